"""Adaptation job routes: POST/GET /v1/characters/{id}/adapt, GET/DELETE /v1/characters/{id}/adapt/{job}.

A request is checked whole before a job is queued (examples count and images, steps, the mix of
pictured and plain examples: each a 400 now, not a failed job later); at most
``max_adapt_jobs`` are queued or running (429); a character that has an adapter (a file, or a job
on the way) keeps it unless the request says ``"overwrite": true`` (409).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from personae.serve.adapt import AdaptationUnavailable, AdaptQueueFull, AdaptTask
from personae.serve.characters import CharacterEntry, CharacterNotFound
from personae.serve.completions import decode_data_url
from personae.serve.errors import ApiError
from personae.serve.schemas import AdaptJobCreated, AdaptJobInfo, AdaptRequest

if TYPE_CHECKING:  # the routes are registered by app.create_app, which passes its context
    from personae.serve.app import ServerContext


def add_adapt_routes(app: FastAPI, context: ServerContext) -> None:
    """Register the adaptation routes on APP."""

    def entry_of(character_id: str) -> CharacterEntry:
        try:
            return context.registry.get(character_id)
        except CharacterNotFound as error:
            raise ApiError(404, str(error), param="id", code="character_not_found") from None

    @app.post("/v1/characters/{character_id}/adapt", status_code=202, tags=["characters"],
              response_model=AdaptJobCreated)
    async def adapt(character_id: str, body: AdaptRequest | None = None) -> JSONResponse:
        entry = entry_of(character_id)
        body = body or AdaptRequest()
        examples = await context.offload(_checked_examples, context, entry, body)
        _refuse_overwrite(context, entry, body.overwrite)
        options = {"steps": body.steps, "inner_params": body.inner_params}
        task = AdaptTask(context.run_dir, entry.id, entry.card, examples, entry.adapter,
                         {key: value for key, value in options.items() if value}, context.served)
        try:
            job = context.adapt_jobs.submit(task)
        except AdaptationUnavailable as error:
            raise ApiError(501, str(error), code="adaptation_unavailable") from None
        except AdaptQueueFull as error:
            raise ApiError(429, str(error), code="too_many_jobs") from None
        return JSONResponse(job.info() | {"status_url": f"/v1/characters/{entry.id}/adapt/{job.id}"},
                            status_code=202)

    @app.get("/v1/characters/{character_id}/adapt", tags=["characters"], response_model=AdaptJobInfo)
    async def latest_job(character_id: str) -> dict[str, Any]:
        entry = entry_of(character_id)
        job = context.adapt_jobs.latest(entry.id)
        if job is None:
            raise ApiError(404, f"'{entry.id}' has no adaptation job", code="job_not_found")
        return job.info()

    def job_of(character_id: str, job_id: str) -> Any:
        job = context.adapt_jobs.get(job_id)
        if job is None or job.character != entry_of(character_id).id:
            raise ApiError(404, f"no adaptation job '{job_id}' for '{character_id}'", param="job_id",
                           code="job_not_found")
        return job

    @app.get("/v1/characters/{character_id}/adapt/{job_id}", tags=["characters"], response_model=AdaptJobInfo)
    async def get_job(character_id: str, job_id: str) -> dict[str, Any]:
        return job_of(character_id, job_id).info()

    @app.delete("/v1/characters/{character_id}/adapt/{job_id}", tags=["characters"], response_model=AdaptJobInfo)
    async def cancel_job(character_id: str, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (no adapter is written); a finished job is answered as it is."""
        job = context.adapt_jobs.cancel(job_of(character_id, job_id).id)
        return job.info()


def _checked_examples(context: ServerContext, entry: CharacterEntry, body: AdaptRequest) -> list[dict[str, Any]]:
    """The request's examples (default: the card's), checked against the limits; raises ApiError 400."""
    settings = context.settings
    if body.steps is not None and body.steps > settings.max_adapt_steps:
        raise ApiError(400, f"steps={body.steps} is over the limit of {settings.max_adapt_steps} (max_adapt_steps; "
                            "`personae serve --max-adapt-steps`)", param="steps", code="invalid_value")
    examples = [e.model_dump() for e in body.examples]
    if not examples:  # the card's example dialogues, one (user, reply) pair per exchange
        examples = [{"user": u, "reply": r, "image": None}
                    for dialogue in entry.card.example_dialogues() for u, r in _pairs(dialogue)]
    if not examples:
        raise ApiError(400, f"'{entry.id}' has no example dialogues; send 'examples' to adapt from",
                       param="examples", code="missing_examples")
    if len(examples) > settings.max_adapt_examples:
        raise ApiError(400, f"{len(examples)} examples are over the limit of {settings.max_adapt_examples} "
                            "(max_adapt_examples; `personae serve --max-adapt-examples`)", param="examples",
                       code="too_many_examples")
    pictured = [bool(example.get("image")) for example in examples]
    if any(pictured) and not all(pictured):
        raise ApiError(400, "some examples have an image and some do not: send images with all of them or none",
                       param="examples", code="mixed_examples")
    for number, example in enumerate(examples):
        if example.get("image"):
            decode_data_url(example["image"], f"examples[{number}].image", settings.max_image_bytes)
    return examples


def _refuse_overwrite(context: ServerContext, entry: CharacterEntry, overwrite: bool) -> None:
    """409 when the character has an adapter (or one on the way) and the request does not ask to replace it."""
    if overwrite:
        return
    active = context.adapt_jobs.active_for(entry.id)
    if active is not None:
        raise ApiError(409, f"'{entry.id}' has an adaptation job {active.status} ({active.id}); cancel it or "
                            "send \"overwrite\": true", param="overwrite", code="adapter_exists")
    if entry.adapter.exists():
        raise ApiError(409, f"'{entry.id}' already has an adapter ({entry.adapter.name}); send \"overwrite\": true "
                            "to replace it", param="overwrite", code="adapter_exists")


def _pairs(dialogue: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(user, reply) pairs of an example dialogue; a reply without a user line gets an empty one."""
    pairs, user = [], ""
    for who, text in dialogue:
        if who == "user":
            user = text
        else:
            pairs.append((user, text))
            user = ""
    return pairs
