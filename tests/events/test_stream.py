"""The event stream over real HTTP (events/stream.py): mail that arrives over SMTP reaches
an SSE client over a real socket; the client disconnects, mail keeps arriving, and it
resumes with Last-Event-ID with no gap and no repeat; another workspace's key sees
nothing; a reader that stops reading is cut off without the server reading on; streams
are capped per key; server shutdown ends a stream cleanly."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest

from smtpd_agent.http.server import HttpServer
from smtpd_agent.store import directory
from smtpd_agent.store.apikeys import create_key
from tests.http.test_api import bearer, deliver, message

pytestmark = pytest.mark.timeout(90)


@dataclass
class Sse:
    id: int | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)

    @property
    def body(self) -> dict:
        return json.loads("\n".join(self.data))


class Reader:
    """A minimal SSE parser over an aiohttp response, as a browser's EventSource reads."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self, timeout: float = 10.0) -> Sse | None:
        """The next event; None at the end of the stream."""
        current = Sse()
        async with asyncio.timeout(timeout):
            while True:
                line = await self.response.content.readline()
                if not line:
                    return None
                text = line.decode().rstrip("\r\n")
                if text == "":
                    if current.data:
                        return current
                    current = Sse()
                elif text.startswith(":"):
                    self.comments.append(text)
                else:
                    name, _, value = text.partition(":")
                    value = value.removeprefix(" ")
                    if name == "id":
                        current.id = int(value)
                    elif name == "event":
                        current.event = value
                    elif name == "data":
                        current.data.append(value)

    async def take(self, count: int, timeout: float = 15.0) -> list[Sse]:
        taken = []
        while len(taken) < count:
            event = await self.next(timeout)
            assert event is not None, f"stream ended after {len(taken)} of {count}"
            taken.append(event)
        return taken


def events_url(server, slug: str = "acme", query: str = "") -> str:
    return f"{server.http_url}/api/v1/workspaces/{slug}/events{query}"


async def send_mail(server, subjects: list[str]) -> None:
    for subject in subjects:
        assert await asyncio.to_thread(deliver, server.port, message(subject)) == 250


async def acme_event_ids(db: asyncpg.Connection) -> list[int]:
    return [r["id"] for r in await db.fetch(
        """SELECT e.id FROM events e JOIN workspaces w ON w.id = e.workspace_id
            WHERE w.slug = 'acme' ORDER BY e.id""")]


async def test_resume_with_last_event_id_has_no_gap_and_no_repeat(server, keys, http, db):
    await send_mail(server, ["one", "two"])
    seen: list[Sse] = []
    async with http.get(events_url(server, query="?after=0"), headers=bearer(keys.acme)) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        reader = Reader(r)
        seen += await reader.take(2)
        await send_mail(server, ["three"])  # arrives while connected: woken by NOTIFY
        seen += await reader.take(1, timeout=10)
    # disconnected; mail keeps arriving
    await send_mail(server, ["four", "five"])
    async with http.get(events_url(server), headers={**bearer(keys.acme),
                                                     "Last-Event-ID": str(seen[-1].id)}) as r:
        reader = Reader(r)
        seen += await reader.take(2)
        await send_mail(server, ["six"])
        seen += await reader.take(1)
        # nothing more: the next read runs into the heartbeat-less quiet, not an event
        with pytest.raises(TimeoutError):
            await reader.next(timeout=1.0)
    ids = [e.id for e in seen]
    assert ids == await acme_event_ids(db) and len(set(ids)) == 6
    assert [e.body["data"]["message"]["subject"] for e in seen] == \
        ["one", "two", "three", "four", "five", "six"]
    assert {e.event for e in seen} == {"message.received"}
    assert all(e.body["type"] == e.event and e.body["id"].startswith("evt_") for e in seen)
    # ?after= resumes the same way, and without a cursor the stream starts at the newest
    async with http.get(events_url(server, query=f"?after={ids[3]}"),
                        headers=bearer(keys.acme)) as r:
        assert [e.id for e in await Reader(r).take(2)] == ids[4:6]
    async with http.get(events_url(server), headers=bearer(keys.acme)) as r:
        reader = Reader(r)
        await send_mail(server, ["seven"])
        [newest] = await reader.take(1)
        assert newest.body["data"]["message"]["subject"] == "seven"


async def test_another_workspace_sees_nothing(server, keys, http, db):
    async with http.get(events_url(server, "globex", "?after=0"),
                        headers=bearer(keys.globex)) as theirs:
        assert theirs.status == 200
        await send_mail(server, ["private"])
        assert len(await acme_event_ids(db)) == 1
        with pytest.raises(TimeoutError):
            await Reader(theirs).next(timeout=1.5)
    # their key on our path: 404, as everywhere in the API
    async with http.get(events_url(server, "acme", "?after=0"),
                        headers=bearer(keys.globex)) as response:
        assert response.status == 404
    # a cursor naming our event shows them nothing of ours
    [ours] = await acme_event_ids(db)
    async with http.get(events_url(server, "globex"),
                        headers={**bearer(keys.globex), "Last-Event-ID": str(ours - 1)}) as r:
        with pytest.raises(TimeoutError):
            await Reader(r).next(timeout=1.0)


async def test_bad_requests(server, keys, http):
    async with http.get(events_url(server)) as response:
        assert response.status == 401
    for query, headers in (("?after=x", {}), ("?after=-1", {}), ("?types=message.nope", {}),
                           ("", {"Last-Event-ID": "1; drop"}),
                           ("?after=99999999999999999999", {})):
        async with http.get(events_url(server, query=query),
                            headers={**bearer(keys.acme), **headers}) as response:
            assert response.status == 400, (query, headers)
    # types filter: only what was asked for
    await send_mail(server, ["filtered"])
    async with http.get(events_url(server, query="?after=0&types=draft.created"),
                        headers=bearer(keys.acme)) as r:
        with pytest.raises(TimeoutError):
            await Reader(r).next(timeout=1.0)
    async with http.get(events_url(server, query="?after=0&types=draft.created,message.received"),
                        headers=bearer(keys.acme)) as r:
        [event] = await Reader(r).take(1)
        assert event.event == "message.received"


async def test_streams_are_capped_per_key(start_server, db, http):
    server = start_server(**{"http.events_streams_per_key": 1, "http.events_heartbeat": 0.2})
    await directory.add_workspace(db, "acme")
    first, second = (await create_key(db, "acme")).key, (await create_key(db, "acme")).key
    async with http.get(events_url(server), headers=bearer(first)) as open_one:
        assert open_one.status == 200
        async with http.get(events_url(server), headers=bearer(first)) as refused:
            assert refused.status == 429 and refused.headers["Retry-After"]
        async with http.get(events_url(server), headers=bearer(second)) as other:
            assert other.status == 200
            # heartbeats keep an idle stream talking
            reader = Reader(other)
            with pytest.raises(TimeoutError):
                await reader.next(timeout=1.0)
            assert ": ping" in reader.comments
    # the slot is given back when the stream ends
    for _ in range(100):
        if server.app.service(HttpServer).streams.open_streams == 0:
            break
        await asyncio.sleep(0.05)
    async with http.get(events_url(server), headers=bearer(first)) as again:
        assert again.status == 200


async def metric(http, server, name: str) -> float:
    async with http.get(f"{server.http_url}/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_a_reader_that_stops_reading_is_bounded_and_cut_off(start_server, db, http):
    """200 events of 100 KB wait; the client sends its request and never reads. The
    server writes only what the socket buffers take, then stops reading the outbox, and
    after events_send_timeout it cuts the reader off."""
    server = start_server(**{"http.events_send_timeout": 2.0, "http.events_heartbeat": 60})
    workspace = await directory.add_workspace(db, "acme")
    key = (await create_key(db, "acme")).key
    total = 200
    async with db.transaction():
        await db.execute(
            """SELECT append_event($1, 'message.received', NULL,
                                   jsonb_build_object('n', n, 'text', repeat('x', 100000)))
                 FROM generate_series(1, $2) AS n""", workspace.id, total)
    port = server.http_port

    def stalled_client(done: threading.Event) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET /api/v1/workspaces/acme/events?after=0 HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        done.wait(30)
        sock.close()

    done = threading.Event()
    client = threading.Thread(target=stalled_client, args=(done,))
    client.start()
    try:
        streams = server.app.service(HttpServer).streams
        for _ in range(200):
            if streams.open_streams == 1:
                break
            await asyncio.sleep(0.05)
        assert streams.open_streams == 1
        # cut off after the send timeout, having written only part of the backlog
        for _ in range(300):
            if streams.open_streams == 0:
                break
            await asyncio.sleep(0.05)
        assert streams.open_streams == 0
        streamed = await metric(http, server, "smtpd_agent_events_streamed_total")
        assert streamed < total / 2, streamed
        # cut off by the write timeout, or by TCP_USER_TIMEOUT (the same setting) first
        ended = [await metric(http, server,
                              f'smtpd_agent_event_streams_ended_total{{reason="{reason}"}}')
                 for reason in ("stalled", "gone")]
        assert sum(ended) == 1, ended
        assert await metric(http, server, "smtpd_agent_events_last_id") == \
            await db.fetchval("SELECT max(id) FROM events")
    finally:
        done.set()
        client.join(10)


async def test_shutdown_ends_open_streams_cleanly(start_server, db, http):
    server = start_server()
    await directory.add_workspace(db, "acme")
    key = (await create_key(db, "acme")).key
    async with http.get(events_url(server), headers=bearer(key)) as response:
        assert response.status == 200
        reader = Reader(response)
        started = time.monotonic()
        stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
        assert await reader.next(timeout=15) is None  # the stream ended, no error
        await stopping
        assert time.monotonic() - started < 10
