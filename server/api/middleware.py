"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers streams and hides disconnects).

Order, outermost first: RequestContext (X-Request-Id, the log line, last-resort 500) ->
CORS -> ApiKey (401) -> BodyLimit (413) -> the routes.
"""
from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import errors
from server.api.serving import ARRIVAL_SCOPE_KEY, LOG_SCOPE_KEY
from server.logs import REQUEST_LOGGER

MAX_BODY_BYTES = 4 * 1024 * 1024
QUIET_PATHS = ("/health", "/ready", "/metrics")      # probes and scrapes: no request log line
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

logger = logging.getLogger(__name__)
request_logger = logging.getLogger(REQUEST_LOGGER)


class RequestContextMiddleware:
    """Echo or generate X-Request-Id, log one line per request, turn a crash into an OpenAI 500."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        fields = scope.setdefault(LOG_SCOPE_KEY, {})
        start, status = time.monotonic(), None
        scope[ARRIVAL_SCOPE_KEY] = start

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - last resort: log it, answer 500 without the trace
            logger.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id)
            if status is None:
                await errors.internal_error().response()(scope, receive, send_with_id)
            status = status or 500
        finally:
            if scope["path"] not in QUIET_PATHS:
                line = {"request_id": request_id, "method": scope["method"], "path": scope["path"],
                        "status": status or 499, "total_s": round(time.monotonic() - start, 4), **fields}
                request_logger.info("request", extra={"fields": line})


class ApiKeyMiddleware:
    """401 unless 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and (scope["path"] + "/").startswith(PROTECTED_PREFIXES)):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                message = "You didn't provide an API key; send it as 'Authorization: Bearer KEY'."
            elif not hmac.compare_digest(token.strip().encode(), self.api_key):
                message = "Incorrect API key provided."
            else:
                message = None
            if message is not None:
                error = errors.OpenAIError(401, message, code="invalid_api_key",
                                           headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`; the body is read here once and replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        pending: Message = {"type": "http.request", "body": b"", "more_body": False}
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending = message            # the client went away; let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                pending = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break

        async def replay() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = errors.OpenAIError(413, f"Request body larger than {self.max_bytes} bytes.",
                                   code="request_too_large")
        await error.response()(scope, receive, send)
