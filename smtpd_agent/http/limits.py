"""Bounds on webhook input: bytes per body, time to read it, posts in flight per process.

A webhook is public: anyone can post to it, and most of them are not the
provider. So a body is never read past `limit` (413, told by Content-Length
before any byte is read, or by counting), never for longer than the read
timeout (408), and only inside one of a few slots (503 with Retry-After when
all are taken; the providers retry). The handlers take a slot only after the
checks that need no body, so a flood that fails those costs no slot at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .responses import HttpError

CHUNK = 64 * 1024


class LimitExceeded(HttpError):
    """A post refused for its size, its pace or the load: `reason` labels it in metrics."""

    def __init__(self, status: int, reason: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.reason = reason


class Gate:
    """At most `limit` webhook posts read or processed at once; the rest come back later."""

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise LimitExceeded(503, "busy", "too many webhook posts in flight, retry later",
                                {"Retry-After": str(self.retry_after)})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def too_large(limit: int) -> LimitExceeded:
    return LimitExceeded(413, "too large", f"request body larger than {limit} bytes")


def check_length(request: web.BaseRequest, limit: int) -> None:
    """413 before reading a byte when the declared length is over the limit."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)


@asynccontextmanager
async def within(timeout: float) -> AsyncIterator[None]:
    """Reading a body: 408 once `timeout` seconds have passed, 400 if the client went away."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise LimitExceeded(408, "too slow", "request body not received in time") from None
    except (HttpProcessingError, ConnectionError):
        raise LimitExceeded(400, "incomplete", "request body incomplete") from None


async def read_body(request: web.BaseRequest, limit: int, timeout: float,
                    each: Callable[[bytes], Any] | None = None) -> bytes:
    """The whole body, at most `limit` bytes within `timeout` seconds; `each` sees every chunk."""
    check_length(request, limit)
    chunks: list[bytes] = []
    size = 0
    async with within(timeout):
        while chunk := await request.content.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            if each is not None:
                each(chunk)
            chunks.append(chunk)
    return b"".join(chunks)


class CappedStream:
    """A request's body stream for aiohttp's MultipartReader, refusing past `limit` bytes.

    Counts what the reader takes (part headers included) less what it gives back.
    """

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._taken = 0

    def _take(self, data: bytes) -> bytes:
        self._taken += len(data)
        if self._taken > self._limit:
            raise too_large(self._limit)
        return data

    async def readline(self, **kwargs: Any) -> bytes:
        return self._take(await self._stream.readline(**kwargs))

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            raise ValueError("CappedStream reads in bounded chunks only")
        return self._take(await self._stream.read(n))

    async def readany(self) -> bytes:
        return self._take(await self._stream.readany())

    def at_eof(self) -> bool:
        return bool(self._stream.at_eof())

    def unread_data(self, data: bytes) -> None:
        self._taken -= len(data)
        self._stream.unread_data(data)
