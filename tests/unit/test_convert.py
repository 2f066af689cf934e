"""`personae data convert`: each input format on small hand-made files with bad rows, and out to OpenAI."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from personae.app.cli import main
from personae.data.cards import CharacterCard, load_card, save_card_json
from personae.data.convert import convert
from personae.data.dialogues import load_character_cards, read_dialogues
from personae.errors import DataError


def png_bytes(colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw):
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_openai_messages_in_with_data_urls_paths_and_bad_rows(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat.png").write_bytes(png_bytes((0, 0, 255)))
    source = write_jsonl(tmp_path / "chats.jsonl", [
        {"id": "a", "messages": [
            {"role": "system", "content": "You are Mira, a witch."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]},
            {"role": "assistant", "name": "Mira", "content": "A red square."},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "name": "Mira", "content": "Still red."}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look"},
                                                   {"type": "image_url", "image_url": {"url": "pics/cat.png"}}]},
                      {"role": "assistant", "content": "Blue!"}]},
        "{not json",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "c1"}]}]},
        {"messages": [{"role": ["user"], "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                      {"role": "assistant", "content": "?"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "pics/none.png"}}]},
                      {"role": "assistant", "content": "?"}]},
    ])
    report = convert(source, "openai", tmp_path / "out")
    assert report.kept == 2 and len(report.refused) == 7
    reasons = "\n".join(report.refused)
    for line, reason in [(3, "invalid JSON"), (4, "role 'tool' is not supported"), (5, "is a tool call"),
                         (6, "role ['user'] is not supported"), (7, "remote image URL"),
                         (8, "no user message followed by an assistant reply"), (9, "image file not found")]:
        assert f"chats.jsonl:{line}" in reasons and reason in reasons
    records = read_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert [r.character for r in records] == ["mira", "assistant"]
    turns = [(t.user, t.reply) for t in records[0].turns]
    assert turns == [("What is this?", "A red square."), ("And now?", "Still red.")]
    assert np.asarray(Image.open(records[1].image))[0, 0].tolist() == [0, 0, 255]  # the file next to the input
    assert "1 conversation(s) have an image and 1 do not" not in report.summary()  # both have one
    cards = load_character_cards(tmp_path / "out" / "characters")
    assert cards["mira"].system_prompt == "You are Mira, a witch." and cards["mira"].name == "Mira"


def test_sharegpt_placeholders_must_match_images(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    source = tmp_path / "share.json"  # a JSON array, as many ShareGPT sets are
    source.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "Red."}],
         "images": ["a.png"], "system": "You are Bob."},
        {"conversations": [{"from": "human", "value": "<image><image>Two?"}, {"from": "gpt", "value": "No."}],
         "images": ["a.png"]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}]},
        ["not", "an", "object"],
    ]))
    report = convert(source, "sharegpt", tmp_path / "out")
    assert report.kept == 1 and len(report.refused) == 3
    assert "share.json:2: 2 <image> placeholder(s) in 'conversations' but 1 image(s) in 'images'" in report.refused[0]
    assert "'function_call' is not supported" in report.refused[1] and "row 4" in report.refused[2]
    (record,) = read_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert record.turns[0].user == "What colour?" and record.image is not None


def test_sillytavern_chat_export(tmp_path):
    source = write_jsonl(tmp_path / "Mira - 2024-01-01.jsonl", [
        {"user_name": "Ann", "character_name": "Mira", "create_date": "2024-01-01", "chat_metadata": {}},
        {"name": "Mira", "is_user": False, "mes": "Welcome, traveller.", "extra": {}},
        {"name": "Ann", "is_user": True, "mes": "Hello!", "extra": {"image": data_url(png_bytes())}},
        {"name": "Mira", "is_user": False, "mes": "A red picture.", "extra": {}},
        {"name": "System", "is_user": False, "is_system": True, "mes": "hidden note"},
        {"name": "Zed", "is_user": False, "mes": "I crash the party."},
        {"name": "Ann", "is_user": True, "mes": "Bye"},
        {"name": "Mira", "is_user": False, "mes": "Farewell."},
        {"is_user": True},
    ])
    report = convert(source, "sillytavern", tmp_path / "out")
    assert report.kept == 1 and len(report.refused) == 3
    assert ":5: a hidden or system message" in report.refused[0] and "'Zed'" in report.refused[1]
    assert ":9: a message line needs a string 'mes'" in report.refused[2]
    (record,) = read_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert [(t.user, t.reply) for t in record.turns] == [("Hello!", "A red picture."), ("Bye", "Farewell.")]
    assert record.character == "mira" and record.image is not None
    headerless = write_jsonl(tmp_path / "bad.jsonl", [{"name": "Mira", "is_user": False, "mes": "hi"}])
    bad = convert(headerless, "sillytavern", tmp_path / "out2")
    assert bad.kept == 0 and "not a SillyTavern chat" in bad.refused[0]


def test_out_to_openai_round_trips_through_the_openai_reader(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": [
        {"role": "system", "content": "Be Mira."},
        {"role": "user", "content": [{"type": "text", "text": "See?"},
                                     {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]},
        {"role": "assistant", "content": "Yes."}]}])
    report = convert(source, "openai", tmp_path / "out.jsonl", to="openai")
    assert report.kept == 1
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    image_part = row["messages"][1]["content"][1]
    assert base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1]) == png_bytes()
    again = convert(tmp_path / "out.jsonl", "openai", tmp_path / "again.jsonl", to="openai")
    assert again.kept == 1 and json.loads((tmp_path / "again.jsonl").read_text())["messages"] == row["messages"]


def test_personae_dialogues_out_to_openai(tmp_path):
    (tmp_path / "characters").mkdir()
    mira = CharacterCard(name="Mira", description="{{char}} is a witch.")
    save_card_json(mira, tmp_path / "characters" / "mira.json")
    (tmp_path / "img.png").write_bytes(png_bytes())
    write_jsonl(tmp_path / "dialogues.jsonl", [
        {"id": "d1", "character": "mira", "image": "img.png", "turns": [{"user": "hi", "reply": "hello"}]},
        {"id": "d2", "character": "nobody", "turns": [{"user": "hi", "reply": "hello"}]}])
    report = convert(tmp_path, "personae", tmp_path / "out.jsonl", to="openai")
    assert report.kept == 1 and "no card for character 'nobody'" in report.refused[0]
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert "Mira: Mira is a witch." in row["messages"][0]["content"]
    assert row["messages"][1]["content"][1]["type"] == "image_url" and row["messages"][2]["content"] == "hello"


def test_more_than_one_image_is_refused_into_personae_and_kept_for_openai(tmp_path):
    part = {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
    two = {"messages": [{"role": "user", "content": [part, part]}, {"role": "assistant", "content": "Two squares."}]}
    source = write_jsonl(tmp_path / "two.jsonl", [two])
    refused = convert(source, "openai", tmp_path / "o").refused
    assert "2 images: a personae conversation looks at one image" in refused[0]
    assert convert(source, "openai", tmp_path / "o.jsonl", to="openai").kept == 1


def test_one_card_for_all_and_the_command_line(tmp_path, capsys):
    card_path = tmp_path / "mira.json"
    save_card_json(CharacterCard(name="Mira", description="A witch."), card_path)
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "[1]"])
    status = main(["data", "convert", str(source), "--from", "openai", "--out", str(tmp_path / "out"),
                   "--card", str(card_path)])
    printed = capsys.readouterr().out
    assert "note:" not in printed
    assert status == 0 and "kept 1 row(s), refused 1, 1 character card(s)" in printed and "in.jsonl:2" in printed
    assert load_card(tmp_path / "out" / "characters" / "mira.json").description == "A witch."
    assert read_dialogues(tmp_path / "out" / "dialogues.jsonl")[0].character == "mira"
    assert main(["data", "convert", str(source), "--from", "openai", "--out", str(tmp_path / "out")]) == 2
    assert "output exists" in capsys.readouterr().err


def test_unknown_formats_are_errors(tmp_path):
    with pytest.raises(DataError, match="choose one of openai, sharegpt, sillytavern, personae"):
        convert(tmp_path, "alpaca", tmp_path / "out")


def test_a_mix_of_image_and_text_only_conversations_is_noted(tmp_path):
    source = write_jsonl(tmp_path / "mix.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "See?"},
                                                   {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]},
                      {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    report = convert(source, "openai", tmp_path / "out")
    assert report.kept == 2 and report.notes == [
        "1 conversation(s) have an image and 1 do not; training takes one kind per data set, so split the file by kind"]


def test_a_png_card_given_for_all_keeps_its_image(tmp_path):
    card = CharacterCard(name="Mira")
    card.avatar = np.full((8, 8, 3), 90, dtype=np.uint8)
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    convert(source, "openai", tmp_path / "out", card=card)
    saved = load_card(tmp_path / "out" / "characters" / "mira.png")
    assert saved.name == "Mira" and saved.avatar[0, 0].tolist() == [90, 90, 90]


def test_converted_data_trains_as_role_play_with_reply_labels(tmp_path):
    from personae.data.labels import IGNORE_INDEX
    from personae.data.roleplay import RolePlayDataset
    from personae.data.tokenizer import train_tokenizer

    source = write_jsonl(tmp_path / "share.jsonl", [
        {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Bob."}],
         "system": "You are Bob."},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}])
    assert convert(source, "sharegpt", tmp_path / "out").kept == 2
    records = read_dialogues(tmp_path / "out" / "dialogues.jsonl")
    cards = load_character_cards(tmp_path / "out" / "characters")
    tok = train_tokenizer(["Who are you? Bob. Hi Hello. You are Bob."] * 10, vocab_size=300)
    data = RolePlayDataset(records, cards, tok, image_size=16, max_tokens=512, progress=False)
    ids, labels = data.examples[0]
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "Bob."
