"""Routes that load and unload character adapters by path: GET/POST /v1/adapters, DELETE /v1/adapters/{id}."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from personae.models.lora import AdapterError
from personae.serve.adapters import ServerAdapters
from personae.serve.characters import CharacterNotFound, CharacterRegistry
from personae.serve.errors import ApiError
from personae.serve.schemas import AdapterInfo, AdapterList, AdapterLoad


def add_adapter_routes(app: FastAPI, adapters: ServerAdapters, registry: CharacterRegistry) -> None:
    """Register the adapter routes on APP (behind the API key like every /v1 route)."""

    def character_id(name: str, param: str) -> str:
        try:
            return registry.get(name).id
        except CharacterNotFound as error:
            raise ApiError(404, str(error), param=param, code="character_not_found") from None

    def info(character: str) -> AdapterInfo:
        source = adapters.source(character)
        return AdapterInfo(character=character, resident=character in adapters.resident(),
                           source=str(source) if source else None)

    @app.get("/v1/adapters", tags=["characters"])
    async def list_adapters() -> AdapterList:
        return AdapterList(data=[info(c) for c in adapters.resident()], max_adapters=adapters.max_resident,
                           evictions=adapters.evictions)

    @app.post("/v1/adapters", tags=["characters"], status_code=201)
    async def load_adapter(body: AdapterLoad) -> AdapterInfo:
        character = character_id(body.character, "character")
        path = Path(body.path).expanduser()
        if not path.is_absolute():
            raise ApiError(400, f"path must be absolute on the server's disk, got {body.path!r}", param="path",
                           code="invalid_value")
        try:
            await run_in_threadpool(adapters.load, character, path)
        except AdapterError as error:
            raise ApiError(400, f"cannot apply {path}: {error}", param="path", code="invalid_adapter") from None
        return info(character)

    @app.delete("/v1/adapters/{character}", tags=["characters"])
    async def unload_adapter(character: str) -> AdapterInfo:
        found = character_id(character, "character")
        if not await run_in_threadpool(adapters.unload, found):
            raise ApiError(404, f"'{found}' has no adapter in memory (see GET /v1/adapters)", param="character",
                           code="adapter_not_found")
        return AdapterInfo(character=found, resident=False)
