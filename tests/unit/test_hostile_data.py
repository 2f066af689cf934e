"""Hostile data (issue 16): strict JSON for cards, manifests and dialogues; ids for any name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from personae.data.cards import CardError, CharacterCard, character_id, load_card, save_card_json
from personae.data.convert_readers import read_rows
from personae.data.dialogues import read_dialogues
from personae.data.jsonl import MAX_JSON_DEPTH, JsonError, numbered_lines, strict_json_loads
from personae.data.manifest import read_pairs
from personae.errors import DataError
from personae.serve.characters import CharacterRegistry


def _card(**data: object) -> bytes:
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Aria", **data}}).encode()


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_a_card_with_1e999_is_refused_and_never_stored_as_infinity(tmp_path: Path) -> None:
    raw = _card().replace(b'"name"', b'"x": 1e999, "name"')
    with pytest.raises(CardError, match=r"upload: .*data\.x is inf, not a JSON number"):
        load_card(raw, name="upload")
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(CardError, match="not valid JSON"):
            load_card(_card().replace(b'"name"', b'"x": ' + constant + b', "name"'), name="upload")
    with pytest.raises(CardError, match="creation_date is inf"):
        CharacterCard(name="A", spec="chara_card_v3", creation_date=float("inf"))


def test_cards_nested_hundreds_deep_or_with_a_list_spec_are_card_errors() -> None:
    deep = json.dumps({"spec": "chara_card_v2", "data": {"name": "A"}})[:-1] + ', "x": ' + _nested(300) + "}"
    with pytest.raises(CardError, match="x.a.a.*nested more than 64 levels deep"):
        load_card(deep.encode(), name="upload")
    for spec in ([], {}, ["chara_card_v2"], 2):
        with pytest.raises(CardError, match="'spec' must be a string"):
            load_card(json.dumps({"spec": spec, "data": {"name": "A"}}).encode(), name="upload")


def test_lone_surrogates_in_a_card_are_refused_at_validation(tmp_path: Path) -> None:
    raw = _card(description="hi").replace(b'"hi"', b'"h\\ud800i"')
    with pytest.raises(CardError, match=r"data\.description holds a lone surrogate U\+D800"):
        load_card(raw, name="upload")
    with pytest.raises(CardError, match="lone surrogate"):
        CharacterCard(name="A\udfff")
    with pytest.raises(CardError, match=r"unknown\.data\.k holds a lone surrogate"):
        CharacterCard(name="A", unknown={"root": {}, "data": {"k": "\ud83d"}})
    good = CharacterCard(name="A", description="a real emoji \U0001f600 and \\ud800 as text")
    save_card_json(good, tmp_path / "a.json")
    assert load_card(tmp_path / "a.json") == good


def test_every_name_gets_an_id_and_non_latin_names_do_not_collide(tmp_path: Path) -> None:
    names = ["Ωμέγα", "Άλφα", "李白", "杜甫", "Дмитрий", "ア", "イ", "🦜", "Dr. 李", "Dr. 杜"]
    ids = [character_id(name) for name in names]
    assert len(set(ids)) == len(names)
    assert all(i and i.replace("-", "").isalnum() and i.isascii() and len(i) <= 48 for i in ids)
    assert character_id("Ωμέγα") == character_id(" Ωμέγα ") == "c-59b35e54"  # stable
    assert character_id("Chef Baptiste!") == "chef-baptiste" and character_id("Zoë") == "zoe"
    long_a, long_b = "a" * 60 + "x", "a" * 60 + "y"
    assert character_id(long_a) != character_id(long_b) and len(character_id(long_a)) <= 48
    registry = CharacterRegistry(tmp_path / "run", image_size=8)
    first = registry.add(json.dumps({"name": "Ωμέγα"}).encode())
    second = registry.add(json.dumps({"name": "李白"}).encode())
    assert first.id != second.id and {first.id, second.id} == {character_id("Ωμέγα"), character_id("李白")}


def _write_pairs(tmp_path: Path, rows: list[str]) -> Path:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_manifest_deep_nesting_is_a_skippable_row_error_never_recursion(tmp_path: Path) -> None:
    good = '{"image": "a.png", "caption": "a cat"}'
    deep = '{"image": "a.png", "caption": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    medium = '{"image": "a.png", "caption": "x", "meta": ' + _nested(MAX_JSON_DEPTH + 5) + "}"
    path = _write_pairs(tmp_path, [good, deep, medium, good])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: invalid JSON: nested more than 64"):
        read_pairs(path)
    manifest = read_pairs(path, skip_bad=True)
    assert len(manifest) == 2 and [e.line for e in manifest.skipped] == [2, 3]
    assert "meta.a.a" in str(manifest.skipped[1])


def test_a_caption_with_a_lone_surrogate_fails_validation_naming_the_line(tmp_path: Path) -> None:
    rows = ['{"image": "a.png", "caption": "ok"}', '{"image": "a.png", "caption": "bad\\udc80"}']
    path = _write_pairs(tmp_path, rows)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: invalid JSON: caption holds a lone surrogate U\+DC80"):
        read_pairs(path)
    assert len(read_pairs(path, skip_bad=True)) == 1


def test_dialogue_rows_are_strict_too(tmp_path: Path) -> None:
    good = {"character": "aria", "turns": [{"user": "hi", "reply": "hello"}]}
    rows = [json.dumps(good), json.dumps(good).replace("hello", "he\\ud800llo"),
            json.dumps({**good, "x": 1}).replace("1}", "NaN}"), json.dumps({**good, "m": json.loads(_nested(200))})]
    path = tmp_path / "dialogues.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"dialogues.jsonl:2: invalid JSON: turns\[0\]\.reply holds a lone surrogate"):
        read_dialogues(path)
    assert len(read_dialogues(path, skip_bad=True)) == 1


def test_an_overlong_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "' + b"x" * 5000 + b'"}\n{"c": 3}\n')
    lines = list(numbered_lines(path, max_bytes=1000))
    assert [n for n, _ in lines] == [1, 2, 3]
    assert lines[0][1] == '{"a": 1}' and lines[2][1] == '{"c": 3}'
    assert isinstance(lines[1][1], DataError) and "over the limit of 1000 bytes" in str(lines[1][1])


def test_strict_loader_accepts_standard_json_exactly() -> None:
    text = '{"a": [1, 2.5, -3e10, true, null, "é\\u00e9\\ud83d\\ude00"], "b": {}}'
    assert strict_json_loads(text) == json.loads(text)
    with pytest.raises(JsonError, match="duplicate key 'a'"):
        strict_json_loads('{"a": 1, "a": 2}')
    assert strict_json_loads(_nested(MAX_JSON_DEPTH - 1))  # the limit itself is allowed
    with pytest.raises(JsonError, match="nested more than 64"):
        strict_json_loads(_nested(MAX_JSON_DEPTH + 1))


def test_a_json_array_of_chat_rows_is_read_strictly_too(tmp_path: Path) -> None:
    for name, text in (("deep", "[" + "[" * 100_000 + "]" * 100_000 + "]"), ("nan", '[{"a": NaN}]')):
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(DataError, match=f"{name}.json: not a JSON array of rows: "):
            list(read_rows(path))
