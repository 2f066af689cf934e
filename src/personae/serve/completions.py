"""Chat completions: an OpenAI request -> character, prompt, image and sampling -> a job; answers and SSE chunks.

How a request is read:

* **character**: the `character` field (an id or name), else `model` (`personae/<id>`, an id, or a
  card name). When neither names a known character but the request has a system message, the
  system text defines an ad-hoc character (named after an assistant message's `name`, else
  "Assistant"). With a known character, system messages replace the card's `system_prompt`, or its
  whole definition when they already carry its description (`data.prompt.client_system_card`).
* **conversation**: user and assistant messages become the prompt's turns (consecutive messages
  of one role are joined; an assistant message before any user message is a greeting). When the
  last message is the assistant's, it is a prefill: the reply continues that text and the answer
  holds the continuation only ("continue" in SillyTavern). When it is a system message (an
  impersonation or group nudge), the character answers an empty user turn. Old turns are dropped
  when the prompt does not fit: the history is limited in tokens, not messages.
* **image**: the model looks at one image, the latest `image_url` part of any role; it must be a
  ``data:image/...;base64,`` URL. The other images are dropped unread (front ends re-send the
  whole chat's images each turn). Without one, the character looks at its card's avatar.
* **tools**: a character has none. `tools` with `tool_choice` "none"/"auto" (or none given) are
  ignored and the answer is text; `tool_choice` "required" or a named function is a 400.
* **null**: an optional field sent as null is the same as one left out.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
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
from personae.data.hf_tokenizer import HFChatTokenizer, prompt_builder
from personae.data.images import model_pixels
from personae.data.prompt import Prompt, PromptTooLong, Turn, client_system_card
from personae.data.tokenizer import Tokenizer
from personae.errors import DataError
from personae.models.generation import Generation
from personae.models.generation_config import FALLBACK, GenerationDefaults
from personae.models.model import PersonaeModel
from personae.models.next_token import SamplingParams
from personae.serve.adapters import ServerAdapters
from personae.serve.characters import CharacterRegistry
from personae.serve.errors import ApiError, error_body
from personae.serve.logprobs import chat_logprobs
from personae.serve.sampling import sampling_params, stop_strings
from personae.serve.scheduler import Done, Failed, Finished, GenerationJob, Piece, RequestHandle
from personae.serve.schemas import ChatCompletionRequest, ChatMessage, ImagePart, TextPart
from personae.serve.settings import ServeSettings

FINGERPRINT = f"personae-{__version__}"
MIN_REPLY = 16  # the fewest reply tokens a request's max_tokens is cut to so that its prompt fits
_DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+);base64,", re.IGNORECASE)


@dataclass
class Conversation:
    """The messages of a request sorted out: system text, turns, the latest image, and who is who."""

    system: str
    turns: list[Turn]
    image: tuple[str, str] | None  # (data URL, the param naming it)
    user_name: str
    char_name: str | None
    prefill: str = ""  # the assistant's unfinished reply the answer continues


@dataclass
class PreparedRequest:
    """A validated request, ready for the scheduler."""

    model: str  # echoed in the answer
    job: GenerationJob
    prompt_tokens: int  # text tokens + image positions
    dropped_turns: int
    stream: bool
    include_usage: bool
    warnings: tuple[str, ...] = ()  # how the card was cut to fit (Prompt.warnings), max_tokens cut to the limit
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
        self.builder = prompt_builder(tokenizer)  # an HF decoder's chat template, else personae's
        self.image_size = model.cfg.vision.image_size
        self._default_pixels: dict[str, torch.Tensor] = {}
        # the most characters one token covers (byte-level BPE: one vocabulary character per byte): a text's
        # length over it is a floor on its tokens, known before tokenizing
        vocab = (tokenizer.hf.get_vocab() if isinstance(tokenizer, HFChatTokenizer)  # an HF decoder's own tokenizer
                 else tokenizer.backend.get_vocab(with_added_tokens=True))
        self.max_token_chars = max(1, max(map(len, vocab)))
        self._lock = threading.Lock()

    def prepare(self, request: ChatCompletionRequest) -> PreparedRequest:
        """Validate a request and build its job (blocking: tokenizes and decodes the image)."""
        stop = self._check_options(request)
        conversation = split_messages(request.messages, request.user_name)
        card, model_name, avatar, adapter = self._character(request, conversation)
        max_tokens, cut_note = self._max_tokens(request)
        conversation, predropped = self._drop_what_cannot_fit(card, conversation)
        prompt, max_tokens, fit_note = self._prompt(card, conversation, max_tokens)
        prompt.dropped_turns += predropped
        pixels = self._image(*conversation.image) if conversation.image else avatar
        # the same for every request to the card with the same lore entries active: cached by its tokens
        head = prompt.segments["definition"] + prompt.segments["examples"]
        stream = bool(request.stream)
        job = GenerationJob(prompt.ids, pixels, self._sampling(request, max_tokens, stop), n=request.n or 1,
                            ignore_eos=bool(request.ignore_eos), head_len=head, stream=stream, adapter=adapter)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        warnings = tuple(prompt.warnings) + tuple(note for note in (cut_note, fit_note) if note)
        return PreparedRequest(model_name, job, len(prompt.ids) + self.model.image_prefix_length(),
                               prompt.dropped_turns, stream, include_usage, warnings, self.tokenizer)

    def _drop_what_cannot_fit(self, card: CharacterCard, conversation: Conversation) -> tuple[Conversation, int]:
        """Before tokenizing: refuse a latest message, and drop old turns, that cannot fit however they tokenize.

        No token covers more than `max_token_chars` characters, so a text of C characters is at least
        C // max_token_chars tokens: a latest message over the model's prompt positions is a 400 at
        once, and turns the builder would drop anyway are not tokenized first (a chat of a megabyte
        costs its last few turns, not a megabyte of tokens). With a lorebook every turn is kept: its
        entries are activated by the whole chat.
        """
        positions, chars = self.model.text_budget(MIN_REPLY, with_image=True), self.max_token_chars
        turns = conversation.turns
        at_least = len(turns[-1].user) // chars
        if at_least > positions:
            raise ApiError(400, f"the latest message is at least {at_least} tokens ({len(turns[-1].user)} characters, "
                                f"no token covers more than {chars}), more than the {positions} prompt positions of "
                                "the model; shorten the message", param="messages", code="context_length_exceeded")
        if card.character_book:
            return conversation, 0
        kept = 0
        for turn in reversed(turns[:-1]):
            at_least += (len(turn.user) + len(turn.reply or "")) // chars
            if at_least > positions:
                break
            kept += 1
        dropped = len(turns) - 1 - kept
        return (dataclasses.replace(conversation, turns=turns[dropped:]), dropped) if dropped else (conversation, 0)

    def _sampling(self, request: ChatCompletionRequest, max_tokens: int, stop: list[str]) -> SamplingParams:
        """The request's sampling over the run's recommended settings (serve/sampling.py)."""
        top = request.top_logprobs or 0
        if top and not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return sampling_params(request, self.generation, self.tokenizer.vocab_size, max_tokens=max_tokens,
                               stop=stop, seed=request.seed, logprobs=bool(request.logprobs), top_logprobs=top)

    def _prompt(self, card: CharacterCard, conversation: Conversation, max_tokens: int) -> tuple[Prompt, int, str]:
        """(the prompt within the budget, a prefill's tokens after the <char> cue; the reply's tokens; a warning).

        When the parts of the prompt that are never cut do not fit beside max_tokens, the reply gets
        what the context leaves instead (at least MIN_REPLY tokens): a front end's max_tokens is a
        ceiling, not a reservation worth refusing the request for.
        """
        prefill = self.builder.tok.encode(conversation.prefill, add_cls=False, add_eos=False, parse_special=False)
        try:
            return self._fit(card, conversation, max_tokens, prefill), max_tokens, ""
        except ApiError:
            if max_tokens <= MIN_REPLY:
                raise
        prompt = self._fit(card, conversation, MIN_REPLY, prefill)
        reply = min(max_tokens, self.model.text_budget(len(prompt.ids), with_image=True))
        return prompt, reply, (f"max_tokens={max_tokens} was cut to {reply} tokens: the prompt's uncut parts take "
                               f"{len(prompt.ids)} of the model's {self.model.cfg.decoder.max_len} positions")

    def _fit(self, card: CharacterCard, conversation: Conversation, max_tokens: int, prefill: list[int]) -> Prompt:
        budget = self.model.text_budget(max_tokens, with_image=True)
        if self.settings.max_prompt_tokens is not None:
            budget = min(budget, self.settings.max_prompt_tokens)
        try:
            prompt = self.builder.build(card, conversation.turns, max_tokens=budget - len(prefill),
                                        user=conversation.user_name, include_examples=self.include_examples)
        except PromptTooLong as error:
            raise ApiError(400, f"{error} (prompt budget {budget} tokens with max_tokens={max_tokens}, "
                                f"{len(prefill)} of them the assistant's prefill)",
                           param="messages", code="context_length_exceeded") from None
        prompt.ids = prompt.ids + prefill
        return prompt

    def _check_options(self, request: ChatCompletionRequest) -> list[str]:
        """The request's limits and options checked; its stop strings."""
        s = self.settings
        if (request.n or 1) > s.max_n:
            raise ApiError(400, f"n={request.n} is over the limit of {s.max_n}", param="n", code="n_too_large")
        stops = stop_strings(request.stop, s.max_stop)
        choice = request.tool_choice
        if choice not in (None, "none", "auto"):  # OpenAI's answer for a model without tool use
            raise ApiError(400, f"tool_choice {choice!r} needs tool use, which this model does not support; "
                                "send tool_choice 'auto' or 'none' (tools are then ignored)",
                           param="tool_choice", code="unsupported")
        return stops

    def _max_tokens(self, request: ChatCompletionRequest) -> tuple[int, str]:
        """The reply's token budget, and a warning when the request's max_tokens was cut to the limit."""
        asked = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        positions = self.model.text_budget(0, with_image=True)
        if asked is None:
            return self.settings.default_reply(positions), ""
        limit = self.settings.reply_limit(positions)
        if asked > limit:  # front ends send their own default (SillyTavern: 300): cut it, as the context would
            return limit, f"{param}={asked} was cut to the server's limit of {limit} tokens (max_tokens_limit)"
        if self.model.text_budget(asked, with_image=True) < 8:
            raise ApiError(400, f"{param}={asked} leaves no room for a prompt in the model's "
                                f"{self.model.cfg.decoder.max_len} positions", param=param, code="max_tokens_too_large")
        return asked, ""

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


def split_messages(messages: list[ChatMessage], user_name: str | None) -> Conversation:
    """Sort messages into system text, turns (user, reply), a prefill and the latest image of any role."""
    system: list[str] = []
    turns: list[Turn] = []
    pending: str | None = None  # the user's text awaiting a reply
    images: list[tuple[str, str]] = []
    names: dict[str, list[str]] = {"user": [], "assistant": []}  # the `name` fields, in order
    prefill, prefill_images = "", []
    if messages[-1].role == "assistant":  # continue / prefill: the answer goes on from this text
        prefill, prefill_images = _content(messages[-1], len(messages) - 1)
        if messages[-1].name:
            names["assistant"].append(messages[-1].name)
        messages = messages[:-1]
    for i, message in enumerate(messages):
        text, found = _content(message, i)
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
    images += prefill_images
    turns.append(Turn(pending or ""))  # after a reply or a system nudge: the character speaks on its own
    user = user_name or (names["user"][-1] if names["user"] else "User")
    char = names["assistant"][-1] if names["assistant"] else None
    return Conversation("\n".join(s for s in system if s), turns, images[-1] if images else None, user, char,
                        prefill)


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
