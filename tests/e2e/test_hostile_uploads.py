"""Hostile uploads over HTTP (issue 16, data half): foreign image formats and hostile cards are 400s."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from personae.data.cards import character_id
from tests.e2e.helpers import chat_body, data_url


def _image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


@pytest.mark.parametrize("raw", [EPS, _image("BMP"), _image("TIFF"), b"\x00\x00\x00\x1cftypavif" + bytes(40)],
                         ids=["eps", "bmp", "tiff", "avif"])
def test_chat_images_in_other_formats_are_400_invalid_image(client: TestClient, raw: bytes) -> None:
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": data_url(raw)}}]
    body = chat_body() | {"messages": [{"role": "user", "content": content}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and "personae decodes only PNG, JPEG, WebP and GIF" in error["message"]
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200  # still serving


HOSTILE_CARDS = {
    "infinity": b'{"spec": "chara_card_v2", "data": {"name": "Inf", "x": 1e999}}',
    "nan": b'{"spec": "chara_card_v2", "data": {"name": "Nan", "x": NaN}}',
    "deep": b'{"spec": "chara_card_v2", "data": {"name": "Deep", "x": ' + b'{"a": ' * 400 + b"1" + b"}" * 400 + b"}}",
    "surrogate": b'{"spec": "chara_card_v2", "data": {"name": "S\\ud800"}}',
    "list-spec": b'{"spec": ["chara_card_v2"], "data": {"name": "L"}}',
    "object-spec": b'{"spec": {}, "data": {"name": "O"}}',
}


@pytest.mark.parametrize("name", list(HOSTILE_CARDS))
def test_hostile_cards_are_400_and_nothing_is_stored(make_app: Callable[..., FastAPI], run_copy: Path,
                                                     name: str) -> None:
    client = TestClient(make_app(run=run_copy))
    response = client.post("/v1/characters", content=HOSTILE_CARDS[name], headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_card", response.text
    assert not (run_copy / "uploads").exists() or not any((run_copy / "uploads").iterdir())
    assert TestClient(make_app(run=run_copy)).get("/v1/models").status_code == 200  # a restart still starts


def test_two_non_latin_names_are_two_characters(make_app: Callable[..., FastAPI], run_copy: Path) -> None:
    client = TestClient(make_app(run=run_copy))
    ids = []
    for name in ("Ωμέγα", "李白"):
        response = client.post("/v1/characters", content=json.dumps({"name": name}).encode(),
                               headers={"content-type": "application/json"})
        assert response.status_code in (200, 201), response.text
        ids.append(response.json()["id"])
    assert ids == [character_id("Ωμέγα"), character_id("李白")] and ids[0] != ids[1]
    restarted = TestClient(make_app(run=run_copy))
    assert {c["id"] for c in restarted.get("/v1/characters").json()["data"]} >= set(ids)


LONE_SURROGATE = '"a\\ud800b"'  # JSON text: a \ud800 escape that decodes to a lone surrogate


@pytest.mark.parametrize("where", ["content", "part", "name", "user_name", "stop", "prompt"])
def test_lone_surrogates_in_requests_are_400_naming_the_field(client: TestClient, where: str) -> None:
    good = "\"hello\""
    message = {"content": f'{{"role": "user", "content": {LONE_SURROGATE}}}',
               "part": f'{{"role": "user", "content": [{{"type": "text", "text": {LONE_SURROGATE}}}]}}',
               "name": f'{{"role": "user", "content": {good}, "name": {LONE_SURROGATE}}}'}.get(
        where, f'{{"role": "user", "content": {good}}}')
    if where == "prompt":
        route, raw = "/v1/completions", f'{{"prompt": {LONE_SURROGATE}, "max_tokens": 2}}'
    else:
        extra = {"user_name": f', "user_name": {LONE_SURROGATE}', "stop": f', "stop": [{LONE_SURROGATE}]'}
        raw = f'{{"model": "{chat_body()["model"]}", "max_tokens": 2, "messages": [{message}]{extra.get(where, "")}}}'
        route = "/v1/chat/completions"
    response = client.post(route, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "lone surrogate U+D800" in response.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200  # the connection still serves
