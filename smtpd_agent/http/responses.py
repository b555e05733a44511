"""JSON responses and errors, one shape for every endpoint: {"error": "..."}
(and "rule" when a named rule refused the request)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Any

from aiohttp import web


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    return str(value)


dumps = partial(json.dumps, default=_default)


def json_response(data: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps, **kwargs)


def error(status: int, message: str, headers: dict[str, str] | None = None,
          rule: str | None = None) -> web.Response:
    """`rule`: the rule or config key that refused the request, for a program to act on."""
    body = {"error": message} if rule is None else {"error": message, "rule": rule}
    return json_response(body, status=status, headers=headers)


class HttpError(Exception):
    """Raised by a handler to answer with an error body; the middleware renders it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 rule: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.rule = rule
