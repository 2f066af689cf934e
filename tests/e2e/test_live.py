"""A real uvicorn on 127.0.0.1: the official openai client, concurrency, and cancellation on disconnect."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai  # noqa: E402  (a dev dependency)
import pytest

from personae.serve.server import ServerThread
from tests.e2e.helpers import CHARACTER, chat_body, data_url, png_bytes

MODEL = f"personae/{CHARACTER}"


@pytest.fixture(scope="module")
def client(live_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_openai_client_lists_models_and_chats(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello, chef!"}],
                                            max_tokens=8, seed=2, temperature=0.7)
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0


def test_openai_client_sends_an_image_and_streams(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What do you see here?"},
                                             {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=4)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=4, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_client_sees_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="personae/nobody", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as remote:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}])
    assert remote.value.code == "remote_image_refused"


def test_concurrent_requests_give_the_same_text_as_sequential_ones(live_server, live_url: str) -> None:
    bodies = [chat_body(f"Tell me about thing number {i}", max_tokens=12, temperature=0.9, seed=100 + i)
              for i in range(8)]

    def post(body: dict) -> str:
        response = httpx.post(f"{live_url}/v1/chat/completions", json=body, timeout=60)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    sequential = [post(body) for body in bodies]
    before = httpx.get(f"{live_url}/stats").json()["scheduler"]
    scheduler = live_server.app.state.context.scheduler
    with ThreadPoolExecutor(len(bodies)) as pool:
        with scheduler.hold():  # on a loaded machine requests could otherwise arrive one decode apart
            replies = pool.map(post, bodies)
            for _ in range(600):
                if scheduler.queued == len(bodies):
                    break
                time.sleep(0.05)
        concurrent = list(replies)
    after = httpx.get(f"{live_url}/stats").json()["scheduler"]
    assert concurrent == sequential
    batched_steps = after["steps"] - before["steps"]
    assert batched_steps <= 2 * 12, "concurrent requests were not decoded together"


def test_client_disconnect_cancels_the_request(live_url: str) -> None:
    body = chat_body(max_tokens=200, ignore_eos=True, stream=True)
    before = httpx.get(f"{live_url}/stats").json()["scheduler"]
    with httpx.stream("POST", f"{live_url}/v1/chat/completions", json=body, timeout=30) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    for _ in range(200):  # the server notices on its next write
        stats = httpx.get(f"{live_url}/stats").json()["scheduler"]
        if stats["cancelled"] > before["cancelled"] and stats["running"] == 0:
            break
        time.sleep(0.02)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["running"] == 0
    assert stats["tokens"] - before["tokens"] < 200  # it stopped before its 200 tokens
    assert httpx.post(f"{live_url}/v1/chat/completions", json=chat_body(), timeout=30).status_code == 200


def test_waiting_request_is_cancelled_when_the_client_gives_up(live_server: ServerThread) -> None:
    url, scheduler = live_server.url, live_server.app.state.context.scheduler
    before = scheduler.stats.cancelled
    with scheduler.hold():  # the request waits in the queue, where the client gives up on it
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=0.5)
        for _ in range(100):
            if scheduler.queued == 1 and scheduler._waiting[0].cancelled:
                break
            time.sleep(0.02)
    for _ in range(100):
        if scheduler.stats.cancelled > before:
            break
        time.sleep(0.02)
    assert scheduler.stats.cancelled == before + 1 and scheduler.queued == 0 and not scheduler.rows


def test_openai_client_continues_a_prefill_and_ignores_tools_with_auto(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hello, chef!"}, {"role": "assistant", "content": "Bonjour! Today I"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    tool = {"type": "function", "function": {"name": "roll", "parameters": {"type": "object", "properties": {}}}}
    answer = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=6, tools=[tool],
                                            tool_choice="auto")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as required:
        client.chat.completions.create(model=MODEL, messages=messages[:1], tools=[tool], tool_choice="required")
    assert required.value.code == "unsupported"
