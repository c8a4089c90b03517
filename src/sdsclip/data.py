"""Training-side reader: validated WebDataset shards -> shuffled batches of (images, captions).

Only the annotation ids listed in validate's ``accepted.csv`` are used. ``captions`` says what one epoch is:
``all`` (every accepted caption is its own pair: an image with 5 captions is seen 5 times per epoch) or
``one_per_image`` (each image once per epoch, with one of its accepted captions drawn afresh every epoch: the
paper's "~118k image-text pairs" for COCO train2017). The stream is infinite: epoch ``e`` re-reads every shard
with a shuffle seeded by ``(seed, e)``, so a seed fixes the whole sequence of batches.

Pipeline per epoch (``webdataset`` stages, all on compressed bytes):
    WebDataset(shards in a seed-shuffled order) -> shuffle(images) -> expand to accepted pairs (or draw one)
    -> shuffle(pairs) -> distinct reorder -> global batches of ``batch_size``
then, only for the global batches this process (and worker) keeps: decode -> transform(RGB image) -> collate.

Distinct reorder (``distinct_batches``): no global batch holds two captions of one image (they would be false
negatives of each other in the contrastive loss), and with ``batching="bag_distinct"`` no two captions sharing
their ``bag_key`` either. It is a deterministic function of the shuffled stream, so everything after it (resume,
DDP slices, worker split) is exact.

Data parallelism: every process of a multi-process run reads the same stream (same seed, no node splitting) of
GLOBAL batches of ``batch_size`` pairs and keeps its own contiguous slice ``rank * b : (rank + 1) * b`` with
``b = batch_size // world_size``, cut before decoding (a rank decodes only its own images). So W processes
see exactly the batch one process would, split W ways.

Workers (``num_workers = N > 0``, torch DataLoader): each worker runs the same cheap compressed pipeline (every
worker reads every shard; no shard splitting) and decodes only the global batches ``g`` with ``g % N`` equal to
its id, ``g`` counting the batches this stream emits. The DataLoader takes one item from each worker in turn, so
it yields exactly the single-process sequence, for any N. This needs a deterministic ``image_transform`` (the
open_clip eval preprocess is).

Position: ``batches(start_epoch, start_batch)`` resumes a stream mid-epoch by dropping the first ``start_batch``
global batches of that epoch still compressed (no decode), so a resumed run reads the same pairs as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import random
import re
import tarfile
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from sdsclip.errors import UserError

SHARD_GLOB = "shard-*.tar"
CAPTIONS = ("all", "one_per_image")
BATCHINGS = ("random", "bag_distinct")


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
                raise DataError(
                    f"{accepted_csv}: line {line}: annotation_id {row['annotation_id']!r} is not an integer"
                ) from None
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


def _usable(meta: Any, accepted: frozenset[int] | set[int] | None) -> list[dict[str, Any]]:
    """The captions of one image that become pairs: well-formed and (when given) accepted."""
    return [
        c
        for c in _captions_of(meta)
        if isinstance(c, dict) and isinstance(c.get("caption"), str) and (accepted is None or c.get("id") in accepted)
    ]


def _check_captions(captions: str) -> None:
    if captions not in CAPTIONS:
        raise ValueError(f"captions must be one of {', '.join(CAPTIONS)}, got {captions!r}")


@dataclass(frozen=True)
class PairCounts:
    """What one read of the shards' ``.json`` members finds."""

    images: int  # images with at least one usable caption
    pairs: int  # usable (image, caption) pairs

    def per_epoch(self, captions: str = "all") -> int:
        """Pairs one epoch holds: every pair (``all``) or one per image (``one_per_image``)."""
        _check_captions(captions)
        return self.images if captions == "one_per_image" else self.pairs


def count_dataset(shards_dir: Path, accepted_csv: Path | None = None) -> PairCounts:
    """Images and (image, caption) pairs in the shards, only accepted annotation ids if accepted_csv is given.

    Reads only the ``.json`` members (tar headers of the images are skipped, not read).
    """
    accepted = load_accepted_ids(accepted_csv) if accepted_csv is not None else None
    images = pairs = 0
    for shard in shard_paths(shards_dir):
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".json"):
                        continue
                    fh = tar.extractfile(member)
                    n = len(_usable(json.loads(fh.read()) if fh is not None else {}, accepted))
                    images, pairs = images + (n > 0), pairs + n
        except (tarfile.TarError, json.JSONDecodeError, OSError) as err:
            raise DataError(f"{shard}: unreadable shard ({' '.join(str(err).split())}); re-run ingest") from None
    return PairCounts(images, pairs)


def count_pairs(shards_dir: Path, accepted_csv: Path | None = None, captions: str = "all") -> int:
    """Pairs in one epoch (see ``PairCounts.per_epoch``), only accepted annotation ids if accepted_csv is given."""
    _check_captions(captions)
    return count_dataset(shards_dir, accepted_csv).per_epoch(captions)


def check_batchable(counts: PairCounts, captions: str, batch_size: int, where: Path, key: str = "batch_size") -> None:
    """DataError (one line) unless one epoch can hold a full global batch of distinct images."""
    per_epoch = counts.per_epoch(captions)
    if per_epoch == 0:
        raise DataError(
            f"{where}: no accepted image-caption pairs (empty dataset: the accepted list names none "
            "of the shards' captions)"
        )
    if per_epoch < batch_size:
        what = "images" if captions == "one_per_image" else "accepted image-caption pairs"
        raise DataError(
            f"{where}: only {per_epoch} {what} per epoch, fewer than one batch of {batch_size} ({key}; "
            "partial batches are dropped)"
        )
    if counts.images < batch_size:
        raise DataError(
            f"{where}: only {counts.images} images, fewer than one batch of {batch_size} ({key}): a "
            "batch never holds two captions of one image; lower the batch size"
        )


def _expand_pairs(
    samples: Iterator[dict[str, Any]], accepted: frozenset[int], captions: str = "all", choice_seed: int = 0
) -> Iterator[dict[str, Any]]:
    """One shard sample (image + all captions) -> one sample per accepted caption (``all``) or one sample with
    one accepted caption drawn by ``(choice_seed, image key)`` (``one_per_image``: the draw does not depend
    on the stream order, so it is the same in every worker and process). Image bytes are shared."""
    from webdataset.autodecode import IMAGE_EXTENSIONS

    for sample in samples:
        raw = sample.get("json")
        if raw is None:
            continue
        ext = next((k for k in sample if not k.startswith("__") and k.lower() in IMAGE_EXTENSIONS), None)
        if ext is None:
            raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image member")
        caps = _usable(json.loads(raw), accepted)
        if captions == "one_per_image" and caps:
            caps = [random.Random(f"{choice_seed}:{sample['__key__']}").choice(caps)]
        for cap in caps:
            yield {
                "__key__": f"{sample['__key__']}/{cap['id']}",
                "__url__": sample.get("__url__"),
                "__image__": sample["__key__"],
                "__ext__": ext,
                "__caption__": cap["caption"],
                ext: sample[ext],
            }


def _to_pair(sample: dict[str, Any], transform: Callable) -> tuple[Any, str]:
    image = sample[sample["__ext__"]]
    if image.mode != "RGB":
        image = image.convert("RGB")
    return transform(image), sample["__caption__"]


def _collate(pairs: list[tuple[Any, str]]) -> tuple[Any, list[str]]:
    import torch

    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def _global_batches(samples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Group raw samples into global batches; the last partial one is dropped."""
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []


# Relation words collapse to their axis: "A left of B" and "B right of A" (same scene) or "B left of A" (the
# swapped scene) are then the same bag, so a bag-distinct batch never holds a word-order hard negative.
_AXIS = {"left": "<horizontal>", "right": "<horizontal>", "above": "<vertical>", "below": "<vertical>"}
_FILLER = frozenset({"a", "an", "the", "to", "of", "is", "are"})


def bag_key(caption: str) -> tuple[str, ...]:
    """A caption's bag of content words with spatial relations reduced to their axis, e.g. both
    ``a red circle to the left of a blue square`` and ``a blue square to the right of a red circle`` ->
    ('<horizontal>', 'blue', 'circle', 'red', 'square')."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    return tuple(sorted(_AXIS.get(w, w) for w in words if w not in _FILLER))


def image_keys(sample: dict[str, Any]) -> tuple[Hashable, ...]:
    """Distinct-batch keys of a pair: its image."""
    return (("image", sample["__image__"]),)


def bag_keys(sample: dict[str, Any]) -> tuple[Hashable, ...]:
    """Distinct-batch keys of a pair: its caption's bag."""
    return (("bag", bag_key(sample["__caption__"])),)


def image_and_bag_keys(sample: dict[str, Any]) -> tuple[Hashable, ...]:
    return image_keys(sample) + bag_keys(sample)


def distinct_batches(
    samples: Iterator[dict[str, Any]],
    batch_size: int,
    max_pending: int,
    keys_of: Callable[[dict[str, Any]], tuple[Hashable, ...]],
    shortage: str,
) -> Iterator[dict[str, Any]]:
    """Reorder a (shuffled) pair stream so that each consecutive run of ``batch_size`` samples holds no two
    samples sharing any of their ``keys_of`` keys (an image, a caption bag). Greedy and deterministic: a
    sample whose key is taken waits in a FIFO for a later batch, oldest first. Once the stream is exhausted
    the waiting samples whose keys have most waiting copies go first, so the end of an epoch loses as few
    pairs as it can; only full batches are emitted. ``shortage`` words the DataError raised when more than
    ``max_pending`` samples wait (``{n}``: the batch size)."""
    pending: deque[tuple[tuple[Hashable, ...], dict[str, Any]]] = deque()
    stream = iter(samples)
    exhausted = False
    while True:
        end_game = exhausted
        if end_game and pending:  # most-waiting keys first (a stable sort, so still deterministic)
            waiting: dict[Hashable, int] = {}
            for keys, _ in pending:
                for k in keys:
                    waiting[k] = waiting.get(k, 0) + 1
            pending = deque(sorted(pending, key=lambda item: -max(waiting[k] for k in item[0])))
        batch: list[tuple[tuple[Hashable, ...], dict[str, Any]]] = []
        taken: set[Hashable] = set()
        for _ in range(len(pending)):  # waiting samples first
            keys, sample = pending.popleft()
            if len(batch) == batch_size or not taken.isdisjoint(keys):
                pending.append((keys, sample))
            else:
                batch.append((keys, sample))
                taken.update(keys)
        while len(batch) < batch_size and not exhausted:
            drawn: dict[str, Any] | None = next(stream, None)
            if drawn is None:
                exhausted = True
                break
            sample = drawn
            keys = keys_of(sample)
            if not taken.isdisjoint(keys):
                pending.append((keys, sample))
                if len(pending) > max_pending:
                    raise DataError(f"{sample.get('__url__')}: {shortage.format(n=batch_size)}")
            else:
                batch.append((keys, sample))
                taken.update(keys)
        if len(batch) == batch_size:
            yield from (sample for _, sample in batch)
        elif not end_game:  # the stream ran out while filling: retry this batch in end-game order
            pending.extendleft(reversed(batch))
        else:
            return  # end of the epoch: the partial batch (and what still waits) is dropped


def bag_distinct(samples: Iterator[dict[str, Any]], batch_size: int, max_pending: int) -> Iterator[dict[str, Any]]:
    """``distinct_batches`` over caption bags alone: no two captions of a batch share their ``bag_key``,
    which is what web-scale batches look like (hard negatives are rare), unlike random batches over a small
    synthetic vocabulary."""
    return distinct_batches(samples, batch_size, max_pending, bag_keys, BAG_SHORTAGE)


BAG_SHORTAGE = (
    "bag_distinct batching: fewer than {n} distinct caption bags in reach; lower the batch size or use batching: random"
)
IMAGE_SHORTAGE = (
    "fewer than {n} distinct images in reach of the shuffle buffer (a batch never holds two captions "
    "of one image); lower the batch size or use captions: one_per_image"
)
BAG_IMAGE_SHORTAGE = (
    "bag_distinct batching: fewer than {n} distinct caption bags (of distinct images) in reach; "
    "lower the batch size or use batching: random"
)


def _epoch_seed(seed: int, epoch: int) -> int:
    return random.Random(f"sdsclip.data:{seed}:{epoch}").randrange(2**62)


@dataclass(frozen=True)
class _Failure:
    """A DataError raised inside a DataLoader worker, passed on as a value so that the main process raises it
    as one line (torch would wrap it in the worker's traceback)."""

    message: str


class _BatchStream(IterableDataset):
    """The ``(epoch, index, batch)`` stream of a PairLoader from a position; in a DataLoader worker, only the
    batches that worker serves."""

    def __init__(self, loader: PairLoader, start_epoch: int, start_batch: int):
        self.loader, self.start_epoch, self.start_batch = loader, start_epoch, start_batch

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None:
            yield from self.loader._stream(self.start_epoch, self.start_batch, 0, 1)
            return
        try:
            yield from self.loader._stream(self.start_epoch, self.start_batch, info.id, info.num_workers)
        except DataError as err:
            yield _Failure(str(err))


class PairLoader:
    """Infinite, seed-deterministic iterable of ([B,3,H,W] image tensor, B captions) batches.

    Each ``iter()`` restarts from epoch 0, so two iterators over the same loader yield the same batches, for
    any ``num_workers``.
    """

    def __init__(
        self,
        shards_dir: Path,
        accepted_csv: Path,
        image_transform: Callable,
        batch_size: int,
        seed: int,
        shuffle_buffer: int = 2000,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batching: str = "random",
        captions: str = "all",
        pin_memory: bool = False,
    ):
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")
        _check_captions(captions)
        self.batching, self.captions = batching, captions
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over {world_size} processes (rank {rank})")
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.shards_dir = Path(shards_dir)
        self.shards = [str(p) for p in shard_paths(self.shards_dir)]
        self.accepted = frozenset(load_accepted_ids(accepted_csv))
        self.counts = count_dataset(self.shards_dir, accepted_csv)
        self.n_pairs = self.counts.per_epoch(captions)
        if self.n_pairs == 0:
            raise DataError(
                f"{self.shards_dir}: no accepted image-caption pairs (empty dataset: "
                f"{len(self.accepted)} ids in {accepted_csv}, none of them in the shards)"
            )
        check_batchable(self.counts, captions, batch_size, self.shards_dir)
        self.transform = image_transform
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.num_workers = max(0, int(num_workers))
        self.pin_memory = pin_memory

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch: ``n_pairs // batch_size`` (the partial batch dropped). The distinct
        reorder can drop a few more pairs at an epoch's end when the last ones left belong to fewer than
        ``batch_size`` images (bags), so this is an upper bound; ``batches()`` reports the true position."""
        return self.n_pairs // self.batch_size

    def _keys_of(self) -> tuple[Callable | None, str]:
        if self.batching == "bag_distinct":
            return (
                (bag_keys, BAG_SHORTAGE)
                if self.captions == "one_per_image"
                else (image_and_bag_keys, BAG_IMAGE_SHORTAGE)
            )
        return (None, "") if self.captions == "one_per_image" else (image_keys, IMAGE_SHORTAGE)

    def epoch(self, epoch: int):
        """The compressed pipeline of one epoch: an iterable of its global batches (lists of raw samples)."""
        import webdataset as wds

        eseed = _epoch_seed(self.seed, epoch)
        urls = list(self.shards)
        random.Random(eseed).shuffle(urls)
        buf = self.shuffle_buffer
        # No node or worker splitting: every process and worker reads the whole epoch (see the module doc).
        ds = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False, seed=eseed
        )
        ds = ds.shuffle(buf, initial=buf, seed=eseed + 1)
        ds = ds.compose(partial(_expand_pairs, accepted=self.accepted, captions=self.captions, choice_seed=eseed + 3))
        ds = ds.shuffle(buf, initial=buf, seed=eseed + 2)
        keys_of, shortage = self._keys_of()
        if keys_of is not None:
            ds = ds.compose(
                partial(
                    distinct_batches,
                    batch_size=self.batch_size,
                    max_pending=max(10 * self.batch_size, buf),
                    keys_of=keys_of,
                    shortage=shortage,
                )
            )
        return ds.compose(partial(_global_batches, batch_size=self.batch_size))

    def _decode(self, samples: list[dict[str, Any]]) -> tuple[Any, list[str]]:
        from webdataset.autodecode import Decoder, ImageHandler

        decoder = Decoder([ImageHandler("pil")])
        return _collate([_to_pair(decoder(s), self.transform) for s in samples])

    def _stream(
        self, start_epoch: int, start_batch: int, worker: int, n_workers: int
    ) -> Iterator[tuple[int, int, tuple[Any, list[str]]]]:
        """``(epoch, index, this rank's slice)`` of the global batches ``g`` (counted from the start position)
        with ``g % n_workers == worker``; the others are skipped still compressed."""
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        epoch, skip, g = start_epoch, start_batch, 0
        while True:
            formed = 0
            for index, batch in enumerate(self.epoch(epoch)):
                formed += 1
                if index < skip:
                    continue
                if g % n_workers == worker:
                    yield epoch, index, self._decode(batch[lo:hi])
                g += 1
            if formed == 0:
                raise DataError(
                    f"{self.shards_dir}: an epoch produced no full batch of {self.batch_size} "
                    f"({self.n_pairs} pairs per epoch over {len(self.shards)} shards); lower the "
                    "batch size"
                )
            epoch, skip = epoch + 1, 0

    def batches(self, start_epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, tuple[Any, list[str]]]]:
        """Infinite ``(epoch, index in epoch, batch)`` stream from global batch ``start_batch`` of ``start_epoch``."""
        stream = _BatchStream(self, start_epoch, start_batch)
        if self.num_workers == 0:
            yield from iter(stream)
            return
        from torch.utils.data import DataLoader

        # batch_size=None: items pass as they are; the DataLoader takes them from the workers in turn.
        for item in DataLoader(
            stream, batch_size=None, shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory
        ):
            if isinstance(item, _Failure):
                raise DataError(item.message)
            yield item

    def __iter__(self) -> Iterator[tuple[Any, list[str]]]:
        for _, _, batch in self.batches():
            yield batch


def pair_loader(
    shards_dir: Path,
    accepted_csv: Path,
    image_transform: Callable,
    batch_size: int,
    seed: int,
    shuffle_buffer: int = 2000,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batching: str = "random",
    captions: str = "all",
    pin_memory: bool = False,
) -> PairLoader:
    """Infinite deterministic stream of (images [B,3,H,W], captions list[str]) over accepted pairs
    (``B = batch_size // world_size``: this rank's slice of each global batch). ``captions``: ``all`` pairs
    or ``one_per_image`` per epoch. No global batch holds two captions of one image; ``batching="bag_distinct"``:
    nor two sharing their ``bag_key`` (see ``distinct_batches``). ``num_workers``: DataLoader processes
    decoding in parallel, the same batches as 0."""
    return PairLoader(
        shards_dir,
        accepted_csv,
        image_transform,
        batch_size,
        seed,
        shuffle_buffer,
        num_workers,
        rank,
        world_size,
        batching,
        captions,
        pin_memory,
    )
