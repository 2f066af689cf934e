"""Adapter operations: load and unload by path over the API, and a cap on resident adapters (LRU eviction)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from personae.serve.adapters import ServerAdapters
from personae.serve.app import create_app, load_run
from personae.serve.characters import CharacterRegistry
from personae.serve.completions import CompletionService
from personae.serve.scheduler import Scheduler
from personae.serve.settings import ServeSettings
from tests.e2e.helpers import CHARACTER
from tests.e2e.test_adapters import _request, adapted_run  # noqa: F401  (the module fixture)
from tests.e2e.test_scheduler import run_until_idle


def _replies(service: CompletionService, scheduler: Scheduler, characters: list[str]) -> list[list[int]]:
    handles = [scheduler.submit(service.prepare(_request(c)).job) for c in characters]
    run_until_idle(scheduler)
    return [h.result_blocking(timeout=5)[0].token_ids for h in handles]


def test_the_cap_evicts_the_least_recently_used_adapter_and_brings_it_back(adapted_run: Path) -> None:  # noqa: F811
    bundle = load_run(adapted_run, "cpu")
    registry = CharacterRegistry(adapted_run, image_size=bundle.model.cfg.vision.image_size)
    first, second = sorted(p.stem for p in registry.adapter_dir.glob("*.safetensors"))
    uncapped = ServerAdapters(bundle.model, registry.adapter_dir)
    service = CompletionService(bundle.model, bundle.tokenizer, registry, ServeSettings(), False, uncapped)
    scheduler = Scheduler(bundle.model, bundle.tokenizer, max_batch=8, adapters=uncapped)
    expected = _replies(service, scheduler, [first, second, CHARACTER])

    capped = ServerAdapters(bundle.model, registry.adapter_dir, max_resident=1)
    assert capped.resident() == [second] and capped.evictions == 1  # loaded in name order: the first went
    assert capped.status(first) == "applied"  # evicted, and loaded again when asked for
    service = CompletionService(bundle.model, bundle.tokenizer, registry, ServeSettings(), False, capped)
    scheduler = Scheduler(bundle.model, bundle.tokenizer, max_batch=8, adapters=capped)
    for order in ([first, second, CHARACTER], [second, first, CHARACTER]):
        by_character = dict(zip(order, [_replies(service, scheduler, [c])[0] for c in order]))
        assert [by_character[c] for c in (first, second, CHARACTER)] == expected
        assert len(capped.resident()) == 1 and len(capped.bank) == 1
    assert capped.evictions >= 4


def test_an_adapter_in_use_is_not_evicted(adapted_run: Path) -> None:  # noqa: F811
    bundle = load_run(adapted_run, "cpu")
    adapter_dir = adapted_run / "adapters"
    first, second = sorted(p.stem for p in adapter_dir.glob("*.safetensors"))
    busy = {first}
    adapters = ServerAdapters(bundle.model, adapter_dir, max_resident=1, in_use=lambda: busy)
    assert adapters.resident() == [first, second] and adapters.evictions == 0  # over the cap while first decodes
    busy.clear()
    adapters.key(first)  # the next use evicts the least recently used one that is free
    assert adapters.resident() == [first] and adapters.evictions == 1


def test_adapters_load_and_unload_by_path_over_the_api(adapted_run: Path, tmp_path: Path) -> None:  # noqa: F811
    run = Path(shutil.copytree(adapted_run, tmp_path / "run"))
    first = sorted(p.stem for p in (run / "adapters").glob("*.safetensors"))[0]
    elsewhere = tmp_path / "mine.safetensors"
    shutil.copy(run / "adapters" / f"{first}.safetensors", elsewhere)
    app = create_app(run, ServeSettings(max_adapters=2), bundle=load_run(run, "cpu"))
    try:
        client = TestClient(app)
        listed = client.get("/v1/adapters").json()
        assert len(listed["data"]) == 2 and listed["max_adapters"] == 2
        loaded = client.post("/v1/adapters", json={"character": CHARACTER, "path": str(elsewhere)})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json() == {"character": CHARACTER, "object": "adapter", "resident": True,
                                 "source": str(elsewhere)}
        assert client.get(f"/v1/models/personae/{CHARACTER}").json()["adapted"] is True
        assert [a["character"] for a in client.get("/v1/adapters").json()["data"]][-1] == CHARACTER
        assert client.get("/v1/adapters").json()["evictions"] == 1  # the cap of 2
        gone = client.delete(f"/v1/adapters/{CHARACTER}")
        assert gone.status_code == 200 and gone.json()["resident"] is False
        assert client.get(f"/v1/models/personae/{CHARACTER}").json()["adapted"] is False
        assert client.delete(f"/v1/adapters/{CHARACTER}").json()["error"]["code"] == "adapter_not_found"
        bad = [({"character": CHARACTER, "path": "relative.safetensors"}, 400, "invalid_value"),
               ({"character": CHARACTER, "path": str(tmp_path / "none.safetensors")}, 400, "invalid_adapter"),
               ({"character": "nobody", "path": str(elsewhere)}, 404, "character_not_found"),
               ({"character": CHARACTER, "path": str(elsewhere), "extra": 1}, 400, "invalid_value")]
        for body, status, code in bad:
            answer = client.post("/v1/adapters", json=body)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), body
        body = {"model": f"personae/{CHARACTER}", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        app.state.context.scheduler.stop()
