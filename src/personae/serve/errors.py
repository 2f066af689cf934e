"""API errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and their handlers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personae.errors import PersonaeError
from personae.serve.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

# OpenAI's error types by status
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    501: "not_implemented_error", 503: "server_overloaded",
}


class ApiError(PersonaeError):
    """An error the API answers with: HTTP status, message, OpenAI type, the offending param and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error (through :class:`~personae.serve.schemas.ErrorResponse`)."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()


def _is_branch(part: Any) -> bool:
    """A union branch name pydantic puts in a location ('str', 'list[tagged-union[...]]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def _location(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'content', 'list[...]', 0, 'image_url', 'image_url', 'url') -> 'messages[0].content[0].image_url.url'."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    text = ""
    for i, part in enumerate(parts):
        if _is_branch(part):
            continue
        is_tag = i > 0 and isinstance(parts[i - 1], int) and i + 1 < len(parts) and parts[i + 1] == part
        if is_tag:  # a tagged union repeats the tag before the field of the same name
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def validation_error(error: RequestValidationError) -> ApiError:
    """The most specific problem pydantic found (the deepest location), as a 400 naming the field."""
    problems = error.errors() or [{"loc": ("body",), "msg": "invalid request", "type": "invalid"}]
    if any(p.get("type") == "json_invalid" for p in problems):
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    deepest = max(len(p.get("loc", ())) for p in problems)
    chosen = [p for p in problems if len(p.get("loc", ())) == deepest]
    param = _location(tuple(chosen[0].get("loc", ())))
    if param == "body" and chosen[0].get("type") == "missing":
        return ApiError(400, "the request needs a JSON body", code="missing_body")
    message = "; or ".join(dict.fromkeys(str(p.get("msg")) for p in chosen))
    got = chosen[0].get("input")
    shown = f" (got {repr(got)[:80]})" if got is not None and not isinstance(got, (dict, list)) else ""
    return ApiError(400, f"{param}: {message}{shown}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers with has OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(error.status_code)
        message = (f"no route {request.method} {request.url.path}" if error.status_code in (404, 405)
                   else str(error.detail))
        return ApiError(error.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return ApiError(500, f"internal server error: {type(error).__name__}: {error}", code="internal_error").response()
