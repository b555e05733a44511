"""kill -9 of `serve` between COMMIT and delivery, and in the middle of a request: the
event still arrives after a restart, with the same webhook-id, delivered once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from smtpd_agent.store import directory
from smtpd_agent.store.apikeys import Scope, create_key
from tests.hooks.receiver import Receiver, spec_verify
from tests.hooks.test_delivery import mail, send
from tests.ops.serve_process import ServeProcess

SETTINGS = {"webhooks.allow_loopback": True, "webhooks.poll_interval": 0.2,
            "webhooks.timeout": 2.0, "webhooks.lease": 3.0, "webhooks.retry_base": 1.0}


async def prepare(db: asyncpg.Connection, serve: ServeProcess, url: str) -> dict[str, Any]:
    """acme/support and an endpoint to `url`, made over serve's API; the endpoint."""
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support", auto_reply=False)
    key = (await create_key(db, "acme", scopes=frozenset({Scope.ADMIN}))).key
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{serve.http_port}/api/v1/workspaces/acme/webhooks",
            json={"url": url, "event_types": ["message.received"]},
            headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status == 201, await response.text()
        created: dict[str, Any] = await response.json()
    return created


def kill_9(serve: ServeProcess) -> None:
    serve.process.send_signal(signal.SIGKILL)
    assert serve.process.wait(30) == -signal.SIGKILL
    serve.close()


async def started(workdir: Path, database_url: str, nameserver: str,
                  **values: Any) -> ServeProcess:
    """serve, ready (it binds port 0 and names its ports in server.ready)."""
    serve = ServeProcess(workdir, database_url, nameserver, **{**SETTINGS, **values})
    try:
        await asyncio.to_thread(serve.wait_for_state, "READY=1")
    except BaseException:
        serve.close()
        raise
    return serve


async def test_kill_9_between_commit_and_delivery_delivers_after_restart_once(
        database_url, dns_server, tmp_path, receiver: Receiver, db):
    # The first process delivers nothing (webhooks.concurrency = 0): the kill falls
    # after COMMIT (250) and before any delivery, every time.
    first = await started(tmp_path, database_url, dns_server.nameserver,
                          **{"webhooks.concurrency": 0})
    try:
        endpoint = await prepare(db, first, receiver.url("/in"))
        for n in range(3):
            await send(first.port, mail(f"crash {n}", f"crash{n}@example.org"))
        rows = await db.fetch("SELECT status, attempts FROM webhook_deliveries ORDER BY id")
        assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 0)] * 3
    finally:
        kill_9(first)
    assert receiver.received == []

    second = await started(tmp_path, database_url, dns_server.nameserver)
    try:
        await receiver.wait(lambda r: len(r) >= 3)
        await asyncio.sleep(2 * SETTINGS["webhooks.lease"])  # a lease and more: no repeat
        ids = [r.id for r in receiver.received]
        assert len(ids) == len(set(ids)) == 3
        assert all(spec_verify(endpoint["secret"], r) for r in receiver.received)
        assert set(ids) == {row["event_id"] for row in await db.fetch(
            "SELECT event_id FROM events WHERE type = 'message.received'")}
        rows = await db.fetch("SELECT status, attempts FROM webhook_deliveries")
        assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 1)] * 3
    finally:
        second.close()


async def test_kill_9_mid_request_is_sent_again_after_the_lease_with_the_same_id(
        database_url, dns_server, tmp_path, receiver: Receiver, db):
    receiver.hold["/in"] = hang = asyncio.Event()
    first = await started(tmp_path, database_url, dns_server.nameserver)
    try:
        endpoint = await prepare(db, first, receiver.url("/in"))
        await send(first.port, mail("mid request", "mid@example.org"))
        await receiver.wait(lambda r: len(r) >= 1)  # the request is in flight, unanswered
        assert await db.fetchval("SELECT status FROM webhook_deliveries") == "sending"
    finally:
        kill_9(first)
    hang.set()

    second = await started(tmp_path, database_url, dns_server.nameserver)
    try:
        await receiver.wait(lambda r: len(r) >= 2)
        await asyncio.sleep(2 * SETTINGS["webhooks.lease"])
        first_try, again = receiver.received
        assert len(receiver.received) == 2
        assert again.id == first_try.id and again.body == first_try.body  # dedupe on the id
        assert again.status == 200 and spec_verify(endpoint["secret"], again)
        row = await db.fetchrow("SELECT status, attempts FROM webhook_deliveries")
        assert (row["status"], row["attempts"]) == ("delivered", 2)
        # the killed attempt left no record; the one that succeeded did
        log = await db.fetch("SELECT attempt, outcome FROM webhook_attempts")
        assert [(a["attempt"], a["outcome"]) for a in log] == [(2, "delivered")]
    finally:
        second.close()
