"""One benchmark's scoring split over N tasks (the teacher's evaluation fanned out over GPU pods), merged into
exactly the metrics of an unsharded run.

Every benchmark scores its items chunk by chunk, one scorer call per chunk, in an order fixed by the data and
the params (items, caps, seeds). Shard ``k`` of ``N`` runs the benchmark as usual with a
:class:`RecordingScorer`: the calls ``j`` with ``j % N == k`` go to the real scorer and their outputs are kept
(round robin, so a slow last dataset is spread over the shards too); the others get zeros of the right shape and
never touch the model. The merge runs the same benchmark again with a :class:`ReplayScorer` that serves every
call from the shards' parts. Each call sees the same images, captions and pairs as unsharded, so the UNet
batches are composed the same and the tensors are bit-identical: the merged metrics JSON (and score file)
equals the unsharded one. A part records a fingerprint of each call's inputs; a merge whose data or params
differ from the shards' fails naming the call, as does a missing, repeated or foreign part.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdsclip.errors import UserError

PART_FORMAT = 1


class ShardError(UserError, ValueError):
    """Parts that do not add up to one evaluation; the message names the part and what to rerun."""


def check_shard(shard: int, shards: int) -> None:
    if shards < 1 or not 0 <= shard < shards:
        raise ShardError(f"shard {shard} of {shards}: need shards >= 1 and 0 <= shard < shards")


def _fingerprint(method: str, images: Sequence[Any], captions: Sequence[str], pairs: Sequence[Any]) -> str:
    sizes = [list(getattr(im, "size", ())) for im in images]
    text = json.dumps([method, sizes, list(captions), [list(p) for p in pairs]])
    return hashlib.sha256(text.encode()).hexdigest()


def _scorer_traits(scorer: Any) -> dict[str, Any]:
    """What the benchmarks read off a scorer besides its calls (kept so the replay takes the same branches)."""
    traits: dict[str, Any] = {
        "name": getattr(scorer, "name", type(scorer).__name__),
        "with_uncond": callable(getattr(scorer, "score_with_uncond", None)),
    }
    if hasattr(scorer, "image_uncond_correction"):
        traits["image_uncond_correction"] = bool(scorer.image_uncond_correction)
    return traits


class _Calls:
    """Numbers the scorer calls and exposes the traits of the scorer a benchmark was written against."""

    def __init__(self, traits: dict[str, Any]):
        self.traits, self.calls = traits, 0
        self.name = traits["name"]
        if "image_uncond_correction" in traits:
            self.image_uncond_correction = traits["image_uncond_correction"]

    def score(self, images, captions, pairs) -> torch.Tensor:
        (out,) = self._call("score", images, captions, pairs)
        return out

    def __getattr__(self, name: str):  # only reached for attributes not set above
        if name == "score_with_uncond" and self.__dict__.get("traits", {}).get("with_uncond"):
            return lambda images, captions, pairs: tuple(self._call("score_with_uncond", images, captions, pairs))
        raise AttributeError(name)

    def _call(self, method: str, images, captions, pairs) -> list[torch.Tensor]:
        raise NotImplementedError


class RecordingScorer(_Calls):
    """Shard ``shard`` of ``shards``: runs its own calls on ``scorer`` and records them; zeros for the rest."""

    def __init__(self, scorer: Any, shard: int, shards: int):
        check_shard(shard, shards)
        super().__init__(_scorer_traits(scorer))
        self.scorer, self.shard, self.shards = scorer, shard, shards
        self.records: dict[int, dict[str, Any]] = {}

    def _call(self, method: str, images, captions, pairs) -> list[torch.Tensor]:
        j, self.calls = self.calls, self.calls + 1
        if j % self.shards != self.shard:  # another shard's call: right shape, never looked at
            zeros = [torch.zeros(len(pairs))]
            return zeros + [torch.zeros(len(images))] if method == "score_with_uncond" else zeros
        out = getattr(self.scorer, method)(images, list(captions), list(pairs))
        outputs = [t.detach().cpu() for t in (out if isinstance(out, tuple) else (out,))]
        self.records[j] = {
            "method": method,
            "fingerprint": _fingerprint(method, images, captions, pairs),
            "outputs": outputs,
        }
        return outputs

    def save(self, path: Path, benchmark: str) -> dict[str, Any]:
        """The part file (torch.save of tensors and plain values) and its summary."""
        summary = {
            "format": PART_FORMAT,
            "benchmark": benchmark,
            "shard": self.shard,
            "shards": self.shards,
            "calls": self.calls,
            "scored": sorted(self.records),
            "scorer": self.traits,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({**summary, "records": self.records}, path)
        return summary


def load_parts(paths: Sequence[Path], benchmark: str) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Every record of ``paths`` (one part per shard) and their common header; ShardError when they are not
    the N parts of one ``benchmark`` evaluation."""
    if not paths:
        raise ShardError(f"{benchmark}: no shard parts to merge")
    parts = []
    for path in paths:
        try:
            part = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means the file is not a part
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ShardError(f"{path}: not a shard part ({reason}); rerun that shard") from None
        if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
            raise ShardError(f"{path}: not a shard part of format {PART_FORMAT}; rerun that shard")
        if part["benchmark"] != benchmark:
            raise ShardError(f"{path}: a part of {part['benchmark']!r}, not {benchmark!r}")
        parts.append((Path(path), part))
    first_path, first = parts[0]
    header = {k: first[k] for k in ("shards", "calls", "scorer")}
    seen: dict[int, Path] = {}
    for path, part in parts:
        other = {k: part[k] for k in header}
        if other != header:
            raise ShardError(
                f"{path}: shards {other['shards']}, {other['calls']} calls, scorer {other['scorer']} "
                f"disagree with {first_path} ({header['shards']}, {header['calls']}, {header['scorer']}):"
                " the parts come from different runs; rerun every shard"
            )
        if part["shard"] in seen:
            raise ShardError(f"{path}: shard {part['shard']} again (also {seen[part['shard']]})")
        seen[part["shard"]] = path
    missing = sorted(set(range(header["shards"])) - set(seen))
    if missing:
        raise ShardError(f"{benchmark}: shard(s) {missing} of {header['shards']} missing from the parts; rerun them")
    records = {int(j): rec for _, part in parts for j, rec in part["records"].items()}
    if sorted(records) != list(range(header["calls"])):
        raise ShardError(f"{benchmark}: the parts hold calls {sorted(records)[:10]}..., not 0..{header['calls'] - 1}")
    return records, header


class ReplayScorer(_Calls):
    """Serves each call from the merged parts, checking it is the call the shard scored."""

    def __init__(self, records: dict[int, dict[str, Any]], header: dict[str, Any]):
        super().__init__(header["scorer"])
        self.records, self.expected = records, header["calls"]

    def _call(self, method: str, images, captions, pairs) -> list[torch.Tensor]:
        j, self.calls = self.calls, self.calls + 1
        rec = self.records.get(j)
        if (
            rec is None
            or rec["method"] != method
            or rec["fingerprint"] != _fingerprint(method, images, captions, pairs)
        ):
            raise ShardError(
                f"scorer call {j}: not the call the shards scored (other data or params than the "
                "shard tasks had); rerun the shards with the merge's params"
            )
        return [t.clone() for t in rec["outputs"]]

    def check_complete(self) -> None:
        if self.calls != self.expected:
            raise ShardError(
                f"the merge made {self.calls} scorer calls, the shards {self.expected}: other data or "
                "params than the shard tasks had; rerun the shards with the merge's params"
            )
