"""JSON responses and errors, one shape for every endpoint: {"error": "..."}
(and "rule" when a named rule refused the request); and the one bearer-key check (401)
of both surfaces that take a workspace API key, the HTTP API and MCP."""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from ..store.apikeys import KeyOwner, find_key

log = structlog.get_logger(__name__)

UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="smtpd-agent"'}


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


async def bearer_owner(db: asyncpg.Pool, request: web.Request, *, missing: str,
                       refused_event: str) -> KeyOwner:
    """Whose key the request's `Authorization: Bearer` names; 401 (`missing` when there is
    none; `refused_event` logged when it is no key of ours)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HttpError(401, missing, UNAUTHORIZED)
    owner = await find_key(db, token.strip())
    if owner is None:
        log.info(refused_event, path=request.path)
        raise HttpError(401, "invalid API key", UNAUTHORIZED)
    return owner
