"""Every limit and every malformed request gets its documented error, and the server keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.e2e.helpers import CHARACTER, chat_body, data_url, png_bytes


def image_message(url: str, text: str = "look") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


# (what to change in a valid body, status, error code, param)
MALFORMED = [
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_value", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400, "invalid_value",
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "invalid_value",
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                   {"role": "user", "content": "hi"}]}, 400, "invalid_image_url",
     "messages[0].content[0].image_url.url"),
    ({"temperature": 3}, 400, "invalid_value", "temperature"),
    ({"top_p": -0.1}, 400, "invalid_value", "top_p"),
    ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"seed": -1}, 400, "invalid_value", "seed"),
    ({"stop": [""]}, 400, "invalid_value", "stop"),
    ({"top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, 400, "invalid_value", "top_logprobs"),
    ({"logit_bias": {"99999": 1}}, 400, "invalid_value", "logit_bias"),
    ({"logit_bias": {"5": 150}}, 400, "invalid_value", "logit_bias"),
    ({"mirostat": 2}, 400, "unsupported_sampler", "mirostat"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, 400, "unsupported", "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "unsupported", "tool_choice"),
    ({"model": "personae/nobody"}, 404, "model_not_found", "model"),
    ({"character": "nobody"}, 404, "model_not_found", "character"),
    ({"model": None}, 400, "missing_character", "model"),
    ({"messages": image_message("https://example.com/cat.png")}, 400, "remote_image_refused",
     "messages[0].content[1].image_url.url"),
    ({"messages": image_message("/etc/passwd")}, 400, "invalid_image_url", "messages[0].content[1].image_url.url"),
    ({"messages": image_message("file:///etc/passwd")}, 400, "invalid_image_url",
     "messages[0].content[1].image_url.url"),
    ({"messages": image_message("data:image/png;base64,@@@@")}, 400, "invalid_image",
     "messages[0].content[1].image_url.url"),
    ({"messages": image_message(data_url(b"not an image at all"))}, 400, "invalid_image",
     "messages[0].content[1].image_url.url"),
]


@pytest.mark.parametrize("change, status, code, param", MALFORMED, ids=[m[2] + ":" + str(m[3]) for m in MALFORMED])
def test_malformed_requests_get_openai_errors(client: TestClient, change: dict, status: int, code: str,
                                              param: str) -> None:
    response = client.post("/v1/chat/completions", json=chat_body() | change)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] and error["message"]


def test_non_json_bodies_and_unknown_routes(client: TestClient) -> None:
    broken = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert client.get("/v1/nothing").json()["error"] == {"message": "no route GET /v1/nothing", "type": "not_found_error",
                                                          "param": None, "code": "unknown_url"}
    assert client.get("/v1/chat/completions").status_code == 405
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200  # still serving


LIMITS = {"max_body_bytes": 4096, "max_image_bytes": 600, "max_image_pixels": 32 * 32,
          "max_prompt_tokens": 300, "max_n": 2, "max_stop": 1}


def over_limit_cases() -> list[tuple[str, dict[str, Any], int, str]]:
    small, big = png_bytes(size=(8, 8)), png_bytes(size=(64, 64))
    noisy = bytes(range(256)) * 4
    return [
        ("max_body_bytes", {"messages": [{"role": "user", "content": "x" * 5000}]}, 413, "body_too_large"),
        ("max_image_bytes", {"messages": image_message(data_url(png_bytes(size=(8, 8)) + noisy))}, 400,
         "image_too_large"),
        ("max_image_pixels", {"messages": image_message(data_url(big))}, 400, "image_too_large"),
        ("max_image_pixels", {"messages": image_message(data_url(small)) + image_message(data_url(big))}, 400,
         "image_too_large"),
        ("max_prompt_tokens", {"messages": [{"role": "user", "content": "words " * 400}]}, 400,
         "context_length_exceeded"),
        ("max_n", {"n": 3}, 400, "n_too_large"),
        ("max_stop", {"stop": ["a", "b"]}, 400, "too_many_stop_strings"),
    ]


def test_every_limit_answers_its_error_and_the_server_goes_on(make_app: Callable[..., FastAPI]) -> None:
    client = TestClient(make_app(**LIMITS))
    for limit, change, status, code in over_limit_cases():
        response = client.post("/v1/chat/completions", json=chat_body() | change)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (limit, response.text)
        assert str(LIMITS[limit]) in response.json()["error"]["message"], (limit, response.json())
    within = chat_body(max_tokens=16, n=2, stop=["zz"], messages=image_message(data_url(png_bytes(size=(16, 16)))))
    assert client.post("/v1/chat/completions", json=within).status_code == 200
    # only the latest image is used: an older one over the limits is dropped unread
    older_big = image_message(data_url(png_bytes(size=(64, 64)))) + image_message(data_url(png_bytes(size=(8, 8))))
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=4, messages=older_big)).status_code == 200


def test_max_tokens_over_the_limit_is_cut_with_a_warning(make_app: Callable[..., FastAPI]) -> None:
    client = TestClient(make_app(max_tokens_limit=16))
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=300, ignore_eos=True)).json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    assert body["warnings"] == ["max_tokens=300 was cut to the server's limit of 16 tokens (max_tokens_limit)"]
    listed = client.get("/v1/models").json()["data"][0]
    assert listed["max_completion_tokens"] == 16 and listed["context_length"] == listed["max_model_len"] > 16


def test_default_limits_take_what_sillytavern_sends(make_app: Callable[..., FastAPI]) -> None:
    client = TestClient(make_app())
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"line {i}"} for i in range(99)]
    answer = client.post("/v1/chat/completions", json=chat_body(max_tokens=300, messages=many))
    assert answer.status_code == 200, answer.text
    limit = client.get("/v1/models").json()["data"][0]["max_completion_tokens"]
    assert answer.json()["usage"]["completion_tokens"] <= min(limit, 300)
    assert int(answer.headers["X-Personae-Dropped-Turns"]) > 0  # the history is cut in tokens, not refused
    cut = [w for w in answer.json()["warnings"] if w.startswith("max_tokens=300 was cut")]
    assert len(cut) == (300 > limit)


def test_null_fields_mean_the_default_and_top_p_zero_is_greedy(client: TestClient) -> None:
    nulls = {key: None for key in ("temperature", "top_p", "n", "stream", "frequency_penalty", "presence_penalty",
                                   "seed", "stop", "top_k", "repetition_penalty", "max_repeats", "ignore_eos",
                                   "max_tokens", "logprobs", "tools", "tool_choice", "stream_options")}
    answer = client.post("/v1/chat/completions", json=chat_body(**nulls))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 1
    greedy = [client.post("/v1/chat/completions", json=chat_body(max_tokens=8, top_p=0, temperature=1.5, seed=seed))
              .json()["choices"][0]["message"]["content"] for seed in (1, 2)]
    zero_t = client.post("/v1/chat/completions", json=chat_body(max_tokens=8, temperature=0)).json()
    assert greedy[0] == greedy[1] == zero_t["choices"][0]["message"]["content"]


def test_api_key_guards_the_api_but_not_the_page(make_app: Callable[..., FastAPI]) -> None:
    client = TestClient(make_app(api_key="sesame"))
    missing = client.get("/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert client.get("/").status_code == 200 and client.get("/health").status_code == 200


def test_full_queue_answers_503_with_retry_after(make_app: Callable[..., FastAPI]) -> None:
    app = make_app(max_queue=1, max_batch=1, max_n=1, retry_after_s=2)
    client = TestClient(app)
    first: dict[str, Any] = {}
    scheduler = app.state.context.scheduler
    with scheduler.hold():
        waiting = threading.Thread(target=lambda: first.update(r=client.post("/v1/chat/completions",
                                                                             json=chat_body())))
        waiting.start()
        while scheduler.queued < 1:
            threading.Event().wait(0.01)
        refused = client.post("/v1/chat/completions", json=chat_body())
    waiting.join(10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "queue_full"
    assert first["r"].status_code == 200
    assert client.get("/stats").json()["scheduler"]["rejected"] == 1


def test_settings_are_checked(make_app: Callable[..., FastAPI]) -> None:
    from personae.serve.settings import ServeSettings, SettingsError

    with pytest.raises(SettingsError, match="unknown serve setting.*max_bodybytes.*valid: .*max_body_bytes"):
        ServeSettings.from_kwargs(max_bodybytes=3)
    with pytest.raises(SettingsError, match="max_n=8 exceeds max_batch=4"):
        ServeSettings(max_n=8, max_batch=4)
    assert CHARACTER  # the character every valid body talks to exists in the run
