"""Content hashes of the files a run reads, with a small on-disk cache for multi-GB weight files.

A Stable Diffusion 1.5 directory holds ~5 GB of weights that one run loads plus as much again that it never
reads (fp16 / .bin / .ckpt siblings, safety_checker). ``files_digest`` hashes only the files it is given,
and ``cached_file_sha256`` hashes each file once per (resolved path, size, mtime_ns): the key git's index
and make use to decide a file is unchanged, so a rewrite or a ``touch`` rehashes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_FILE = "sha256-cache.json"
_MAX_ENTRIES = 2000  # a few SD dirs' worth of weight files; oldest dropped beyond that


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root: Path) -> str:
    """Hash of every file under root (relative paths + contents), order-independent of the filesystem."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def cache_path() -> Path:
    """$XDG_CACHE_HOME/sdsclip/sha256-cache.json, else ~/.cache/sdsclip/sha256-cache.json."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdsclip" / CACHE_FILE


class HashCache:
    """sha256 per (resolved path, size, mtime_ns), persisted as JSON. Unreadable or unwritable cache files
    are not errors: the hash is then just computed again."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_path()
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        try:
            raw = json.loads(self.path.read_text())
            if isinstance(raw, dict) and isinstance(raw.get("files"), dict):
                self.entries = raw["files"]
        except (OSError, ValueError):
            pass

    def sha256(self, path: Path) -> str:
        resolved = Path(path).resolve()
        st = resolved.stat()
        key = str(resolved)
        hit = self.entries.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns and hit.get("sha256"):
            return hit["sha256"]
        value = file_sha256(resolved)
        self.entries.pop(key, None)  # re-insert last: dict order is the eviction order
        self.entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": value}
        self.dirty = True
        return value

    def save(self) -> None:
        if not self.dirty:
            return
        entries = dict(list(self.entries.items())[-_MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".sha256-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "files": entries}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: concurrent runs never read half a file
            self.dirty = False
        except OSError:
            pass


def files_digest(root: Path, relative_paths: list[str], cache: HashCache | None = None) -> dict[str, Any]:
    """{"files": [{"path", "bytes", "sha256"}], "sha256": combined digest} of ``relative_paths`` under root.

    The combined digest covers each file's relative path and content hash (sorted), so it changes when a
    loaded file changes, and only then."""
    root = Path(root)
    own = cache is None
    cache = cache or HashCache()
    files = []
    for rel in sorted(set(relative_paths)):
        path = root / rel
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": cache.sha256(path)})
    if own:
        cache.save()
    combined = hashlib.sha256("".join(f"{f['path']}\t{f['sha256']}\n" for f in files).encode()).hexdigest()
    return {"files": files, "sha256": combined}
