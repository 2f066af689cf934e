"""Property tests (hypothesis, bounded): cards, manifests, dialogue rows, strict JSON, images, tokenizer."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from personae.data.cards import (
    SPEC_V2,
    SPEC_V3,
    CardError,
    CharacterCard,
    character_id,
    load_card,
    save_card_json,
    save_card_png,
)
from personae.data.dialogues import parse_dialogue
from personae.data.images import load_image_bytes
from personae.data.jsonl import JsonError, strict_json_loads
from personae.data.manifest import PairRecord, read_pairs, write_pairs
from personae.data.tokenizer import Tokenizer, train_tokenizer
from personae.errors import DataError

# Bounded so the whole file runs in seconds in CI; PERSONAE_FUZZ_EXAMPLES=5000 runs the same
# properties as a longer fuzz run (see SECURITY.md for the figures of the last one).
EXAMPLES = int(os.environ.get("PERSONAE_FUZZ_EXAMPLES", "40"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=max(1, EXAMPLES * 3 // 8), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # PNG writing is slower

text = st.text(max_size=40)  # hypothesis never draws lone surrogates here: valid Unicode
name = text.filter(lambda s: s.strip() != "")
finite = st.floats(allow_nan=False, allow_infinity=False)
scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | text
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                          max_leaves=12)


@st.composite
def cards(draw: st.DrawFn) -> CharacterCard:
    v3 = draw(st.booleans())
    extras = {"nickname": draw(st.none() | text), "source": draw(st.none() | st.lists(text, max_size=3)),
              "creation_date": draw(st.none() | st.integers(0, 2**40)),
              "group_only_greetings": draw(st.lists(text, max_size=2))} if v3 else {}  # V3 always writes the list
    known = set(CharacterCard.__dataclass_fields__)
    unknown_data = draw(st.dictionaries(text.filter(lambda k: k not in known), json_value, max_size=3))
    return CharacterCard(
        name=draw(name), description=draw(text), personality=draw(text), first_mes=draw(text),
        mes_example=draw(text), creator_notes=draw(text), alternate_greetings=draw(st.lists(text, max_size=3)),
        tags=draw(st.lists(text, max_size=3)), extensions=draw(st.dictionaries(text, json_value, max_size=3)),
        character_book=draw(st.none() | st.dictionaries(text, json_value, max_size=2)),
        spec=SPEC_V3 if v3 else "chara_card_v2", unknown={"root": {}, "data": unknown_data}, **extras)


@FAST
@given(card=cards())
def test_every_accepted_card_saves_and_reads_back_as_json(card: CharacterCard, tmp_path: Path) -> None:
    save_card_json(card, tmp_path / "card.json")
    assert load_card(tmp_path / "card.json") == card


@SLOW
@given(card=cards())
def test_every_accepted_card_saves_and_reads_back_as_png(card: CharacterCard, tmp_path: Path) -> None:
    avatar = Image.new("RGB", (8, 8), (40, 80, 120))
    save_card_png(card, tmp_path / "card.png", avatar)
    loaded = load_card(tmp_path / "card.png")
    assert loaded == card
    assert loaded.avatar is not None and loaded.avatar.shape == (8, 8, 3)


@FAST
@given(raw=st.binary(max_size=300) | json_value.map(lambda v: json.dumps({"spec": SPEC_V2, "data": v}).encode()))
def test_any_bytes_are_a_card_or_a_card_error(raw: bytes) -> None:
    try:
        card = load_card(raw, name="fuzz")
    except CardError as error:
        assert str(error).startswith("fuzz")
    else:
        assert load_card(json.dumps(card.to_json()).encode()) == card


@FAST
@given(data=st.data())
def test_damaged_png_cards_are_card_errors(data: st.DataObject, tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    if not path.exists():
        save_card_png(CharacterCard(name="Aria", description="d"), path, Image.new("RGB", (4, 4)))
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(raw)))
    try:
        card = load_card(bytes(raw[:cut]), name="png")
    except CardError as error:
        assert str(error).startswith("png: ")
    else:
        assert card.name == "Aria"  # a flip in pixel data only: still the same card


@FAST
@given(value=json_value)
def test_strict_json_reads_back_what_json_writes(value: object) -> None:
    assert strict_json_loads(json.dumps(value, ensure_ascii=False)) == value


@FAST
@given(raw=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_strict_json_never_raises_anything_but_json_error(raw: str) -> None:
    try:
        value = strict_json_loads(raw)
    except JsonError as error:
        assert str(error)
        return
    assert value == json.loads(raw)  # what strict JSON accepts, it reads as the standard library does


rows = st.one_of(
    st.fixed_dictionaries({"image": name, "caption": name}, optional={"split": st.sampled_from(["train", "val", "x"]),
                                                                      "scene_id": json_value, "meta": json_value}),
    json_value,
).map(lambda v: json.dumps(v, ensure_ascii=False)) | st.text(max_size=40).map(lambda s: s.replace("\n", " "))


@FAST
@given(lines=st.lists(rows, max_size=8))
def test_a_manifest_of_any_rows_reads_with_skip_bad_and_counts_every_row(lines: list[str], tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    counted = sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))
    manifest = read_pairs(path, skip_bad=True, check_images=False)
    assert len(manifest) + len(manifest.skipped) == counted
    assert all(isinstance(error, DataError) and error.line for error in manifest.skipped)


@FAST
@given(records=st.lists(st.builds(PairRecord, image=name.map(lambda s: Path("images") / character_id(s)),
                                  caption=name, scene_id=name, split=st.sampled_from(["train", "val", "test"])),
                        max_size=5))
def test_manifests_write_and_read_back(records: list[PairRecord], tmp_path: Path) -> None:
    path = tmp_path / "out" / "pairs.jsonl"
    records = [PairRecord(path.parent / r.image, r.caption, r.scene_id, r.split) for r in records]
    back = read_pairs(write_pairs(path, records), check_images=False)
    assert [(r.image, r.caption, r.scene_id, r.split) for r in back] == [
        (r.image, r.caption, r.scene_id, r.split) for r in records]


turn = st.fixed_dictionaries({"user": json_value | name, "reply": json_value | name})
dialogue_rows = st.fixed_dictionaries(
    {"character": json_value | name, "turns": st.lists(turn, max_size=3) | json_value},
    optional={"split": json_value, "image": json_value, "character_split": json_value})


@FAST
@given(row=dialogue_rows | json_value)
def test_any_dialogue_row_is_a_record_or_a_data_error(row: object) -> None:
    try:
        record = parse_dialogue(json.dumps(row), Path("d.jsonl"), 3, check_images=False)
    except DataError as error:
        assert str(error).startswith("d.jsonl:3: ")
    else:
        assert record.turns and all(t.user.strip() and t.reply.strip() for t in record.turns)


@FAST
@given(names=st.lists(name, min_size=2, max_size=6, unique_by=lambda s: character_id(s)))
def test_character_ids_are_safe_and_stable(names: list[str]) -> None:
    for each in names:
        cid = character_id(each)
        assert cid == character_id(each) and 0 < len(cid) <= 48 and cid.isascii()
        assert all(ch.isalnum() or ch == "-" for ch in cid) and cid == cid.lower()


@FAST
@given(prefix=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM", b""]),
       tail=st.binary(max_size=200))
def test_any_image_bytes_decode_or_raise_data_error(prefix: bytes, tail: bytes) -> None:
    try:
        pixels = load_image_bytes(prefix + tail, name="fuzz")
    except DataError as error:
        assert str(error).startswith("fuzz")
    else:
        assert pixels.ndim == 3 and pixels.shape[2] == 3


@FAST
@given(data=st.data())
def test_damaged_pngs_decode_or_raise_data_error(data: st.DataObject) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (1, 2, 3)).save(buffer, format=data.draw(st.sampled_from(["PNG", "GIF", "WEBP", "JPEG"])))
    raw = bytearray(buffer.getvalue())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        pixels = load_image_bytes(bytes(raw[: data.draw(st.integers(1, len(raw)))]), name="damaged")
    except DataError as error:
        assert str(error).startswith("damaged")
    else:
        assert pixels.shape[2] == 3


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(["the character looks at the picture and answers", "ünïcödé テキスト 🦜"] * 20, vocab_size=300)


@settings(max_examples=EXAMPLES * 5 // 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=st.text(max_size=80))
def test_tokenizer_round_trips_any_text(sample: str, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(sample, add_cls=False, parse_special=False)
    assert tokenizer.decode(ids, skip_special=False) == sample


def test_tokenizer_refuses_lone_surrogates_with_a_clear_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at character 1"):
        tokenizer.encode("a\ud800")
    with pytest.raises(ValueError, match="lone surrogate"):
        tokenizer.encode_many(["fine", "\udfff"])
