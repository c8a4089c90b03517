"""Stream the records of an MS-COCO annotations file without holding the file (or its objects) in memory.

``iter_records`` yields ``("images", i, record)`` and ``("annotations", i, record)`` in file order, parsing each
record with the standard library's JSON decoder (``json.JSONDecoder.raw_decode``) over a sliding text window of
the file; any other top-level key (``info``, ``licenses``, ...) is parsed and dropped. Memory is the window
(1 MiB) plus one record, whatever the split's size.

Why not ijson: its C backend (yajl) fails the whole file on one caption holding bytes that are not UTF-8 (or a
lone-surrogate escape), where ingest quarantines that one caption. Here the file is decoded with
``surrogateescape`` exactly as ``json.loads`` of the whole text was, and a syntax error is reported with the
same message, line and column ``json.loads`` gives.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import IO, Any

from sdsclip.errors import UserError

ARRAY_KEYS = ("images", "annotations")
CHUNK_CHARS = 1 << 20
_MIN_BATCH_CHARS = 4096
_CUT_MARGIN = 16  # a literal, number or escape cut by the window's end fails within this many characters of it
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class CocoJsonError(UserError, ValueError):
    """The file is not a JSON object whose ``images`` / ``annotations`` are lists; ``str()`` is the reason,
    ``syntax`` tells a JSON syntax error (re-export the file) from a well-formed file of the wrong shape."""

    def __init__(self, reason: str, syntax: bool = False):
        super().__init__(reason)
        self.syntax = syntax


class _Window:
    """The not-yet-consumed text of the file, refilled on demand; keeps the absolute line/column of its start."""

    def __init__(self, fh: IO[bytes], first: bytes):
        self.fh = fh
        encoding = json.detect_encoding(first)
        self.decoder = codecs.getincrementaldecoder(encoding)(
            "surrogateescape" if encoding.startswith("utf-8") else "strict"
        )
        self.buf = self.decoder.decode(first)
        self.pos, self.eof = 0, False
        self.line, self.col = 1, 1  # of buf[0]
        self.no_batch_before = 0  # a batch failed in this window: none again until the window grows

    def more(self) -> bool:
        """Append the next chunk; False at the end of the file."""
        if self.eof:
            return False
        data = self.fh.read(CHUNK_CHARS)
        self.eof = not data
        self.buf += self.decoder.decode(data, final=self.eof)
        return True

    def compact(self) -> None:
        if self.pos < CHUNK_CHARS:
            return
        cut = self.pos
        newlines = self.buf.count("\n", 0, cut)
        if newlines:
            self.line += newlines
            self.col = cut - self.buf.rfind("\n", 0, cut)
        else:
            self.col += cut
        self.buf, self.pos = self.buf[cut:], 0

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), with pos on it."""
        if self.pos < len(self.buf) and self.buf[self.pos] not in " \t\n\r":
            return self.buf[self.pos]
        while True:
            m = _WS.match(self.buf, self.pos)  # always matches (possibly empty)
            self.pos = m.end() if m else self.pos
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def value(self) -> Any:
        """Decode the JSON value at pos. A value ending near the window's end may continue (a number cut in two),
        and a failure may be the window's end: both read on before deciding."""
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self._maybe_cut(err) and self.more():
                    continue
                raise self.error(err.msg, err.pos) from None
            if end > len(self.buf) - _CUT_MARGIN and self.more():  # '112' of '112.5', 'tr' of 'true' ...
                continue
            self.pos = end
            return obj

    def batch(self) -> list[Any] | None:
        """The records from pos to the window's last ``}`` that is followed by ``,`` (or to the array's end if that
        comes first), decoded in one call (C speed, where one call per record is mostly Python overhead); None
        when there is no such boundary or the slice does not decode (a ``}`` of a nested object, or an error for
        :meth:`value` to report). A slice that decodes starts and ends outside any string, so its cut is between
        two records."""
        end = len(self.buf)
        if end <= self.no_batch_before:
            return None
        cut = self.buf.rfind("}", self.pos, end)
        while cut != -1:
            m = _WS.match(self.buf, cut + 1)
            after = m.end() if m else cut + 1
            if after < end and self.buf[after] == ",":
                break
            cut = self.buf.rfind("}", self.pos, cut)
        if cut - self.pos < _MIN_BATCH_CHARS:
            return None
        text = "[" + self.buf[self.pos : cut + 1] + "]"
        try:
            records, stop = _DECODER.raw_decode(text)
        except (json.JSONDecodeError, RecursionError):
            self.no_batch_before = end
            return None
        # stop < len(text): the array ended inside the slice (its ']' closed our '['): pos goes onto that ']'
        self.pos = cut + 1 if stop == len(text) else self.pos + stop - 2
        return records

    def _maybe_cut(self, err: json.JSONDecodeError) -> bool:
        """The error may come from the window ending inside the value (else it is the file's own error)."""
        return err.msg.startswith("Unterminated string") or err.pos >= len(self.buf) - _CUT_MARGIN

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise self.error(what, self.pos)
        self.pos += 1

    def error(self, msg: str, pos: int) -> CocoJsonError:
        newlines = self.buf.count("\n", 0, pos)
        line = self.line + newlines
        col = pos - self.buf.rfind("\n", 0, pos) if newlines else self.col + pos
        return CocoJsonError(f"not valid JSON (line {line} column {col}: {msg})", syntax=True)


def iter_records(fh: IO[bytes]) -> Iterator[tuple[str, int, Any]]:
    """(array key, index, record) for every element of the top-level ``images`` and ``annotations`` lists.

    Raises CocoJsonError when the file is empty, not valid JSON, not an object, misses one of ARRAY_KEYS or has
    one that is not a list (raised when reached: a caller that needs the whole file valid consumes it first).
    """
    first = fh.read(CHUNK_CHARS)
    if not first.strip():
        raise CocoJsonError("empty file")
    win = _Window(fh, first)
    if win.peek() != "{":
        raise CocoJsonError(_not_an_object(win))
    win.pos += 1
    seen: set[str] = set()
    if win.peek() == "}":
        win.pos += 1
    else:
        while True:
            key = _key(win)
            if key in ARRAY_KEYS and key in seen:
                raise CocoJsonError(f"top-level key '{key}' appears twice")
            seen.add(key)
            if key in ARRAY_KEYS:
                yield from _array(win, key)
            else:
                win.peek()
                win.value()  # info, licenses, ...: not needed
            if win.peek() == ",":
                win.pos += 1
                continue
            win.expect("}", "Expecting ',' delimiter")
            break
    if win.peek():
        raise win.error("Extra data", win.pos)
    missing = [k for k in ARRAY_KEYS if k not in seen]
    if missing:
        raise CocoJsonError(f"missing top-level key(s) {', '.join(map(repr, missing))}")


def _not_an_object(win: _Window) -> str:
    """The reason a top level that does not start with '{' is unusable (its JSON type, or the syntax error)."""
    try:
        top = win.value()
    except RecursionError:
        return "JSON nested too deeply"
    if win.peek():
        raise win.error("Extra data", win.pos)
    return f"top level is a JSON {type(top).__name__}, not an object"


def _key(win: _Window) -> str:
    if win.peek() != '"':
        raise win.error("Expecting property name enclosed in double quotes", win.pos)
    key = win.value()
    win.expect(":", "Expecting ':' delimiter")
    return key


def _array(win: _Window, key: str) -> Iterator[tuple[str, int, Any]]:
    if win.peek() != "[":
        value = win.value()
        raise CocoJsonError(f"top-level '{key}' is a JSON {type(value).__name__}, not a list")
    win.pos += 1
    if win.peek() == "]":
        win.pos += 1
        return
    i = 0
    while True:
        win.peek()
        records = win.batch()
        if records is None:
            try:
                records = [win.value()]
            except RecursionError:
                raise CocoJsonError(f"{key}[{i}]: JSON nested too deeply") from None
        for record in records:
            yield key, i, record
            i += 1
        win.compact()
        nxt = win.peek()
        win.pos += 1
        if nxt == ",":
            continue
        if nxt != "]":
            raise win.error("Expecting ',' delimiter", win.pos - 1)
        return
