"""HTTP plumbing shared by the policy service and the target server: error bodies that are always JSON, and
request text that the tokenizers can encode.

FastAPI's error bodies echo the offending input. A JSON ``NaN``, ``1e400`` (read as infinity) or a string
with a lone surrogate (``"\\ud800"``, valid JSON) cannot be written back as JSON, so the client got a plain
500 instead of the 422 it had earned. The handlers here write such values as text.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


def json_safe(value: Any) -> Any:
    """``value`` with what JSON cannot hold made writable: non-finite floats and unknown objects as text, lone
    surrogates as ``\\udXXX`` escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return json_safe(str(value))


def check_text(text: str) -> str:
    """``text`` unchanged when it is encodable Unicode; a ValueError (→ 422) naming the first lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: lone surrogate {text[e.start]!r} at character {e.start}") from None
    return text


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{k: v for k, v in err.items() if k != "url"} for err in exc.errors()]
    return JSONResponse({"detail": json_safe(errors)}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": json_safe(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error body ``app`` writes valid JSON. Call before ``@serve.ingress`` copies the app."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
