"""Serving: an OpenAI-compatible HTTP API with continuous batching, character management, and a chat page.

``create_app(run_dir, settings)`` builds the FastAPI app; ``serve(run_dir, host, port, api_key, **limits)``
runs it under uvicorn (what ``personae serve`` calls). Importing this package needs the ``serve``
extra (fastapi, uvicorn, pydantic); the submodules load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personae.serve.app import create_app
    from personae.serve.server import serve
    from personae.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from personae.serve.app import create_app

        return create_app
    if name == "serve":
        from personae.serve.server import serve

        return serve
    if name == "ServeSettings":
        from personae.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'personae.serve' has no attribute {name!r}")
