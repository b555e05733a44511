"""Streamable HTTP at /mcp on the aiohttp surface: the SDK's session manager (an ASGI
app) behind a small bridge from the aiohttp request.

The bridge authenticates first (Authorization: Bearer <workspace key>, 401 without a
valid one), takes a slot of mcp.concurrency (503 with Retry-After when none is free),
reads the body within mcp.max_request_size (413 above, from Content-Length before any
byte is read), and only then hands the request to the SDK, with the key's owner in the
ASGI scope for the tools to read. Stateless mode: each POST is a complete exchange and
no session outlives it, so nothing accumulates per client; JSON responses, not SSE, and
no GET stream (only POST is routed), so every request ends within its time bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from ..config import McpSettings
from ..http.limits import LimitExceeded, read_body
from ..http.responses import HttpError, bearer_owner
from ..metrics import Metrics
from ..store.apikeys import KeyOwner

log = structlog.get_logger(__name__)

OWNER = "smtpd_agent.owner"
# Headers the ASGI app never sees (the key stays here) or that aiohttp sets itself.
DROPPED_IN = {b"authorization", b"cookie"}
DROPPED_OUT = {"connection", "transfer-encoding", "keep-alive"}
# Seconds a request body may take to arrive.
READ_TIMEOUT = 30.0


async def owner_of(ctx: ServerRequestContext[Any, Any]) -> KeyOwner | None:
    """The owner the bridge put in the request's ASGI scope."""
    request = ctx.request
    scope = getattr(request, "scope", None)
    owner = scope.get(OWNER) if isinstance(scope, dict) else None
    return owner if isinstance(owner, KeyOwner) else None


class McpHttp:
    """/mcp: one session manager per HTTP server, run in a task of its own from start()
    to stop() (the SDK's task group must be entered and left in one task)."""

    def __init__(self, db: asyncpg.Pool, server: Server[Any], settings: McpSettings,
                 metrics: Metrics) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.manager = StreamableHTTPSessionManager(
            app=server, json_response=True, stateless=True,
            max_request_body_size=settings.max_request_size)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        ready = asyncio.Event()

        async def run() -> None:
            async with self.manager.run():
                ready.set()
                await self._stopping.wait()

        self._task = asyncio.create_task(run(), name="mcp-session-manager")
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({self._task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if self._task.done():
            self._task.result()  # raises what stopped it

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            owner = await bearer_owner(self.db, request,
                                       missing="missing bearer token (a workspace API key)",
                                       refused_event="mcp.unauthorized")
        except HttpError:
            self.metrics.mcp_rejected.labels("unauthorized").inc()
            raise
        if self._slots.locked():
            log.warning("mcp.busy", key_id=owner.key_id)
            self.metrics.mcp_rejected.labels("busy").inc()
            raise HttpError(503, "busy, retry shortly", {"Retry-After": "1"})
        async with self._slots:
            # 413 / 408 / 400 as the webhooks answer them
            try:
                body = await read_body(request, self.settings.max_request_size, READ_TIMEOUT)
            except LimitExceeded as error:
                # too_large, too_slow, incomplete
                self.metrics.mcp_rejected.labels(error.reason.replace(" ", "_")).inc()
                raise
            return await self._bridge(request, body, owner)

    async def _bridge(self, request: web.Request, body: bytes,
                      owner: KeyOwner) -> web.StreamResponse:
        """Run the ASGI app for this request; its response streams out as it is sent."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": f"{request.version.major}.{request.version.minor}",
            "method": request.method, "scheme": request.scheme, "path": request.path,
            "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1", "replace"),
            "query_string": request.query_string.encode("latin-1", "replace"),
            "root_path": "",
            "headers": [(name.lower(), value) for name, value in request.raw_headers
                        if name.lower() not in DROPPED_IN],
            "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
            "server": None, "state": {}, OWNER: owner}
        finished = asyncio.Event()
        delivered = False
        response: web.StreamResponse | None = None
        start: dict[str, Any] = {}

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal response
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body" or finished.is_set():
                return
            if response is None:
                response = self._response(start)
                await response.prepare(request)
            if message.get("body"):
                await response.write(message["body"])
            if not message.get("more_body", False):
                await response.write_eof()
                finished.set()

        try:
            # the tool is stopped at tool_timeout; this bounds whatever else could hang
            async with asyncio.timeout(self.settings.tool_timeout + READ_TIMEOUT):
                await self.manager.handle_request(scope, receive, send)
        except TimeoutError:
            log.error("mcp.request_timeout", key_id=owner.key_id)
            if response is None:
                raise HttpError(504, "the MCP request took too long") from None
        finally:
            finished.set()
        if response is None:
            if not start:
                log.error("mcp.no_response", method=request.method)
                raise HttpError(500, "internal error")
            response = self._response(start)
            await response.prepare(request)
            await response.write_eof()
        return response

    @staticmethod
    def _response(start: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(status=start.get("status", 500))
        for name, value in start.get("headers", []):
            key = name.decode("latin-1")
            if key.lower() not in DROPPED_OUT:
                response.headers.add(key, value.decode("latin-1"))
        return response
