"""Tests for character cards: V1/V2/V3 JSON and PNG round trips, errors, substitution, examples."""

from __future__ import annotations

import base64
import copy
import io
import json
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from personae.data.cards import (
    PROMPT_FIELDS,
    SPEC_V2,
    SPEC_V3,
    CardError,
    CharacterCard,
    default_avatar,
    load_card,
    parse_mes_example,
    save_card_json,
    save_card_png,
)
from personae.errors import DataError

SECRET = "CREATOR-ONLY-7f3a"
EXTENSIONS = {
    "talkativeness": "0.5",
    "depth_prompt": {"prompt": "Stay in {{char}}'s voice", "depth": 4, "role": "system"},
    "world": "Harbour",
    "odd": [1, 2.5, None, True, {"ünïcode": "✓ 猫"}],
}
BOOK = {
    "name": "Harbour lore",
    "extensions": {"x": 1},
    "entries": [{"keys": ["lighthouse"], "content": "It is old.", "extensions": {}, "enabled": True,
                 "insertion_order": 0, "unknown_entry_key": "kept"}],
}  # fmt: skip
MES = (
    "<START>\n{{user}}: Hi.\n{{char}}: *waves*\nHello, {{user}}!\n"
    "<START>\n<USER>: Who are you?\n<BOT>: Aria."
)


def v2_card() -> dict[str, Any]:
    """A full V2 card as SillyTavern exports it: V1 mirrors and app keys at the top level."""
    data = {
        "name": "Aria", "description": "{{char}} keeps the lighthouse.", "personality": "calm",
        "scenario": "{{user}} arrives by boat.", "first_mes": "Welcome, {{user}}.", "mes_example": MES,
        "creator_notes": SECRET, "system_prompt": "You are {{char}}.",
        "post_history_instructions": "Stay brief.", "alternate_greetings": ["Oh, <USER>!"],
        "character_book": copy.deepcopy(BOOK), "tags": ["sea", "calm"], "creator": "me",
        "character_version": "1.2", "extensions": copy.deepcopy(EXTENSIONS),
        "future_field": {"nested": [1, "two"]},
    }  # fmt: skip
    return {
        "name": "Aria", "description": data["description"], "personality": "calm",
        "scenario": data["scenario"], "first_mes": data["first_mes"], "mes_example": MES,
        "avatar": "none", "talkativeness": "0.5", "fav": False, "create_date": "2024-1-1",
        "spec": SPEC_V2, "spec_version": "2.0", "data": data,
    }  # fmt: skip


def v3_card() -> dict[str, Any]:
    """A full V3 card with every V3 extra and unknown keys at both levels."""
    card = v2_card()
    card["spec"], card["spec_version"] = SPEC_V3, "3.0"
    card["data"].update(
        assets=[{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
        nickname="Ari", creator_notes_multilingual={"en": SECRET, "fr": SECRET + "-fr"},
        source=["https://example.org/aria"], group_only_greetings=["Hello, all."],
        creation_date=1700000000, modification_date=1700000500.5,
    )  # fmt: skip
    return card


def png_with_chunks(chunks: list[tuple[str, str, str]], image: Image.Image | None = None) -> bytes:
    """A PNG with (kind, keyword, text) chunks: kind is 'tEXt', 'zTXt' or 'iTXt'."""
    info = PngInfo()
    for kind, keyword, text in chunks:
        if kind == "iTXt":
            info.add_itxt(keyword, text, zip=True)
        else:
            info.add_text(keyword, text, zip=kind == "zTXt")
    buffer = io.BytesIO()
    (image or Image.new("RGB", (8, 8), (10, 20, 30))).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [v2_card, v3_card], ids=["v2", "v3"])
def test_json_round_trip_is_exact(make: Any, tmp_path: Path) -> None:
    original = make()
    path = tmp_path / "card.json"
    path.write_text(json.dumps(original), encoding="utf-8")
    card = load_card(path)
    assert card.to_json() == original
    save_card_json(card, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text(encoding="utf-8")) == original
    assert load_card(tmp_path / "again.json") == card
    assert card.avatar is None


@pytest.mark.parametrize("make", [v2_card, v3_card], ids=["v2", "v3"])
def test_png_round_trip_is_exact_and_keeps_the_avatar(make: Any, tmp_path: Path) -> None:
    original = make()
    pixels = np.random.default_rng(0).integers(0, 256, (24, 16, 3), dtype=np.uint8)
    card = CharacterCard.from_json(original)
    save_card_png(card, tmp_path / "card.png", avatar=Image.fromarray(pixels))
    loaded = load_card(tmp_path / "card.png")
    assert loaded.to_json() == original
    assert loaded.extensions == EXTENSIONS and loaded.character_book == BOOK
    np.testing.assert_array_equal(loaded.avatar, pixels)  # the avatar is visual context, exactly
    save_card_png(loaded, tmp_path / "again.png")  # no avatar argument: the card's own is kept
    np.testing.assert_array_equal(load_card(tmp_path / "again.png").avatar, pixels)


def test_v3_png_also_has_a_v2_backfill_that_says_so(tmp_path: Path) -> None:
    save_card_png(CharacterCard.from_json(v3_card()), tmp_path / "card.png")
    with Image.open(tmp_path / "card.png") as image:
        text = dict(image.text)
    chara = json.loads(base64.b64decode(text["chara"]))
    ccv3 = json.loads(base64.b64decode(text["ccv3"]))
    assert ccv3 == v3_card()
    assert chara["spec"] == SPEC_V2 and chara["spec_version"] == "2.0"
    assert "nickname" not in chara["data"] and "group_only_greetings" not in chara["data"]
    assert chara["data"]["creator_notes"].startswith("This character card is Character Card V3")
    assert chara["data"]["creator_notes"].endswith(SECRET)
    assert load_card(base64.b64decode(text["chara"])).spec == SPEC_V2


def test_v2_png_has_only_chara(tmp_path: Path) -> None:
    save_card_png(CharacterCard(name="Bo"), tmp_path / "bo.png")
    with Image.open(tmp_path / "bo.png") as image:
        assert set(image.text) == {"chara"}


def test_unknown_fields_are_split_by_level() -> None:
    card = CharacterCard.from_json(v2_card())
    assert card.unknown["data"] == {"future_field": {"nested": [1, "two"]}}
    assert card.unknown["root"]["talkativeness"] == "0.5" and card.unknown["root"]["fav"] is False
    assert "spec" not in card.unknown["root"] and "data" not in card.unknown["root"]


def test_top_level_mirrors_follow_edits() -> None:
    card = CharacterCard.from_json(v2_card())
    card.name, card.description = "Bea", "new"
    out = card.to_json()
    assert out["name"] == out["data"]["name"] == "Bea"
    assert out["description"] == out["data"]["description"] == "new"
    assert out["avatar"] == "none"  # non-mirror keys untouched


def test_to_json_returns_copies() -> None:
    card = CharacterCard.from_json(v3_card())
    out = card.to_json()
    out["data"]["extensions"]["world"] = "changed"
    out["data"]["tags"].append("x")
    out["data"]["future_field"]["nested"].append(3)
    assert card.to_json() == v3_card()


def test_v1_card_is_upgraded(tmp_path: Path) -> None:
    v1 = {"name": "Old", "description": "{{char}} is old.", "personality": "grumpy", "scenario": "",
          "first_mes": "Hm.", "mes_example": "", "avatar": "none", "chat": "Old - 2023"}  # fmt: skip
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    card = load_card(tmp_path / "v1.json")
    assert card.spec == SPEC_V2 and card.spec_version == "2.0"
    assert (card.name, card.personality, card.first_mes) == ("Old", "grumpy", "Hm.")
    out = card.to_json()
    assert out["data"]["description"] == "{{char}} is old." and out["data"]["tags"] == []
    assert out["data"]["extensions"] == {} and "character_book" not in out["data"]
    assert out["chat"] == "Old - 2023" and out["name"] == "Old"  # V1 keys stay for V1 readers
    assert load_card(json.dumps(out).encode()) == card


def test_v3_spec_version_is_kept_and_group_greetings_filled() -> None:
    obj = v3_card()
    obj["spec_version"] = "3.1"
    del obj["data"]["group_only_greetings"]
    card = CharacterCard.from_json(obj)
    assert card.spec_version == "3.1" and card.group_only_greetings is None
    assert card.to_json()["data"]["group_only_greetings"] == []  # required by V3
    assert card.to_json(SPEC_V2)["spec_version"] == "2.0"


# --------------------------------------------------------------------------- PNG variants


@pytest.mark.parametrize("ccv3_first", [True, False])
def test_ccv3_is_preferred_over_chara(ccv3_first: bool) -> None:
    v2, v3 = v2_card(), v3_card()
    v2["data"]["name"], v3["data"]["name"] = "FromChara", "FromCcv3"
    chunks = [("tEXt", "chara", b64(v2)), ("tEXt", "ccv3", b64(v3))]
    card = load_card(png_with_chunks(chunks[::-1] if ccv3_first else chunks))
    assert card.name == "FromCcv3" and card.spec == SPEC_V3


@pytest.mark.parametrize("kind", ["zTXt", "iTXt"])
def test_compressed_and_international_text_chunks(kind: str) -> None:
    card = load_card(png_with_chunks([(kind, "chara", b64(v2_card()))]))
    assert card.to_json() == v2_card()


def test_bare_json_chunk_and_odd_keyword_case() -> None:
    card = load_card(png_with_chunks([("tEXt", "Chara", json.dumps(v2_card()))]))
    assert card.name == "Aria"


def test_loading_from_bytes_and_saving_over_a_card_png(tmp_path: Path) -> None:
    save_card_png(CharacterCard(name="First"), tmp_path / "first.png")
    with Image.open(tmp_path / "first.png") as image:  # carries First's chara chunk in .info
        save_card_png(CharacterCard(name="Second"), tmp_path / "second.png", avatar=image)
    assert load_card(tmp_path / "second.png").name == "Second"
    assert load_card((tmp_path / "second.png").read_bytes()).name == "Second"


def test_avatar_from_rgba_and_numpy(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    save_card_png(CharacterCard(name="Red"), tmp_path / "red.png", avatar=rgba)
    avatar = load_card(tmp_path / "red.png").avatar
    assert avatar is not None and avatar.shape == (4, 4, 3) and (avatar[..., 0] == 200).all()
    with pytest.raises(ValueError, match="uint8"):
        save_card_png(CharacterCard(name="Red"), tmp_path / "bad.png", avatar=rgba.astype(np.float32))


def test_default_avatar_is_a_deterministic_coloured_square() -> None:
    first, again, other = default_avatar("Aria"), default_avatar("Aria"), default_avatar("Zed")
    assert first.size == (256, 256) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert first.getpixel((2, 2)) != other.getpixel((2, 2))
    white = (np.asarray(first) == 255).all(axis=-1).mean()
    assert 0.02 < white < 0.5  # the initial is drawn, in white


# --------------------------------------------------------------------------- errors


def _set_data(key: str, value: Any) -> bytes:
    card = v3_card()
    card["data"][key] = value
    return json.dumps(card).encode()


def _bad_crc_png() -> bytes:
    data = bytearray(png_with_chunks([("tEXt", "chara", b64(v2_card()))]))
    data[40] ^= 0xFF  # inside the first chunk after IHDR
    return bytes(data)


BAD_CARDS: dict[str, tuple[bytes, str]] = {
    "gif": (b"GIF89a\x01\x00\x01\x00", "neither a PNG nor a JSON object"),
    "json-array": (b"[1, 2]", "neither a PNG nor a JSON object"),
    "plain-png": (png_with_chunks([]), "no 'chara' or 'ccv3' text chunk"),
    "other-text-only": (png_with_chunks([("tEXt", "Comment", "hi")]), "no 'chara' or 'ccv3'"),
    "bad-base64": (png_with_chunks([("tEXt", "chara", "ab$cd!!")]), "'chara' is not valid base64"),
    "empty-chunk": (png_with_chunks([("tEXt", "ccv3", "  ")]), "'ccv3' is empty"),
    "chunk-not-json": (png_with_chunks([("tEXt", "chara", b64(b"{oops"))]), "'chara' is not valid JSON"),
    "chunk-not-utf8": (png_with_chunks([("tEXt", "chara", b64(b"\xff\xfe{"))]), "not UTF-8"),
    "bad-crc": (_bad_crc_png(), "bad CRC"),
    "truncated-png": (png_with_chunks([("tEXt", "chara", b64(v2_card()))])[:60], "truncated"),
    "bad-json": (b'{"spec": "chara_card_v2",\n "data": {', "not valid JSON: Expecting property name"),
    "not-utf8": (b'{"name": "\xff"}', "not UTF-8"),
    "nan": (b'{"name": "A", "x": NaN}', "not valid JSON: NaN is not a JSON value"),
    "deep": (b'{"a":' * 100_000, "nested more than 64 levels deep"),
    "wrong-spec": (json.dumps({"spec": "chara_card_v9", "data": {"name": "A"}}).encode(), "unsupported spec"),
    "missing-spec": (json.dumps({"data": {"name": "A"}}).encode(), "missing 'spec'"),
    "data-not-object": (json.dumps({"spec": SPEC_V2, "data": []}).encode(), "'data' must be an object"),
    "no-data": (json.dumps({"spec": SPEC_V2}).encode(), "'data' must be an object, got null"),
    "missing-name": (json.dumps({"spec": SPEC_V2, "data": {"description": "x"}}).encode(), "'data.name'"),
    "empty-name": (_set_data("name", "  "), "'data.name' is empty"),
    "v1-no-name": (json.dumps({"description": "x"}).encode(), "missing 'name'"),
    "tags-string": (_set_data("tags", "a,b"), "'data.tags' must be a list of strings, got a string"),
    "tags-ints": (_set_data("tags", ["a", 1, "b"]), "got a list whose item 1 is a number"),
    "greetings-null": (_set_data("alternate_greetings", None), "'data.alternate_greetings'"),
    "description-number": (_set_data("description", 3), "'data.description' must be a string, got a number"),
    "extensions-list": (_set_data("extensions", []), "'data.extensions' must be an object"),
    "book-string": (_set_data("character_book", "x"), "'data.character_book' must be an object or null"),
    "v3-date-string": (_set_data("creation_date", "2024"), "'data.creation_date' must be a number"),
    "v3-assets": (_set_data("assets", ["icon.png"]), "list of objects, got a list of strings"),
    "spec-version-number": (json.dumps({**v2_card(), "spec_version": 2.0}).encode(), "'spec_version'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CARDS))
def test_bad_cards_raise_card_error_naming_the_file(case: str, tmp_path: Path) -> None:
    raw, expected = BAD_CARDS[case]
    path = tmp_path / f"{case}.card"
    path.write_bytes(raw)
    with pytest.raises(CardError) as info:
        load_card(path)
    assert expected in str(info.value), str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, DataError) and info.value.path == path


def test_bad_bytes_are_named_by_the_caller() -> None:
    with pytest.raises(CardError, match=r"^upload\.png: .*no 'chara'"):
        load_card(png_with_chunks([]), name="upload.png")
    with pytest.raises(CardError, match=r"^<bytes>: empty card file"):
        load_card(b"")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="card file not found"):
        load_card(tmp_path / "nope.png")
    with pytest.raises(CardError, match="not a file"):
        load_card(tmp_path)


def test_size_limits(tmp_path: Path) -> None:
    png = png_with_chunks([("tEXt", "chara", b64(v2_card()))])
    with pytest.raises(CardError, match="PNG card is over the limit of 100 bytes"):
        load_card(png, max_png_bytes=100)
    with pytest.raises(CardError, match="over the limit of 100 bytes of JSON"):
        load_card(png, max_json_bytes=100)
    with pytest.raises(CardError, match="JSON card is over the limit"):
        load_card(json.dumps(v2_card()).encode(), max_json_bytes=100)
    (tmp_path / "big.json").write_bytes(b"{" + b" " * 5000 + b"}")
    with pytest.raises(CardError, match="over the limit"):
        load_card(tmp_path / "big.json", max_json_bytes=1000, max_png_bytes=1000)
    with pytest.raises(CardError, match="over the limit"):
        save_card_json(CharacterCard.from_json(v2_card()), tmp_path / "x.json", max_json_bytes=100)
    assert not (tmp_path / "x.json").exists()


def test_compressed_chunk_cannot_expand_past_the_limit() -> None:
    bomb = PngInfo()
    bomb.add_text("chara", "A" * 200_000, zip=True)  # ~ 200 bytes compressed
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG", pnginfo=bomb)
    with pytest.raises(CardError, match="'chara' expands past the limit"):
        load_card(buffer.getvalue(), max_json_bytes=1000)


@pytest.mark.parametrize("kind", ["tEXt", "zTXt"])
def test_cards_over_pillows_text_chunk_cap_still_load(kind: str) -> None:
    card = CharacterCard(name="Big", description="The harbour at night. " * 70_000)  # ~1.5 MB
    png = png_with_chunks([(kind, "chara", b64(card.to_json()))])
    loaded = load_card(png)
    assert loaded == card and loaded.avatar is not None and loaded.avatar.shape == (8, 8, 3)


def test_avatar_pixel_limit() -> None:
    png = png_with_chunks([("tEXt", "chara", b64(v2_card()))], Image.new("RGB", (40, 30)))
    with pytest.raises(CardError, match=r"avatar: .*1200 pixels, over the limit of 1000"):
        load_card(png, max_pixels=1000)
    assert load_card(png, max_pixels=1200).avatar.shape == (30, 40, 3)  # type: ignore[union-attr]


def test_constructor_validates() -> None:
    with pytest.raises(CardError, match="'tags' must be a list of strings"):
        CharacterCard(name="A", tags="a,b")  # type: ignore[arg-type]
    with pytest.raises(CardError, match="unsupported spec"):
        CharacterCard(name="A", spec="chara_card_v1")
    with pytest.raises(CardError, match="'name' is empty"):
        CharacterCard(name="")
    assert CharacterCard(name="A", spec=SPEC_V3).spec_version == "3.0"


def test_card_error_pickles() -> None:
    err = CardError("bad", "a.png")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, CardError) and str(again) == "a.png: bad"


def test_crc_is_checked_on_every_chunk() -> None:
    png = bytearray(png_with_chunks([("tEXt", "chara", b64(v2_card()))]))
    iend = png.rindex(b"IEND")
    png[iend + 4 : iend + 8] = struct.pack(">I", zlib.crc32(b"IEND") ^ 1)
    with pytest.raises(CardError, match="chunk 'IEND' .* bad CRC"):
        load_card(bytes(png))


# --------------------------------------------------------------------------- prompt side


def test_render_substitutes_all_macros_in_one_pass() -> None:
    card = CharacterCard(name="Aria")
    text = "{{char}}/{{CHAR}}/{{ Char }}/<BOT>/<bot>/<char>|{{user}}/{{User}}/<USER>/<user>"
    assert card.render(text, user="Bob") == "Aria/Aria/Aria/Aria/Aria/Aria|Bob/Bob/Bob/Bob"
    assert card.render("hi {{user}}", user="{{char}}") == "hi {{char}}"  # no re-substitution
    assert card.render("{{random}} {char}") == "{{random}} {char}"


def test_v3_nickname_stands_in_for_the_name() -> None:
    card = CharacterCard.from_json(v3_card())
    assert card.render("{{char}}") == "Ari"


def test_prompt_fields_are_substituted_and_never_hold_creator_notes() -> None:
    for card in (CharacterCard.from_json(v2_card()), CharacterCard.from_json(v3_card())):
        fields = card.prompt_fields(user="Bob")
        assert tuple(fields) == PROMPT_FIELDS
        assert "creator_notes" not in fields and "creator_notes" not in PROMPT_FIELDS
        assert not any(SECRET in value for value in fields.values())
        assert not any("{{" in value or "<USER>" in value for value in fields.values())
        assert fields["scenario"] == "Bob arrives by boat."
        assert fields["system_prompt"] == f"You are {card.nickname or 'Aria'}."


def test_greetings() -> None:
    card = CharacterCard.from_json(v2_card())
    assert card.greetings("Bob") == ["Welcome, Bob.", "Oh, Bob!"]
    assert CharacterCard(name="A", alternate_greetings=["x"]).greetings() == ["x"]


def test_parse_mes_example() -> None:
    assert parse_mes_example(MES) == [
        [("user", "Hi."), ("char", "*waves*\nHello, {{user}}!")],
        [("user", "Who are you?"), ("char", "Aria.")],
    ]
    text = "*She looks up.*\n{{char}}: Yes?\r\n<start>\r\n\r\n<START>{{User}}:no space\n  {{char}} :  spaced "
    assert parse_mes_example(text) == [
        [("char", "*She looks up.*"), ("char", "Yes?")],
        [("user", "no space"), ("char", "spaced")],
    ]
    assert parse_mes_example("") == [] and parse_mes_example("<START>\n<START>") == []
    named = "<START>\nBob: hello\nAria: hi\nnarration: kept in Aria's turn"
    assert parse_mes_example(named, char_name="Aria", user_name="Bob") == [
        [("user", "hello"), ("char", "hi\nnarration: kept in Aria's turn")]
    ]
    assert parse_mes_example(named) == [[("char", named.removeprefix("<START>\n"))]]


def test_example_dialogues_substitute_names() -> None:
    card = CharacterCard.from_json(v2_card())
    assert card.example_dialogues("Bob")[0] == [("user", "Hi."), ("char", "*waves*\nHello, Bob!")]
