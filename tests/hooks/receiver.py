"""A webhook receiver on loopback (aiohttp): records every POST, answers as planned."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what we answered
    at: float

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def type(self) -> str:
        return str(self.json["type"])


def spec_verify(secret: str, received: Received, tolerance: float = 300) -> bool:
    """The Standard Webhooks algorithm, written out from the specification: HMAC-SHA256
    over `id.timestamp.body` under the base64 secret after `whsec_`, any v1 signature."""
    message_id = received.headers["webhook-id"]
    timestamp = received.headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, f"{message_id}.{timestamp}.".encode() + received.body,
                        hashlib.sha256).digest()
    for signature in received.headers["webhook-signature"].split(" "):
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
            return True
    return False


class Receiver:
    """POSTs to any path are recorded; `plan[path]` lists the statuses to answer first
    (then 200), or `answer` decides."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.plan: dict[str, list[int]] = {}
        self.answer: Callable[[str], int] | None = None
        # requests to these paths wait until the event is set (a receiver that hangs)
        self.hold: dict[str, asyncio.Event] = {}
        # answer with a megabyte of text
        self.long_answer = False
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        held = self.hold.pop(request.path, None)
        if held is not None:
            self.received.append(Received(request.path, {k.lower(): v for k, v in
                                                          request.headers.items()},
                                          body, 0, time.time()))
            self.arrived.set()
            await held.wait()
            return web.Response(status=200)
        planned = self.plan.get(request.path)
        if planned:
            status = planned.pop(0)
        elif self.answer is not None:
            status = self.answer(request.path)
        else:
            status = 200
        self.received.append(Received(request.path, {k.lower(): v for k, v in
                                                      request.headers.items()},
                                      body, status, time.time()))
        self.arrived.set()
        if self.long_answer:
            return web.Response(status=status, text="x" * (1 << 20))
        return web.Response(status=status, text="ok" if status < 300 else "no")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait(self, predicate: Callable[[list[Received]], bool],
                   timeout: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"receiver: not there within {timeout}s; got "
                                     f"{[(r.path, r.headers.get('webhook-id'), r.status) for r in self.received]}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        return self.received

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
