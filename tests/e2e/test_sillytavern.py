"""SillyTavern's chat-completion requests at its default settings, answered 200 by a real uvicorn server."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.helpers import CHARACTER, sse_events, streamed_texts
from tests.e2e.sillytavern import corpus

MODEL = f"personae/{CHARACTER}"
CASES = corpus(MODEL)


def ask(url: str, body: dict) -> tuple[httpx.Response, str, str | None]:
    """POST one body; (response, the reply's text, its finish reason), streamed or not."""
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    if body.get("stream"):
        events = sse_events(response.text)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1] if isinstance(e, dict))
        finish = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        return response, streamed_texts(events)[0], finish[-1]
    choice = response.json()["choices"][0]
    return response, choice["message"]["content"], choice["finish_reason"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_sillytavern_request_is_answered(live_url: str, name: str) -> None:
    _, text, finish = ask(live_url, CASES[name])
    assert finish in ("stop", "length")
    assert text.strip(), f"{name}: an empty reply"


def test_continue_streams_the_continuation_only(live_url: str) -> None:
    body = CASES["continue_prefill"] | {"temperature": 0, "max_tokens": 12}
    _, whole, _ = ask(live_url, body)
    _, streamed, _ = ask(live_url, body | {"stream": True})
    assert streamed == whole and not whole.startswith("*cuts a thick slice*")
    # the continuation is what the model says after the prefill: not the reply to the user's message alone
    answer = body | {"messages": body["messages"][:-1]}
    _, fresh, _ = ask(live_url, answer)
    assert fresh != whole


def test_dropped_images_and_turns_are_not_refused(live_url: str) -> None:
    response, _, _ = ask(live_url, CASES["long_chat"])
    assert int(response.headers["X-Personae-Dropped-Turns"]) > 0
    limit = httpx.get(f"{live_url}/v1/models/{MODEL}").json()["max_completion_tokens"]
    warnings = response.json()["warnings"]
    assert any("max_tokens=300 was cut" in w for w in warnings) == (limit < 300)


def test_a_prompt_that_leaves_no_room_for_max_tokens_gets_a_shorter_reply(live_url: str) -> None:
    body = CASES["impersonate"] | {"stream": False, "max_tokens": 600}
    response, _, _ = ask(live_url, body)
    note = [w for w in response.json()["warnings"] if w.startswith("max_tokens=")]
    assert note and "was cut to" in note[-1], response.json()["warnings"]
    usage = response.json()["usage"]
    assert usage["total_tokens"] <= httpx.get(f"{live_url}/v1/models/{MODEL}").json()["context_length"]
