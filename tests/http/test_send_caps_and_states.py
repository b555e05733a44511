"""What an API send may do and what became of it (issue 18 with issue 17's caps), over real
HTTP, the real outbound worker and the relay sink on loopback: the built-in agent's caps
refuse an API send, reply or draft send (429 + Retry-After while a cap frees up with time,
422 when it never will), naming the rule, with nothing stored or queued; and a sent
message shows its delivery state as the sink answers: 250 sent, 4xx deferred with its
next attempt, 5xx bounced, failed when retries run out; a suppressed recipient is refused
before anything is queued."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import aiohttp
import pytest

from smtpd_agent.outbound.queue import suppress
from tests.http.test_api import deliver, message
from tests.http.test_mailbox_api import call, open_mailbox
from tests.outbound.conftest import relay  # noqa: F401

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http_sessions():
    sessions: list[aiohttp.ClientSession] = []
    yield sessions
    for session in sessions:
        await session.close()
    await asyncio.sleep(0.05)  # the connector's transports finish closing on this loop


async def started(start_server, db, relay, database_url, dns_server,  # noqa: F811
                  sessions, **overrides):
    sink, url = relay
    server, keys = await open_mailbox(start_server, db, url, database_url, dns_server,
                                      **overrides)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    sessions.append(session)
    return server, sink, keys, session, f"{server.http_url}/api/v1/workspaces/acme"


async def counts(db) -> tuple[int, int]:
    return (await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'"),
            await db.fetchval("SELECT count(*) FROM deliveries"))


async def test_the_workspace_cap_refuses_api_sends_replies_and_drafts_with_429(
        start_server, db, relay, database_url, dns_server, http_sessions):  # noqa: F811
    server, sink, keys, http, base = await started(
        start_server, db, relay, database_url, dns_server, http_sessions,
        **{"agent.workspace_replies_per_hour": 2})
    assert await asyncio.to_thread(deliver, server.port, message("capped thread")) == 250
    thread_id = await db.fetchval("SELECT id FROM threads")
    # a draft written while there is room, sent when there is none
    status, draft, _ = await call(http, "POST", f"{base}/agents/sales/drafts", keys["send"],
                                  json={"to": "erin@example.org", "text": "later"})
    assert status == 201
    for to in ("bob@example.org", "carol@example.org"):
        status, sent, _ = await call(http, "POST", f"{base}/agents/support/messages",
                                     keys["send"], json={"to": to, "text": "hello"})
        assert status == 201, sent
    before = await counts(db)
    assert before == (2, 2)
    refused = [
        await call(http, "POST", f"{base}/agents/sales/messages", keys["send"],
                   json={"to": "dave@example.org", "text": "one more"}),
        await call(http, "POST", f"{base}/threads/{thread_id}/reply", keys["send"],
                   json={"text": "one more"}),
        await call(http, "POST", f"{base}/drafts/{draft['id']}/send", keys["send"]),
    ]
    for status, body, headers in refused:
        assert status == 429, body
        assert body["rule"] == "agent.workspace_replies_per_hour"
        assert body["error"] == ("cap: 2 replies per hour from this workspace "
                                 "(agent.workspace_replies_per_hour)")
        # the oldest of the two sends leaves the hour's window in just under an hour
        assert 3000 < int(headers["Retry-After"]) <= 3600
    assert await counts(db) == before
    _, seen, _ = await call(http, "GET", f"{base}/drafts/{draft['id']}", keys["read"])
    assert (seen["status"], seen["sent_message_id"]) == ("draft", None)
    await asyncio.to_thread(sink.wait_for, 2)
    await asyncio.sleep(0.3)
    assert sorted(r.rcpt_tos[0] for r in sink.received) == ["bob@example.org",
                                                            "carol@example.org"]


async def test_the_per_correspondent_rate_counts_every_recipient(
        start_server, db, relay, database_url, dns_server, http_sessions):  # noqa: F811
    server, sink, keys, http, base = await started(
        start_server, db, relay, database_url, dns_server, http_sessions,
        **{"agent.correspondent_replies_per_hour": 1})
    url = f"{base}/agents/support/messages"
    status, _, _ = await call(http, "POST", url, keys["send"],
                              json={"to": "bob@example.org", "text": "first"})
    assert status == 201
    # bob again, even as the second recipient: refused; another agent of the workspace may
    status, body, headers = await call(http, "POST", url, keys["send"], json={
        "to": ["carol@example.org", "Bob@Example.org"], "text": "second"})
    assert status == 429 and body["rule"] == "agent.correspondent_replies_per_hour", body
    assert "Retry-After" in headers
    status, _, _ = await call(http, "POST", f"{base}/agents/sales/messages", keys["send"],
                              json={"to": "bob@example.org", "text": "from sales"})
    assert status == 201
    assert await counts(db) == (2, 2)


async def test_first_time_recipients_beyond_the_cap_are_a_422_that_never_frees(
        start_server, db, relay, database_url, dns_server, http_sessions):  # noqa: F811
    server, sink, keys, http, base = await started(
        start_server, db, relay, database_url, dns_server, http_sessions,
        **{"agent.new_recipients_per_day": 2})
    url = f"{base}/agents/support/messages"
    # three new addresses in one message: more than a day's cap, waiting cannot help
    status, body, headers = await call(http, "POST", url, keys["send"], json={
        "to": "a@example.org", "cc": ["b@example.org"], "bcc": ["c@example.org"], "text": "x"})
    assert status == 422 and body["rule"] == "agent.new_recipients_per_day", body
    assert "Retry-After" not in headers
    assert await counts(db) == (0, 0)
    status, _, _ = await call(http, "POST", url, keys["send"],
                              json={"to": ["a@example.org", "b@example.org"], "text": "x"})
    assert status == 201
    assert {r["address"] for r in await db.fetch("SELECT address FROM agent_recipients")} == {
        "a@example.org", "b@example.org"}
    # written to before: not new, so not capped; anyone new now is, until the day is over
    status, _, _ = await call(http, "POST", url, keys["send"],
                              json={"to": "a@example.org", "text": "again"})
    assert status == 201
    status, body, headers = await call(http, "POST", url, keys["send"],
                                       json={"to": "new@example.org", "text": "x"})
    assert status == 429 and body["rule"] == "agent.new_recipients_per_day"
    assert 86000 < int(headers["Retry-After"]) <= 86400
    assert await counts(db) == (2, 2)


async def test_a_suppressed_recipient_is_refused_before_anything_is_queued(
        start_server, db, relay, database_url, dns_server, http_sessions):  # noqa: F811
    server, sink, keys, http, base = await started(
        start_server, db, relay, database_url, dns_server, http_sessions)
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    await suppress(db, workspace_id, "gone@example.org", "complaint", source="test")
    status, body, _ = await call(http, "POST", f"{base}/agents/support/messages", keys["send"],
                                 json={"to": "bob@example.org", "cc": "Gone@Example.org",
                                       "text": "x"})
    assert status == 422 and body["rule"] == "suppression", body
    assert "gone@example.org" in body["error"]
    assert await counts(db) == (0, 0)
    assert await db.fetchval("SELECT count(*) FROM agent_recipients") == 0


async def state_of(http, base, key, message_id, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        status, found, _ = await call(http, "GET", f"{base}/messages/{message_id}", key)
        assert status == 200, found
        if found["status"] in states or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_delivery_states_follow_what_the_relay_answers(
        start_server, db, relay, database_url, dns_server, http_sessions):  # noqa: F811
    # retries far apart: a deferred message stays deferred while the test looks at it
    server, sink, keys, http, base = await started(
        start_server, db, relay, database_url, dns_server, http_sessions,
        **{"outbound.retry_base": 600.0, "outbound.retry_max": 1200.0})
    url = f"{base}/agents/support/messages"

    async def send(to: str) -> dict:
        status, sent, _ = await call(http, "POST", url, keys["send"],
                                     json={"to": to, "text": "state?"})
        assert status == 201, sent
        assert sent["status"] == "queued" and sent["delivery"]["status"] in {
            "queued", "sending", "sent", "deferred", "bounced"}
        return sent

    # 250: sent, the recipient with its code
    sent = await send("ok@example.org")
    found = await state_of(http, base, keys["read"], sent["id"], {"sent"})
    assert (found["status"], found["delivery"]["status"]) == ("sent", "sent")
    assert found["delivery"]["next_attempt_at"] is None
    assert [(r["address"], r["state"], r["code"]) for r in found["delivery"]["recipients"]] \
        == [("ok@example.org", "sent", 250)]

    # 4xx at RCPT: deferred, with the next attempt about retry_base ahead
    sink.script.append("451 4.3.0 try again later")
    sent = await send("later@example.org")
    found = await state_of(http, base, keys["read"], sent["id"], {"deferred"})
    delivery = found["delivery"]
    assert (found["status"], delivery["status"], delivery["attempts"]) == ("deferred",
                                                                           "deferred", 1)
    assert [(r["state"], r["code"]) for r in delivery["recipients"]] == [("deferred", 451)]
    ahead = (datetime.fromisoformat(delivery["next_attempt_at"])
             - datetime.fromisoformat(delivery["last_attempt_at"])).total_seconds()
    assert 590 < ahead < 610, delivery
    assert "451" in delivery["last_error"]

    # 5xx about the address at RCPT: bounced, and the address suppressed
    sink.script.append("550 5.1.1 no such user")
    sent = await send("nobody@example.org")
    found = await state_of(http, base, keys["read"], sent["id"], {"bounced"})
    assert (found["status"], found["delivery"]["status"]) == ("bounced", "bounced")
    assert [(r["state"], r["code"], r["enhanced"]) for r in found["delivery"]["recipients"]] \
        == [("bounced", 550, "5.1.1")]
    assert found["delivery"]["finished_at"] is not None
    # ... so the next send to it is refused before queueing
    status, body, _ = await call(http, "POST", url, keys["send"],
                                 json={"to": "nobody@example.org", "text": "again"})
    assert status == 422 and body["rule"] == "suppression"

    # 5xx to the content at DATA: bounced too, nobody suppressed
    sink.data_script.append("554 5.6.0 content refused")
    sent = await send("strict@example.org")
    found = await state_of(http, base, keys["read"], sent["id"], {"bounced"})
    assert found["delivery"]["status"] == "bounced"
    assert await db.fetchval("SELECT count(*) FROM suppressions WHERE address = $1",
                             "strict@example.org") == 0
    assert len(sink.received) == 1


async def test_a_delivery_that_runs_out_of_retries_is_failed(
        start_server, db, relay, database_url, dns_server, http_sessions):  # noqa: F811
    # the next retry would come after give_up_after: the first 4xx ends it
    server, sink, keys, http, base = await started(
        start_server, db, relay, database_url, dns_server, http_sessions,
        **{"outbound.retry_base": 30.0, "outbound.retry_max": 60.0,
           "outbound.give_up_after": 10.0})
    sink.script.append("452 4.2.2 mailbox full")
    status, sent, _ = await call(http, "POST", f"{base}/agents/support/messages", keys["send"],
                                 json={"to": "busy@example.org", "text": "x"})
    assert status == 201
    found = await state_of(http, base, keys["read"], sent["id"], {"failed"})
    delivery = found["delivery"]
    assert (found["status"], delivery["status"]) == ("failed", "failed")
    assert delivery["next_attempt_at"] is None and delivery["finished_at"] is not None
    assert delivery["last_error"].startswith("gave up after 1 attempts")
    assert [(r["state"], r["code"]) for r in delivery["recipients"]] == [("failed", 452)]
    # another workspace's key cannot read it
    status, _, _ = await call(http, "GET", f"{base.replace('acme', 'globex')}/messages/"
                              f"{sent['id']}", keys["globex"])
    assert status == 404
    status, _, _ = await call(http, "GET", f"{base}/messages/{sent['id']}", keys["globex"])
    assert status == 404
