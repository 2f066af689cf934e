"""Cards over the API: lossless export (JSON and the PNG as uploaded), cards cut to fit, no doubled definitions."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from personae.data.cards import CharacterCard, load_card, save_card_png
from personae.data.prompt import PromptBuilder, Turn
from personae.serve.app import RunBundle
from tests.e2e.helpers import chat_body

V3_CARD = {"spec": "chara_card_v3", "spec_version": "3.0", "x_root": 1,
           "data": {"name": "Zed Quill", "description": "A poet of the docks.", "nickname": "Zed",
                    "character_book": {"entries": [{"keys": ["rain"], "content": "Rain makes Zed sad.",
                                                    "enabled": True, "insertion_order": 1}]},
                    "extensions": {"depth_prompt": {"depth": 4}}, "x_data": [1, 2]}}


def test_json_card_exports_as_uploaded(make_app: Callable[..., FastAPI], run_copy: Path) -> None:
    client = TestClient(make_app(run=run_copy))
    raw = json.dumps(V3_CARD, indent=1).encode()
    created = client.post("/v1/characters", content=raw, headers={"content-type": "application/json"})
    assert created.status_code == 201 and created.json()["warnings"] == []
    assert (run_copy / "uploads" / "zed-quill.json").read_bytes() == raw  # stored byte for byte
    assert client.get("/v1/characters/zed-quill/card").json() == V3_CARD
    png = client.get("/v1/characters/zed-quill/card.png")
    assert png.headers["content-type"] == "image/png"
    assert load_card(png.content).to_json() == load_card(raw).to_json()  # a PNG of the same card


def test_png_card_exports_its_original_bytes_with_transparency(make_app: Callable[..., FastAPI], run_copy: Path,
                                                               tmp_path: Path) -> None:
    client = TestClient(make_app(run=run_copy))
    path = tmp_path / "pia.png"
    see_through = Image.new("RGBA", (32, 32), (20, 90, 200, 0))
    save_card_png(CharacterCard(name="Pia Lumen", description="Paints light."), path, avatar=see_through)
    uploaded = path.read_bytes()
    assert client.post("/v1/characters", content=uploaded, headers={"content-type": "image/png"}).status_code == 201
    exported = client.get("/v1/characters/pia-lumen/card.png").content
    assert exported == uploaded and Image.open(io.BytesIO(exported)).getpixel((0, 0)) == (20, 90, 200, 0)
    assert client.get("/v1/characters/pia-lumen/card").json() == load_card(uploaded).to_json()
    assert client.get("/v1/characters/nobody/card.png").status_code == 404


def test_a_too_long_card_uploads_with_a_warning_and_chats_with_one(make_app: Callable[..., FastAPI],
                                                                   run_copy: Path) -> None:
    client = TestClient(make_app(run=run_copy))
    long_card = {"spec": "chara_card_v2", "spec_version": "2.0",
                 "data": {"name": "Long Lore", "description": "The keeper of the long harbour. " * 150}}
    created = client.post("/v1/characters", json=long_card).json()
    assert created["prompt_tokens"] > created["prompt_budget"]
    assert any("the description was cut" in warning for warning in created["warnings"])
    chat = client.post("/v1/chat/completions", json=chat_body(model="personae/long-lore", max_tokens=4))
    assert chat.status_code == 200 and "the description was cut" in chat.json()["warnings"][0]
    streamed = client.post("/v1/chat/completions", json=chat_body(model="personae/long-lore", max_tokens=4,
                                                                  stream=True))
    first = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))
    assert "the description was cut" in first["warnings"][0]


def test_a_system_message_carrying_the_card_is_not_doubled(make_app: Callable[..., FastAPI], run_copy: Path,
                                                           bundle: RunBundle) -> None:
    client = TestClient(make_app(run=run_copy))
    description = "Zed is a poet of the docks who writes about ships, gulls, ropes and the grey morning tide."
    client.post("/v1/characters", json={"name": "Zed", "description": description})

    def prompt_tokens(system: str) -> int:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello"}]
        answer = client.post("/v1/chat/completions", json=chat_body(model="personae/zed", messages=messages))
        return answer.json()["usage"]["prompt_tokens"]

    described = len(bundle.tokenizer.encode(description, add_cls=False, add_eos=False))
    carrying = prompt_tokens(f"Write Zed's next reply in a role-play.\n{description}")
    other = prompt_tokens("Write Zed's next reply in a role-play.")  # the card's definition is added to this one
    assert abs(carrying - other) < described // 2  # the description is in the prompt once, not twice


def test_the_server_adds_the_lorebook_entries_a_message_activates(make_app: Callable[..., FastAPI], run_copy: Path,
                                                                  bundle: RunBundle) -> None:
    client = TestClient(make_app(run=run_copy))
    assert client.post("/v1/characters", json=V3_CARD).status_code == 201

    def prompt_tokens(text: str) -> int:
        answer = client.post("/v1/chat/completions", json=chat_body(text, model="personae/zed-quill"))
        return answer.json()["usage"]["prompt_tokens"]

    builder, card = PromptBuilder(bundle.tokenizer), load_card(json.dumps(V3_CARD).encode())
    for text, entries in (("Is it sunny", 0), ("Is it RAIN", 1)):
        prompt = builder.build(card, [Turn(text)], max_tokens=10_000)
        assert prompt.lore_entries == entries
        assert prompt_tokens(text) == len(prompt.ids) + bundle.model.image_prefix_length()
