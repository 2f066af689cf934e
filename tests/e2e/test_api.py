"""The HTTP API in-process (TestClient): completions, streaming, characters, adaptation jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from personae.data.cards import CharacterCard, load_card, save_card_png
from personae.data.images import load_image_bytes, model_pixels
from personae.data.prompt import PromptBuilder, Turn
from personae.meta.adapt import CharacterAdapter
from personae.models.generation import SamplingParams, generate
from personae.models.generation_config import read_generation_config
from personae.models.lora import load_adapter
from personae.serve.app import RunBundle
from personae.serve.schemas import (
    AdapterList,
    CharacterInfo,
    CharacterList,
    ChatCompletion,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelList,
)
from tests.e2e.helpers import CHARACTER, chat_body, data_url, png_bytes, sse_events, streamed_texts


def test_models_and_characters_list_the_trained_cards(client: TestClient, finetuned_run: Path) -> None:
    trained = sorted(p.stem for p in (finetuned_run / "characters").glob("*.json"))
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [f"personae/{stem}" for stem in trained]
    assert all(m["source"] == "trained" and m["adapted"] is False for m in models["data"])
    one = client.get(f"/v1/models/personae/{CHARACTER}").json()
    assert one["name"] == load_card(finetuned_run / "characters" / f"{CHARACTER}.json").name
    characters = client.get("/v1/characters").json()["data"]
    assert {c["id"] for c in characters} == set(trained)
    avatar = client.get(characters[0]["avatar_url"])
    assert avatar.headers["content-type"] == "image/png" and load_image_bytes(avatar.content).shape[2] == 3


def test_completion_is_what_generate_writes_for_the_same_prompt(client: TestClient, bundle: RunBundle,
                                                                finetuned_run: Path) -> None:
    image = png_bytes((30, 160, 90))
    body = chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": data_url(image)}}]}], max_tokens=10, temperature=0.9, seed=11)
    answer = client.post("/v1/chat/completions", json=body).json()

    card = load_card(finetuned_run / "characters" / f"{CHARACTER}.json")
    budget = bundle.model.text_budget(10, with_image=True)
    prompt = PromptBuilder(bundle.tokenizer).build(card, [Turn("What is in the picture?")], max_tokens=budget,
                                                   include_examples=bundle.include_examples)
    size = bundle.model.cfg.vision.image_size
    pixels = model_pixels(image, size)[None]
    expected = generate(bundle.model, bundle.tokenizer, [prompt.ids], pixels,
                        SamplingParams(max_new_tokens=10, temperature=0.9, seed=11,
                                       max_repeats=read_generation_config(finetuned_run).max_repeats))[0]
    assert answer["object"] == "chat.completion" and answer["model"] == f"personae/{CHARACTER}"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert answer["choices"][0]["finish_reason"] == expected.finish_reason
    prefix = bundle.model.image_prefix_length()
    assert answer["usage"] == {"prompt_tokens": len(prompt.ids) + prefix, "completion_tokens": len(expected.token_ids),
                               "total_tokens": len(prompt.ids) + prefix + len(expected.token_ids)}


def test_stream_carries_the_same_text_in_openai_chunks(client: TestClient) -> None:
    body = chat_body(max_tokens=12, temperature=1.0, seed=5, n=2)
    plain = client.post("/v1/chat/completions", json=body).json()
    response = client.post("/v1/chat/completions", json=body | {"stream": True,
                                                                 "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["delta"] for c in chunks[0]["choices"]] == [{"role": "assistant", "content": ""}] * 2
    texts = streamed_texts(chunks)
    assert texts == {i: c["message"]["content"] for i, c in enumerate(plain["choices"])}
    finishes = {c["index"]: c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]}
    assert finishes == {i: c["finish_reason"] for i, c in enumerate(plain["choices"])}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert plain["choices"][0]["message"] != plain["choices"][1]["message"]  # choice 1 samples with seed + 1


def test_seed_repeats_and_stop_cuts(client: TestClient) -> None:
    body = chat_body(max_tokens=16, temperature=0.0)
    first = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert client.post("/v1/chat/completions", json=body).json()["choices"][0] == first
    text = first["message"]["content"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"greedy reply too short to cut: {text!r}"
    cut = client.post("/v1/chat/completions", json=body | {"stop": [stop]}).json()["choices"][0]
    assert cut["message"]["content"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"


def test_system_message_defines_a_character_and_names_are_used(client: TestClient) -> None:
    body = {"model": "gpt-4o", "max_tokens": 4, "seed": 1, "messages": [
        {"role": "system", "content": "You are Mira, a lighthouse keeper."},
        {"role": "assistant", "name": "Mira", "content": "Welcome to the lighthouse."},
        {"role": "user", "content": "Hello!"}]}
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200 and answer.json()["model"] == "gpt-4o"
    assert answer.headers["x-personae-dropped-turns"] == "0"
    body["messages"] = body["messages"][1:]
    missing = client.post("/v1/chat/completions", json=body)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_upload_chat_delete_and_uploads_survive_a_restart(make_app: Callable[..., FastAPI], run_copy: Path,
                                                           tmp_path: Path) -> None:
    client = TestClient(make_app(run=run_copy))
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Zed Quill", "description": "A poet of the docks.", "first_mes": "Ahoy, {{user}}."}}
    created = client.post("/v1/characters", json=card)
    assert created.status_code == 201 and created.json()["id"] == "zed-quill"
    assert created.json()["greeting"] == "Ahoy, User." and created.json()["source"] == "uploaded"
    again = client.post("/v1/characters", json=card)
    assert again.status_code == 409 and again.json()["error"]["code"] == "character_exists"
    png = tmp_path / "card.png"
    save_card_png(CharacterCard(name="Pia Lumen", description="Paints light."), png, avatar=Image.new("RGB", (64, 64), (20, 90, 200)))
    uploaded = client.post("/v1/characters", content=png.read_bytes(), headers={"content-type": "image/png"})
    assert uploaded.status_code == 201 and (run_copy / "uploads" / "pia-lumen.png").exists()
    chat = client.post("/v1/chat/completions", json=chat_body(model="personae/zed-quill"))
    assert chat.status_code == 200 and chat.json()["model"] == "personae/zed-quill"

    restarted = TestClient(make_app(run=run_copy))
    ids = [m["id"] for m in restarted.get("/v1/models").json()["data"]]
    assert "personae/zed-quill" in ids and "personae/pia-lumen" in ids
    assert restarted.delete("/v1/characters/zed-quill").json() == {"id": "zed-quill", "object": "character",
                                                                   "deleted": True}
    assert restarted.get("/v1/characters/zed-quill").status_code == 404
    assert not (run_copy / "uploads" / "zed-quill.json").exists()
    trained = restarted.delete(f"/v1/characters/{CHARACTER}")
    assert trained.status_code == 403 and trained.json()["error"]["code"] == "character_read_only"


@pytest.mark.parametrize("content, kind, code", [
    (b'{"spec": "chara_card_v2", "data": {"name": ""}}', "application/json", "invalid_card"),
    (b"GIF89a not a card", "image/gif", "invalid_card"),
    (b"", "application/json", "missing_body"),
])
def test_bad_card_uploads_are_refused(make_app: Callable[..., FastAPI], run_copy: Path, content: bytes,
                                      kind: str, code: str) -> None:
    client = TestClient(make_app(run=run_copy))
    response = client.post("/v1/characters", content=content, headers={"content-type": kind})
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert client.get("/v1/models").status_code == 200


def test_adaptation_is_501_until_a_hook_is_plugged_in(client: TestClient) -> None:
    misspelt = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"params": "all"})
    assert misspelt.status_code == 400 and "params" in misspelt.json()["error"]["message"]
    bad = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"inner_params": "most"})
    assert bad.status_code == 400 and "'auto', 'all', 'head' or 'lora'" in bad.json()["error"]["message"]
    mixed = [{"user": "hi", "reply": "yo", "image": data_url(png_bytes((9, 9, 9)))}, {"user": "hi", "reply": "yo"}]
    response = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"examples": mixed})
    assert response.status_code == 400 and response.json()["error"]["code"] == "mixed_examples"
    broken = [{"user": "hi", "reply": "yo", "image": "data:image/png;base64,@@@"}]
    response = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"examples": broken})
    assert response.status_code == 400 and response.json()["error"]["param"] == "examples[0].image"
    response = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"examples": [{"user": "hi", "reply": "yo"}]})
    assert response.status_code == 501
    assert response.json()["error"]["code"] == "adaptation_unavailable"
    assert "not available in this build" in response.json()["error"]["message"]


def test_adaptation_job_runs_the_hook_and_reports_progress(make_app: Callable[..., FastAPI], run_copy: Path) -> None:
    seen = {}

    def fake_adapt(task, progress):
        seen.update(examples=task.examples, steps=task.options.get("steps"))
        for step in range(1, 5):
            progress(step / 4, f"step {step}/4")
        weight = task.served.model.decoder.ln_f.weight  # the served model itself, not a reloaded copy
        return CharacterAdapter({"decoder.ln_f.weight": weight.detach() * 2}, {"inner_params": "head"})

    client = TestClient(make_app(run=run_copy, adapt_fn=fake_adapt))
    started = client.post(f"/v1/characters/{CHARACTER}/adapt",
                          json={"examples": [{"user": "hi", "reply": "Bonjour!"}], "steps": 4})
    assert started.status_code == 202 and started.json()["status"] in ("queued", "running", "succeeded")
    url = started.json()["status_url"]
    for _ in range(100):
        job = client.get(url).json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.02)
    assert job["status"] == "succeeded" and job["progress"] == 1.0, job
    assert seen == {"examples": [{"user": "hi", "reply": "Bonjour!", "image": None}], "steps": 4}
    assert client.get(f"/v1/characters/{CHARACTER}/adapt").json()["id"] == job["id"]
    # the head adapter is written but not applied per request: the character is played with the base weights
    assert client.get(f"/v1/models/personae/{CHARACTER}").json()["adapted"] is False
    tensors, metadata = load_adapter(run_copy / "adapters" / f"{CHARACTER}.safetensors")  # the job wrote it
    assert set(tensors) == {"decoder.ln_f.weight"} and metadata["inner_params"] == "head"
    assert client.get(f"/v1/characters/{CHARACTER}").json()["adapter"].startswith("not applied: ")  # not LoRA
    stored = (run_copy / "uploads" / "examples" / f"{CHARACTER}.jsonl").read_text().splitlines()
    assert [json.loads(line)["reply"] for line in stored] == ["Bonjour!"]
    assert client.get(f"/v1/characters/{CHARACTER}/adapt/adapt-nope").status_code == 404


# (method, path, status) of each JSON route -> the response model /openapi.json must name for it
ROUTE_MODELS = [
    ("post", "/v1/chat/completions", "200", "ChatCompletion"),
    ("get", "/v1/models", "200", "ModelList"),
    ("get", "/v1/models/{model_id}", "200", "ModelInfo"),
    ("get", "/v1/characters", "200", "CharacterList"),
    ("post", "/v1/characters", "201", "CharacterUploaded"),
    ("get", "/v1/characters/{character_id}", "200", "CharacterInfo"),
    ("delete", "/v1/characters/{character_id}", "200", "CharacterDeleted"),
    ("post", "/v1/characters/{character_id}/adapt", "202", "AdaptJobCreated"),
    ("get", "/v1/characters/{character_id}/adapt", "200", "AdaptJobInfo"),
    ("get", "/v1/characters/{character_id}/adapt/{job_id}", "200", "AdaptJobInfo"),
    ("get", "/health", "200", "Health"),
    ("get", "/v1/adapters", "200", "AdapterList"),
    ("post", "/v1/adapters", "201", "AdapterInfo"),
    ("delete", "/v1/adapters/{character}", "200", "AdapterInfo"),
]


@pytest.mark.parametrize("method, path, status, model", ROUTE_MODELS)
def test_openapi_names_the_response_model_of_each_route(client: TestClient, method: str, path: str, status: str,
                                                        model: str) -> None:
    operation = client.get("/openapi.json").json()["paths"][path][method]
    assert operation["responses"][status]["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{model}"}
    for errors in ("4XX", "5XX"):
        schema = operation["responses"][errors]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "422" not in operation["responses"]  # bad requests are answered 400 with an ErrorResponse


def test_answers_are_exactly_their_response_models(client: TestClient) -> None:
    """Each JSON body parses as its model and dumps back to the same keys, in the same order."""
    answers = {
        ChatCompletion: client.post("/v1/chat/completions", json=chat_body(max_tokens=4, n=2, seed=3)),
        ModelList: client.get("/v1/models"),
        ModelInfo: client.get(f"/v1/models/personae/{CHARACTER}"),
        CharacterList: client.get("/v1/characters"),
        CharacterInfo: client.get(f"/v1/characters/{CHARACTER}"),
        Health: client.get("/health"),
        AdapterList: client.get("/v1/adapters"),
        ErrorResponse: client.get("/v1/characters/nobody"),
    }
    for model, response in answers.items():
        body = response.json()
        assert list(model.model_validate(body).model_dump(mode="json").items()) == list(body.items()), model
    character = answers[CharacterInfo].json()
    assert character["object"] == "character" and "adapter" in character
    assert answers[ErrorResponse].status_code == 404 and answers[ErrorResponse].json()["error"]["code"] == \
        "character_not_found"
