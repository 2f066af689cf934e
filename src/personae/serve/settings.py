"""Server settings: the API key, every request limit, and the batching knobs, with their defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from personae.errors import PersonaeError

MiB = 1024 * 1024


class SettingsError(PersonaeError, ValueError):
    """A server setting that does not exist or has a bad value; the message names it."""


@dataclass
class ServeSettings:
    """What `personae serve` accepts and how it batches; see docs/guide/api.md for each limit's error."""

    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_body_bytes: int = 64 * MiB  # whole request body (413 above it); front ends re-send every image of a chat
    # UTF-8 bytes of all the text of one request (messages, names, stop, prompt), counted before anything is
    # tokenized (413 text_too_large above it); a long chat's history is a few hundred KB
    max_text_bytes: int = 1 * MiB
    body_timeout_s: int = 30  # seconds a client may take to send its whole body (408 request_timeout after)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this many seconds (uvicorn's)
    header_timeout_s: int = 10  # seconds to send a request's headers, on a new or a kept-alive connection (closed after)
    prepare_threads: int = 4  # threads that tokenize requests and decode images, off the event loop
    docs: bool = True  # /docs, /redoc and /openapi.json (behind api_key when one is set); False: off (404)
    max_image_bytes: int = 4 * MiB  # one decoded image (400 image_too_large)
    max_image_pixels: int = 2048 * 2048  # width x height, checked before decoding (400 image_too_large)
    max_prompt_tokens: int | None = None  # prompt tokens after old turns are dropped; None: what the context leaves
    # most tokens of one reply; a larger max_tokens is cut to it, with a warning; None: half the model's text positions
    max_tokens_limit: int | None = None
    default_max_tokens: int | None = None  # max_tokens when a request gives none; None: min(64, max_tokens_limit)
    max_adapters: int | None = None  # character adapters resident in memory, least recently used evicted; None: no cap
    max_n: int = 4  # choices per request
    max_stop: int = 4  # stop strings per request
    max_batch: int = 32  # rows decoded together in one forward pass
    max_queue: int = 64  # requests waiting for a place in the batch (503 + Retry-After above it)
    batching: bool = True  # False: one request at a time (the benchmark's baseline)
    prefix_cache_mib: int = 256  # keys/values of prompt heads (system + card + image) kept for reuse; 0: off
    retry_after_s: int = 1  # the Retry-After header of a 503
    device: str | None = None  # None: cuda when available, else cpu
    torch_threads: int | None = None  # intra-op threads; None: torch's default (1 is often fastest for small models)
    include_examples: bool | None = None  # card example dialogues in prompts; None: as the run was trained
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API
    adapt_fn: Callable[..., Any] | None = None  # the adaptation hook; None: adaptation unavailable (501)
    max_adapt_jobs: int = 4  # adaptation jobs queued or running at once (429 above it)
    max_adapt_examples: int = 256  # examples of one adaptation request (400 above it)
    max_adapt_steps: int = 500  # inner steps of one adaptation (400 above it)

    def __post_init__(self) -> None:
        positive = ["max_body_bytes", "max_image_bytes", "max_image_pixels", "max_n", "max_batch", "max_text_bytes",
                    "body_timeout_s", "keep_alive_s", "header_timeout_s", "prepare_threads", "max_adapt_jobs",
                    "max_adapt_examples", "max_adapt_steps"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingsError(f"serve setting {name} must be a positive integer, got {value!r}")
        for name in ("max_stop", "max_queue", "retry_after_s", "prefix_cache_mib"):
            if getattr(self, name) < 0:
                raise SettingsError(f"serve setting {name} must be >= 0, got {getattr(self, name)!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise SettingsError(f"serve setting torch_threads must be >= 1 or None, got {self.torch_threads}")
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_adapters", "default_max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SettingsError(f"serve setting {name} must be a positive integer or None, got {value!r}")
        if self.max_tokens_limit is not None:
            if self.default_max_tokens is None:
                self.default_max_tokens = min(64, self.max_tokens_limit)
            if self.default_max_tokens > self.max_tokens_limit:
                raise SettingsError(f"default_max_tokens={self.default_max_tokens} must be at most "
                                    f"max_tokens_limit={self.max_tokens_limit}")
        if self.max_n > self.max_batch:
            raise SettingsError(f"max_n={self.max_n} exceeds max_batch={self.max_batch}: a request must fit a batch")
        if self.api_key is not None and not self.api_key.strip():
            raise SettingsError("api_key is empty; give a key or None for an open server")

    @classmethod
    def from_kwargs(cls, **values: Any) -> ServeSettings:
        """Settings from keyword arguments; an unknown name is an error that lists the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise SettingsError(f"unknown serve setting(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return cls(**values)

    def reply_limit(self, text_positions: int) -> int:
        """The most tokens one reply gets with a model of `text_positions` positions after the image."""
        return self.max_tokens_limit or max(1, text_positions // 2)

    def default_reply(self, text_positions: int) -> int:
        """max_tokens for a request that gives none."""
        return self.default_max_tokens or min(64, self.reply_limit(text_positions))

    def public(self) -> dict[str, Any]:
        """The limits as a client may see them (no key, no hook)."""
        hidden = {"api_key", "adapt_fn", "cors_origins", "device", "torch_threads"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in hidden}
