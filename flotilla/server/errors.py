"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

Clients (the ``openai`` package above all) parse that body to raise a typed exception with the message; a plain
text 500 or FastAPI's 422 ``{"detail": ...}`` would surface as an opaque error. So FastAPI's own errors are
rewritten here, and anything that escapes a handler is caught by an outermost ASGI middleware and answered
with a 500 in the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from flotilla.errors import InvalidParameter

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class APIError(Exception):
    """An error the client should see, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())


class ClientDisconnected(Exception):
    """The client went away before a response was ready; the request has been aborted."""


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_param(param: str, message: str) -> APIError:
    """A 400 whose message starts with the parameter it is about."""
    return APIError(400, f"{param}: {message}", param=param, code="invalid_parameter")


def invalid_parameter(err: InvalidParameter, aliases: dict[str, str]) -> APIError:
    """The engine's ``InvalidParameter`` as a 400 whose ``param`` (and the message's head) is the API's name for
    the engine's field (``aliases``: engine field -> API parameter)."""
    param = aliases.get(err.field, err.field)
    return APIError(400, f"{param}: {err.message}", param=param, code="invalid_parameter")


def from_value_error(err: ValueError, aliases: dict[str, str]) -> APIError:
    """A 400 for what the engine refused: by type, an ``InvalidParameter`` names its parameter; any other
    ``ValueError`` is a 400 with its text and no ``param``."""
    if isinstance(err, InvalidParameter):
        return invalid_parameter(err, aliases)
    return APIError(400, str(err), code="invalid_parameter")


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="service_unavailable")


def internal_error(exc: BaseException) -> APIError:
    """A 500 for an unexpected exception; the type is named so the report is actionable."""
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's own errors (422 validation, 404 route, 405 method) and ours, all in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        err = validation_error(exc.errors())
        if not is_json_content_type(request.headers.get("content-type")):
            # FastAPI reads a body as JSON only when it says so (or says nothing): curl -d sends form data
            err.message += (f" (the body was sent as Content-Type {request.headers.get('content-type')!r}, "
                            "so it was not read as JSON; send the header 'Content-Type: application/json')")
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()


def is_json_content_type(value: str | None) -> bool:
    """What FastAPI parses as JSON: no Content-Type, application/json, or application/*+json."""
    if not value:
        return True
    mime = value.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


RAW_SEND = "flotilla.raw_send"
"""Scope key of the ``send`` that ``CatchAllMiddleware`` was given: every layer inside it (ours, Starlette's
exception layers, the route's) is bypassed by what is sent through it; only Starlette's outermost
``ServerErrorMiddleware`` (and FastAPI's telemetry, when on) stay in the path."""


class CatchAllMiddleware:
    """Outermost ASGI layer: an exception nothing else handled becomes a logged 500 in OpenAI's shape.

    Starlette's own last-resort handler answers ``Internal Server Error`` as plain text; clients then see an
    unparseable body. If the response has already started (a stream), nothing can be sent any more; streams
    turn their own failures into error events (see ``streaming.py``), so that only happens on a bug.

    It also leaves the ``send`` it was given in the scope (``RAW_SEND``): a stream sends its start through every
    layer (each records that the response started) and then its body chunks through that ``send``, skipping
    the pass-through wrappers inside this one (three per chunk).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        scope[RAW_SEND] = send

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await internal_error(exc).response()(scope, receive, send)


def validation_error(errors: Iterable[Any]) -> APIError:
    """pydantic's first complaint as a 400 whose ``param`` is the top-level field it is about."""
    errors = list(errors)
    # a union (prompt: str | list[str] | ...) reports one error per member; a validator's own complaint (a lone
    # surrogate) says more than "Input should be a valid string" from a member that never applied
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else None)
    if first is None:
        return APIError(400, "invalid request body")
    # drop "body" and pydantic's union-member tags ("str", "list[str]") so the path names only fields
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('msg', '')}", code="invalid_json")
    if not loc:
        return APIError(400, f"request body: {first.get('msg', 'invalid')}", code="invalid_request_body")
    # param is the top-level field (what OpenAI reports); the message keeps the full path, e.g.
    # "messages.0.role: Input should be 'system', ..."
    return APIError(400, f"{'.'.join(loc)}: {first.get('msg', 'invalid')}", param=loc[0], code="invalid_parameter")


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict", "none")
                                      or "[" in part or part.startswith("function-"))
