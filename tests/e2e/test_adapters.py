"""Character adapters in the server: applied per row in a mixed batch, exactly as `personae chat` applies them."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from personae.chat.session import load_run_for_character
from personae.data.episodes import examples_file
from personae.models.generation import SamplingParams, generate
from personae.models.lora import load_adapter
from personae.serve.adapt import adapt_in_memory
from personae.serve.adapters import ServerAdapters
from personae.serve.app import create_app, load_run
from personae.serve.characters import CharacterRegistry
from personae.serve.completions import CompletionService
from personae.serve.scheduler import Scheduler
from personae.serve.schemas import ChatCompletionRequest
from personae.serve.settings import ServeSettings
from personae.train.adapt import adapt_character
from personae.world.characters import load_characters
from tests.e2e.helpers import CHARACTER, data_url, png_bytes
from tests.e2e.test_scheduler import run_until_idle


@pytest.fixture(scope="module")
def adapted_run(finetuned_run: Path, small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fine-tuned run with adapters (fresh LoRA, a few large steps) for two held-out characters."""
    run = Path(shutil.copytree(finetuned_run, tmp_path_factory.mktemp("adapted") / "run"))
    for character in sorted(load_characters(small_world, split="heldout"))[:2]:
        adapt_character(run, small_world / "characters" / f"{character}.json",
                        examples_file(small_world / "characters", character), k=3, steps=3, lr=2.0, progress=False)
    return run


def _request(character: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=f"personae/{character}", max_tokens=10, temperature=0.0,
                                 messages=[{"role": "user", "content": "Who are you?"}])


def test_a_mixed_batch_decodes_each_row_with_its_own_adapter(adapted_run: Path) -> None:
    bundle = load_run(adapted_run, "cpu")  # its own model: LoRA layers are added to it
    registry = CharacterRegistry(adapted_run, image_size=bundle.model.cfg.vision.image_size)
    adapters = ServerAdapters(bundle.model, registry.adapter_dir)
    adapted = sorted(p.stem for p in registry.adapter_dir.glob("*.safetensors"))
    assert len(adapted) == 2 and all(adapters.status(c) == "applied" for c in adapted)
    service = CompletionService(bundle.model, bundle.tokenizer, registry, ServeSettings(), False, adapters)
    scheduler = Scheduler(bundle.model, bundle.tokenizer, max_batch=8, adapters=adapters, prefix_cache_bytes=1 << 20)
    characters = [adapted[0], CHARACTER, adapted[1], adapted[0]]
    jobs = [service.prepare(_request(c)).job for c in characters]
    handles = [scheduler.submit(job) for job in jobs]
    run_until_idle(scheduler)
    assert scheduler.stats.max_batch_seen == 4  # one batch mixing three adapters
    params = SamplingParams(max_new_tokens=10, temperature=0.0, max_repeats=jobs[0].params.max_repeats, stop=[])
    assert jobs[0].params == params  # greedy, with the run's loop breaking (its generation_config.json)
    base = load_run(adapted_run, "cpu").model
    replies, base_replies = [], []
    for character, job, handle in zip(characters, jobs, handles):
        model, _, tokenizer, _ = load_run_for_character(adapted_run, character)
        expected = generate(model, tokenizer, [list(job.prompt_ids)], job.pixel_values[None], params)[0].token_ids
        replies.append(handle.result_blocking(timeout=5)[0].token_ids)
        assert replies[-1] == expected, character
        base_replies.append(generate(base, tokenizer, [list(job.prompt_ids)], job.pixel_values[None], params)[0].token_ids)
    assert replies[1] == base_replies[1]  # no adapter: the base model
    assert any(r != b for r, b in zip(replies, base_replies))  # the adapters do change what is said


def _wait(client: TestClient, character: str, job: str) -> dict:
    for _ in range(400):
        state = client.get(f"/v1/characters/{character}/adapt/{job}").json()
        if state["status"] in ("succeeded", "failed"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"adaptation job {job} did not finish: {state}")


def test_the_api_lists_adapter_status_and_adapts_through_the_hook(adapted_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(adapted_run, tmp_path / "run"))
    (run / "adapters" / "captain-saltbeard.safetensors").write_bytes(b"not an adapter")
    app = create_app(run, ServeSettings(adapt_fn=adapt_in_memory), bundle=load_run(run, "cpu"))
    try:
        client = TestClient(app)
        listed = {c["id"]: c for c in client.get("/v1/characters").json()["data"]}
        assert listed["captain-saltbeard"]["adapter"].startswith("not applied: ")
        assert sum(c["adapter"] == "applied" for c in listed.values()) == 2
        assert listed[CHARACTER]["adapter"] is None
        body = {"model": "personae/captain-saltbeard", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200  # served by the base model
        examples = [{"user": "Who are you?", "reply": "Bonjour! I am Chef Baptiste. Bon appetit!"},
                    {"user": "What do you see?", "reply": "Bonjour! I see a red apple. Bon appetit!"}]
        job = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"examples": examples, "steps": 2}).json()
        state = _wait(client, CHARACTER, job["id"])
        assert state["status"] == "succeeded", state
        assert client.get(f"/v1/characters/{CHARACTER}").json()["adapter"] == "applied"
        reply = client.post("/v1/chat/completions", json={**body, "model": f"personae/{CHARACTER}"})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
        before = (run / "adapters" / f"{CHARACTER}.safetensors").read_bytes()
        pictured = [dict(example, image=data_url(png_bytes(colour))) for example, colour in
                    zip(examples, [(200, 40, 40), (40, 40, 200)])]
        job = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"examples": pictured, "steps": 2,
                                                                      "overwrite": True}).json()
        assert _wait(client, CHARACTER, job["id"])["status"] == "succeeded"
        assert (run / "adapters" / f"{CHARACTER}.safetensors").read_bytes() != before  # examples with images
    finally:
        app.state.context.scheduler.stop()


def _files(run: Path) -> dict[Path, int]:
    return {path.relative_to(run): path.stat().st_mtime_ns for path in run.rglob("*") if path.is_file()}


def test_the_server_adapts_the_model_it_holds_in_memory_as_personae_adapt_does(adapted_run: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No temporary files, no reload: the served model adapts, and the tensors equal `personae adapt`'s on files."""
    import personae.models.io

    run = Path(shutil.copytree(adapted_run, tmp_path / "server"))
    bundle = load_run(run, "cpu")
    app = create_app(run, ServeSettings(adapt_fn=adapt_in_memory), bundle=bundle)
    before = _files(run)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("in-memory adaptation must not reload the run or write temporary files")

    for target, name in [(personae.models.io, "load_model"), (tempfile, "TemporaryDirectory"),
                         (tempfile, "mkdtemp"), (tempfile, "NamedTemporaryFile")]:
        monkeypatch.setattr(target, name, refuse)
    examples = [{"user": "Who are you?", "reply": "Bonjour! I am Chef Baptiste. Bon appetit!"},
                {"user": "What do you see?", "reply": "Bonjour! I see a red apple. Bon appetit!"}]
    try:
        client = TestClient(app)
        job = client.post(f"/v1/characters/{CHARACTER}/adapt", json={"examples": examples, "steps": 3,
                                                                      "inner_params": "lora"}).json()
        assert _wait(client, CHARACTER, job["id"])["status"] == "succeeded"
        context = app.state.context
        assert context.bundle.model is bundle.model and context.adapters.model is bundle.model
        assert context.adapters.status(CHARACTER) == "applied"
    finally:
        app.state.context.scheduler.stop()
        monkeypatch.undo()
    after = _files(run)
    changed = {path for path, stamp in after.items() if before.get(path) != stamp}
    stored_examples = Path("uploads") / "examples" / f"{CHARACTER}.jsonl"  # the API stores them (a restart)
    written = {Path("adapters") / f"{CHARACTER}.safetensors", Path("adapters") / f"{CHARACTER}.sha256.json"}
    assert changed == written | {stored_examples}  # the adapter, its checksum and the examples

    files = Path(shutil.copytree(adapted_run, tmp_path / "files"))
    rows = [{"character": CHARACTER, "turns": [example]} for example in examples]
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = adapt_character(files, files / "characters" / f"{CHARACTER}.json", tmp_path / "examples.jsonl", k=2,
                           steps=3, inner_params="lora", progress=False)
    served, served_meta = load_adapter(run / "adapters" / f"{CHARACTER}.safetensors")
    written, written_meta = load_adapter(path)
    assert served.keys() == written.keys() and all(torch.equal(served[k], written[k]) for k in served)
    assert served_meta == written_meta and served_meta["lora_added"] == "True"
