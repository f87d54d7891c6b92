"""OpenAI error objects: `{"error": {"message", "type", "param", "code"}}`, one status each.

Handlers call `raise OpenAIError(...)` (or a named helper); app.py turns it, pydantic's
validation errors, bodies that do not parse and anything unexpected into this shape. 500s never
carry a stack trace.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

RETRY_AFTER_SECONDS = 1

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": printable(self.message),
                          "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": printable(self.param), "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def context_length_exceeded(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="context_length_exceeded")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def queue_full() -> OpenAIError:
    return OpenAIError(429, "The server is at capacity (waiting queue full); retry after a moment.",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def draining() -> OpenAIError:
    return OpenAIError(503, "The server is shutting down and takes no new requests.",
                       code="draining", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def internal_error() -> OpenAIError:
    return OpenAIError(500, "Internal server error; see the server log.", code="internal_error")


def printable(text: Optional[str]) -> Optional[str]:
    """A message or param that can be sent as UTF-8 JSON (a lone surrogate from the request shows as \\udcff)."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# The names pydantic gives the members of a union in an error's location ('str', 'list[str]',
# "literal['none','auto']", 'function-after[...]', a model's class name): not fields.
_UNION_TAG = re.compile(r"(str|int|float|bool|bytes|none|any|[a-z][a-z0-9_-]*\[.*\]|[A-Z][A-Za-z0-9]*)", re.S)


def _strip_tags(loc: tuple) -> tuple:
    return tuple(p for i, p in enumerate(loc)
                 if not (i > 0 and isinstance(p, str) and _UNION_TAG.fullmatch(p)) and p != "body")


def format_path(parts: tuple) -> Optional[str]:
    """('messages', 0, 'content') -> 'messages[0].content': a field's path as a `param`."""
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or None


def _param(loc: tuple) -> Optional[str]:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content' (union member tags dropped)."""
    return format_path(_strip_tags(loc))


# pydantic's error types that OpenAI's API names with a code of its own
_CODES = {"too_long": "array_above_max_length", "string_too_long": "string_above_max_length"}


def _pick(errors: list[dict]) -> dict:
    """The first error; where it is one of a union's alternatives, the alternative that got furthest
    (for `content: [{"type": "text", "text": 5}]`, the part's text, not "content should be a string")."""
    first = _strip_tags(tuple(errors[0].get("loc", ())))
    same_field = [e for e in errors if _strip_tags(tuple(e.get("loc", ())))[:len(first)] == first]
    return max(same_field, key=lambda e: len(_strip_tags(tuple(e.get("loc", ())))))


def from_validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first pydantic error as a 400 that names its field."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request body.")
    err = _pick(errors)
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid value"))
    param = _param(tuple(err.get("loc", ())))
    cause = (err.get("ctx") or {}).get("error")
    if hasattr(cause, "code"):  # protocol.FieldError
        if cause.param:
            param = f"{param}.{cause.param}" if param else cause.param
        return bad_request(str(cause), param=param, code=cause.code)
    if kind == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}",
                           code="invalid_json")
    if kind == "missing" and param is None:
        return bad_request("A JSON request body is required.", code="invalid_json")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "model_attributes_type" and param is None and isinstance(err.get("input"), (bytes, str)):
        return bad_request("Request body must be JSON, sent with 'Content-Type: application/json'.",
                           code="invalid_json")
    if kind == "model_attributes_type":
        return bad_request(f"{param or 'Request body'} must be a JSON object.", param=param, code="invalid_type")
    msg = msg.removeprefix("Value error, ")
    code = _CODES.get(kind, "invalid_value")
    return bad_request(f"{param}: {msg}" if param and param not in msg else msg, param=param, code=code)


def from_http_exception(status: int, detail: Any, cause: Optional[BaseException],
                        headers: Optional[dict[str, str]] = None) -> OpenAIError:
    """Starlette/FastAPI's HTTPException. FastAPI answers a body that its JSON parser raised on (other
    than a plain syntax error) with a bare 400 "There was an error parsing the body"; the cause says
    why: invalid UTF-8, nesting deeper than Python's recursion limit, an integer over 4300 digits."""
    if status == 400 and isinstance(cause, (RecursionError, ValueError)):
        if isinstance(cause, RecursionError):
            reason = "it is nested too deeply"
        elif isinstance(cause, UnicodeDecodeError):
            reason = f"it is not valid UTF-8 ({cause.reason} at byte {cause.start})"
        else:
            reason = printable(str(cause)) or "it cannot be parsed"
        return bad_request(f"Request body is not valid JSON: {reason}.", code="invalid_json")
    return OpenAIError(status, str(detail), headers=headers)
