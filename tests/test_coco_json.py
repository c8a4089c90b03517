"""The streaming reader of COCO annotation files: the same records and the same errors as json.loads of the whole
file, whatever the window size (chunk boundaries inside numbers, strings, escapes and multi-byte characters)."""

from __future__ import annotations

import io
import json
import random

import pytest

from sdsclip import coco_json
from sdsclip.coco_json import CocoJsonError, iter_records


def _doc(seed: int = 0) -> dict:
    rng = random.Random(seed)

    def record(i: int):
        r = rng.random()
        if r < 0.05:  # nested objects whose '}' followed by ',' is not a record boundary
            return {"id": i, "nested": {"a": [1, {"b": "}, {"}]}, "caption": "x},{y"}
        if r < 0.1:
            return i * 1.5  # a number that a window can cut after '1' or '1.'
        if r < 0.12:
            return None
        return {"id": i, "image_id": i % 7, "caption": f'cap }} , {{ \\" é 😀 \u00e9 {i}'}

    return {
        "info": {"v": "}, {", "nested": [[{}]]},
        "images": [record(i) for i in range(600)],
        "licenses": [{}],
        "annotations": [record(i) for i in range(900)],
    }


def _records(data: bytes) -> dict[str, list]:
    got: dict[str, list] = {"images": [], "annotations": []}
    for key, i, rec in iter_records(io.BytesIO(data)):
        assert i == len(got[key])
        got[key].append(rec)
    return got


@pytest.mark.parametrize("chunk", [1, 7, 100, 5000, 1 << 20])
@pytest.mark.parametrize("indent", [None, 1])
def test_records_equal_json_loads_for_any_window(monkeypatch, chunk, indent):
    monkeypatch.setattr(coco_json, "CHUNK_CHARS", chunk)
    monkeypatch.setattr(coco_json, "_MIN_BATCH_CHARS", 64)  # batches in small windows too
    doc = _doc()
    data = json.dumps(doc, indent=indent, ensure_ascii=False).encode("utf-8")
    got = _records(data)
    assert got["images"] == doc["images"] and got["annotations"] == doc["annotations"]


def test_bytes_that_are_not_utf8_survive_as_surrogates(monkeypatch):
    monkeypatch.setattr(coco_json, "CHUNK_CHARS", 3)
    data = b'{"images": [], "annotations": [{"id": 1, "caption": "caf\xe9 \\ud800 ok"}]}'
    (rec,) = _records(data)["annotations"]
    assert rec["caption"] == json.loads(data.decode("utf-8", "surrogateescape"))["annotations"][0]["caption"]
    assert rec["caption"] == "caf\udce9 \ud800 ok"


BAD = [
    '{"images": [1, 2,, "annotations": []}',
    '{"images": [}',
    '{"images": [\n{"a": 1}\n{"b": 2}], "annotations": []}',
    '{"images": [], "annotations": [' + ",".join(f'{{"id": {i}}}' for i in range(300)) + ', {"id": tru}]}',
    '{"images": [], "annotations": []} x',
    '{"images": [], "annotations": [{"id": 1, "c": "unterminated]}',
    '{"images": [], "annotations": [{"id": 1}\n\n   {"id": 2}]}',
    '{"images" [], "annotations": []}',
    '{"images": [], 5: []}',
]


@pytest.mark.parametrize("chunk", [2, 50, 1 << 20])
@pytest.mark.parametrize("text", BAD)
def test_syntax_errors_name_the_line_and_column_json_loads_names(monkeypatch, chunk, text):
    monkeypatch.setattr(coco_json, "CHUNK_CHARS", chunk)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(CocoJsonError) as err:
        _records(text.encode())
    want = expected.value
    assert str(err.value) == f"not valid JSON (line {want.lineno} column {want.colno}: {want.msg})"
    assert err.value.syntax


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty file"),
        ("  \n", "empty file"),
        ("[]", "top level is a JSON list, not an object"),
        ('"x"', "top level is a JSON str, not an object"),
        ("[" * 100000, "JSON nested too deeply"),
        ('{"images": {}, "annotations": []}', "top-level 'images' is a JSON dict, not a list"),
        ('{"images": []}', "missing top-level key(s) 'annotations'"),
        ('{"info": 1}', "missing top-level key(s) 'images', 'annotations'"),
        ('{"images": [], "annotations": [], "images": []}', "top-level key 'images' appears twice"),
    ],
)
def test_wrong_shapes_are_named(text, reason):
    with pytest.raises(CocoJsonError) as err:
        _records(text.encode())
    assert str(err.value) == reason and not err.value.syntax


def test_utf16_file_is_read_like_json_loads():
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 2, "image_id": 1, "caption": "é"}]}
    got = _records(json.dumps(doc, ensure_ascii=False).encode("utf-16"))
    assert got == {"images": doc["images"], "annotations": doc["annotations"]}
