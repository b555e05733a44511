"""Outgoing webhooks end to end: real SMTP in, real Postgres, an aiohttp receiver on
loopback that checks every signature with the specification's algorithm."""

from __future__ import annotations

import asyncio
import json
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from smtpd_agent.hooks.signing import new_secret
from smtpd_agent.store import directory, events
from smtpd_agent.store.apikeys import Scope, create_key
from tests.hooks.conftest import FAST, Api
from tests.hooks.receiver import Received, Receiver, spec_verify
from tests.http.test_api import deliver
from tests.http.test_health_metrics import metric


def mail(subject: str, message_id: str, in_reply_to: str | None = None,
         to: str = "support@acme.agents.test") -> bytes:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.org>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{message_id}>"
    if in_reply_to:
        message["In-Reply-To"] = f"<{in_reply_to}>"
        message["References"] = f"<{in_reply_to}>"
    message.set_content(f"body of {subject}\n")
    return message.as_bytes(policy=SMTP)


async def send(port: int, raw: bytes, rcpt: str = "support@acme.agents.test") -> None:
    assert await asyncio.to_thread(deliver, port, raw, rcpt) == 250


def message_of(received: Received) -> dict[str, Any]:
    """The stored message an event is about (ids as the API shows them)."""
    data: dict[str, Any] = received.json["data"]
    return data


def received_of_type(receiver: Receiver, path: str, kind: str) -> list[Received]:
    return [r for r in receiver.at(path) if r.type == kind]


async def test_mail_over_smtp_reaches_the_receiver_signed(hooks_server, receiver, db):
    hooks = await hooks_server()
    created = await hooks.acme.create(receiver.url("/acme"), event_types=["message.received"])
    secret = created["secret"]
    assert secret.startswith("whsec_")
    # shown once: no listing, no single read, no column in the clear
    listed = await hooks.acme.call("GET", "/webhooks", expect=200)
    one = await hooks.acme.call("GET", f"/webhooks/{created['id']}", expect=200)
    assert secret not in json.dumps([listed, one]) and "secret" not in one
    sealed = bytes(await db.fetchval("SELECT secret FROM webhook_endpoints"))
    assert secret.encode() not in sealed and secret.removeprefix("whsec_").encode() not in sealed

    await send(hooks.server.port, mail("hello hooks", "hello@example.org"))
    [got] = await receiver.wait(lambda r: len(r) >= 1)
    assert got.type == "message.received"
    assert got.headers["content-type"] == "application/json"
    assert spec_verify(secret, got)
    assert not spec_verify(new_secret(), got)
    assert Webhook(secret).verify(got.body, got.headers)["type"] == "message.received"
    stored = await db.fetchrow("SELECT id, thread_id FROM messages WHERE subject = 'hello hooks'")
    data = message_of(got)
    assert data["message"]["id"] == stored["id"]
    assert data["message"]["thread_id"] == stored["thread_id"]
    assert data["workspace"] == "acme" and data["snippet"] == "body of hello hooks"
    assert secret not in got.body.decode()

    [delivery] = await hooks.acme.settled(created["id"], 1)
    assert delivery["status"] == "delivered" and delivery["attempts"] == 1
    assert got.id == got.json["id"] == await db.fetchval(
        "SELECT event_id FROM events WHERE id = $1", delivery["event_id"])
    assert got.id.startswith("evt_")
    [attempt] = delivery["attempt_log"]
    assert attempt["status_code"] == 200 and attempt["outcome"] == "delivered"
    assert attempt["duration_ms"] >= 0 and attempt["error"] is None

    async with hooks.acme.http.get(f"{hooks.server.http_url}/metrics") as response:
        text = await response.text()
    assert metric(text, "smtpd_agent_webhook_attempts_total", outcome="delivered") == 1
    assert metric(text, "smtpd_agent_webhook_attempts_total", outcome="failed") == 0
    assert metric(text, "smtpd_agent_queue_depth", queue="webhook_deliveries",
                  state="delivered") == 1
    assert metric(text, "smtpd_agent_queue_depth", queue="webhook_deliveries",
                  state="pending") == 0


async def test_a_500_is_retried_on_the_stored_schedule_and_a_thread_keeps_its_order(
        hooks_server, receiver, db):
    base = 3.0
    hooks = await hooks_server(**{"webhooks.retry_base": base})
    created = await hooks.acme.create(receiver.url("/acme"), event_types=["message.received"])
    receiver.plan["/acme"] = [500]
    await send(hooks.server.port, mail("order", "a@example.org"))
    await send(hooks.server.port, mail("Re: order", "b@example.org", "a@example.org"))
    await send(hooks.server.port, mail("Re: order", "c@example.org", "b@example.org"))
    await receiver.wait(lambda r: sum(x.status == 200 for x in r) >= 3)

    first = receiver.received[0]
    assert first.status == 500
    delivered = [r for r in receiver.received if r.status == 200]
    assert delivered[0].id == first.id  # the retry: the same webhook-id
    stored = await db.fetch("SELECT id, thread_id FROM messages WHERE direction = 'inbound' "
                            "ORDER BY id")
    assert len({row["thread_id"] for row in stored}) == 1  # one thread
    assert [message_of(r)["message"]["id"] for r in delivered] == [row["id"] for row in stored]
    assert len(receiver.received) == 4

    deliveries = await hooks.acme.settled(created["id"], 3)
    log = deliveries[0]["attempt_log"]
    assert [(a["status_code"], a["outcome"]) for a in log] == [(500, "failed"),
                                                               (200, "delivered")]
    assert log[0]["error"] == "HTTP 500"
    started, retry_at = (_time(log[0]["started_at"]), _time(log[0]["retry_at"]))
    gap = (retry_at - started).total_seconds()
    assert base <= gap <= base + log[0]["duration_ms"] / 1000 + 1.0
    assert _time(log[1]["started_at"]) >= retry_at
    # the later events of the thread existed before the retry, and waited for it
    later = [_time(a["started_at"]) for d in deliveries[1:] for a in d["attempt_log"]]
    created_at = [_time(d["created_at"]) for d in deliveries[1:]]
    assert max(created_at) < retry_at, "the test needs the later mail stored before the retry"
    assert min(later) >= _time(log[1]["started_at"])
    assert [len(d["attempt_log"]) for d in deliveries] == [2, 1, 1]


def _time(text: str) -> Any:
    from datetime import datetime
    return datetime.fromisoformat(text)


async def test_a_workspace_never_gets_another_workspaces_events(hooks_server, receiver, db):
    hooks = await hooks_server()
    acme = await hooks.acme.create(receiver.url("/acme"))
    globex = await hooks.globex.create(receiver.url("/globex"))
    for n in range(2):
        await send(hooks.server.port, mail(f"acme {n}", f"acme{n}@example.org"))
        await send(hooks.server.port,
                   mail(f"globex {n}", f"globex{n}@example.org", to="support@globex.agents.test"),
                   rcpt="support@globex.agents.test")
    await receiver.wait(lambda r: len([x for x in r if x.type == "message.received"]) >= 4)
    owned = {row["id"]: row["slug"] for row in await db.fetch(
        "SELECT m.id, w.slug FROM messages m JOIN workspaces w ON w.id = m.workspace_id")}
    for path, slug in (("/acme", "acme"), ("/globex", "globex")):
        got = received_of_type(receiver, path, "message.received")
        assert len(got) == 2
        assert {owned[message_of(r)["message"]["id"]] for r in got} == {slug}
    assert spec_verify(acme["secret"], receiver.at("/acme")[0])
    assert not spec_verify(globex["secret"], receiver.at("/acme")[0])
    # over the API a key sees only its own workspace's endpoints, log and events
    [acme_delivery, *_] = await hooks.acme.settled(acme["id"], 2)
    for method, path, body in (
            ("GET", f"/webhooks/{acme['id']}", None),
            ("PATCH", f"/webhooks/{acme['id']}", {"enabled": False}),
            ("GET", f"/webhooks/{acme['id']}/deliveries", None),
            ("POST", f"/webhooks/{acme['id']}/rotate-secret", None),
            ("POST", f"/webhooks/{acme['id']}/deliveries/{acme_delivery['id']}/replay", None),
            ("POST", f"/webhooks/{globex['id']}/replay", {"event_id": acme_delivery["event_id"]}),
            ("DELETE", f"/webhooks/{acme['id']}", None)):
        await hooks.globex.call(method, path, body, expect=404)
    assert [e["id"] for e in (await hooks.globex.call("GET", "/webhooks"))["endpoints"]] == \
        [globex["id"]]
    other = hooks.acme.base.replace("/acme", "/globex")
    async with hooks.acme.http.get(f"{other}/webhooks", headers=hooks.acme.headers) as response:
        assert response.status == 404
    assert (await hooks.acme.call("GET", f"/webhooks/{acme['id']}"))["enabled"] is True


async def test_repeated_failure_disables_the_endpoint_and_says_so(hooks_server, receiver):
    hooks = await hooks_server(**{"webhooks.retry_base": 0.2,
                                  "webhooks.disable_after_failures": 3,
                                  "webhooks.disable_after_seconds": 0})
    failing = await hooks.acme.create(receiver.url("/down"), event_types=["message.received"])
    watcher = await hooks.acme.create(receiver.url("/watch"), event_types=["webhook.disabled"])
    receiver.answer = lambda path: 500 if path == "/down" else 200
    with capture_logs() as logs:
        await send(hooks.server.port, mail("down", "down@example.org"))
        await receiver.wait(lambda r: any(x.path == "/watch" for x in r))
    assert [r.status for r in receiver.at("/down")] == [500, 500, 500]
    [notice] = receiver.at("/watch")
    assert notice.type == "webhook.disabled" and spec_verify(watcher["secret"], notice)
    assert notice.json["data"]["endpoint"]["id"] == failing["id"]
    [line] = [e for e in logs if e["event"] == "webhooks.endpoint_disabled"]
    assert line["endpoint_id"] == failing["id"] and line["failures"] == 3
    assert line["log_level"] == "warning"

    endpoint = await hooks.acme.call("GET", f"/webhooks/{failing['id']}", expect=200)
    assert endpoint["enabled"] is False and endpoint["disabled_at"]
    assert endpoint["disabled_reason"].startswith("3 failed attempts in a row")
    [delivery] = await hooks.acme.deliveries(failing["id"])
    assert delivery["status"] == "failed" and len(delivery["attempt_log"]) == 3
    # a disabled endpoint gets nothing new
    await send(hooks.server.port, mail("while down", "down2@example.org"))
    await asyncio.sleep(1.0)
    assert len(receiver.at("/down")) == 3
    assert len(await hooks.acme.deliveries(failing["id"])) == 1

    # enabled again, its failure count starts afresh, and a replay delivers the first event
    receiver.answer = None
    enabled = await hooks.acme.call("PATCH", f"/webhooks/{failing['id']}", {"enabled": True},
                                    expect=200)
    assert enabled["enabled"] and enabled["consecutive_failures"] == 0
    replay = await hooks.acme.call(
        "POST", f"/webhooks/{failing['id']}/deliveries/{delivery['id']}/replay", expect=202)
    await receiver.wait(lambda r: any(x.path == "/down" and x.status == 200 for x in r))
    assert receiver.at("/down")[-1].id == receiver.at("/down")[0].id
    log = await hooks.acme.deliveries(failing["id"])
    assert [d["id"] for d in log if d["replay_of"] == delivery["id"]] == [replay["delivery_id"]]


class Counter:
    """A TCP listener that only counts connections: a refused address never reaches it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()
        self.server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port


async def test_ssrf_private_addresses_are_refused_at_create_and_at_connect(
        hooks_server, dns_server, db):
    hooks = await hooks_server(**{"webhooks.allow_loopback": False,
                                  "webhooks.retry_base": 60.0})
    for url in ("http://127.0.0.1:9/x", "https://127.0.0.1/", "https://localhost/",
                "https://10.0.0.5/", "https://192.168.1.1/", "https://169.254.169.254/latest",
                "https://[::ffff:a9fe:a9fe]/", "https://[fd00:ec2::254]/", "https://[::1]/",
                "http://hooks.example.com/", "https://user:pw@hooks.example.com/"):
        refused = await hooks.acme.call("POST", "/webhooks", {"url": url}, expect=422)
        assert refused["error"].startswith("url:")
    counter = Counter()
    port = await counter.start()
    dns_server.a("metadata.hooks.test", "169.254.169.254")
    dns_server.a("loop.hooks.test", "127.0.0.1")
    dns_server.a("inside.hooks.test", "10.1.2.3", "fd12::1")
    names = {"metadata": "169.254.169.254 is a link-local address",
             "loop": "127.0.0.1 is a loopback address",
             "inside": "10.1.2.3 is a private address"}
    made = {name: await hooks.acme.create(f"https://{name}.hooks.test:{port}/in")
            for name in names}
    await send(hooks.server.port, mail("ssrf", "ssrf@example.org"))
    for name, why in names.items():
        for _ in range(100):
            log = await hooks.acme.deliveries(made[name]["id"])
            attempts = [a for d in log for a in d["attempt_log"]]
            if attempts:
                break
            await asyncio.sleep(0.1)
        assert attempts, name
        assert attempts[0]["outcome"] == "refused" and attempts[0]["status_code"] is None
        assert why in attempts[0]["error"]
    assert counter.connections == 0
    assert counter.server is not None
    counter.server.close()


@pytest.mark.parametrize("field", ["url", "event_types", "enabled", "description"])
async def test_bad_fields_are_400_or_422(hooks_server, field):
    hooks = await hooks_server()
    bad = {"url": 5, "event_types": ["no.such_type"], "enabled": "yes",
           "description": "x" * 501}[field]
    body = {"url": "https://hooks.example.com/in", field: bad}
    answer = await hooks.acme.call("POST", "/webhooks", body)
    assert answer["error"].startswith(f"{field}:")


class Rollback(Exception):
    pass


async def test_an_event_is_delivered_when_its_cause_commits_and_never_after_a_rollback(
        hooks_server, receiver, db):
    hooks = await hooks_server()
    created = await hooks.acme.create(receiver.url("/acme"))
    await db.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                            schema="pg_catalog")
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    with pytest.raises(Rollback):
        async with db.transaction():
            await events.append(db, workspace_id, events.EventType.DOMAIN_VERIFIED,
                                {"domain": "rolled.example"})
            raise Rollback
    async with db.transaction():
        await events.append(db, workspace_id, events.EventType.DOMAIN_VERIFIED,
                            {"domain": "kept.example"})
    [got] = await receiver.wait(lambda r: len(r) >= 1)
    assert got.type == "domain.verified" and got.json["data"] == {"domain": "kept.example"}
    assert spec_verify(created["secret"], got)
    await asyncio.sleep(1.0)  # a second poll and more: still nothing of the rolled-back one
    assert len(receiver.received) == 1
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1


async def test_two_servers_on_one_database_deliver_each_event_once(
        start_server, receiver, db, tmp_path, http):
    # Two processes' worth of workers (each a whole App) share the queue; small batches
    # and fast polls make them contend for the same rows.
    shared = {**FAST, "domains.key_file": str(tmp_path / "at-rest.secret"),
              "webhooks.batch_size": 2, "webhooks.poll_interval": 0.05}
    one = start_server(**shared)
    start_server(**shared)
    await directory.add_workspace(db, "acme")
    key = (await create_key(db, "acme", scopes=frozenset({Scope.ADMIN}))).key
    api = Api(http, f"{one.http_url}/api/v1/workspaces/acme", key)
    created = await api.create(receiver.url("/in"))
    await db.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                            schema="pg_catalog")
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    for n in range(30):
        async with db.transaction():
            await events.append(db, workspace_id, events.EventType.DOMAIN_VERIFIED,
                                {"n": n})
    await receiver.wait(lambda r: len(r) >= 30)
    await asyncio.sleep(1.0)
    ids = [r.id for r in receiver.received]
    assert len(ids) == len(set(ids)) == 30
    assert sorted(r.json["data"]["n"] for r in receiver.received) == list(range(30))
    assert all(spec_verify(created["secret"], r) for r in receiver.received)
    attempts = await db.fetch("SELECT attempts, status FROM webhook_deliveries")
    assert {(a["attempts"], a["status"]) for a in attempts} == {(1, "delivered")}


async def append_event(db, slug: str, data: dict[str, Any]) -> int:
    """An event of workspace `slug` committed straight into the outbox; its id."""
    await db.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                            schema="pg_catalog")
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = $1", slug)
    async with db.transaction():
        event_id: int = await events.append(db, workspace_id,
                                             events.EventType.DOMAIN_VERIFIED, data)
    return event_id


async def test_a_rotated_secret_signs_beside_the_new_one_for_the_grace(
        hooks_server, receiver, db):
    hooks = await hooks_server()
    created = await hooks.acme.create(receiver.url("/in"))
    rotated = await hooks.acme.call("POST", f"/webhooks/{created['id']}/rotate-secret",
                                    expect=200)
    assert rotated["secret"] != created["secret"] and rotated["rotating_secret_until"]
    await append_event(db, "acme", {"n": 1})
    [got] = await receiver.wait(lambda r: len(r) >= 1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    assert spec_verify(rotated["secret"], got) and spec_verify(created["secret"], got)
    # the grace over (as if it had passed), only the new secret signs
    await db.execute("UPDATE webhook_endpoints SET previous_secret_until = now()")
    await append_event(db, "acme", {"n": 2})
    await receiver.wait(lambda r: len(r) >= 2)
    latest = receiver.received[-1]
    assert len(latest.headers["webhook-signature"].split(" ")) == 1
    assert spec_verify(rotated["secret"], latest) and not spec_verify(created["secret"], latest)


async def test_replay_of_an_event_the_endpoint_never_had_and_paging_of_the_log(
        hooks_server, receiver, db):
    hooks = await hooks_server()
    early = await append_event(db, "acme", {"n": 0})  # before the endpoint existed
    created = await hooks.acme.create(receiver.url("/in"))
    for n in range(1, 4):
        await append_event(db, "acme", {"n": n})
    await hooks.acme.settled(created["id"], 3)
    replay = await hooks.acme.call("POST", f"/webhooks/{created['id']}/replay",
                                   {"event_id": early}, expect=202)
    await receiver.wait(lambda r: len(r) >= 4)
    assert receiver.received[-1].json["data"] == {"n": 0}
    assert spec_verify(created["secret"], receiver.received[-1])
    await hooks.acme.call("POST", f"/webhooks/{created['id']}/replay", {"event_id": 10**12},
                          expect=404)
    await hooks.acme.call("POST", f"/webhooks/{created['id']}/replay", {"event_id": "1"},
                          expect=400)
    first = await hooks.acme.call("GET", f"/webhooks/{created['id']}/deliveries?limit=3",
                                  expect=200)
    assert first["deliveries"][0]["id"] == replay["delivery_id"]
    assert first["deliveries"][0]["replay"] is True
    assert first["deliveries"][0]["replay_of"] is None  # it had no original
    rest = await hooks.acme.call(
        "GET", f"/webhooks/{created['id']}/deliveries?limit=3&before={first['next_before']}",
        expect=200)
    ids = [d["id"] for d in first["deliveries"] + rest["deliveries"]]
    assert len(ids) == len(set(ids)) == 4 and ids == sorted(ids, reverse=True)
    assert rest["next_before"] is None


async def test_a_slow_endpoint_times_out_and_a_long_answer_is_cut(hooks_server, receiver, db):
    hooks = await hooks_server(**{"webhooks.timeout": 1.0, "webhooks.retry_base": 0.5})
    created = await hooks.acme.create(receiver.url("/in"))
    receiver.hold["/in"] = never = asyncio.Event()
    receiver.answer = lambda path: 500
    receiver.long_answer = True
    await append_event(db, "acme", {"n": 1})
    await receiver.wait(lambda r: len(r) >= 3)
    never.set()
    log = (await hooks.acme.deliveries(created["id"]))[0]["attempt_log"]
    assert log[0]["outcome"] == "failed" and log[0]["status_code"] is None
    assert log[0]["error"].startswith("TimeoutError")
    assert 1000 <= log[0]["duration_ms"] < 5000
    assert log[1]["status_code"] == 500 and len(log[1]["response"]) == 500
