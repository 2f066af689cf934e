"""Tests for JSONL pair manifests: round trips, validation errors with file:line, skip_bad."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
from PIL import Image

from personae.data.manifest import PairRecord, read_pairs, write_pairs
from personae.errors import DataError, PersonaeError


def _make_images(root: Path, n: int) -> list[str]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"images/s{i:06d}.png"
        Image.new("RGB", (4, 4), (i * 40 % 256, 0, 0)).save(root / name)
        names.append(name)
    return names


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(image: str, caption: str = "a dog on the beach", **extra: object) -> str:
    return json.dumps({"image": image, "caption": caption, **extra}, ensure_ascii=False)


def test_read_fields_defaults_and_meta(tmp_path: Path) -> None:
    names = _make_images(tmp_path, 3)
    manifest = _write_lines(tmp_path / "pairs.jsonl", [
        "# a comment line",
        _row(names[0], scene_id="s000000", split="val", mood="calm"),
        "",
        _row(names[1], caption="une café ☕", scene_id=7),
        _row(names[2]),
    ])
    pairs = read_pairs(manifest)
    assert len(pairs) == 3 and pairs.skipped == []
    first, second, third = pairs.records
    assert first.image == tmp_path / names[0] and first.image.is_file()
    assert (first.split, first.scene_id, first.meta, first.line) == ("val", "s000000", {"mood": "calm"}, 2)
    assert (second.caption, second.scene_id, second.split, second.line) == ("une café ☕", "7", "train", 4)
    assert third.scene_id == names[2]  # default: the image path as written
    assert [r.line for r in read_pairs(manifest, split="train")] == [4, 5]
    assert [r.line for r in pairs.filter("val")] == [2]


def test_write_read_round_trip(tmp_path: Path) -> None:
    names = _make_images(tmp_path, 2)
    outside = tmp_path / "elsewhere" / "x.png"
    outside.parent.mkdir()
    Image.new("RGB", (2, 2)).save(outside)
    records = [
        PairRecord(tmp_path / "data" / ".." / names[0], "a dog", "s0", "train", {"k": [1, 2]}),
        PairRecord(tmp_path / names[1], "émoji 🐕", "s1", "test", {}),
    ]
    manifest = tmp_path / "pairs.jsonl"
    write_pairs(manifest, records)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert rows[1]["image"] == names[1]  # relative to the manifest's folder
    back = read_pairs(manifest)
    assert [(r.caption, r.scene_id, r.split, r.meta) for r in back] == [
        (r.caption, r.scene_id, r.split, r.meta) for r in records
    ]
    assert [r.image.resolve() for r in back] == [r.image.resolve() for r in records]
    # An image outside the manifest's folder is written as an absolute path.
    sub = tmp_path / "sub" / "pairs.jsonl"
    sub.parent.mkdir()
    write_pairs(sub, [PairRecord(outside, "x", "x")])
    assert json.loads(sub.read_text())["image"] == str(outside)
    assert read_pairs(sub)[0].image == outside


BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"just a string"', "expected a JSON object, got a string"),
    ('{"caption": "x"}', "missing field 'image'"),
    ('{"image": "images/s000000.png"}', "missing field 'caption'"),
    ('{"image": "images/s000000.png", "caption": 3}', "field 'caption' must be a string, got a number"),
    ('{"image": "images/s000000.png", "caption": "  "}', "field 'caption' is empty"),
    ('{"image": null, "caption": "x"}', "field 'image' must be a string, got null"),
    ('{"image": "images/s000000.png", "caption": "x", "split": "dev"}', "field 'split' must be one of"),
    ('{"image": "images/s000000.png", "caption": "x", "scene_id": [1]}', "field 'scene_id' must be"),
    ('{"image": "images/s000000.png", "caption": "x", "caption": "y"}', "duplicate key 'caption'"),
    ('{"image": "images/missing.png", "caption": "x"}', "image file not found: images/missing.png"),
]


@pytest.mark.parametrize(("bad_line", "expected"), BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    names = _make_images(tmp_path, 1)
    manifest = _write_lines(tmp_path / "pairs.jsonl", [_row(names[0]), "", bad_line, _row(names[0])])
    with pytest.raises(DataError) as info:
        read_pairs(manifest)
    err = info.value
    assert (err.path, err.line) == (manifest, 3)
    assert str(err).startswith(f"{manifest}:3: ")
    assert expected in str(err)
    assert isinstance(err, PersonaeError) and isinstance(err, ValueError)


def test_invalid_utf8_line(tmp_path: Path) -> None:
    names = _make_images(tmp_path, 1)
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_bytes(_row(names[0]).encode() + b"\n{\"caption\": \"\xff\"}\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: not valid UTF-8"):
        read_pairs(manifest)


def test_skip_bad_counts_and_keeps_good_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = _make_images(tmp_path, 2)
    lines = [_row(names[0])] + [bad for bad, _ in BAD_ROWS] + [_row(names[1], split="val")]
    manifest = _write_lines(tmp_path / "pairs.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="personae.data.manifest"):
        pairs = read_pairs(manifest, skip_bad=True)
    assert [r.line for r in pairs] == [1, len(lines)]
    assert len(pairs.skipped) == len(BAD_ROWS)
    assert [e.line for e in pairs.skipped] == list(range(2, 2 + len(BAD_ROWS)))
    assert f"skipped {len(BAD_ROWS)} bad row(s) of {len(lines)}" in caplog.text
    assert len(read_pairs(manifest, skip_bad=True, split="val")) == 1


def test_check_images_off_and_missing_manifest(tmp_path: Path) -> None:
    manifest = _write_lines(tmp_path / "pairs.jsonl", [_row("nowhere.png")])
    assert read_pairs(manifest, check_images=False)[0].image == tmp_path / "nowhere.png"
    with pytest.raises(DataError, match="manifest file not found"):
        read_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="split must be one of"):
        read_pairs(manifest, split="dev", check_images=False)


def test_data_error_pickles_and_formats() -> None:
    err = DataError("missing field 'caption'", "pairs.jsonl", 17)
    assert str(err) == "pairs.jsonl:17: missing field 'caption'"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.line == 17
    assert str(DataError("boom")) == "boom"
    assert str(DataError("boom", "a.png")) == "a.png: boom"


def test_write_rejects_reserved_meta(tmp_path: Path) -> None:
    record = PairRecord(tmp_path / "a.png", "x", "s", "train", {"caption": "clash"})
    with pytest.raises(ValueError, match="reserved key"):
        write_pairs(tmp_path / "pairs.jsonl", [record])
    assert not (tmp_path / "pairs.jsonl").exists()
