"""What every request meets before a route runs, and the last word on a bug: the ASGI guards of the server.

* :class:`LimitsMiddleware`: the API key, then the body: at most ``max_body_bytes`` (413), received
  within ``body_timeout_s`` (408: a client that sends its headers and then trickles the body is cut
  off, not waited on forever).
* :class:`CatchAllMiddleware`: an exception no handler turned into an answer becomes personae's
  500 in OpenAI's shape, and the connection stays open. Starlette's own last handler answers too,
  but then re-raises, and uvicorn closes the connection of any request whose app raised.
* :func:`check_text_bytes`: the text of a request, counted in UTF-8 bytes before anything is
  tokenized (413 ``text_too_large``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from personae.serve.errors import ApiError

log = logging.getLogger(__name__)
_OPENAPI_PATHS = ("/docs", "/redoc", "/openapi.json")


class LimitsMiddleware:
    """API key (Bearer) on the protected paths, then the body's size and time limits, before any route runs.

    The body is read here and replayed to the app; later receives go to the server, so the app still
    hears when the client disconnects.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, protected: tuple[str, ...], max_body_bytes: int,
                 body_timeout_s: float) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.protected = protected + _OPENAPI_PATHS  # the schema and its pages are behind the key too
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith(self.protected) and scope["method"] != "OPTIONS":
            problem = self._auth_problem(headers.get("authorization"))
            if problem:
                await ApiError(401, problem, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read_body(headers.get("content-length"), receive),
                                          self.body_timeout_s)
        except TimeoutError:
            # the rest of the body may still come: this connection cannot carry another request
            await ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s (body_timeout_s; "
                                "`personae serve --body-timeout-s`)", code="request_timeout",
                           headers={"Connection": "close"}).response()(scope, receive, send)
            return
        if body is None:
            too_big = ApiError(413, f"the request body is over the limit of {self.max_body_bytes} bytes "
                                    "(max_body_bytes; `personae serve --max-body-bytes`)", code="body_too_large")
            await too_big.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _auth_problem(self, header: str | None) -> str | None:
        if not header:
            return "this server needs an API key: send 'Authorization: Bearer <key>'"
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return "the API key is wrong (expected 'Authorization: Bearer <key>')"
        return None

    async def _read_body(self, declared: str | None, receive: Receive) -> bytes | None:
        """The whole body, or None when it is (or says it is) over the limit."""
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


class CatchAllMiddleware:
    """Turn an exception that reached the middleware stack into a logged 500 in OpenAI's shape, keeping the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def watched(message: Message) -> None:
            nonlocal started, finished
            started = started or message["type"] == "http.response.start"
            finished = finished or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as error:  # a bug in a route: answer for it, and keep serving this client
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await ApiError(500, f"internal server error: {type(error).__name__}: {error}",
                               code="internal_error").response()(scope, receive, send)
            elif not finished:  # a stream broke midway: end it cleanly, the client sees it stop
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def text_bytes(texts: Iterable[str | None]) -> int:
    """UTF-8 bytes of some request texts (None counts 0)."""
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts if text)


def check_text_bytes(texts: Iterable[str | None], limit: int) -> None:
    """Raise 413 text_too_large when the texts hold more than `limit` UTF-8 bytes in all."""
    size = text_bytes(texts)
    if size > limit:
        raise ApiError(413, f"the request's text is {size} bytes (UTF-8), over the limit of {limit} "
                            "(max_text_bytes; `personae serve --max-text-bytes`)", code="text_too_large")
