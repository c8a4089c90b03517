"""Tests of the toy-world generator against the data contract (../shared/toyworld.md).

The geometry checks do not trust the generator's own bookkeeping: objects are re-detected from the rendered
PNG pixels (connected components of non-black pixels) and every caption is re-evaluated against them with the
contract's thresholds, implemented here independently of ``sdsclip.synth``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdsclip.config import WorldConfig
from sdsclip.synth import (
    CLASS_NAMES,
    COLORS,
    RELATIONS,
    SHAPES,
    generate_world,
    render,
    sample_two_object_scene,
    world_vocabulary,
)

# Contract constants, restated on purpose (not imported) so a drift in the module fails the tests.
NOMINAL_RGB = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (50, 90, 235), "yellow": (235, 220, 40)}
MAX_JITTER = 20
CONVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}

SEED = 7
SMALL_WORLD = WorldConfig(
    image_size=32,
    color_jitter=20,
    # Equal split sizes: if both splits shared one RNG stream they would be identical (test_coco_format).
    pretrain_images=20,
    train_images=20,
    captions_per_image=5,
    single_object_fraction=0.25,
    winoground_items=12,
    aro_relation_items=10,
    aro_attribution_items=10,
    coco_order_images=6,
    zeroshot_per_class=2,
)

_COLOR = "(" + "|".join(NOMINAL_RGB) + ")"
_SHAPE = "(circle|square|triangle)"
_REL = "(to the left of|to the right of|above|below)"
RELATIONAL_RE = re.compile(rf"^a {_COLOR} {_SHAPE} {_REL} a {_COLOR} {_SHAPE}$")
CONJUNCTIVE_RE = re.compile(rf"^a {_COLOR} {_SHAPE} and a {_COLOR} {_SHAPE}$")
SINGLE_RE = re.compile(rf"^a {_COLOR} {_SHAPE}$")
DEFINITE_RELATIONAL_RE = re.compile(rf"^the {_COLOR} {_SHAPE} is {_REL} the {_COLOR} {_SHAPE}$")
DEFINITE_CONJUNCTIVE_RE = re.compile(rf"^the {_COLOR} {_SHAPE} and the {_COLOR} {_SHAPE}$")


# ---------------------------------------------------------------------------------------------------------------
# Independent object detector
# ---------------------------------------------------------------------------------------------------------------


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components; scipy when installed, else a plain flood fill."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - depends on the environment
        labels = np.zeros(mask.shape, dtype=np.int32)
        count = 0
        for start in zip(*np.nonzero(mask)):
            if labels[start]:
                continue
            count += 1
            labels[start] = count
            stack = [start]
            while stack:
                y, x = stack.pop()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = count
                            stack.append((ny, nx))
        return labels, count
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    return labels, int(count)


@dataclass(frozen=True)
class Detected:
    color: str
    shape: str
    cx: float  # bounding-box centre, continuous image coordinates (pixel i covers [i, i+1))
    cy: float
    half_side: float
    box: tuple[int, int, int, int]  # inclusive x0, y0, x1, y1

    @property
    def identity(self) -> tuple[str, str]:
        return (self.color, self.shape)


def detect(image: Image.Image) -> list[Detected]:
    pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    labels, count = _label_components(pixels.max(axis=2) > 0)
    found = []
    for index in range(1, count + 1):
        ys, xs = np.nonzero(labels == index)
        colours = np.unique(pixels[ys, xs], axis=0)
        assert len(colours) == 1, f"object is not one flat colour: {colours.tolist()}"
        rgb = colours[0]
        color = min(NOMINAL_RGB, key=lambda name: np.abs(rgb - NOMINAL_RGB[name]).sum())
        assert np.abs(rgb - NOMINAL_RGB[color]).max() <= MAX_JITTER, f"{rgb.tolist()} is outside {color}'s jitter"
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        width, height = x1 - x0 + 1, y1 - y0 + 1
        assert width == height, f"bounding box not square: {width}x{height}"
        component = labels[y0 : y1 + 1, x0 : x1 + 1] == index
        row_counts = component.sum(axis=1)
        if component.all():
            shape = "square"
        elif row_counts[0] < row_counts[-1]:  # apex up, base at the bottom
            shape = "triangle"
        else:
            assert (row_counts == row_counts[::-1]).all(), "neither square, triangle nor circle"
            shape = "circle"
        found.append(Detected(color, shape, (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2, width / 2, (x0, y0, x1, y1)))
    return found


def relation_true(a: Detected, relation: str, b: Detected, canvas: int) -> bool:
    """The contract's thresholds, restated independently of the module."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "to the left of":
        return dx >= canvas / 4 and abs(dy) <= canvas / 6
    if relation == "to the right of":
        return -dx >= canvas / 4 and abs(dy) <= canvas / 6
    if relation == "above":
        return dy >= canvas / 4 and abs(dx) <= canvas / 6
    if relation == "below":
        return -dy >= canvas / 4 and abs(dx) <= canvas / 6
    raise AssertionError(relation)


def _find(objects: list[Detected], identity: tuple[str, str]) -> Detected | None:
    matches = [o for o in objects if o.identity == identity]
    assert len(matches) <= 1, f"two objects with identity {identity}"
    return matches[0] if matches else None


def caption_true(caption: str, objects: list[Detected], canvas: int) -> bool:
    """Truth of any caption form of the world (indefinite or definite) in a detected scene."""
    for pattern in (RELATIONAL_RE, DEFINITE_RELATIONAL_RE):
        if m := pattern.match(caption):
            a, b = _find(objects, (m[1], m[2])), _find(objects, (m[4], m[5]))
            return a is not None and b is not None and relation_true(a, m[3], b, canvas)
    for pattern in (CONJUNCTIVE_RE, DEFINITE_CONJUNCTIVE_RE):
        if m := pattern.match(caption):
            return _find(objects, (m[1], m[2])) is not None and _find(objects, (m[3], m[4])) is not None
    if m := SINGLE_RE.match(caption):
        return _find(objects, (m[1], m[2])) is not None
    raise AssertionError(f"caption outside the grammar: {caption!r}")


def check_scene_geometry(objects: list[Detected], canvas: int) -> None:
    """Sizes, containment and non-overlap of re-detected objects."""
    assert 1 <= len(objects) <= 2, f"{len(objects)} objects"
    for obj in objects:
        assert canvas / 12 <= obj.half_side <= canvas / 6, f"radius {obj.half_side} outside [S/12, S/6]"
        assert obj.cx - obj.half_side >= 0 and obj.cx + obj.half_side <= canvas
        assert obj.cy - obj.half_side >= 0 and obj.cy + obj.half_side <= canvas
    if len(objects) == 2:
        a, b = objects
        assert a.identity != b.identity, "two objects share colour and shape"
        boxes_disjoint = a.box[2] < b.box[0] or b.box[2] < a.box[0] or a.box[3] < b.box[1] or b.box[3] < a.box[1]
        assert boxes_disjoint


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    counts = generate_world(SMALL_WORLD, out, SEED)
    (out / "_counts.json").write_text(json.dumps(counts))
    return out


def _load_counts(world_dir: Path) -> dict[str, int]:
    return json.loads((world_dir / "_counts.json").read_text())


def _load_coco(world_dir: Path, split: str) -> dict:
    return json.loads((world_dir / "coco" / "annotations" / f"captions_{split}.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------


def test_vocabulary_constants() -> None:
    assert set(COLORS) == set(NOMINAL_RGB) and len(COLORS) == 4
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert set(RELATIONS) == set(CONVERSE)
    assert len(CLASS_NAMES) == 12 and len(set(CLASS_NAMES)) == 12
    vocabulary = world_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    required = {"a", "the", "and", "is", "to", "of", "left", "right", "above", "below", *COLORS, *SHAPES}
    assert set(vocabulary) == required


# ---------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------


def test_coco_format(world_dir: Path) -> None:
    image_ids, annotation_ids, image_bytes = set(), set(), {}
    for split, expected in (("pretrain", SMALL_WORLD.pretrain_images), ("train", SMALL_WORLD.train_images)):
        coco = _load_coco(world_dir, split)
        assert list(coco) == ["info", "images", "annotations", "licenses"]
        assert isinstance(coco["info"], dict) and isinstance(coco["licenses"], list) and coco["licenses"]
        assert len(coco["images"]) == expected
        for record in coco["images"]:
            assert set(record) == {
                "id",
                "width",
                "height",
                "file_name",
                "license",
                "flickr_url",
                "coco_url",
                "date_captured",
            }
            assert isinstance(record["id"], int) and record["id"] not in image_ids
            image_ids.add(record["id"])
            assert record["file_name"] == f"{record['id']:012d}.png"
            path = world_dir / "coco" / "images" / split / record["file_name"]
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == "RGB"
                assert image.size == (record["width"], record["height"]) == (32, 32)
            image_bytes[(split, record["id"])] = path.read_bytes()
        per_image = Counter()
        for annotation in coco["annotations"]:
            assert set(annotation) == {"id", "image_id", "caption"}
            assert isinstance(annotation["id"], int) and annotation["id"] not in annotation_ids
            annotation_ids.add(annotation["id"])
            assert isinstance(annotation["caption"], str) and annotation["caption"]
            per_image[annotation["image_id"]] += 1
        assert set(per_image) == {r["id"] for r in coco["images"]}
        assert set(per_image.values()) == {SMALL_WORLD.captions_per_image}
        on_disk = sorted(p.name for p in (world_dir / "coco" / "images" / split).iterdir())
        assert on_disk == sorted(r["file_name"] for r in coco["images"])
    # Different RNG streams: no image of the pretraining split reappears in the fine-tuning split.
    pretrain = {b for (s, _), b in image_bytes.items() if s == "pretrain"}
    train = {b for (s, _), b in image_bytes.items() if s == "train"}
    assert not pretrain & train


def test_coco_captions_are_true_of_their_images(world_dir: Path) -> None:
    counts = _load_counts(world_dir)
    for split in ("pretrain", "train"):
        coco = _load_coco(world_dir, split)
        captions: dict[int, list[str]] = {}
        for annotation in coco["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
        singles = 0
        for record in coco["images"]:
            objects = detect(Image.open(world_dir / "coco" / "images" / split / record["file_name"]))
            check_scene_geometry(objects, 32)
            texts = captions[record["id"]]
            for caption in texts:
                assert caption_true(caption, objects, 32), (record["file_name"], caption, objects)
            if len(objects) == 1:
                singles += 1
                assert all(SINGLE_RE.match(t) for t in texts)
                continue
            relational = [RELATIONAL_RE.match(t) for t in texts if RELATIONAL_RE.match(t)]
            conjunctive = [t for t in texts if CONJUNCTIVE_RE.match(t)]
            assert conjunctive, texts
            # Both the relation and its converse are present, and swapping the arguments makes them false.
            assert len({m[3] for m in relational}) == 2, texts
            for m in relational:
                assert m[3] == CONVERSE[[r[3] for r in relational if r[3] != m[3]][0]]
                swapped = f"a {m[4]} {m[5]} {m[3]} a {m[1]} {m[2]}"
                assert not caption_true(swapped, objects, 32), (record["file_name"], swapped)
        assert singles == round(SMALL_WORLD.single_object_fraction * len(coco["images"]))
        assert counts[f"{split}_single_object_images"] == singles


# ---------------------------------------------------------------------------------------------------------------
# Winoground
# ---------------------------------------------------------------------------------------------------------------


def test_winoground(world_dir: Path) -> None:
    lines = (world_dir / "winoground" / "examples.jsonl").read_text().splitlines()
    assert len(lines) == SMALL_WORLD.winoground_items
    tags = Counter()
    for line in lines:
        item = json.loads(line)
        assert set(item) == {
            "id",
            "caption_0",
            "caption_1",
            "image_0",
            "image_1",
            "tag",
            "secondary_tag",
            "num_main_preds",
            "collapsed_tag",
        }
        assert isinstance(item["id"], int) and isinstance(item["num_main_preds"], int)
        assert isinstance(item["secondary_tag"], str)
        tags[(item["tag"], item["collapsed_tag"])] += 1
        assert Counter(item["caption_0"].split()) == Counter(item["caption_1"].split())
        assert item["caption_0"] != item["caption_1"]
        m0, m1 = RELATIONAL_RE.match(item["caption_0"]), RELATIONAL_RE.match(item["caption_1"])
        assert m0 and m1 and m0[3] == m1[3]
        if item["tag"] == "Attribute-Color":  # nouns stay, adjectives swap
            assert (m1[1], m1[2], m1[4], m1[5]) == (m0[4], m0[2], m0[1], m0[5])
        else:  # noun phrases swap
            assert (m1[1], m1[2], m1[4], m1[5]) == (m0[4], m0[5], m0[1], m0[2])
        scenes = []
        for k in (0, 1):
            assert item[f"image_{k}"] == f"ex_{item['id']}_img_{k}"
            scenes.append(detect(Image.open(world_dir / "winoground" / "images" / f"{item[f'image_{k}']}.png")))
            check_scene_geometry(scenes[k], 32)
            assert len(scenes[k]) == 2
        for k in (0, 1):
            assert caption_true(item[f"caption_{k}"], scenes[k], 32), (item, k)
            assert not caption_true(item[f"caption_{k}"], scenes[1 - k], 32), (item, k)
    n = SMALL_WORLD.winoground_items
    assert tags == {("Attribute-Color", "Relation"): n - n // 2, ("Object-Swap", "Object"): n // 2}


# ---------------------------------------------------------------------------------------------------------------
# ARO
# ---------------------------------------------------------------------------------------------------------------


def _check_bbox(record: dict, canvas: int) -> None:
    for key in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"):
        assert isinstance(record[key], int)
    assert record["bbox_x"] >= 0 and record["bbox_y"] >= 0 and record["bbox_w"] > 0 and record["bbox_h"] > 0
    assert record["bbox_x"] + record["bbox_w"] <= canvas and record["bbox_y"] + record["bbox_h"] <= canvas


def _aro_objects(world_dir: Path, record: dict, key: str = "image_path") -> list[Detected]:
    image = Image.open(world_dir / "aro" / "images" / record[key])
    if "bbox_x" in record:  # score what ARO's loader sees: the crop to the box
        box = (
            record["bbox_x"],
            record["bbox_y"],
            record["bbox_x"] + record["bbox_w"],
            record["bbox_y"] + record["bbox_h"],
        )
        assert image.crop(box).size == image.size  # whole canvas, see synth._whole_canvas_bbox
    objects = detect(image)
    check_scene_geometry(objects, 32)
    return objects


def test_aro_relation(world_dir: Path) -> None:
    records = json.loads((world_dir / "aro" / "visual_genome_relation.json").read_text())
    assert len(records) == SMALL_WORLD.aro_relation_items
    for record in records:
        assert set(record) == {
            "image_path",
            "bbox_x",
            "bbox_y",
            "bbox_w",
            "bbox_h",
            "relation_name",
            "true_caption",
            "false_caption",
        }
        _check_bbox(record, 32)
        assert record["relation_name"] in RELATIONS
        true_m = DEFINITE_RELATIONAL_RE.match(record["true_caption"])
        false_m = DEFINITE_RELATIONAL_RE.match(record["false_caption"])
        assert true_m and false_m and true_m[3] == false_m[3] == record["relation_name"]
        assert (false_m[1], false_m[2], false_m[4], false_m[5]) == (true_m[4], true_m[5], true_m[1], true_m[2])
        objects = _aro_objects(world_dir, record)
        assert caption_true(record["true_caption"], objects, 32)
        assert not caption_true(record["false_caption"], objects, 32)


def test_aro_attribution(world_dir: Path) -> None:
    records = json.loads((world_dir / "aro" / "visual_genome_attribution.json").read_text())
    assert len(records) == SMALL_WORLD.aro_attribution_items
    for record in records:
        assert set(record) == {
            "image_path",
            "bbox_x",
            "bbox_y",
            "bbox_w",
            "bbox_h",
            "attributes",
            "true_caption",
            "false_caption",
        }
        _check_bbox(record, 32)
        true_m = DEFINITE_CONJUNCTIVE_RE.match(record["true_caption"])
        false_m = DEFINITE_CONJUNCTIVE_RE.match(record["false_caption"])
        assert true_m and false_m
        assert record["attributes"] == [true_m[1], true_m[3]] and true_m[1] != true_m[3]
        assert (false_m[1], false_m[2], false_m[3], false_m[4]) == (true_m[3], true_m[2], true_m[1], true_m[4])
        objects = _aro_objects(world_dir, record)
        assert caption_true(record["true_caption"], objects, 32)
        assert not caption_true(record["false_caption"], objects, 32)


def test_aro_coco_order(world_dir: Path) -> None:
    records = json.loads((world_dir / "aro" / "coco_karpathy_test.json").read_text())
    assert len(records) == SMALL_WORLD.coco_order_images
    for record in records:
        assert set(record) == {"image", "caption"}
        assert isinstance(record["caption"], list) and len(record["caption"]) == SMALL_WORLD.captions_per_image
        objects = _aro_objects(world_dir, record, key="image")
        for caption in record["caption"]:
            assert caption_true(caption, objects, 32), (record, caption)


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot, summary
# ---------------------------------------------------------------------------------------------------------------


def test_zeroshot(world_dir: Path) -> None:
    root = world_dir / "zeroshot"
    class_dirs = sorted(p for p in root.iterdir())
    assert [p.name for p in class_dirs] == sorted(f"{c} {s}" for c in NOMINAL_RGB for s in SHAPES)
    for class_dir in class_dirs:
        files = sorted(class_dir.iterdir())
        assert [f.name for f in files] == [f"{i:05d}.png" for i in range(SMALL_WORLD.zeroshot_per_class)]
        for file in files:
            objects = detect(Image.open(file))
            check_scene_geometry(objects, 32)
            assert [f"{o.color} {o.shape}" for o in objects] == [class_dir.name]


def test_world_json_and_counts(world_dir: Path) -> None:
    summary = json.loads((world_dir / "world.json").read_text())
    counts = _load_counts(world_dir)
    assert summary["seed"] == SEED and summary["image_size"] == 32
    assert summary["counts"] == counts
    assert counts["pretrain_images"] == SMALL_WORLD.pretrain_images
    assert counts["train_images"] == SMALL_WORLD.train_images
    assert counts["winoground_items"] == SMALL_WORLD.winoground_items
    assert counts["zeroshot_images"] == 12 * SMALL_WORLD.zeroshot_per_class
    # Every word of every caption in every format is in the published vocabulary.
    vocabulary = set(world_vocabulary())
    texts = [a["caption"] for s in ("pretrain", "train") for a in _load_coco(world_dir, s)["annotations"]]
    for line in (world_dir / "winoground" / "examples.jsonl").read_text().splitlines():
        item = json.loads(line)
        texts += [item["caption_0"], item["caption_1"]]
    for name in ("visual_genome_relation.json", "visual_genome_attribution.json"):
        for record in json.loads((world_dir / "aro" / name).read_text()):
            texts += [record["true_caption"], record["false_caption"]]
    for record in json.loads((world_dir / "aro" / "coco_karpathy_test.json").read_text()):
        texts += record["caption"]
    used = {word for text in texts for word in text.split()}
    assert used <= vocabulary
    assert {"the", "is", "and", "left", "right"} <= used  # the formats above really exercise the vocabulary


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------

TINY_WORLD = WorldConfig(
    image_size=32,
    pretrain_images=6,
    train_images=4,
    winoground_items=2,
    aro_relation_items=2,
    aro_attribution_items=2,
    coco_order_images=2,
    zeroshot_per_class=1,
    single_object_fraction=0.5,
)


def test_same_seed_same_bytes_and_rerun_replaces_tree(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    generate_world(TINY_WORLD, first, 3)
    generate_world(TINY_WORLD, second, 3)
    assert tree_digest(first) == tree_digest(second)
    # A rerun over an existing tree (with stale files from a bigger run) ends in the same tree.
    stale = second / "coco" / "images" / "train" / "000000999999.png"
    stale.write_bytes(b"stale")
    (second / ".aro.partial").mkdir()
    generate_world(TINY_WORLD, second, 3)
    assert not stale.exists()
    assert tree_digest(first) == tree_digest(second)


def test_bytes_do_not_depend_on_the_process(tmp_path: Path) -> None:
    """Another interpreter (other hash salt) writes the same bytes: nothing may depend on Python's hash()."""
    generate_world(TINY_WORLD, tmp_path / "here", 3)
    script = (
        "import sys; from pathlib import Path; from sdsclip.config import WorldConfig; "
        "from sdsclip.synth import generate_world; "
        "generate_world(WorldConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]), 3)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-c", script, TINY_WORLD.model_dump_json(), str(tmp_path / "there")], check=True, env=env
    )
    assert tree_digest(tmp_path / "here") == tree_digest(tmp_path / "there")


def test_different_seed_different_images(tmp_path: Path) -> None:
    generate_world(TINY_WORLD, tmp_path / "a", 3)
    generate_world(TINY_WORLD, tmp_path / "b", 4)
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "b")
    for family in ("coco/images/train", "winoground/images", "aro/images/relation", "zeroshot/red circle"):
        a_bytes = {p.read_bytes() for p in (tmp_path / "a" / family).iterdir()}
        b_bytes = {p.read_bytes() for p in (tmp_path / "b" / family).iterdir()}
        assert a_bytes != b_bytes, family


# ---------------------------------------------------------------------------------------------------------------
# Geometry over canvas sizes, speed
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("canvas", [16, 32, 50, 64, 128])
def test_relation_geometry_all_sizes(canvas: int) -> None:
    rng = np.random.Generator(np.random.PCG64(canvas))
    identities = [(c, s) for c in COLORS for s in SHAPES]
    for trial in range(60):
        relation = RELATIONS[trial % 4]
        i, j = rng.choice(len(identities), size=2, replace=False)
        a, b = identities[i], identities[j]
        objects = detect(render(sample_two_object_scene(rng, canvas, 20, a, relation, b), canvas))
        check_scene_geometry(objects, canvas)
        assert len(objects) == 2
        found_a, found_b = _find(objects, a), _find(objects, b)
        assert found_a and found_b
        assert relation_true(found_a, relation, found_b, canvas)
        assert relation_true(found_b, CONVERSE[relation], found_a, canvas)
        for other in RELATIONS:  # the relations are mutually exclusive in a generated scene
            if other != relation:
                assert not relation_true(found_a, other, found_b, canvas)
