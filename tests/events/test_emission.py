"""Every emission point writes its event in the transaction of its cause, in the right
workspace: mail over real SMTP, the group commit, quarantine and release, the outbound
worker against the relay sink (deferred, sent, bounced), a DSN over SMTP, SES delivery
and complaint notifications, drafts over the API, domain checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from smtpd_agent.config import DatabaseSettings
from smtpd_agent.outbound.bounces import BounceProcessor
from smtpd_agent.store import directory, quarantine
from smtpd_agent.store import domains as domain_store
from smtpd_agent.store.apikeys import Scope, create_key
from smtpd_agent.store.database import create_pool, migrate
from smtpd_agent.store.messages import GroupCommit, Verdicts
from tests.http.test_api import bearer, deliver, message
from tests.integration.test_group_commit import VERDICTS, inbound, mailbox
from tests.outbound.conftest import fast, make_agent, relay, store_reply, wait_state  # noqa: F401
from tests.outbound.test_relay import dsn_for
from tests.support import Dialogue, smtp_send

pytestmark = pytest.mark.timeout(90)


async def events_of(db: asyncpg.Connection, workspace: str) -> list[asyncpg.Record]:
    return await db.fetch(
        """SELECT e.id, e.type, e.thread_id, (e.event_payload)::text AS payload,
                  e.txid::text AS txid
             FROM events e JOIN workspaces w ON w.id = e.workspace_id
            WHERE w.slug = $1 ORDER BY e.id""", workspace)


def payload(row: asyncpg.Record) -> dict:
    return json.loads(row["payload"])


async def wait_events(db: asyncpg.Connection, workspace: str, count: int,
                      timeout: float = 15.0) -> list[asyncpg.Record]:
    for _ in range(int(timeout / 0.05)):
        found = await events_of(db, workspace)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{workspace}: {[r['type'] for r in await events_of(db, workspace)]}")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, DatabaseSettings(pool_max=4))
    yield pool
    await pool.close()


async def test_mail_over_smtp_is_announced_in_its_own_commit(server, db):
    raw = message("where is my order")
    assert await asyncio.to_thread(deliver, server.port, raw) == 250
    [event] = await events_of(db, "acme")
    assert event["type"] == "message.received"
    stored = await db.fetchrow("SELECT id, thread_id, extracted_text, xmin::text AS xmin "
                               "FROM messages")
    # the event row was written by the transaction that wrote the message
    assert int(event["txid"]) % 2**32 == int(stored["xmin"])
    data = payload(event)
    assert data["workspace"] == "acme" and data["agent"] == "support"
    assert data["message"]["id"] == stored["id"] and event["thread_id"] == stored["thread_id"]
    assert data["message"]["subject"] == "where is my order"
    assert data["envelope"] == {"mail_from": "alice@example.org",
                                "rcpt_to": "support@acme.agents.test"}
    assert data["snippet"] == "body of where is my order" and not data["text_truncated"]
    assert stored["extracted_text"] and data["text"] == stored["extracted_text"]
    assert data["links"]["thread"] == f"/api/v1/workspaces/acme/threads/{stored['thread_id']}"
    assert data["links"]["raw"] == f"/api/v1/workspaces/acme/messages/{stored['id']}/raw"
    assert "html_body" not in json.dumps(data) and "raw" not in data["message"]
    # the row itself does not repeat the body: the text is joined when the event is read
    stored_payload = json.loads(await db.fetchval("SELECT payload::text FROM events"))
    assert "text" not in stored_payload and "snippet" not in stored_payload
    assert await events_of(db, "globex") == []


async def test_a_store_rolled_back_after_its_event_leaves_no_event(server, db):
    """A failure after the event row was written (a trigger on events, in the same
    transaction): the sender gets 4xx, and neither the message nor its event exists."""
    await db.execute(
        """CREATE FUNCTION fail_after_event() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.payload->'message'->>'subject' = 'roll me back' THEN
                   RAISE EXCEPTION 'injected failure after the event';
               END IF;
               RETURN NULL;
           END $$;
           CREATE TRIGGER fail_after_event AFTER INSERT ON events
               FOR EACH ROW EXECUTE FUNCTION fail_after_event();""")
    code = await asyncio.to_thread(deliver_code, server.port, message("roll me back"))
    assert 400 <= code < 500
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert await events_of(db, "acme") == []
    assert await asyncio.to_thread(deliver, server.port, message("kept")) == 250
    assert [r["type"] for r in await events_of(db, "acme")] == ["message.received"]


def deliver_code(port: int, raw: bytes) -> int:
    dialogue = Dialogue.open(port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    dialogue.command("MAIL FROM:<alice@example.org>")
    assert dialogue.command("RCPT TO:<support@acme.agents.test>")[0] == 250
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, _ = dialogue.reply()
    dialogue.command("QUIT")
    return code


async def test_group_commit_quarantine_and_release(pool):
    async with pool.acquire() as connection:
        await migrate(connection)
    await directory.add_workspace(pool, "acme")
    await directory.add_agent(pool, "acme", "support")
    support = await mailbox(pool, "support")
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    stored = await asyncio.gather(*(store.store(inbound(i, support), VERDICTS, f"q{i}")
                                     for i in range(20)))
    # every message of a batch has its event, written by the batch's transaction
    assert await pool.fetchval(
        """SELECT count(*) FROM messages m JOIN events e
               ON (e.payload->'message'->>'id')::bigint = m.id
              AND e.txid::text::bigint % 4294967296 = m.xmin::text::bigint
            WHERE e.type = 'message.received'""") == 20
    [held] = await store.store(inbound(99, support), Verdicts(quarantined=True, dmarc="fail"),
                               "q99")
    row = await pool.fetchrow("SELECT type, payload::text AS p FROM events ORDER BY id DESC "
                              "LIMIT 1")
    assert row["type"] == "message.quarantined"
    assert json.loads(row["p"])["message"]["quarantined"] is True
    await quarantine.release(pool, held.id, "acme")
    row = await pool.fetchrow("SELECT type, payload::text AS p FROM events ORDER BY id DESC "
                              "LIMIT 1")
    assert row["type"] == "message.received" and json.loads(row["p"])["released"] is True
    assert json.loads(row["p"])["message"]["id"] == held.id
    assert len(stored) == 20


async def test_outbound_deferred_sent_bounced_delivered_complained(start_server, db, relay,
                                                                    pool):
    sink, url = relay
    sink.script = ["451 4.3.0 try later"]
    server = start_server(**fast(url))
    agent = await make_agent(db)
    await make_agent(db, "globex")
    sent = await store_reply(db, agent, "bob@example.org")
    await wait_state(db, sent, {"sent"})
    found = await wait_events(db, "acme", 2)
    assert [r["type"] for r in found] == ["message.deferred", "message.sent"]
    deferred, done = map(payload, found)
    assert deferred["message"]["id"] == sent and deferred["delivery"]["retry_in"] == 0.3
    assert done["delivery"]["recipients"][0]["code"] == 250
    assert done["message"]["direction"] == "outbound"

    # a DSN to the VERP address, over SMTP
    verp = (await asyncio.to_thread(sink.wait_for, 1))[0].mail_from
    code, line = await smtp_send(server.port, dsn_for(verp, "bob@example.org"), "", [verp])
    assert code == 250, line
    bounced = payload((await wait_events(db, "acme", 3))[2])
    assert {k: bounced["bounce"][k] for k in ("address", "status", "source")} == \
        {"address": "bob@example.org", "status": "5.1.1", "source": "dsn"}
    assert "user unknown" in bounced["bounce"]["detail"] and bounced["message"]["id"] == sent

    # SES feedback about a delivery that SES sent
    other = await store_reply(db, agent, "carol@example.org")
    await wait_state(db, other, {"sent"})
    await db.execute("UPDATE deliveries SET provider_message_id = 'ses-1' WHERE message_id = $1",
                     other)
    processor = BounceProcessor(pool)
    for kind, body in (("delivery", {"delivery": {"recipients": ["carol@example.org"],
                                                  "smtpResponse": "250 ok"}}),
                       ("complaint", {"complaint": {
                           "complainedRecipients": [{"emailAddress": "carol@example.org"}],
                           "complaintFeedbackType": "abuse"}})):
        await processor.receive_ses(json.dumps(
            {"notificationType": kind.capitalize(), "mail": {"messageId": "ses-1"}, **body}))
    found = await wait_events(db, "acme", 6)
    assert [r["type"] for r in found[3:]] == ["message.sent", "message.delivered",
                                              "message.complained"]
    assert payload(found[5])["recipient"]["address"] == "carol@example.org"
    assert all(payload(r)["message"]["id"] == other for r in found[3:])

    # a 550 at the relay
    sink.script = ["550 5.1.1 <gone@example.org>: Recipient address rejected"]
    gone = await store_reply(db, agent, "gone@example.org")
    await wait_state(db, gone, {"bounced"})
    last = (await wait_events(db, "acme", 7))[6]
    assert last["type"] == "message.bounced"
    assert payload(last)["delivery"]["state"] == "bounced"
    assert await events_of(db, "globex") == []


async def test_drafts_and_domains_announce_themselves(server, db, pool):
    key = (await create_key(db, "acme", scopes=frozenset(Scope))).key
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.http_url}/api/v1/workspaces/acme/agents/support/drafts",
            headers=bearer(key),
            json={"to": ["bob@example.org"], "bcc": ["secret@example.org"],
                  "subject": "a draft", "text": "draft text " * 1000}) as response:
        assert response.status == 201, await response.text()
        draft = await response.json()
    [event] = await events_of(db, "acme")
    data = payload(event)
    assert event["type"] == "draft.created" and data["draft"]["id"] == draft["id"]
    assert data["draft"]["to"] == ["bob@example.org"] and "secret@" not in event["payload"]
    assert len(data["text"]) == 8000 and data["text_truncated"]
    assert data["links"]["draft"] == f"/api/v1/workspaces/acme/drafts/{draft['id']}"

    domain = await domain_store.add_domain(pool, "globex", "mail.globex.test", "token",
                                            "mail.mail.globex.test")
    checked = await domain_store.record_check(pool, domain, [])
    await domain_store.record_check(pool, checked, [])  # no change: no event
    await domain_store.record_check(pool, checked, ["MX"])
    found = await events_of(db, "globex")
    assert [r["type"] for r in found] == ["domain.verified", "domain.degraded"]
    assert payload(found[1])["domain"]["failing"] == ["MX"]
    assert payload(found[1])["domain"]["name"] == "mail.globex.test"
    assert [r["type"] for r in await events_of(db, "acme")] == ["draft.created"]
