"""The HTTP edges every route shares: errors in the web UI's shape, HTTP Basic authentication, and a
cap on the request body. The two guards are plain ASGI middleware (not Starlette's
BaseHTTPMiddleware), so streamed answers and disconnect detection pass through untouched.

Errors: request validation is FastAPI's 422 with its `detail` list; every other error is
`{"error", "detail", "body", "errors"}` with a 4xx status for the client's mistakes (400, 404 for
unknown names, 401, 413) and 500 only for a bug.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import traceback

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SdlabError
from .engine import error_status


class ApiError(Exception):
    """An error answer: `status`, the error's name and a message a person can act on."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_body(error: str, detail, body="", errors=None) -> dict:
    return {"error": error, "detail": detail, "body": body, "errors": str(detail) if errors is None else errors}


def install_error_handlers(app) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.error, exc.detail), status_code=exc.status)

    @app.exception_handler(SdlabError)
    async def user_error(request: Request, exc: SdlabError):
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=error_status(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body("HTTPException", exc.detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        traceback.print_exception(exc)
        return JSONResponse(error_body(type(exc).__name__, "internal error; the server's log has the details"),
                            status_code=500)


async def send_json(send, status: int, content: dict, headers: tuple = ()) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BasicAuth:
    """HTTP Basic on every route and the page when credentials are set (the web UI's --api-auth).
    Without credentials any Authorization header is ignored: clients such as Open WebUI send an
    empty `Basic ` one."""

    def __init__(self, app, credentials: tuple[tuple[str, str], ...]):
        self.app = app
        self.credentials = tuple((user.encode(), password.encode()) for user, password in credentials)

    def allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        found = False
        for known_user, known_password in self.credentials:  # every pair compared: no early exit to time
            found |= secrets.compare_digest(user, known_user) & secrets.compare_digest(password, known_password)
        return bool(sep) and found

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.credentials:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", ())).get(b"authorization", b"")
        if self.allowed(header):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send_json(send, 401, error_body("Unauthorized", "this server needs a user name and password "
                                              "(HTTP Basic, as set by --api-auth)"),
                        ((b"www-authenticate", b'Basic realm="sdlab"'),))


class BodyLimit:
    """413 for a request body over `max_bytes`: by its Content-Length before anything is read, and by
    counting when it comes in chunks without one."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def refusal(self) -> dict:
        return error_body("PayloadTooLarge", f"the request body is larger than this server's limit of "
                          f"{self.max_bytes // (1024 * 1024)} MB; send smaller images")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                return await send_json(send, 400, error_body("BadRequest", "Content-Length is not a number"))
            if too_large:
                return await send_json(send, 413, self.refusal())
        received, started, refused = 0, False, False

        async def counting_receive():
            # past the limit: answer 413 now and tell the app its client left (an exception raised here
            # would be caught by FastAPI's body parsing and turned into a 400)
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not refused:
                        refused = True
                        await send_json(send, 413, self.refusal())
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return  # the answer was the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, tracking_send)
