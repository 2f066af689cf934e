"""Issue 16, the server: text limits before tokenizing, a free event loop, slow clients, errors, /docs, strict ints."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from personae.serve.server import ServerThread
from tests.e2e.helpers import chat_body

MiB = 1024 * 1024


@pytest.fixture()
def serve_app() -> Iterator[Callable[[FastAPI], str]]:
    """serve_app(app) -> base URL of a real uvicorn on 127.0.0.1; stopped afterwards."""
    servers: list[ServerThread] = []

    def start(app: FastAPI) -> str:
        server = ServerThread(app)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("field, value", [("max_tokens", "10"), ("n", "2"), ("seed", "3"), ("top_k", "5"),
                                          ("max_completion_tokens", "10"), ("top_logprobs", "1"),
                                          ("stream", "true"), ("temperature", "0.5"), ("max_tokens", 10.0)])
def test_numbers_and_booleans_given_as_strings_are_400_not_coerced(client: TestClient, field: str, value: Any) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json=chat_body(**{field: value})), 400,
                                "invalid_value")
    assert error["param"] == field


def test_integers_and_floats_in_their_json_form_still_pass(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=4, temperature=1, top_p=1, n=1))
    assert response.status_code == 200, response.text


def test_text_over_max_text_bytes_is_413_before_tokenizing(make_app: Callable[..., FastAPI]) -> None:
    app = make_app(max_text_bytes=1000)
    tokenizer = app.state.context.bundle.tokenizer
    calls = []
    original = tokenizer.encode

    def counting(*args: Any, **kwargs: Any) -> list[int]:
        calls.append(1)
        return original(*args, **kwargs)

    tokenizer.encode = counting  # type: ignore[method-assign]
    try:
        client = TestClient(app)
        long = [{"role": "user", "content": "a" * 600}, {"role": "assistant", "content": "b" * 300},
                {"role": "user", "content": [{"type": "text", "text": "é" * 100}]}]  # 1,100 bytes in all
        error = assert_openai_error(client.post("/v1/chat/completions", json=chat_body(messages=long)), 413,
                                    "text_too_large")
        assert "1000" in error["message"] and "max_text_bytes" in error["message"]
        assert "--max-text-bytes" in error["message"]
        prompt = client.post("/v1/completions", json={"prompt": "x" * 1001, "max_tokens": 2})
        assert_openai_error(prompt, 413, "text_too_large")
        assert not calls, "text over the limit was tokenized"
        within = client.post("/v1/chat/completions", json=chat_body("Bonjour, chef! " * 30))  # 450 bytes
        assert within.status_code == 200, within.text
    finally:
        del tokenizer.encode


def _health_latencies(url: str, until: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=10) as health:
        while not until.is_set():
            start = time.perf_counter()
            assert health.get(f"{url}/health").status_code == 200
            out.append(time.perf_counter() - start)
            time.sleep(0.05)


def _three_chats_while_watching_health(url: str, body: str) -> tuple[list[httpx.Response], list[float]]:
    """Three concurrent chat requests with BODY; their answers and /health's latencies meanwhile."""
    done, latencies, answers = threading.Event(), [], []
    watcher = threading.Thread(target=_health_latencies, args=(url, done, latencies))
    watcher.start()
    senders = [threading.Thread(target=lambda: answers.append(httpx.post(
        f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60)))
        for _ in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    time.sleep(0.2)
    done.set()
    watcher.join(10)
    return answers, latencies


def test_health_answers_within_a_second_while_three_4mb_requests_are_in_flight(
        make_app: Callable[..., FastAPI], serve_app: Callable[[FastAPI], str]) -> None:
    url = serve_app(make_app())
    body = json.dumps(chat_body("word " * (4 * MiB // 5)))
    answers, latencies = _three_chats_while_watching_health(url, body)
    assert [answer.status_code for answer in answers] == [413, 413, 413]
    assert latencies and max(latencies) < 1.0, f"/health took up to {max(latencies):.2f} s"


def test_tokenizing_runs_off_the_event_loop(make_app: Callable[..., FastAPI], serve_app: Callable[[FastAPI], str]) -> None:
    app = make_app(max_text_bytes=8 * MiB)
    tokenizer = app.state.context.bundle.tokenizer
    original = tokenizer.encode

    def slow(*args: Any, **kwargs: Any) -> list[int]:
        time.sleep(1.5)  # a tokenizer that takes long (a huge text): the loop must not wait for it
        return original(*args, **kwargs)

    tokenizer.encode = slow  # type: ignore[method-assign]
    try:
        url = serve_app(app)
        done, latencies = threading.Event(), []
        bodies = [("/v1/chat/completions", chat_body()), ("/tokenize", {"prompt": "hello"}),
                  ("/v1/completions", {"prompt": "hello", "max_tokens": 2})]
        senders = [threading.Thread(target=lambda p=path, b=body: httpx.post(f"{url}{p}", json=b, timeout=60))
                   for path, body in bodies]
        for sender in senders:
            sender.start()
        watcher = threading.Thread(target=_health_latencies, args=(url, done, latencies))
        watcher.start()
        time.sleep(2.0)
        done.set()
        watcher.join(10)
        for sender in senders:
            sender.join(60)
        assert latencies and max(latencies) < 1.0
    finally:
        del tokenizer.encode


def test_a_client_that_trickles_its_body_is_cut_off_with_408(make_app: Callable[..., FastAPI],
                                                             serve_app: Callable[[FastAPI], str]) -> None:
    url = serve_app(make_app(body_timeout_s=1))
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"mess")
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            if time.monotonic() - start > 3:  # a byte every 0.2 s would keep an unbounded reader waiting
                break
            raw.sendall(b" ")
            time.sleep(0.2)
            raw.settimeout(0.01)
            try:
                answer += raw.recv(65536)
            except TimeoutError:
                pass
            raw.settimeout(10)
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 0.8 < elapsed < 2.5
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and "body_timeout_s" in error["message"]


def test_keep_alive_timeout_is_set(make_app: Callable[..., FastAPI]) -> None:
    server = ServerThread(make_app(keep_alive_s=3))
    assert server.server.config.timeout_keep_alive == 3


def _seconds_until_closed(raw: socket.socket, limit: float = 6.0) -> float | None:
    start = time.monotonic()
    raw.settimeout(limit)
    try:
        while raw.recv(65536):
            pass
    except TimeoutError:
        return None
    return time.monotonic() - start


def test_clients_that_send_no_or_slow_headers_are_disconnected(make_app: Callable[..., FastAPI],
                                                               serve_app: Callable[[FastAPI], str]) -> None:
    url = serve_app(make_app(header_timeout_s=1, keep_alive_s=30))  # keep-alive long: the header deadline acts
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as silent:  # opens and sends nothing
        closed = _seconds_until_closed(silent)
    assert closed is not None and 0.8 < closed < 2.5
    with socket.create_connection((host, int(port))) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # half the headers, the rest never comes
        closed = _seconds_until_closed(slow)
    assert closed is not None and closed < 2.5
    with socket.create_connection((host, int(port))) as kept:  # a whole request, then half of the next one
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        closed = _seconds_until_closed(kept)
    assert closed is not None and closed < 2.5
    assert httpx.get(f"{url}/health").status_code == 200  # prompt clients are served as before


def _boom_app(make_app: Callable[..., FastAPI]) -> FastAPI:
    app = make_app(max_body_bytes=2000)

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("a deliberate bug")

    return app


def test_every_refusal_and_a_500_keep_the_connection(make_app: Callable[..., FastAPI],
                                                     serve_app: Callable[[FastAPI], str]) -> None:
    url = serve_app(_boom_app(make_app))
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    requests = [("GET", "/v1/nowhere", None, 404), ("GET", "/v1/chat/completions", None, 405),
                ("POST", "/v1/chat/completions", "x" * 3000, 413), ("POST", "/v1/chat/completions", "{", 400),
                ("GET", "/v1/boom", None, 500), ("POST", "/v1/chat/completions", json.dumps(chat_body()), 200)]
    ports = set()
    for method, path, body, status in requests:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        ports.add(connection.sock.getsockname()[1])
        response = connection.getresponse()
        payload = json.loads(response.read())
        assert response.status == status, payload
        if status != 200:
            assert set(payload["error"]) == {"message", "type", "param", "code"}
        assert response.getheader("connection") != "close"
    assert len(ports) == 1, "the server closed the connection after an error"
    connection.close()


def test_the_frameworks_own_refusals_are_in_openai_shape(client: TestClient) -> None:
    assert_openai_error(client.get("/static/nothing-here.js"), 404)  # a mounted app's 404
    assert_openai_error(client.put("/v1/models"), 405, "method_not_allowed")
    assert_openai_error(client.get("/v1/characters/chef-baptiste/adapt/x/y"), 404, "unknown_url")
    missing = assert_openai_error(client.post("/v1/chat/completions"), 400, "missing_body")  # FastAPI: 422
    assert missing["type"] == "invalid_request_error"


def test_a_500_is_answered_by_personae_in_openai_shape(make_app: Callable[..., FastAPI]) -> None:
    client = TestClient(_boom_app(make_app), raise_server_exceptions=False)
    error = assert_openai_error(client.get("/v1/boom"), 500, "internal_error")
    assert "RuntimeError: a deliberate bug" in error["message"] and error["type"] == "server_error"


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_behind_the_api_key_when_one_is_set(make_app: Callable[..., FastAPI], path: str) -> None:
    client = TestClient(make_app(api_key="sesame"))
    assert_openai_error(client.get(path), 401, "invalid_api_key")
    assert client.get(path, headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert TestClient(make_app()).get(path).status_code == 200  # an open server has open docs


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_can_be_turned_off(make_app: Callable[..., FastAPI], path: str) -> None:
    assert_openai_error(TestClient(make_app(docs=False)).get(path), 404, "unknown_url")


def test_every_error_code_the_server_answers_is_in_the_guide() -> None:
    import re
    from pathlib import Path

    import personae.serve

    source = "".join(path.read_text() for path in Path(personae.serve.__file__).parent.glob("*.py"))
    codes = set(re.findall(r'code="([a-z_]+)"', source)) | {"unknown_url", "method_not_allowed"}
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guide" / "api.md").read_text()
    errors = guide.split("## Errors", 1)[1].split("\n## ", 1)[0]
    assert len(codes) > 25 and sorted(c for c in codes if f"`{c}`" not in errors) == []


def test_turns_that_cannot_fit_are_dropped_before_tokenizing_with_the_same_prompt(
        make_app: Callable[..., FastAPI]) -> None:
    from personae.serve.schemas import ChatCompletionRequest

    service = make_app().state.context.completions
    history = [{"role": role, "content": f"turn {n}: " + "Bonjour, chef! " * 40}
               for n in range(60) for role in ("user", "assistant")]
    request = ChatCompletionRequest.model_validate(chat_body(messages=history + [{"role": "user", "content": "hi"}]))
    tokenized: list[int] = []
    original = service.builder.tok.encode

    def counting(text: str, **kwargs: Any) -> list[int]:
        tokenized.append(len(text))
        return original(text, **kwargs)

    service.builder.tok.encode = counting
    try:
        early = service.prepare(request)
        early_chars, tokenized[:] = sum(tokenized), []
        real = service.max_token_chars
        service.max_token_chars = 10**9  # no floor: every turn is tokenized, then dropped by the builder
        late = service.prepare(request)
        late_chars = sum(tokenized)
    finally:
        service.max_token_chars = real
        del service.builder.tok.encode
    assert early.job.prompt_ids == late.job.prompt_ids and early.dropped_turns == late.dropped_turns > 50
    assert early_chars < late_chars / 5  # most of the chat was never tokenized


def test_a_4mb_message_is_refused_before_tokenizing_and_health_stays_fast(
        make_app: Callable[..., FastAPI], serve_app: Callable[[FastAPI], str]) -> None:
    url = serve_app(make_app(max_text_bytes=8 * MiB))  # let the text through the byte limit
    body = json.dumps(chat_body("word " * (4 * MiB // 5)))
    answers, latencies = _three_chats_while_watching_health(url, body)
    assert [a.json()["error"]["code"] for a in answers] == ["context_length_exceeded"] * 3
    assert "the latest message is at least" in answers[0].json()["error"]["message"]
    assert max(latencies) < 1.0, f"/health took up to {max(latencies):.2f} s"
