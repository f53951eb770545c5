"""OpenAI's error body for every error the server answers, and request-validation errors as one
sentence that names the field.

    {"error": {"message": "'temperature' must be at most 2, got 3.", "type": "invalid_request_error",
               "param": "temperature", "code": null}}

``install_error_handlers(app)`` makes any FastAPI app answer this way (lmforge's server, or an app
that mounts the RAG route on its own).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


# --- the error body --------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    def utf8(s: str | None) -> str | None:  # a lone surrogate from the request (a key, a name) would not encode
        return None if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")

    return {"error": {"message": utf8(message), "type": type, "param": utf8(param), "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


# --- request validation ----------------------------------------------------------------------------
def validation_error(errors: Sequence[dict], body: Any) -> APIError:
    """The first of pydantic's errors as one sentence that starts with the field's path
    (``'messages[0].content'``), with the top-level field as ``param``."""
    err = errors[0]
    kind, loc, ctx = err["type"], tuple(err.get("loc", ())), err.get("ctx") or {}
    if kind == "json_invalid":
        return bad(f"the request body is not valid JSON ({ctx.get('error', 'JSON decode error')} at character {loc[-1]}).")
    path = _field_path(loc[1:] if loc[:1] == ("body",) else loc, body, last_is_field=kind == "missing")
    shown = err.get("input")
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a tagged object whose tag is wrong or missing
        path.append(str(ctx.get("discriminator", "type")).strip("'"))
        shown = ctx.get("tag")
    if not path:
        return bad(f"the request body {_must(kind, ctx, '') if kind == 'string_unicode' else 'must be a JSON object'}.")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if i else str(p) for i, p in enumerate(path))
    got = f", got {_shown(shown)}" if kind in _SHOW_INPUT and _shown(shown) is not None else ""
    return bad(f"'{where}' {_must(kind, ctx, err.get('msg', 'is not valid'))}{got}.", str(path[0]))


def _field_path(loc: Sequence, body: Any, last_is_field: bool) -> list:
    """The parts of an error's location that are keys and indices of the request body: a union's member
    tags (protocol._union) are dropped by walking the body along the location. A missing field's name,
    absent from the body by definition, ends its location."""
    path, value = [], body
    for i, part in enumerate(loc):
        if isinstance(value, dict) and part in value or isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            path.append(part)
            value = value[part]
        elif last_is_field and i == len(loc) - 1:
            path.append(part)
    return path


_SHOW_INPUT = {"int_type", "bool_type", "string_type", "float_type", "finite_number", "list_type", "dict_type", "model_type",
               "model_attributes_type", "greater_than_equal", "less_than_equal", "greater_than", "less_than",
               "literal_error", "union_type", "union_tag_invalid", "string_pattern_mismatch"}  # fmt: skip


def _must(kind: str, ctx: dict, msg: str) -> str:
    """What a field must be, for pydantic's error kinds (protocol.py's own errors say it themselves)."""
    plain = {"missing": "is required", "extra_forbidden": "is not a known parameter", "int_type": "must be an integer",
             "bool_type": "must be true or false", "string_type": "must be a string", "float_type": "must be a number",
             "finite_number": "must be a finite number", "list_type": "must be an array", "dict_type": "must be an object",
             "model_type": "must be an object", "model_attributes_type": "must be an object",
             "union_tag_not_found": "is required", "string_unicode": "has a key that is not valid Unicode (a lone surrogate)"}  # fmt: skip
    if kind in plain:
        return plain[kind]
    bound = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
             "greater_than": ("greater than", "gt"), "less_than": ("less than", "lt")}  # fmt: skip
    if kind in bound:
        words, key = bound[kind]
        return f"must be {words} {_number(ctx[key])}"
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        return "must not be empty" if kind == "too_short" and n == 1 else f"must have at {'least' if kind == 'too_short' else 'most'} {n} items"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "union_tag_invalid":
        return f"must be one of {ctx['expected_tags']}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}"
    return msg.removeprefix("Value error, ").replace("Input should", "must")


def _number(x: int | float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _shown(value: Any) -> str | None:
    """A scalar as JSON, cut short (objects and arrays are not shown)."""
    if isinstance(value, str):
        return json.dumps(value[:60] + ("..." if len(value) > 60 else ""))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**60 else f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, float):
        return json.dumps(value)  # NaN and Infinity spelled as the client sent them
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Answer ``APIError``, request-validation errors (400 naming the field, never FastAPI's 422) and
    HTTP errors with OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(validation_error(e.errors(), e.body))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
        if isinstance(e.__cause__, RecursionError):  # FastAPI's 400 for a body json.loads could not parse
            message = "the request body nests arrays or objects too deeply."
        elif isinstance(e.__cause__, ValueError):  # not UTF-8, an integer of over 4300 digits, ...
            message = f"the request body is not valid JSON ({str(e.__cause__).split(';')[0]})."
        return JSONResponse(error_body(message, kind), status_code=e.status_code)
