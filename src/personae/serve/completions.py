"""Chat completions: an OpenAI request -> character, prompt, image and sampling -> a job; answers and SSE chunks.

How a request is read:

* **character**: the `character` field (an id or name), else `model` (`personae/<id>`, an id, or a
  card name). When neither names a known character but the request has a system message, the
  system text defines an ad-hoc character (named after an assistant message's `name`, else
  "Assistant"). With a known character, system messages replace the card's `system_prompt`, or its
  whole definition when they already carry its description (`data.prompt.client_system_card`).
* **conversation**: user and assistant messages become the prompt's turns (consecutive messages
  of one role are joined; an assistant message before any user message is a greeting); the last
  message must be the user's. Old turns are dropped when the prompt does not fit.
* **image**: the model looks at one image, the latest `image_url` part; it must be a
  ``data:image/...;base64,`` URL. Without one, the character looks at its card's avatar.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from personae import __version__
from personae.data.cards import CharacterCard, default_avatar
from personae.data.images import model_pixels
from personae.data.prompt import PromptBuilder, PromptTooLong, Turn, client_system_card
from personae.data.tokenizer import Tokenizer
from personae.errors import DataError
from personae.models.generation import Generation
from personae.models.generation_config import FALLBACK, GenerationDefaults
from personae.models.model import PersonaeModel
from personae.serve.adapters import ServerAdapters
from personae.serve.characters import CharacterRegistry
from personae.serve.errors import ApiError, error_body
from personae.serve.logprobs import chat_logprobs
from personae.serve.sampling import sampling_params
from personae.serve.scheduler import Done, Failed, Finished, GenerationJob, Piece, RequestHandle
from personae.serve.schemas import ChatCompletionRequest, ChatMessage, ImagePart, TextPart
from personae.serve.settings import ServeSettings

FINGERPRINT = f"personae-{__version__}"
_DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+);base64,", re.IGNORECASE)


@dataclass
class Conversation:
    """The messages of a request sorted out: system text, turns, the latest image, and who is who."""

    system: str
    turns: list[Turn]
    image: tuple[str, str] | None  # (data URL, the param naming it)
    user_name: str
    char_name: str | None


@dataclass
class PreparedRequest:
    """A validated request, ready for the scheduler."""

    model: str  # echoed in the answer
    job: GenerationJob
    prompt_tokens: int  # text tokens + image positions
    dropped_turns: int
    stream: bool
    include_usage: bool
    warnings: tuple[str, ...] = ()  # how the card was cut to fit (Prompt.warnings)
    tokenizer: Tokenizer | None = None  # spells out the tokens of logprobs


class CompletionService:
    """Turns chat-completion requests into scheduler jobs, with every limit checked on the way."""

    def __init__(self, model: PersonaeModel, tokenizer: Tokenizer, registry: CharacterRegistry,
                 settings: ServeSettings, include_examples: bool, adapters: ServerAdapters | None = None,
                 generation: GenerationDefaults = FALLBACK) -> None:
        self.model, self.tokenizer, self.registry, self.settings = model, tokenizer, registry, settings
        self.generation = generation  # the run's recommended sampling, for every field a request leaves out
        self.adapters = adapters
        self.include_examples = include_examples
        self.builder = PromptBuilder(tokenizer)
        self.image_size = model.cfg.vision.image_size
        self._default_pixels: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def prepare(self, request: ChatCompletionRequest) -> PreparedRequest:
        """Validate a request and build its job (blocking: tokenizes and decodes the image)."""
        self._check_options(request)
        conversation = split_messages(request.messages, self.settings, request.user_name)
        card, model_name, avatar, adapter = self._character(request, conversation)
        max_tokens = self._max_tokens(request)
        budget = self.model.text_budget(max_tokens, with_image=True)
        if self.settings.max_prompt_tokens is not None:
            budget = min(budget, self.settings.max_prompt_tokens)
        try:
            prompt = self.builder.build(card, conversation.turns, max_tokens=budget, user=conversation.user_name,
                                        include_examples=self.include_examples)
        except PromptTooLong as error:
            raise ApiError(400, f"{error} (prompt budget {budget} tokens with max_tokens={max_tokens})",
                           param="messages", code="context_length_exceeded") from None
        pixels = self._image(*conversation.image) if conversation.image else avatar
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        top = request.top_logprobs or 0
        if top and not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        params = sampling_params(request, self.generation, self.tokenizer.vocab_size, max_tokens=max_tokens,
                                 stop=stop, seed=request.seed, logprobs=bool(request.logprobs), top_logprobs=top)
        # the same for every request to the card with the same lore entries active: cached by its tokens
        head = prompt.segments["definition"] + prompt.segments["examples"]
        job = GenerationJob(prompt.ids, pixels, params, n=request.n, ignore_eos=request.ignore_eos, head_len=head,
                            stream=request.stream, adapter=adapter)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return PreparedRequest(model_name, job, len(prompt.ids) + self.model.image_prefix_length(),
                               prompt.dropped_turns, request.stream, include_usage, tuple(prompt.warnings),
                               self.tokenizer)

    def _check_options(self, request: ChatCompletionRequest) -> None:
        s = self.settings
        if len(request.messages) > s.max_messages:
            raise ApiError(400, f"{len(request.messages)} messages is over the limit of {s.max_messages}",
                           param="messages", code="too_many_messages")
        if request.n > s.max_n:
            raise ApiError(400, f"n={request.n} is over the limit of {s.max_n}", param="n", code="n_too_large")
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > s.max_stop:
            raise ApiError(400, f"{len(stops)} stop strings is over the limit of {s.max_stop}", param="stop",
                           code="too_many_stop_strings")
        if any(not stop or len(stop) > 100 for stop in stops):
            raise ApiError(400, "every stop string must have 1 to 100 characters", param="stop", code="invalid_value")
        if request.tools:
            raise ApiError(400, "tools are not supported: a character answers in text", param="tools",
                           code="unsupported")

    def _max_tokens(self, request: ChatCompletionRequest) -> int:
        asked = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if asked is None:
            return int(self.settings.default_max_tokens or 64)
        if asked > self.settings.max_tokens_limit:
            raise ApiError(400, f"{param}={asked} is over the limit of {self.settings.max_tokens_limit}",
                           param=param, code="max_tokens_too_large")
        if self.model.text_budget(asked, with_image=True) < 8:
            raise ApiError(400, f"{param}={asked} leaves no room for a prompt in the model's "
                                f"{self.model.cfg.decoder.max_len} positions", param=param, code="max_tokens_too_large")
        return asked

    def _character(self, request: ChatCompletionRequest,
                   conversation: Conversation) -> tuple[CharacterCard, str, torch.Tensor, str | None]:
        """The card to play, the model name to echo, what the character looks at by default, its adapter."""
        named, param = (request.character, "character") if request.character else (request.model, "model")
        entry = self.registry.find(named) if named else None
        if entry is not None:
            card = entry.card
            if conversation.system:
                card = client_system_card(card, conversation.system)
            adapter = self.adapters.key(entry.id) if self.adapters is not None else None
            return card, entry.model, self.registry.pixels(entry), adapter
        if named and (param == "character" or not conversation.system):
            known = ", ".join(e.model for e in self.registry.list()[:8]) or "none"
            raise ApiError(404, f"no character '{named}' (see GET /v1/models); known: {known}", param=param,
                           code="model_not_found")
        if not conversation.system:
            raise ApiError(400, "name a character in 'model' (see GET /v1/models) or define one with a system "
                                "message", param="model", code="missing_character")
        name = conversation.char_name or "Assistant"
        card = CharacterCard(name=name, system_prompt=conversation.system)
        return card, named or f"personae/{name}", self._ad_hoc_pixels(name), None

    def _ad_hoc_pixels(self, name: str) -> torch.Tensor:
        with self._lock:  # prepare() runs on several worker threads
            if name not in self._default_pixels:
                self._default_pixels = dict(list(self._default_pixels.items())[-63:])  # a small bounded cache
                self._default_pixels[name] = model_pixels(default_avatar(name), self.image_size)
            return self._default_pixels[name]

    def _image(self, url: str, param: str) -> torch.Tensor:
        """A data: URL -> (3, S, S) pixels; remote URLs, paths, oversized and broken images are refused."""
        raw = decode_data_url(url, param, self.settings.max_image_bytes)
        try:
            return model_pixels(raw, self.image_size, max_pixels=self.settings.max_image_pixels, name=param)
        except DataError as error:
            code = "image_too_large" if "over the limit" in str(error) else "invalid_image"
            raise ApiError(400, str(error), param=param, code=code) from None


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL, with the byte limit checked before decoding."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme in ("http", "https"):
        raise ApiError(400, "remote image URLs are refused: this server fetches nothing; send the image inline "
                            "as a data:image/...;base64 URL", param=param, code="remote_image_refused")
    match = _DATA_URL.match(url)
    if not match:
        raise ApiError(400, "image_url.url must be a data:image/<type>;base64,... URL (file paths and other "
                            f"schemes are refused), got {url[:40]!r}", param=param, code="invalid_image_url")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ApiError(400, f"the image is about {len(payload) * 3 // 4} bytes, over the limit of {max_bytes} "
                            "(max_image_bytes)", param=param, code="image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image's base64 data is malformed", param=param, code="invalid_image") from None
    if len(raw) > max_bytes:
        raise ApiError(400, f"the image is {len(raw)} bytes, over the limit of {max_bytes} (max_image_bytes)",
                       param=param, code="image_too_large")
    return raw


def split_messages(messages: list[ChatMessage], settings: ServeSettings, user_name: str | None) -> Conversation:
    """Sort messages into system text, turns (user, reply) and the latest image; checks roles and images."""
    system: list[str] = []
    turns: list[Turn] = []
    pending: str | None = None  # the user's text awaiting a reply
    images: list[tuple[str, str]] = []
    names: dict[str, list[str]] = {"user": [], "assistant": []}  # the `name` fields, in order
    for i, message in enumerate(messages):
        text, found = _content(message, i)
        if found and message.role != "user":
            raise ApiError(400, f"only user messages may carry images (messages[{i}] is {message.role})",
                           param=f"messages[{i}].content", code="invalid_value")
        images += found
        if message.name and message.role in names:
            names[message.role].append(message.name)
        if message.role in ("system", "developer"):
            system.append(text)
        elif message.role == "user":
            pending = text if pending is None else f"{pending}\n{text}"
        elif pending is not None:
            turns.append(Turn(pending, text))
            pending = None
        elif turns:
            turns[-1] = Turn(turns[-1].user, f"{turns[-1].reply}\n{text}")
        else:
            turns.append(Turn("", text))  # the character speaks first: a greeting
    if len(images) > settings.max_images:
        raise ApiError(400, f"{len(images)} images is over the limit of {settings.max_images}", param="messages",
                       code="too_many_images")
    if pending is None:
        raise ApiError(400, "the last message must be the user's (the character answers it)", param="messages",
                       code="invalid_value")
    turns.append(Turn(pending))
    user = user_name or (names["user"][-1] if names["user"] else "User")
    char = names["assistant"][-1] if names["assistant"] else None
    return Conversation("\n".join(s for s in system if s), turns, images[-1] if images else None, user, char)


def _content(message: ChatMessage, index: int) -> tuple[str, list[tuple[str, str]]]:
    """A message's text (parts joined by newlines) and its image URLs with their param names."""
    if message.content is None:
        return "", []
    if isinstance(message.content, str):
        return message.content, []
    texts, images = [], []
    for j, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            images.append((part.image_url.url, f"messages[{index}].content[{j}].image_url.url"))
    return "\n".join(texts), images


# ---- answers -----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prepared: PreparedRequest, generations: list[Generation]) -> dict[str, int]:
    completion = sum(len(g.token_ids) for g in generations)
    return {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": completion,
            "total_tokens": prepared.prompt_tokens + completion}


def completion_body(prepared: PreparedRequest, generations: list[Generation], cid: str, created: int) -> dict:
    """The non-streamed answer."""
    choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason,
                "logprobs": chat_logprobs(prepared.tokenizer, g.logprobs) if g.logprobs is not None else None}
               for i, g in enumerate(generations)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": prepared.model,
            "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage(prepared, generations),
            "warnings": list(prepared.warnings)}


def _chunk(cid: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT, "choices": choices, **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def stream_chunks(handle: RequestHandle, prepared: PreparedRequest) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; cancels on exit."""
    cid, created, model = completion_id(), int(time.time()), prepared.model
    try:
        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(handle.job.n)]
        yield _chunk(cid, created, model, roles, **({"warnings": list(prepared.warnings)} if prepared.warnings else {}))
        while True:
            event = await handle.next_event()
            if isinstance(event, Piece):
                logprobs = chat_logprobs(prepared.tokenizer, event.logprobs) if handle.job.params.logprobs else None
                delta = {"index": event.index, "delta": {"content": event.text}, "logprobs": logprobs,
                         "finish_reason": None}
                yield _chunk(cid, created, model, [delta])
            elif isinstance(event, Finished):
                end = {"index": event.index, "delta": {}, "logprobs": None,
                       "finish_reason": event.generation.finish_reason}
                yield _chunk(cid, created, model, [end])
            elif isinstance(event, Done):
                if prepared.include_usage:
                    yield _chunk(cid, created, model, [], usage=usage(prepared, event.generations))
                break
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(error_body(f'generation failed: {event.error}', 'server_error'))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a no-op when finished; frees the rows when the client went away
