"""Running the app: `serve()` for `personae serve`, and `ServerThread` (a real uvicorn in-process, for tests)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from personae.serve.app import RunBundle, create_app
from personae.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def serve(run_dir: Path | str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          **limits: Any) -> None:
    """Serve RUN until interrupted; `limits` are ServeSettings fields (unknown names are an error)."""
    settings = ServeSettings.from_kwargs(api_key=api_key, **limits)
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    app = create_app(Path(run_dir), settings)
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", host)
    print(f"personae: serving {run_dir} on http://{host}:{port}/ (OpenAI base_url http://{host}:{port}/v1)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                timeout_keep_alive=settings.keep_alive_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a background thread: `with ServerThread(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.app, self.host, self.port = app, host, port or free_port(host)
        context = getattr(app.state, "context", None)  # a personae app: its keep-alive setting
        keep_alive = context.settings.keep_alive_s if context is not None else 5
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on",
                                timeout_keep_alive=keep_alive)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="personae-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        """Start serving and wait until the port accepts requests; returns the base URL."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_bundle(run_dir: Path, bundle: RunBundle, settings: ServeSettings) -> ServerThread:
    """A started ServerThread for an already loaded run (tests and the benchmark share one model)."""
    server = ServerThread(create_app(run_dir, settings, bundle=bundle))
    server.start()
    return server
