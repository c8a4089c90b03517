"""ARO: the repository's rules (bbox crop, symmetric relations, >= 25 items, perturbations, pre_caption, ties)."""

import json
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from eval_fixtures import ConstantScorer, HashScorer, hash_score, tiny_world
from PIL import Image

from sdsclip.evaluate.aro import (
    PERTURBATIONS,
    SYMMETRIC_RELATIONS,
    AroDataError,
    PosTagger,
    TextShuffler,
    evaluate_aro,
    order_metrics,
    pre_caption,
    vg_attribution_metrics,
    vg_relation_metrics,
)
from sdsclip.synth import (
    COLORS,
    RELATIONS,
    SHAPES,
    conjunctive_caption,
    definite_conjunctive_caption,
    definite_relational_caption,
    relational_caption,
    single_object_caption,
)


@pytest.fixture(scope="module")
def tagger():
    return PosTagger("textblob")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("world"))


def test_pre_caption_is_the_repositorys_normalisation():
    assert (
        pre_caption("A Man  (riding) a wave; on top: of a surf*board!\n")
        == "a man riding a wave on top of a surf board"
    )
    assert pre_caption('"Two" dogs ~ #1.') == "two dogs 1"
    long = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(long) == " ".join(f"w{i}" for i in range(30))
    assert pre_caption("keeps, commas and it's") == "keeps, commas and it's"


def test_tagger_marks_world_colours_as_adjectives_and_shapes_as_nouns(tagger):
    captions = []
    for i, (c1, s1) in enumerate((c, s) for c in COLORS for s in SHAPES):
        c2, s2 = COLORS[(i + 1) % 4], SHAPES[(i + 2) % 3]
        rel = RELATIONS[i % 4]
        captions += [
            relational_caption((c1, s1), rel, (c2, s2)),
            conjunctive_caption((c1, s1), (c2, s2)),
            single_object_caption((c1, s1)),
            definite_relational_caption((c1, s1), rel, (c2, s2)),
            definite_conjunctive_caption((c1, s1), (c2, s2)),
        ]
    for caption in captions:
        for word, tag in tagger.tag(caption):
            if word in COLORS:
                assert tag.startswith("JJ"), (caption, word, tag)
            if word in SHAPES:
                assert tag.startswith("NN"), (caption, word, tag)


def test_perturbations_permute_the_right_words(tagger):
    shuffler = TextShuffler(tagger, seed=3)
    caption = "a red circle to the left of a blue square and a green triangle above a yellow square"
    words = caption.split()
    tags = dict(tagger.tag(caption))
    noun_adj = [i for i, w in enumerate(words) if tags[w][:2] in ("NN", "JJ")]
    for _ in range(5):
        out = shuffler.shuffle_nouns_and_adj(caption).split()
        assert Counter(out) == Counter(words)
        assert all(out[i] == words[i] for i in range(len(words)) if i not in noun_adj)  # only nouns/adjs move
        assert sorted(tags[out[i]][:2] for i in noun_adj) == sorted(tags[words[i]][:2] for i in noun_adj)
        out = shuffler.shuffle_allbut_nouns_and_adj(caption).split()
        assert Counter(out) == Counter(words) and all(out[i] == words[i] for i in noun_adj)
        out = shuffler.shuffle_within_trigrams(caption).split()
        assert [Counter(out[i : i + 3]) for i in range(0, len(out), 3)] == [
            Counter(words[i : i + 3]) for i in range(0, len(words), 3)
        ]
        out = shuffler.shuffle_trigrams(caption).split()
        blocks = [tuple(words[i : i + 3]) for i in range(0, len(words), 3)]
        assert Counter(tuple(out[i : i + 3]) for i in range(0, len(out), 3)) == Counter(blocks)


def test_options_are_pre_captioned_and_seeded(tagger):
    caption = "A red circle to the left of a blue square."
    a = TextShuffler(tagger, seed=0).options(caption)
    assert len(a) == 1 + len(PERTURBATIONS)
    assert a[0] == "a red circle to the left of a blue square"
    assert all(o == pre_caption(o) for o in a)
    assert a == TextShuffler(tagger, seed=0).options(caption)
    many = {TextShuffler(tagger, seed=s).options(caption) for s in range(10)}
    assert len(many) > 1


def _repository_vg_relation(scores, relations):
    """The repository's computation: argmax over [false, true] per item, accuracy per relation, notebook filter."""
    preds = np.argmax(scores, axis=-1)
    correct = preds == 1
    rel = np.array(relations)
    records = [{"Relation": r, "Accuracy": correct[rel == r].mean()} for r in np.unique(rel)]
    df = pd.DataFrame(records)
    return df[~df.Relation.isin(SYMMETRIC_RELATIONS)].Accuracy.mean()


def _repository_vg_attribution(scores, pairs):
    correct = np.argmax(scores, axis=-1) == 1
    attrs = np.array(pairs)
    acc = [correct[attrs == a].mean() for a in np.unique(attrs) if (attrs == a).sum() >= 25]
    return float(np.mean(acc)) if acc else None


def test_vg_metrics_match_the_repository_computation_ties_included():
    rng = np.random.default_rng(0)
    relations = list(rng.choice(["on", "above", "next to", "holding", "behind", "with"], size=300))
    scores = rng.integers(0, 3, size=(300, 2)).astype(float)  # many exact ties
    ours = vg_relation_metrics(torch.tensor(scores), relations)
    assert ours["macro_accuracy"] == pytest.approx(_repository_vg_relation(scores, relations))
    assert set(ours["excluded_symmetric"]) == {"next to", "with"}
    assert ours["n_relations_kept"] == 4
    pairs = list(rng.choice(["red_blue", "blue_red", "green_red", "rare_pair"], p=[0.4, 0.3, 0.28, 0.02], size=300))
    ours = vg_attribution_metrics(torch.tensor(scores), pairs)
    assert ours["macro_accuracy"] == pytest.approx(_repository_vg_attribution(scores, pairs))
    assert ours["n_pairs_kept"] == 3 and ours["by_attribute_pair"]["rare_pair"]["count"] < 25


def test_vg_tie_is_wrong_and_order_tie_is_right():
    tie = torch.tensor([[0.5, 0.5]])
    assert vg_relation_metrics(tie, ["above"])["macro_accuracy"] == 0.0
    order = torch.tensor([[0.5, 0.5, 0.1, 0.2, 0.5], [0.4, 0.5, 0.1, 0.1, 0.1]])
    m = order_metrics(order)
    assert m["precision_at_1"] == 0.5 and m["ties_at_top"] == 1
    # the repository: argmax(scores) == 0
    assert m["precision_at_1"] == float(np.mean(np.argmax(order.numpy(), axis=-1) == 0))


def test_attribution_min_count_and_undefined_macro():
    m = vg_attribution_metrics(torch.tensor([[0.1, 0.9]] * 3), ["a_b", "a_b", "c_d"], min_count=25)
    assert m["macro_accuracy"] is None and m["accuracy"] == 1.0 and m["n_pairs_kept"] == 0
    assert vg_attribution_metrics(torch.tensor([[0.1, 0.9]] * 3), ["a_b"] * 3, min_count=2)["macro_accuracy"] == 1.0


def test_images_are_cropped_to_the_bbox(tmp_path):
    (tmp_path / "images").mkdir()
    im = Image.new("RGB", (40, 30), (0, 0, 0))
    im.paste((255, 0, 0), (10, 5, 30, 25))
    im.save(tmp_path / "images" / "a.png")
    rec = {
        "image_path": "a.png",
        "bbox_x": 10,
        "bbox_y": 5,
        "bbox_w": 20,
        "bbox_h": 20,
        "relation_name": "above",
        "true_caption": "t",
        "false_caption": "f",
    }
    (tmp_path / "visual_genome_relation.json").write_text(json.dumps([rec]))
    seen = []

    class Spy:
        def score(self, images, captions, pairs):
            seen.extend(images)
            return torch.tensor([1.0 if captions[c] == "t" else 0.0 for _, c in pairs])

    m = evaluate_aro(Spy(), tmp_path, tmp_path / "m.json")
    assert seen[0].size == (20, 20) and set(seen[0].getdata()) == {(255, 0, 0)}
    assert m["vg_relation"]["macro_accuracy"] == 1.0


def _reference_order(path, scorer_fn, shuffler):
    """Precision@1 computed item by item, the repository's way, with the same options."""
    correct = []
    for rec in json.loads(path.read_text()):
        image = Image.open(path.parent / "images" / rec["image"]).convert("RGB")
        for caption in rec["caption"]:
            options = shuffler.options(caption)
            correct.append(np.argmax([scorer_fn(image, o) for o in options]) == 0)
    return float(np.mean(correct))


def test_world_end_to_end_with_flickr30k_fixture(world, tmp_path, tagger):
    aro = world / "aro"
    # Flickr30k-Order: the same record format in flickr30k_test.json, its images relative to its own root
    flickr = tmp_path / "flickr"
    (flickr / "flickr30k-images").mkdir(parents=True)
    records = []
    for i, rec in enumerate(json.loads((aro / "coco_karpathy_test.json").read_text())[:2]):
        shutil.copy(aro / "images" / rec["image"], flickr / "flickr30k-images" / f"{i}.jpg.png")
        records.append({"image": f"flickr30k-images/{i}.jpg.png", "caption": rec["caption"][:3]})
    (flickr / "flickr30k_test.json").write_text(json.dumps(records))
    scorer = HashScorer()
    m = evaluate_aro(
        scorer,
        aro,
        tmp_path / "aro.json",
        order_dirs={"flickr30k_order": flickr},
        min_count=1,
        tagger_factory=lambda spec: tagger,
    )
    assert m["datasets"] == ["vg_relation", "vg_attribution", "coco_order", "flickr30k_order"]
    assert json.loads((tmp_path / "aro.json").read_text()) == m
    assert m["vg_relation"]["n"] == 12 and m["vg_attribution"]["n"] == 12
    assert m["coco_order"]["n"] == 3 * 5 and m["coco_order"]["n_images"] == 3
    assert m["flickr30k_order"]["n"] == 6 and m["flickr30k_order"]["n_images"] == 2
    assert m["pos_tagger"].startswith("textblob")
    assert m["coco_order"]["precision_at_1"] == pytest.approx(
        _reference_order(aro / "coco_karpathy_test.json", hash_score, TextShuffler(tagger, 0))
    )
    vg = json.loads((aro / "visual_genome_relation.json").read_text())
    scores = []
    for rec in vg:
        im = Image.open(aro / "images" / rec["image_path"]).convert("RGB")
        box = (rec["bbox_x"], rec["bbox_y"], rec["bbox_x"] + rec["bbox_w"], rec["bbox_y"] + rec["bbox_h"])
        im = im.crop(box)
        scores.append([hash_score(im, rec["false_caption"]), hash_score(im, rec["true_caption"])])
    assert m["vg_relation"]["macro_accuracy"] == pytest.approx(
        _repository_vg_relation(np.array(scores), [r["relation_name"] for r in vg])
    )
    # ties everywhere: VG counts them wrong, the order datasets right
    t = evaluate_aro(ConstantScorer(), aro, tmp_path / "t.json", min_count=1, tagger_factory=lambda spec: tagger)
    assert t["vg_relation"]["accuracy"] == 0.0 and t["coco_order"]["precision_at_1"] == 1.0


def test_max_items_and_dataset_selection(world, tmp_path, tagger):
    m = evaluate_aro(
        HashScorer(),
        world / "aro",
        tmp_path / "m.json",
        ["vg_relation", "coco_order"],
        max_items=5,
        tagger_factory=lambda spec: tagger,
    )
    assert m["datasets"] == ["vg_relation", "coco_order"] and "vg_attribution" not in m
    assert m["vg_relation"]["n"] == 5 and m["coco_order"]["n"] == 5
    with pytest.raises(AroDataError, match="no file for flickr30k_order"):
        evaluate_aro(HashScorer(), world / "aro", tmp_path / "m.json", ["flickr30k_order"])


def test_bad_input_errors_name_the_file(world, tmp_path, tagger):
    aro = tmp_path / "aro"
    shutil.copytree(world / "aro", aro)
    path = aro / "visual_genome_relation.json"
    good = path.read_text()
    path.write_text(good.replace('"relation_name"', '"relation_name" "', 1))
    with pytest.raises(AroDataError, match=r"visual_genome_relation.json:\d+:\d+: not valid JSON"):
        evaluate_aro(HashScorer(), aro, tmp_path / "m.json", ["vg_relation"])
    records = json.loads(good)
    del records[3]["true_caption"]
    path.write_text(json.dumps(records))
    with pytest.raises(AroDataError, match=r"visual_genome_relation.json: record 3: missing field\(s\) true_caption"):
        evaluate_aro(HashScorer(), aro, tmp_path / "m.json", ["vg_relation"])
    path.write_text(good)
    (aro / "images" / json.loads(good)[4]["image_path"]).unlink()
    with pytest.raises(AroDataError, match=r"visual_genome_relation.json: record 4: image '.*' not found"):
        evaluate_aro(HashScorer(), aro, tmp_path / "m.json", ["vg_relation"])
    m = evaluate_aro(HashScorer(), aro, tmp_path / "m.json", ["vg_relation"], on_missing="skip")
    assert m["vg_relation"]["n"] == 11 and m["skipped"]["count"] == 1
    assert "record 4" in m["skipped"]["first"][0]["where"]
    with pytest.raises(AroDataError, match="no ARO file found"):
        evaluate_aro(HashScorer(), tmp_path / "empty", tmp_path / "m.json")


def test_spacy_backend_when_installed(tagger):
    spacy = pytest.importorskip("spacy", reason="spaCy is optional (eval.aro_pos_tagger: spacy:MODEL)")
    try:
        spacy.load("en_core_web_sm")
    except OSError:
        pytest.skip("no en_core_web_sm model installed")
    tags = dict(PosTagger("spacy:en_core_web_sm").tag("a red circle to the left of a blue square"))
    assert tags["red"] == "JJ" and tags["circle"] == "NN"
