"""Zero-shot classification: ImageFolder and CIFAR (torchvision's on-disk layout), prompts, metrics."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import HashScorer, hash_score, tiny_world
from PIL import Image

from sdsclip.evaluate.zeroshot import (
    ZeroShotDataError,
    default_prompts_file,
    evaluate_zeroshot,
    load_prompt_set,
    zeroshot_metrics,
)
from sdsclip.synth import CLASS_NAMES, COLOR_RGB


def test_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(200, 7)))
    targets = torch.tensor(rng.integers(0, 7, size=200))
    targets[targets == 6] = 5  # class 6 has no image: left out of the per-class mean, as sklearn does
    m = zeroshot_metrics(logits, targets, [f"c{i}" for i in range(7)])
    pred = logits.argmax(1).numpy()
    assert m["acc1"] == pytest.approx(sk.accuracy_score(targets.numpy(), pred))
    assert m["acc5"] == pytest.approx(sk.top_k_accuracy_score(targets.numpy(), logits.numpy(), k=5, labels=range(7)))
    with pytest.warns(UserWarning):  # sklearn warns about the class with predictions but no images
        balanced = sk.balanced_accuracy_score(targets.numpy(), pred)
    assert m["mean_per_class_recall"] == pytest.approx(balanced)
    assert set(m["per_class_recall"]) == {f"c{i}" for i in range(6)}


class ColourScorer:
    """A CLIP-like scorer for the world: image embedding = one-hot of its nearest nominal colour; a prompt's
    embedding = one-hot of the colour word it names plus a template-dependent component."""

    name = "colour"
    colours = list(COLOR_RGB)

    def embed_images(self, images):
        out = []
        for im in images:
            px = [p for p in im.getdata() if p != (0, 0, 0)]
            mean = np.mean(px, axis=0)
            k = int(np.argmin([np.sum((mean - np.array(c)) ** 2) for c in COLOR_RGB.values()]))
            out.append(F.one_hot(torch.tensor(k), 5).float())
        return F.normalize(torch.stack(out), dim=-1)

    def embed_texts(self, texts):
        out = []
        for t in texts:
            v = torch.zeros(5)
            v[[i for i, c in enumerate(self.colours) if c in t.split()][0]] = 1.0
            v[4] = 0.5 if t.startswith("a ") else -0.25
            out.append(v)
        return F.normalize(torch.stack(out), dim=-1)


def test_imagefolder_world_and_prompt_ensembling(tmp_path):
    world = tiny_world(tmp_path / "w", zeroshot_per_class=3)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"two": {"templates": ["a {c}", "the {c}"]}}))
    m = evaluate_zeroshot(
        ColourScorer(), world / "zeroshot", tmp_path / "m.json", prompt_set="two", prompts_file=prompts
    )
    assert json.loads((tmp_path / "m.json").read_text()) == m
    assert (m["format"], m["n"], m["n_classes"], m["templates"]) == ("imagefolder", 36, 12, 2)
    # colour is always right, shape is a 3-way tie broken by topk: acc@1 = 1/3, acc@5 >= colour's 3 classes
    assert m["acc1"] == pytest.approx(1 / 3) and m["acc5"] == 1.0
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)
    assert set(m["per_class_recall"]) == set(CLASS_NAMES)


def test_generic_scorer_averages_over_templates(tmp_path):
    world = tiny_world(tmp_path / "w", zeroshot_per_class=1)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"s": {"templates": ["a {c}", "{c} here"]}}))
    m = evaluate_zeroshot(HashScorer(), world / "zeroshot", tmp_path / "m.json", prompt_set="s", prompts_file=prompts)
    classes = sorted(p.name for p in (world / "zeroshot").iterdir())
    correct = []
    for label, name in enumerate(classes):
        im = Image.open(next((world / "zeroshot" / name).iterdir())).convert("RGB")
        logits = [np.mean([hash_score(im, t.format(c=c)) for t in ("a {c}", "{c} here")]) for c in classes]
        correct.append(int(np.argmax(logits)) == label)
    assert m["acc1"] == pytest.approx(np.mean(correct))


def _cifar_images(labels):
    rgb = [tuple(int(x) for x in v) for v in COLOR_RGB.values()]
    return np.stack([np.full((32, 32, 3), rgb[y % 4], dtype=np.uint8) for y in labels])


def _write_cifar(root, kind, labels, names):
    folder, batch, meta, key, label_key = {
        "cifar10": ("cifar-10-batches-py", "test_batch", "batches.meta", "label_names", "labels"),
        "cifar100": ("cifar-100-python", "test", "meta", "fine_label_names", "fine_labels"),
    }[kind]
    (root / folder).mkdir(parents=True)
    data = _cifar_images(labels).transpose(0, 3, 1, 2).reshape(len(labels), -1)  # torchvision's CHW rows
    with open(root / folder / batch, "wb") as f:
        pickle.dump({"data": data, label_key: list(labels)}, f)
    with open(root / folder / meta, "wb") as f:
        pickle.dump({key: names}, f)


class CifarColourScorer(ColourScorer):
    colours = list(COLOR_RGB)

    def embed_texts(self, texts):  # class name "red_thing k" -> its colour
        return super().embed_texts([t.replace("_", " ") for t in texts])


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_on_disk_layout_through_torchvision(tmp_path, kind):
    names = ["red_thing", "green_thing", "blue_thing", "yellow_thing"]
    labels = [0, 1, 2, 3, 0, 1, 2, 3, 2, 2]
    _write_cifar(tmp_path, kind, labels, names)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({kind: {"templates": ["a photo of a {c}."]}}))
    m = evaluate_zeroshot(CifarColourScorer(), tmp_path, tmp_path / "m.json", prompts_file=prompts)
    assert m["format"] == kind and m["prompt_set"] == kind
    assert (m["n"], m["n_classes"], m["acc1"], m["mean_per_class_recall"]) == (10, 4, 1.0, 1.0)
    assert m["official_md5"] is False  # read without the official archive's md5
    assert set(m["per_class_recall"]) == {"red thing", "green thing", "blue thing", "yellow thing"}


def test_packaged_prompts_have_the_clip_cifar_templates():
    for key in ("cifar10", "cifar100", "imagefolder", "toyworld"):
        assert load_prompt_set(key)["templates"]
    assert len(load_prompt_set("cifar10")["templates"]) == 18
    assert default_prompts_file().is_file()


def test_bad_input(tmp_path):
    world = tiny_world(tmp_path / "w", zeroshot_per_class=1)
    root = world / "zeroshot"
    (root / "purple circle").mkdir()
    with pytest.raises(ZeroShotDataError, match=r"zeroshot/purple circle: class folder has no images"):
        evaluate_zeroshot(HashScorer(), root, tmp_path / "m.json", prompt_set="toyworld")
    (root / "purple circle").rmdir()
    with pytest.raises(ZeroShotDataError, match=r"no prompt set 'nope'"):
        evaluate_zeroshot(HashScorer(), root, tmp_path / "m.json", prompt_set="nope")
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": {"templates": ["a {c}"]},\n oops}')
    with pytest.raises(ZeroShotDataError, match=r"bad.json:2:2: not valid JSON"):
        evaluate_zeroshot(HashScorer(), root, tmp_path / "m.json", prompt_set="x", prompts_file=bad)
    victim = next((root / "red circle").iterdir())
    victim.write_bytes(b"not a png")
    with pytest.raises(ZeroShotDataError, match=r"red circle/.*unreadable image"):
        evaluate_zeroshot(HashScorer(), root, tmp_path / "m.json", prompt_set="toyworld")
    m = evaluate_zeroshot(HashScorer(), root, tmp_path / "m.json", prompt_set="toyworld", on_missing="skip")
    assert m["n"] == 11 and m["skipped"]["count"] == 1
    (tmp_path / "c" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(ZeroShotDataError, match=r"cifar-10-batches-py: missing test_batch, batches.meta"):
        evaluate_zeroshot(HashScorer(), tmp_path / "c", tmp_path / "m.json")
