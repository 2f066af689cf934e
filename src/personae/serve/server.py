"""Running the app: `serve()` for `personae serve`, and `ServerThread` (a real uvicorn in-process, for tests)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import h11
import torch
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from personae.serve.app import RunBundle, create_app
from personae.serve.settings import ServeSettings

log = logging.getLogger(__name__)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers (uvicorn has none: a client could open
    connections and trickle their headers, or send nothing, and hold them for ever).

    The deadline is armed when a connection opens and after each response, and disarmed once a
    request's headers are complete; when it passes first, the connection is closed.
    """

    header_timeout_s: float = 10.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._header_deadline is not None:  # headers complete
            self._header_deadline.cancel()
            self._header_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()  # the next request's headers get the same time

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request headers did not arrive within %.0f s", self.header_timeout_s)
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class uvicorn is given (it instantiates it per connection), with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": float(seconds)})


def uvicorn_options(app: FastAPI) -> dict[str, Any]:
    """The connection settings of a personae app: keep-alive and header timeouts."""
    context = getattr(app.state, "context", None)
    settings = context.settings if context is not None else ServeSettings()
    return {"timeout_keep_alive": settings.keep_alive_s, "http": protocol_with_header_timeout(settings.header_timeout_s)}


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
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, **uvicorn_options(app))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a background thread: `with ServerThread(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.app, self.host, self.port = app, host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on",
                                **uvicorn_options(app))
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
