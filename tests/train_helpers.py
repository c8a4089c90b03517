"""Small on-disk fixtures for the training tests: shards + accepted.csv, a tiny student and teacher, params.

Written directly (webdataset TarWriter), not through ingest/validate, so these tests only depend on the
shard layout the training reader consumes: ``shard-*.tar`` with ``{key}.png`` + ``{key}.json`` (captions).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
import yaml
from PIL import Image
from tiny_params import ROOT, merge

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "triangle")


def make_dataset(
    root: Path, n_images: int = 8, captions_per_image: int = 5, side: int = 32, shard_size: int = 3
) -> tuple[Path, Path]:
    """(shards dir, accepted.csv): ``n_images`` two-colour images, each with ``captions_per_image`` captions."""
    import webdataset as wds

    shards = Path(root) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    rows = []
    writer = None
    for i in range(n_images):
        if i % shard_size == 0:
            if writer:
                writer.close()
            writer = wds.TarWriter(str(shards / f"shard-{i // shard_size:06d}.tar"))
        a, b = names[i % 4], names[(i // 4 + i + 1) % 4]
        s1, s2 = SHAPES[i % 3], SHAPES[(i + 1) % 3]
        im = Image.new("RGB", (side, side), COLOURS[a])
        im.paste(COLOURS[b], (side // 2, 0, side, side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        caps = [
            {
                "id": i * 10 + k,
                "caption": f"a {a} {s1} {['left of', 'right of', 'above', 'below', 'and'][k % 5]} a {b} {s2}",
            }
            for k in range(captions_per_image)
        ]
        key = f"{i:012d}"
        writer.write({"__key__": key, "png": buf.getvalue(), "json": json.dumps({"captions": caps}).encode()})
        rows += [{"annotation_id": c["id"], "caption": c["caption"]} for c in caps]
    writer.close()
    accepted = Path(root) / "accepted.csv"
    with accepted.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["annotation_id", "caption"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return shards, accepted


def vocabulary() -> list[str]:
    words = {"a", "left", "right", "of", "above", "below", "and", *COLOURS, *SHAPES}
    return sorted(words)


TINY_TEACHER = {
    "image_size": 32,
    "tiny": {
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "text_width": 32,
        "text_layers": 1,
        "text_heads": 2,
        "max_caption_tokens": 12,
        "train_timesteps": 1000,
    },
}


def make_models(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(student dir, teacher dir): a random tiny open_clip student and a random tiny diffusers teacher."""
    from sdsclip.config import TeacherConfig
    from sdsclip.models.student import build_student, save_student
    from sdsclip.models.teacher import build_tiny_teacher, save_teacher

    torch.manual_seed(seed)
    student_dir, teacher_dir = Path(root) / "student", Path(root) / "teacher"
    save_student(build_student("sdsclip-tiny-vit"), student_dir, {"source": "test"})
    save_teacher(
        build_tiny_teacher(TeacherConfig(**TINY_TEACHER), vocabulary()).freeze(), teacher_dir, {"source": "test"}
    )
    return student_dir, teacher_dir


def train_params(tmp: Path, **train) -> dict:
    """The shipped params.yaml with a tiny, CPU-only train section (MLflow in ``tmp``)."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    return merge(
        shipped,
        {
            "device": "cpu",
            "teacher": TINY_TEACHER,
            "train": {
                "steps": 6,
                "batch_size": 8,
                "warmup_steps": 1,
                "checkpoint_every": 0,
                "log_mlflow": False,
                **train,
            },
            "registry": {"tracking_uri": f"sqlite:///{Path(tmp) / 'mlflow.db'}", "experiment": "test"},
        },
    )


def write_params(path: Path, raw: dict) -> Path:
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    return Path(path)
