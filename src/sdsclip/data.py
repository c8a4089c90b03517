"""Training-side reader: validated WebDataset shards -> shuffled batches of (images, captions).

Only the annotation ids listed in validate's ``accepted.csv`` are used. One shard sample (an image with all of
its captions) expands into one (image, caption) pair per accepted caption. The stream is infinite: epoch ``e``
re-reads every shard with a shuffle seeded by ``(seed, e)``, so a seed fixes the whole sequence of batches.

Pipeline per epoch (all ``webdataset`` stages):
    WebDataset(shards in a seed-shuffled order) -> shuffle(images, raw bytes) -> expand to accepted pairs
    -> shuffle(pairs) [-> bag-distinct reorder] -> decode("pil") -> (transform(RGB image), caption) -> batched(partial=False)

Shuffling happens before decoding so the buffers hold compressed bytes, not pixels. With ``num_workers > 0``
shards are split over DataLoader workers (each worker drops its own partial batch) and batches arrive in a
fixed round-robin order, so the stream is still deterministic for a seed.

Data parallelism: every process of a multi-process run reads the same stream (same seed, no node splitting) of
GLOBAL batches of ``batch_size`` pairs and keeps its own contiguous slice ``rank * b : (rank + 1) * b`` with
``b = batch_size // world_size``, cut before decoding (a rank decodes only its own images). So W processes
see exactly the batch one process would, split W ways.

Position: ``batches(start_epoch, start_batch)`` resumes a stream mid-epoch by dropping the first ``start_batch``
global batches of that epoch still compressed (no decode), so a resumed run reads the same pairs as an
uninterrupted one.
"""

from __future__ import annotations

from sdsclip.errors import UserError
import csv
import json
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

SHARD_GLOB = "shard-*.tar"


class DataError(UserError):
    """Training data that cannot be used; the message is one line naming the file or directory."""


def load_accepted_ids(accepted_csv: Path) -> set[int]:
    """Annotation ids of validate's accepted.csv."""
    accepted_csv = Path(accepted_csv)
    if not accepted_csv.is_file():
        raise DataError(f"{accepted_csv}: accepted list not found (run the validate stage first)")
    ids: set[int] = set()
    with accepted_csv.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "annotation_id" not in reader.fieldnames:
            raise DataError(f"{accepted_csv}: no 'annotation_id' column (expected validate's accepted.csv)")
        for line, row in enumerate(reader, start=2):
            try:
                ids.add(int(row["annotation_id"]))
            except (TypeError, ValueError):
                raise DataError(f"{accepted_csv}: line {line}: annotation_id {row['annotation_id']!r} is not an "
                                "integer") from None
    return ids


def shard_paths(shards_dir: Path) -> list[Path]:
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise DataError(f"{shards_dir}: shard directory not found (run the ingest stage first)")
    shards = sorted(shards_dir.glob(SHARD_GLOB))
    if not shards:
        raise DataError(f"{shards_dir}: no {SHARD_GLOB} files (empty dataset; did ingest write any image?)")
    return shards


def _captions_of(meta: Any) -> list[dict[str, Any]]:
    caps = meta.get("captions") if isinstance(meta, dict) else None
    return caps if isinstance(caps, list) else []


def count_pairs(shards_dir: Path, accepted_csv: Path | None = None) -> int:
    """Number of (image, caption) pairs in the shards, only accepted annotation ids if accepted_csv is given.

    Reads only the ``.json`` members (tar headers of the images are skipped, not read).
    """
    accepted = load_accepted_ids(accepted_csv) if accepted_csv is not None else None
    n = 0
    for shard in shard_paths(shards_dir):
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".json"):
                        continue
                    fh = tar.extractfile(member)
                    meta = json.loads(fh.read()) if fh is not None else {}
                    n += sum(1 for c in _captions_of(meta)
                             if accepted is None or (isinstance(c, dict) and c.get("id") in accepted))
        except (tarfile.TarError, json.JSONDecodeError, OSError) as err:
            raise DataError(f"{shard}: unreadable shard ({' '.join(str(err).split())}); re-run ingest") from None
    return n


def _expand_pairs(samples: Iterator[dict[str, Any]], accepted: frozenset[int]) -> Iterator[dict[str, Any]]:
    """One shard sample (image + all captions) -> one sample per accepted caption, image bytes shared."""
    from webdataset.autodecode import IMAGE_EXTENSIONS

    for sample in samples:
        raw = sample.get("json")
        if raw is None:
            continue
        meta = json.loads(raw)
        ext = next((k for k in sample if not k.startswith("__") and k.lower() in IMAGE_EXTENSIONS), None)
        if ext is None:
            raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image member")
        for cap in _captions_of(meta):
            if isinstance(cap, dict) and cap.get("id") in accepted and isinstance(cap.get("caption"), str):
                yield {"__key__": f"{sample['__key__']}/{cap['id']}", "__url__": sample.get("__url__"),
                       "__ext__": ext, "__caption__": cap["caption"], ext: sample[ext]}


def _to_pair(sample: dict[str, Any], transform: Callable) -> tuple[Any, str]:
    image = sample[sample["__ext__"]]
    if image.mode != "RGB":
        image = image.convert("RGB")
    return transform(image), sample["__caption__"]


def _collate(pairs: list[tuple[Any, str]]) -> tuple[Any, list[str]]:
    import torch

    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def _global_batch_slice(samples: Iterator[dict[str, Any]], batch_size: int, skip: int, lo: int, hi: int
                        ) -> Iterator[dict[str, Any]]:
    """Group raw samples into global batches (the last partial one dropped), drop the first ``skip``, and
    yield samples ``lo:hi`` of each remaining batch."""
    batch: list[dict[str, Any]] = []
    index = 0
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            if index >= skip:
                yield from batch[lo:hi]
            index += 1
            batch = []


# Relation words collapse to their axis: "A left of B" and "B right of A" (same scene) or "B left of A" (the
# swapped scene) are then the same bag, so a bag-distinct batch never holds a word-order hard negative.
_AXIS = {"left": "<horizontal>", "right": "<horizontal>", "above": "<vertical>", "below": "<vertical>"}
_FILLER = frozenset({"a", "an", "the", "to", "of", "is", "are"})
BATCHINGS = ("random", "bag_distinct")


def bag_key(caption: str) -> tuple[str, ...]:
    """A caption's bag of content words with spatial relations reduced to their axis, e.g. both
    ``a red circle to the left of a blue square`` and ``a blue square to the right of a red circle`` ->
    ('<horizontal>', 'blue', 'circle', 'red', 'square')."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    return tuple(sorted(_AXIS.get(w, w) for w in words if w not in _FILLER))


def _bag_distinct(samples: Iterator[dict[str, Any]], batch_size: int, max_pending: int
                  ) -> Iterator[dict[str, Any]]:
    """Reorder a (shuffled) pair stream so that each consecutive run of ``batch_size`` samples holds no two
    captions with the same ``bag_key``: what web-scale batches look like (hard negatives are rare), unlike
    random batches over a small synthetic vocabulary. Greedy and deterministic: a sample whose bag is taken
    waits in a FIFO for a later batch; only full batches are emitted."""
    from collections import deque

    pending: deque[dict[str, Any]] = deque()
    stream = iter(samples)
    exhausted = False
    while True:
        batch: list[dict[str, Any]] = []
        bags: set[tuple[str, ...]] = set()
        for _ in range(len(pending)):  # oldest waiting samples first
            sample = pending.popleft()
            key = bag_key(sample["__caption__"])
            if key in bags or len(batch) == batch_size:
                pending.append(sample)
            else:
                batch.append(sample)
                bags.add(key)
        while len(batch) < batch_size and not exhausted:
            sample = next(stream, None)
            if sample is None:
                exhausted = True
                break
            key = bag_key(sample["__caption__"])
            if key in bags:
                pending.append(sample)
                if len(pending) > max_pending:
                    raise DataError(f"{sample.get('__url__')}: bag_distinct batching: fewer than {batch_size} "
                                    "distinct caption bags in reach; lower the batch size or use batching: random")
            else:
                batch.append(sample)
                bags.add(key)
        if len(batch) < batch_size:
            return  # end of the epoch: the partial batch (and what still waits) is dropped
        yield from batch


def _epoch_seed(seed: int, epoch: int) -> int:
    return random.Random(f"sdsclip.data:{seed}:{epoch}").randrange(2**62)


class PairLoader:
    """Infinite, seed-deterministic iterable of ([B,3,H,W] image tensor, B captions) batches.

    Each ``iter()`` restarts from epoch 0, so two iterators over the same loader yield the same batches.
    """

    def __init__(self, shards_dir: Path, accepted_csv: Path, image_transform: Callable, batch_size: int,
                 seed: int, shuffle_buffer: int = 2000, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 batching: str = "random"):
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")
        self.batching = batching
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over {world_size} processes (rank {rank})")
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.shards_dir = Path(shards_dir)
        self.shards = [str(p) for p in shard_paths(self.shards_dir)]
        self.accepted = frozenset(load_accepted_ids(accepted_csv))
        self.n_pairs = count_pairs(self.shards_dir, accepted_csv)
        if self.n_pairs == 0:
            raise DataError(f"{self.shards_dir}: no accepted image-caption pairs (empty dataset: "
                            f"{len(self.accepted)} ids in {accepted_csv}, none of them in the shards)")
        if self.n_pairs < batch_size:
            raise DataError(f"{self.shards_dir}: only {self.n_pairs} accepted image-caption pairs, fewer than one "
                            f"batch of {batch_size} (partial batches are dropped)")
        self.transform = image_transform
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.num_workers = max(0, int(num_workers))

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (partial batch dropped); exact with num_workers == 0."""
        return self.n_pairs // self.batch_size

    def epoch(self, epoch: int, skip: int = 0):
        """The webdataset pipeline of one epoch (an iterable of this rank's batches), ``skip`` global
        batches dropped from its start."""
        import webdataset as wds

        eseed = _epoch_seed(self.seed, epoch)
        urls = list(self.shards)
        random.Random(eseed).shuffle(urls)
        buf = self.shuffle_buffer
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                            empty_check=False, seed=eseed)
        ds = ds.shuffle(buf, initial=buf, seed=eseed + 1)
        ds = ds.compose(partial(_expand_pairs, accepted=self.accepted))
        ds = ds.shuffle(buf, initial=buf, seed=eseed + 2)
        if self.batching == "bag_distinct":
            ds = ds.compose(partial(_bag_distinct, batch_size=self.batch_size,
                                    max_pending=max(10 * self.batch_size, buf)))
        lo = self.rank * self.local_batch_size
        ds = ds.compose(partial(_global_batch_slice, batch_size=self.batch_size, skip=skip, lo=lo,
                                hi=lo + self.local_batch_size))
        ds = ds.decode("pil")
        ds = ds.map(partial(_to_pair, transform=self.transform))
        ds = ds.batched(self.local_batch_size, collation_fn=_collate, partial=False)
        if self.num_workers == 0:
            return ds
        return wds.WebLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers)

    def batches(self, start_epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, tuple[Any, list[str]]]]:
        """Infinite ``(epoch, index in epoch, batch)`` stream from global batch ``start_batch`` of ``start_epoch``."""
        epoch, skip = start_epoch, start_batch
        while True:
            n = 0
            for n, batch in enumerate(self.epoch(epoch, skip), start=skip + 1):
                yield epoch, n - 1, batch
            if n == 0 and skip == 0:
                raise DataError(f"{self.shards_dir}: an epoch produced no full batch of {self.batch_size} "
                                f"({self.n_pairs} pairs over {len(self.shards)} shards / {self.num_workers} "
                                "workers); lower batch_size or num_workers")
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[Any, list[str]]]:
        for _, _, batch in self.batches():
            yield batch


def pair_loader(shards_dir: Path, accepted_csv: Path, image_transform: Callable, batch_size: int, seed: int,
                shuffle_buffer: int = 2000, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                batching: str = "random") -> PairLoader:
    """Infinite deterministic stream of (images [B,3,H,W], captions list[str]) over accepted pairs
    (``B = batch_size // world_size``: this rank's slice of each global batch). ``batching="bag_distinct"``:
    no two captions of a global batch share their ``bag_key`` (see ``_bag_distinct``)."""
    return PairLoader(shards_dir, accepted_csv, image_transform, batch_size, seed, shuffle_buffer, num_workers,
                      rank, world_size, batching)
