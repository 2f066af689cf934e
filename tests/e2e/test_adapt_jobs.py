"""Adaptation jobs are validated, bounded in number, cancellable, and never overwrite an adapter unasked (issue 16)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from personae.meta.adapt import CharacterAdapter
from tests.e2e.helpers import CHARACTER

EXAMPLE = [{"user": "hi", "reply": "Bonjour!"}]


def gated_adapt(release: threading.Event, calls: list[int]) -> Callable[..., CharacterAdapter]:
    """An adapt_fn that reports progress until `release` is set (so jobs stay running as long as a test needs)."""

    def adapt(task: Any, progress: Callable[[float, str], None]) -> CharacterAdapter:
        calls.append(1)
        while not release.wait(0.01):
            progress(0.5, "waiting")
        weight = task.served.model.decoder.ln_f.weight
        return CharacterAdapter({"decoder.ln_f.weight": weight.detach() * 2}, {"inner_params": "head"})

    return adapt


def wait_status(client: TestClient, url: str, wanted: set[str]) -> dict[str, Any]:
    for _ in range(500):
        job = client.get(url).json()
        if job["status"] in wanted:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job never reached {wanted}: {job}")


def test_requests_over_the_limits_are_400_naming_the_limit(make_app: Callable[..., FastAPI], run_copy: Path) -> None:
    release = threading.Event()
    release.set()
    client = TestClient(make_app(run=run_copy, adapt_fn=gated_adapt(release, []), max_adapt_examples=2,
                                 max_adapt_steps=5))
    url = f"/v1/characters/{CHARACTER}/adapt"
    many = client.post(url, json={"examples": EXAMPLE * 3})
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_examples"
    assert "max_adapt_examples" in many.json()["error"]["message"]
    steps = client.post(url, json={"examples": EXAMPLE, "steps": 6})
    assert steps.status_code == 400 and steps.json()["error"]["param"] == "steps"
    assert "max_adapt_steps" in steps.json()["error"]["message"]
    assert client.post(url, json={"examples": EXAMPLE, "steps": "5"}).status_code == 400  # no coercion
    assert client.post(url, json={"examples": [{"user": "x" * 4001, "reply": "y"}]}).status_code == 400
    assert not (run_copy / "uploads" / "examples").exists()  # nothing stored for a refused request
    assert client.post(url, json={"examples": EXAMPLE * 2, "steps": 5}).status_code == 202


def test_one_job_over_max_adapt_jobs_is_429(make_app: Callable[..., FastAPI], run_copy: Path) -> None:
    release, calls = threading.Event(), []
    app = make_app(run=run_copy, adapt_fn=gated_adapt(release, calls), max_adapt_jobs=2)
    client = TestClient(app)
    uploaded = []
    for name in ("Ada", "Bea", "Cy"):
        card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": name, "description": "x"}}
        uploaded.append(client.post("/v1/characters", json=card).json()["id"])
    try:
        first = client.post(f"/v1/characters/{uploaded[0]}/adapt", json={"examples": EXAMPLE})
        second = client.post(f"/v1/characters/{uploaded[1]}/adapt", json={"examples": EXAMPLE})
        assert first.status_code == second.status_code == 202
        third = client.post(f"/v1/characters/{uploaded[2]}/adapt", json={"examples": EXAMPLE})
        assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_jobs"
        assert "max_adapt_jobs" in third.json()["error"]["message"]
    finally:
        release.set()
    wait_status(client, second.json()["status_url"], {"succeeded"})
    again = client.post(f"/v1/characters/{uploaded[2]}/adapt", json={"examples": EXAMPLE})
    assert again.status_code == 202  # room again once they finished


def test_jobs_are_cancelled_queued_or_running_and_write_nothing(make_app: Callable[..., FastAPI],
                                                                run_copy: Path) -> None:
    release, calls = threading.Event(), []
    client = TestClient(make_app(run=run_copy, adapt_fn=gated_adapt(release, calls)))
    url = f"/v1/characters/{CHARACTER}/adapt"
    running = client.post(url, json={"examples": EXAMPLE}).json()
    wait_status(client, running["status_url"], {"running"})
    queued = client.post(url, json={"examples": EXAMPLE, "overwrite": True}).json()
    assert client.get(queued["status_url"]).json()["status"] == "queued"
    cancelled = client.delete(queued["status_url"])
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    stopped = client.delete(running["status_url"]).json()
    assert stopped["status"] in ("running", "cancelled")
    assert wait_status(client, running["status_url"], {"cancelled", "succeeded", "failed"})["status"] == "cancelled"
    assert calls == [1]  # the queued job never started
    assert not (run_copy / "adapters" / f"{CHARACTER}.safetensors").exists()
    assert client.delete(f"{url}/adapt-nope").status_code == 404
    release.set()


def test_an_existing_adapter_is_409_unless_overwrite_is_asked(make_app: Callable[..., FastAPI],
                                                             run_copy: Path) -> None:
    release = threading.Event()
    release.set()
    client = TestClient(make_app(run=run_copy, adapt_fn=gated_adapt(release, [])))
    url = f"/v1/characters/{CHARACTER}/adapt"
    wait_status(client, client.post(url, json={"examples": EXAMPLE}).json()["status_url"], {"succeeded"})
    adapter = run_copy / "adapters" / f"{CHARACTER}.safetensors"
    written = adapter.read_bytes()
    refused = client.post(url, json={"examples": EXAMPLE})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_exists"
    assert refused.json()["error"]["param"] == "overwrite" and adapter.read_bytes() == written
    replaced = client.post(url, json={"examples": [{"user": "who?", "reply": "Baptiste."}], "overwrite": True})
    assert replaced.status_code == 202
    assert wait_status(client, replaced.json()["status_url"], {"succeeded", "failed"})["status"] == "succeeded"
