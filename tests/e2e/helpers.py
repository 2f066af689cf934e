"""Helpers of the serving tests: request bodies and inline images."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image

CHARACTER = "chef-baptiste"


def png_bytes(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (48, 40)) -> bytes:
    """A small solid PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def chat_body(text: str = "What do you see?", **fields: object) -> dict:
    """A minimal valid request to the test character."""
    return {"model": f"personae/{CHARACTER}", "messages": [{"role": "user", "content": text}],
            "max_tokens": 8, "seed": 3, **fields}


def sse_events(text: str) -> list[Any]:
    """The data payloads of a server-sent event stream: parsed JSON, or the string "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def streamed_texts(events: list[Any]) -> dict[int, str]:
    """The text of each choice, joined from its deltas."""
    texts: dict[int, str] = {}
    for event in events:
        if isinstance(event, dict):
            for choice in event.get("choices", []):
                texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return texts
