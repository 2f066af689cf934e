"""Text completions and tokenization: ``POST /v1/completions``, ``/tokenize``, ``/detokenize``.

A text completion continues a raw prompt (a string, parsed with the model's special tokens, or
token ids) with no character, card or image: what SillyTavern's Text Completion mode and
llama.cpp / KoboldCpp clients expect. Sampling takes the same fields as chat completions (plus
the legacy integer ``logprobs``); what a request leaves out comes from the run's
``generation_config.json``. Shapes follow OpenAI (completions) and vLLM (tokenize / detokenize).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from personae.data.tokenizer import Tokenizer
from personae.models.generation import Generation
from personae.models.generation_config import GenerationDefaults
from personae.models.model import PersonaeModel
from personae.models.next_token import MAX_TOP_LOGPROBS
from personae.serve.completions import FINGERPRINT
from personae.serve.errors import ApiError, error_body
from personae.serve.guards import check_text_bytes
from personae.serve.logprobs import legacy_logprobs
from personae.serve.sampling import sampling_params, stop_strings
from personae.serve.scheduler import Done, Failed, Finished, GenerationJob, Piece, RequestHandle
from personae.serve.schemas import MAX_SEED, SamplerFields, StreamOptions, Text
from personae.serve.settings import ServeSettings

# ---- request and response models ----------------------------------------------------------------


class TextCompletionRequest(SamplerFields):
    """POST /v1/completions (OpenAI's legacy completions, with llama.cpp's samplers)."""

    model: str | None = None
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(description="text, or token ids; one prompt")
    max_tokens: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None  # the answer's text starts with the prompt
    stop: Text | list[Text] | None = None
    n: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-1, lt=MAX_SEED, description="-1 or null: random")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token (legacy)")
    suffix: str | None = None  # refused: no fill-in-the-middle
    best_of: int | None = Field(None, ge=1)  # only best_of == n (no reranking)
    ignore_eos: bool | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used

    def texts(self) -> list[str]:
        """The prompt's and stop strings' text (token ids are no text: max_body_bytes bounds them)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else [p for p in self.prompt if isinstance(p, str)]
        return prompts + ([self.stop] if isinstance(self.stop, str) else list(self.stop or []))


class CompletionChoice(BaseModel):
    """One choice of a text completion."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None  # tokens, token_logprobs, top_logprobs, text_offset
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    """The non-streamed answer of /v1/completions."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: dict[str, int]


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the leading [cls] every personae prompt starts with


class TokenizeResponse(BaseModel):
    """The ids of the prompt, their count, and the model's context length."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """The text of the ids (special tokens skipped)."""

    prompt: str


# ---- preparing a request ------------------------------------------------------------------------


class TextCompletionService:
    """Turns /v1/completions requests into scheduler jobs (text only: no image, no card)."""

    def __init__(self, model: PersonaeModel, tokenizer: Tokenizer, settings: ServeSettings,
                 generation: GenerationDefaults, model_name: str = "personae") -> None:
        self.model, self.tokenizer, self.settings, self.generation = model, tokenizer, settings, generation
        self.model_name = model_name

    def prepare(self, request: TextCompletionRequest) -> tuple[GenerationJob, list[int]]:
        """The job and the prompt ids; 400s name the field at fault."""
        if request.suffix:
            raise ApiError(400, "suffix (fill in the middle) is not supported", param="suffix", code="unsupported")
        n = request.n or 1
        if n > self.settings.max_n:
            raise ApiError(400, f"n={n} is over the limit of {self.settings.max_n}", param="n", code="n_too_large")
        if request.best_of not in (None, n):
            raise ApiError(400, "best_of must equal n (no reranking)", param="best_of", code="unsupported")
        ids = self._prompt_ids(request.prompt)
        max_tokens = self._max_tokens(request.max_tokens, len(ids))
        stop = stop_strings(request.stop, self.settings.max_stop)
        seed = request.seed if request.seed is not None and request.seed >= 0 else None
        params = sampling_params(request, self.generation, self.tokenizer.vocab_size, max_tokens=max_tokens,
                                 stop=stop, seed=seed, logprobs=request.logprobs is not None,
                                 top_logprobs=request.logprobs or 0)
        job = GenerationJob(ids, None, params, n=n, ignore_eos=bool(request.ignore_eos), stream=bool(request.stream))
        return job, ids

    def _prompt_ids(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[int]:
        """One prompt's ids: text is encoded with the leading [cls], ids are taken as they are."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # type: ignore[assignment]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif all(isinstance(t, int) for t in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
        else:
            raise ApiError(400, "prompt must be one string or one list of token ids (batches are not supported)",
                           param="prompt", code="invalid_value")
        vocab = self.tokenizer.vocab_size
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab}) and there must be at least one",
                           param="prompt", code="invalid_value")
        return ids

    def _max_tokens(self, asked: int | None, prompt_len: int) -> int:
        positions = self.model.text_budget(0, with_image=False)
        limit = self.settings.reply_limit(positions)
        if asked is not None and asked > limit:  # no warnings field in this answer's shape: refused, not cut
            raise ApiError(400, f"max_tokens={asked} is over the limit of {limit}", param="max_tokens",
                           code="max_tokens_too_large")
        max_tokens = asked or min(int(self.settings.default_max_tokens or self.generation.max_new_tokens), limit)
        room = positions - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt's {prompt_len} tokens fill the model's {self.model.max_positions} "
                                "positions", param="prompt", code="context_length_exceeded")
        if asked is not None and asked > room:
            raise ApiError(400, f"max_tokens={asked} is more than the {room} positions the prompt leaves",
                           param="max_tokens", code="context_length_exceeded")
        return min(max_tokens, room)  # the default shrinks to fit; an explicit max_tokens that does not is a 400


# ---- answers ------------------------------------------------------------------------------------


def _choice(service: TextCompletionService, index: int, generation: Generation, echo: str) -> dict[str, Any]:
    logprobs = None
    if generation.logprobs is not None:
        logprobs = legacy_logprobs(service.tokenizer, generation.logprobs, len(echo))
    return {"index": index, "text": echo + generation.text, "logprobs": logprobs,
            "finish_reason": generation.finish_reason}


def _usage(prompt_len: int, generations: list[Generation]) -> dict[str, int]:
    completion = sum(len(g.token_ids) for g in generations)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}


def completion_answer(service: TextCompletionService, model: str, ids: list[int], generations: list[Generation],
                      echo: bool) -> dict[str, Any]:
    """The non-streamed /v1/completions body."""
    prefix = service.tokenizer.decode(ids) if echo else ""
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": FINGERPRINT,
            "choices": [_choice(service, i, g, prefix) for i, g in enumerate(generations)],
            "usage": _usage(len(ids), generations)}


async def stream_completion(service: TextCompletionService, handle: RequestHandle, model: str, ids: list[int],
                            echo: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of text_completion chunks, ending with `data: [DONE]`; cancels on exit."""
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    offsets = [0] * handle.job.n  # characters sent per choice (text_offset of the next token)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": FINGERPRINT, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if echo:
            prompt = service.tokenizer.decode(ids)
            offsets = [len(prompt)] * handle.job.n
            yield chunk([{"index": i, "text": prompt, "logprobs": None, "finish_reason": None}
                         for i in range(handle.job.n)])
        while True:
            event = await handle.next_event()
            if isinstance(event, Piece):
                logprobs = None
                if handle.job.params.logprobs:
                    logprobs = legacy_logprobs(service.tokenizer, event.logprobs, offsets[event.index])
                offsets[event.index] += len(event.text)
                yield chunk([{"index": event.index, "text": event.text, "logprobs": logprobs, "finish_reason": None}])
            elif isinstance(event, Finished):
                yield chunk([{"index": event.index, "text": "", "logprobs": None,
                              "finish_reason": event.generation.finish_reason}])
            elif isinstance(event, Done):
                if include_usage:
                    yield chunk([], usage=_usage(len(ids), event.generations))
                break
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(error_body(f'generation failed: {event.error}', 'server_error'))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


Submit = Callable[[GenerationJob], RequestHandle]
Collect = Callable[[RequestHandle, Request], Awaitable[list]]


def add_text_routes(app: FastAPI, service: TextCompletionService, submit: Submit, collect: Collect,
                    run_in_thread: Callable[..., Awaitable[Any]], max_text_bytes: int) -> None:
    """Register /v1/completions, /tokenize and /detokenize; text over `max_text_bytes` is refused untokenized."""

    @app.post("/v1/completions", tags=["openai"], response_model=TextCompletion)
    async def completions(request: Request, body: TextCompletionRequest) -> Response:
        check_text_bytes(body.texts(), max_text_bytes)
        job, ids = await run_in_thread(service.prepare, body)
        handle = submit(job)
        model = body.model or service.model_name
        if job.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_completion(service, handle, model, ids, bool(body.echo), include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        generations = await collect(handle, request)
        answer = TextCompletion.model_validate(completion_answer(service, model, ids, generations, bool(body.echo)))
        return JSONResponse(answer.model_dump(mode="json"))

    @app.post("/tokenize", tags=["tokenizer"])
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_text_bytes([body.prompt], max_text_bytes)
        tokens = await run_in_thread(functools.partial(service.tokenizer.encode, body.prompt,
                                                       add_cls=body.add_special_tokens))
        return TokenizeResponse(count=len(tokens), max_model_len=service.model.max_positions, tokens=tokens)

    @app.post("/detokenize", tags=["tokenizer"])
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        vocab = service.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
        return DetokenizeResponse(prompt=await run_in_thread(service.tokenizer.decode, body.tokens))


__all__ = ["DetokenizeRequest", "TextCompletionRequest", "TextCompletionService", "TokenizeRequest",
           "add_text_routes", "completion_answer", "stream_completion"]
