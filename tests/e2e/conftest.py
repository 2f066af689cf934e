"""Fixtures of the serving tests: a fine-tuned micro run, its loaded model, apps, and a live uvicorn."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from personae.serve.app import RunBundle
    from personae.serve.server import ServerThread

if importlib.util.find_spec("fastapi") is None:  # the serve extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Decode steps of the micro model are tiny ops: on 2 shared cores one intra-op thread is many times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def finetuned_run(pretrained_run: Path, small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro model fine-tuned for two role-play steps: a decoder and RUN/characters/*.json."""
    from personae.config import apply_overrides
    from personae.train.finetune import run_config, run_finetune

    out = tmp_path_factory.mktemp("finetuned") / "run"
    # adaptations of this run use LoRA with SGD, the adapters the server mixes per row
    lora = ["meta.algo=lora-maml", "meta.inner_optimizer=sgd", "meta.inner_lr=0.05"]
    cfg = apply_overrides(run_config(pretrained_run), ["finetune.train.steps=2", *lora])
    run_finetune(pretrained_run, small_world, out, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def bundle(finetuned_run: Path) -> RunBundle:
    """The fine-tuned run loaded once and shared by every app of the session."""
    from personae.serve.app import load_run

    return load_run(finetuned_run, "cpu")


@pytest.fixture()
def run_copy(finetuned_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run, for tests that upload or delete characters."""
    return Path(shutil.copytree(finetuned_run, tmp_path / "run"))


@pytest.fixture()
def make_app(bundle: RunBundle, finetuned_run: Path) -> Iterator[Callable[..., FastAPI]]:
    """Build apps on the shared model: make_app(run=..., **settings); their schedulers stop afterwards."""
    from personae.serve.app import create_app
    from personae.serve.settings import ServeSettings

    apps: list[FastAPI] = []

    def make(run: Path | None = None, **settings: Any) -> FastAPI:
        app = create_app(run or finetuned_run, ServeSettings.from_kwargs(**settings), bundle=bundle)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.state.context.scheduler.stop()


@pytest.fixture()
def client(make_app: Callable[..., FastAPI]) -> TestClient:
    """A TestClient on an app with the default settings."""
    from fastapi.testclient import TestClient

    return TestClient(make_app())


@pytest.fixture(scope="module")
def live_server(bundle: RunBundle, finetuned_run: Path) -> Iterator[ServerThread]:
    """A real uvicorn on 127.0.0.1 serving the fine-tuned run with the default settings."""
    from personae.serve.app import create_app
    from personae.serve.server import ServerThread
    from personae.serve.settings import ServeSettings

    server = ServerThread(create_app(finetuned_run, ServeSettings(), bundle=bundle))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_url(live_server: ServerThread) -> str:
    return live_server.url
