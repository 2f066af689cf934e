"""The FastAPI app: OpenAI-compatible chat completions, models, character management, and the web page.

``create_app(run_dir, settings)`` loads a fine-tuned run, starts the batching scheduler and returns
the app; ``personae.serve.server.serve`` runs it under uvicorn. Routes (docs/guide/api.md has examples):

    GET  /                                  the chat page (static/)
    GET  /health                            liveness, no key needed
    POST /v1/chat/completions               OpenAI chat completions, streamed (SSE) or not
    GET  /v1/models[/{id}]                  the characters as models
    GET  /v1/characters[/{id}]              list / show characters
    POST /v1/characters                     upload a card (raw JSON or PNG body)
    DELETE /v1/characters/{id}              remove an uploaded character
    GET  /v1/characters/{id}/avatar         the card's image as PNG
    GET  /v1/characters/{id}/card[.png]     export the card: JSON, or the PNG as uploaded
    POST /v1/characters/{id}/adapt          start an adaptation job (501 without an adapt_fn)
    GET  /v1/characters/{id}/adapt[/{job}]  poll it
    GET|POST /v1/adapters, DELETE /v1/adapters/{id}   resident adapters; load one by path; unload one
    GET  /stats                             scheduler counters and the limits
    GET  /metrics                           the same and more in Prometheus's text format
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from personae import __version__
from personae.config import Config
from personae.data.cards import CardError, CharacterCard
from personae.data.prompt import PromptTooLong, Turn
from personae.data.tokenizer import Tokenizer
from personae.meta.adapt import CharacterAdapter, learned_rates
from personae.models.generation_config import read_generation_config, recommended_generation
from personae.models.model import PersonaeModel
from personae.serve.adapt import AdaptJobs, AdaptTask, ServedRun
from personae.serve.adapt_routes import add_adapt_routes
from personae.serve.adapter_routes import add_adapter_routes
from personae.serve.adapters import ServerAdapters
from personae.serve.characters import (
    CharacterEntry,
    CharacterExists,
    CharacterNotFound,
    CharacterReadOnly,
    CharacterRegistry,
)
from personae.serve.completions import CompletionService, completion_body, completion_id, stream_chunks
from personae.serve.errors import ApiError, install_error_handlers
from personae.serve.guards import CatchAllMiddleware, LimitsMiddleware, check_text_bytes
from personae.serve.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware, first_token_timed, scrape
from personae.serve.scheduler import Done, Failed, QueueFull, RequestHandle, Scheduler, SchedulerStopped
from personae.serve.schemas import (
    CharacterDeleted,
    CharacterInfo,
    CharacterList,
    CharacterUploaded,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelList,
)
from personae.serve.settings import ServeSettings
from personae.serve.text_completions import TextCompletionService, add_text_routes

STATIC = Path(__file__).parent / "static"
_PROTECTED = ("/v1/", "/stats", "/metrics", "/tokenize", "/detokenize")


@dataclass
class RunBundle:
    """A loaded run: the model, its tokenizer, whether its prompts include card examples, and its config."""

    model: PersonaeModel
    tokenizer: Tokenizer
    include_examples: bool
    config: Config  # the run's settings (adaptation reads meta.* and finetune.*)


def load_run(run_dir: Path, device: str | None = None) -> RunBundle:
    """Load a fine-tuned run for serving (it must have a decoder)."""
    # checkpoint reading lives in train/ for now; serve needs only this read-only function of it
    from personae.models.io import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, config, tokenizer = load_model(Path(run_dir), device)
    model.require_decoder()  # a pretrained-only run cannot chat: say so at start, not per request
    return RunBundle(model.eval(), tokenizer, config.finetune.include_examples, config)


class ServerContext:
    """Everything the routes share: settings, model, registry, scheduler, completions, adaptation jobs."""

    def __init__(self, run_dir: Path, settings: ServeSettings, bundle: RunBundle) -> None:
        self.run_dir, self.settings, self.bundle = Path(run_dir), settings, bundle
        self.registry = CharacterRegistry(self.run_dir, image_size=bundle.model.cfg.vision.image_size)
        self.adapters = ServerAdapters(bundle.model, self.registry.adapter_dir, settings.max_adapters,
                                       in_use=self._adapters_in_use)
        include = bundle.include_examples if settings.include_examples is None else settings.include_examples
        # the run's recommended sampling (a run older than the file: what evaluation decodes with)
        self.generation = read_generation_config(self.run_dir, recommended_generation(bundle.config))
        self.completions = CompletionService(bundle.model, bundle.tokenizer, self.registry, settings, include,
                                             self.adapters, self.generation)
        self.text_completions = TextCompletionService(bundle.model, bundle.tokenizer, settings, self.generation)
        self.scheduler = Scheduler(bundle.model, bundle.tokenizer, max_batch=settings.max_batch,
                                   max_queue=settings.max_queue, batching=settings.batching,
                                   retry_after=settings.retry_after_s,
                                   prefix_cache_bytes=settings.prefix_cache_mib * 1024 * 1024,
                                   adapters=self.adapters)
        self.adapt_jobs = AdaptJobs(settings.adapt_fn, on_done=self._adapted, max_jobs=settings.max_adapt_jobs)
        self.served = ServedRun(bundle.model, bundle.config, bundle.tokenizer, self.adapters.lock,
                                settings.max_image_pixels, learned_rates(self.run_dir))
        self.started = time.time()
        # tokenizing and image decoding run on these threads, never on the event loop; more requests wait
        self.limiter = anyio.CapacityLimiter(settings.prepare_threads)
        self.metrics = Metrics()
        self.metrics.describe("personae_http_requests_total", "HTTP requests answered, by route, method and status")
        self.metrics.describe("personae_http_request_duration_seconds", "time to answer a request (streams: to "
                              "their last byte), by route")
        self.metrics.describe("personae_time_to_first_token_seconds", "from a streamed chat completion's start "
                              "to its first text chunk")
        self.metrics.describe("personae_prompt_tokens_total", "prompt tokens of accepted chat completions (image "
                              "positions included)")

    def _adapters_in_use(self) -> set[str]:
        scheduler = getattr(self, "scheduler", None)  # the adapter files are loaded before it is made
        return scheduler.adapters_in_use() if scheduler is not None else set()

    def _adapted(self, task: AdaptTask, adapter: CharacterAdapter) -> None:
        """An adaptation job made an adapter (and wrote its file): list it and apply it to the requests to come."""
        self.registry.refresh()
        self.adapters.add(task.character_id, adapter.tensors, adapter.metadata, task.adapter_path)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking function (tokenizing, decoding, hashing) on one of the bounded worker threads."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)

    def submit(self, job: Any) -> RequestHandle:
        """Queue a job for this event loop; a full queue is a 503 with Retry-After."""
        try:
            return self.scheduler.submit(job, asyncio.get_running_loop())
        except QueueFull as error:
            raise ApiError(503, str(error), code="queue_full",
                           headers={"Retry-After": str(error.retry_after)}) from None
        except SchedulerStopped as error:
            raise ApiError(503, str(error), code="shutting_down") from None


def create_app(run_dir: Path | str, settings: ServeSettings | None = None, *,
               bundle: RunBundle | None = None) -> FastAPI:
    """The app for a fine-tuned run; `bundle` reuses an already loaded model (tests, benchmarks)."""
    settings = settings or ServeSettings()
    context = ServerContext(Path(run_dir), settings, bundle or load_run(Path(run_dir), settings.device))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        context.scheduler.start()
        yield
        context.scheduler.stop()
        context.adapt_jobs.stop()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="personae", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="OpenAI-compatible role-play server; see docs/guide/api.md", **docs)
    app.state.context = context
    context.scheduler.start()  # also without the lifespan (e.g. a TestClient used outside `with`)
    install_error_handlers(app)
    _chat_routes(app, context)
    add_text_routes(app, context.text_completions, context.submit, _collect, context.offload,
                    settings.max_text_bytes)
    _character_routes(app, context)
    add_adapt_routes(app, context)
    add_adapter_routes(app, context.adapters, context.registry)
    _misc_routes(app, context)
    app.add_middleware(CatchAllMiddleware)  # innermost: the others see its 500 like any answer
    app.add_middleware(LimitsMiddleware, api_key=settings.api_key, protected=_PROTECTED,
                       max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=context.metrics)  # outermost: refusals are counted too
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


async def _collect(handle: RequestHandle, request: Request) -> list:
    """Wait for every choice; if the client disconnects meanwhile, cancel the request."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        handle.cancel()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            event = await handle.next_event()
            if isinstance(event, Done):
                return event.generations
            if isinstance(event, Failed):
                if isinstance(event.error, asyncio.CancelledError):
                    raise ApiError(499, "the request was cancelled (client disconnected)", code="cancelled")
                raise ApiError(500, f"generation failed: {event.error}", code="generation_failed")
    finally:
        watcher.cancel()
        handle.cancel()


# every route may answer an error in OpenAI's shape (request validation errors are 400s, not 422s)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "a refused request"},
    "5XX": {"model": ErrorResponse, "description": "a server error"},
}
_STREAM_RESPONSE = {200: {"description": "the completion; with `stream: true`, server-sent events of chunks",
                          "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _chat_routes(app: FastAPI, context: ServerContext) -> None:
    @app.post("/v1/chat/completions", tags=["openai"], response_model=ChatCompletion, responses=_STREAM_RESPONSE)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        check_text_bytes(body.texts(), context.settings.max_text_bytes)  # before anything is tokenized
        prepared = await context.offload(context.completions.prepare, body)
        handle = context.submit(prepared.job)
        context.metrics.inc("personae_prompt_tokens_total", prepared.prompt_tokens * prepared.job.n)
        headers = {"X-Personae-Dropped-Turns": str(prepared.dropped_turns)}
        if prepared.stream:
            headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(first_token_timed(stream_chunks(handle, prepared), context.metrics),
                                     media_type="text/event-stream", headers=headers)
        generations = await _collect(handle, request)
        body = ChatCompletion.model_validate(completion_body(prepared, generations, completion_id(), int(time.time())))
        return JSONResponse(body.model_dump(mode="json"), headers=headers)

    @app.get("/v1/models", tags=["openai"])
    async def list_models() -> ModelList:
        return ModelList(data=[_model_info(context, e) for e in context.registry.list()])

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str) -> ModelInfo:
        return _model_info(context, _entry(context, model_id, "model"))


def _model_info(context: ServerContext, entry: CharacterEntry) -> ModelInfo:
    """A character as a model; `adapted` only when the server applies its adapter (not when a file merely exists)."""
    model = context.bundle.model
    return ModelInfo(id=entry.model, created=entry.created, name=entry.card.name, source=entry.source,
                     adapted=context.adapters.status(entry.id) == "applied", context_length=model.cfg.decoder.max_len,
                     max_model_len=model.cfg.decoder.max_len,
                     max_completion_tokens=context.settings.reply_limit(model.text_budget(0, with_image=True)))


def _character_info(entry: CharacterEntry, adapters: ServerAdapters) -> CharacterInfo:
    greetings = entry.card.greetings()
    return CharacterInfo(id=entry.id, model=entry.model, name=entry.card.name, source=entry.source,
                         adapted=adapters.status(entry.id) == "applied", adapter=adapters.status(entry.id),
                         description=entry.card.description,
                         greeting=greetings[0] if greetings else "", avatar_url=f"/v1/characters/{entry.id}/avatar",
                         tags=list(entry.card.tags))


def _entry(context: ServerContext, name: str, param: str = "id") -> CharacterEntry:
    try:
        return context.registry.get(name)
    except CharacterNotFound as error:
        raise ApiError(404, str(error), param=param, code="character_not_found") from None


def _character_routes(app: FastAPI, context: ServerContext) -> None:
    @app.get("/v1/characters", tags=["characters"])
    async def list_characters() -> CharacterList:
        return CharacterList(data=[_character_info(e, context.adapters) for e in context.registry.list()])

    @app.get("/v1/characters/{character_id}", tags=["characters"])
    async def get_character(character_id: str) -> CharacterInfo:
        return _character_info(_entry(context, character_id), context.adapters)

    @app.post("/v1/characters", status_code=201, tags=["characters"])
    async def upload_character(request: Request) -> CharacterUploaded:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind.startswith("multipart/"):
            raise ApiError(415, "send the card file itself as the body (Content-Type: application/json or "
                                "image/png), not a multipart form", code="unsupported_media_type")
        raw = await request.body()
        if not raw:
            raise ApiError(400, "the body is empty: send a card as JSON or as a PNG with a chara/ccv3 chunk",
                           code="missing_body")
        try:
            entry = await context.offload(
                functools.partial(context.registry.add, raw, max_pixels=context.settings.max_image_pixels))
        except CardError as error:
            raise ApiError(400, f"not a valid character card: {error}", code="invalid_card") from None
        except CharacterExists as error:
            raise ApiError(409, str(error), code="character_exists") from None
        tokens, budget, warnings = await context.offload(_card_fit, context, entry.card)
        return CharacterUploaded(**_character_info(entry, context.adapters).model_dump(), prompt_tokens=tokens,
                                 prompt_budget=budget, warnings=warnings)

    @app.delete("/v1/characters/{character_id}", tags=["characters"])
    async def delete_character(character_id: str) -> CharacterDeleted:
        try:
            entry = context.registry.remove(character_id)
        except CharacterNotFound as error:
            raise ApiError(404, str(error), param="id", code="character_not_found") from None
        except CharacterReadOnly as error:
            raise ApiError(403, str(error), param="id", code="character_read_only") from None
        return CharacterDeleted(id=entry.id)

    @app.get("/v1/characters/{character_id}/avatar", tags=["characters"])
    async def avatar(character_id: str) -> Response:
        entry = _entry(context, character_id)
        png = await context.offload(context.registry.avatar_png, entry)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    @app.get("/v1/characters/{character_id}/card", tags=["characters"])
    async def card_json(character_id: str) -> JSONResponse:
        return JSONResponse(await context.offload(context.registry.card_json, _entry(context, character_id)))

    @app.get("/v1/characters/{character_id}/card.png", tags=["characters"])
    async def card_png(character_id: str) -> Response:
        entry = _entry(context, character_id)
        png = await context.offload(context.registry.card_png, entry)
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{entry.id}.png"'})


def _card_fit(context: ServerContext, card: CharacterCard) -> tuple[int, int, list[str]]:
    """(uncut prompt tokens around an empty message, the default request's budget, the cuts it would make)."""
    service, settings = context.completions, context.settings
    reply = settings.default_reply(service.model.text_budget(0, with_image=True))
    budget = service.model.text_budget(reply, with_image=True)
    if settings.max_prompt_tokens is not None:
        budget = min(budget, settings.max_prompt_tokens)
    full = service.builder.build(card, [Turn("")], max_tokens=2**31, include_examples=service.include_examples)
    try:
        fitted = service.builder.build(card, [Turn("")], max_tokens=budget, include_examples=service.include_examples)
    except PromptTooLong as error:
        return len(full.ids), budget, [f"the card cannot be used with the default max_tokens: {error}"]
    return len(full.ids), budget, fitted.warnings


def _misc_routes(app: FastAPI, context: ServerContext) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", tags=["server"])
    async def health() -> Health:
        return Health(version=__version__, characters=len(context.registry.list()))

    @app.get("/stats", tags=["server"])
    async def stats() -> dict[str, Any]:
        s = context.scheduler.stats
        return {"scheduler": {"requests": s.requests, "rejected": s.rejected, "cancelled": s.cancelled,
                              "failed": s.failed, "steps": s.steps, "tokens": s.tokens,
                              "mean_batch": s.row_steps / s.steps if s.steps else 0.0,
                              "max_batch_seen": s.max_batch_seen, "joins_mid_batch": s.joins_mid_batch,
                              "running": len(context.scheduler.rows), "queued": context.scheduler.queued,
                              "compactions": context.scheduler.batch.compactions,
                              "prefix_cache_hits": context.scheduler.batch.prefixes.hits,
                              "prefix_cache_misses": context.scheduler.batch.prefixes.misses},
                "limits": context.settings.public(), "uptime_s": time.time() - context.started}

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format 0.0.4"}})
    async def metrics() -> Response:
        text = scrape(context.metrics, context.scheduler, context.adapters, len(context.registry.list()),
                      context.started)
        return Response(text, media_type=CONTENT_TYPE)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
