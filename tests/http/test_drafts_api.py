"""Drafts and approval over real HTTP and the CLI (issue 18): reply_mode 'draft' makes the
built-in agent write a draft and send nothing; sending the draft delivers it through the
relay sink; discarding leaves nothing queued; drafts written over the API; isolation."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.agent.conftest import publish_spf
from tests.http.test_api import deliver, message
from tests.http.test_mailbox_api import call, open_mailbox, parse
from tests.outbound.conftest import relay  # noqa: F401

pytestmark = pytest.mark.timeout(120)

CANNED = "Thanks for writing. We will look into it."


@pytest.fixture
async def drafting(start_server, db, relay, database_url, dns_server):  # noqa: F811
    """The mailbox server whose built-in agent answers with agent.offline_reply (no LLM)."""
    sink, url = relay
    # the built-in agent answers only an authenticated sender: example.org passes SPF
    publish_spf(dns_server, "example.org")
    server, keys = await open_mailbox(start_server, db, url, database_url, dns_server,
                                      **{"agent.offline_reply": CANNED,
                                         "agent.poll_interval": 0.05})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield server, sink, keys, http


async def jobs_done(db, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if await db.fetchval("SELECT count(*) FROM agent_jobs WHERE status = 'done'") >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(await db.fetch("SELECT status, skip_reason FROM agent_jobs"))


async def test_draft_mode_writes_a_draft_sends_nothing_until_sent(drafting, db):
    server, sink, keys, http = drafting
    base = f"{server.http_url}/api/v1/workspaces/acme"
    status, agent, _ = await call(http, "PATCH", f"{base}/agents/support", keys["admin"],
                                  json={"reply_mode": "draft"})
    assert status == 200 and agent["reply_mode"] == "draft"
    assert await asyncio.to_thread(deliver, server.port, message("refund please")) == 250
    await jobs_done(db, 1)
    _, listed, _ = await call(http, "GET", f"{base}/drafts?agent=support", keys["read"])
    [draft] = listed["drafts"]
    assert (draft["origin"], draft["to"], draft["subject"], draft["status"]) == (
        "agent", ["alice@example.org"], "Re: refund please", "draft")
    assert draft["text"].strip() == CANNED and draft["thread_id"]
    # announced in the outbox: the mail, then the agent's draft (issue 19)
    announced = await db.fetch("SELECT type, thread_id, payload->'draft'->>'id' AS draft, "
                               "payload->'draft'->>'origin' AS origin FROM events ORDER BY id")
    assert [(e["type"], e["thread_id"]) for e in announced] == [
        ("message.received", draft["thread_id"]), ("draft.created", draft["thread_id"])]
    assert (announced[1]["draft"], announced[1]["origin"]) == (str(draft["id"]), "agent")
    await asyncio.sleep(0.5)
    assert sink.received == []
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 0
    # sending it delivers it, in the thread, answering the inbound message
    status, sent, _ = await call(http, "POST", f"{base}/drafts/{draft['id']}/send",
                                 keys["send"])
    assert status == 201, sent
    assert sent["thread_id"] == draft["thread_id"] and sent["status"] == "queued"
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert received.rcpt_tos == ["alice@example.org"]
    mail = parse(received.data)
    assert mail["In-Reply-To"] == "<refund-please@example.org>"
    assert mail["Subject"] == "Re: refund please"
    assert CANNED in mail.get_body(("plain",)).get_content()
    _, seen, _ = await call(http, "GET", f"{base}/drafts/{draft['id']}", keys["read"])
    assert (seen["status"], seen["sent_message_id"]) == ("sent", sent["id"])
    status, _, _ = await call(http, "POST", f"{base}/drafts/{draft['id']}/send", keys["send"])
    assert status == 409
    # a second inbound mail: a second draft, discarded: nothing more is queued
    assert await asyncio.to_thread(deliver, server.port, message("another thing")) == 250
    await jobs_done(db, 2)
    _, listed, _ = await call(http, "GET", f"{base}/drafts", keys["read"])
    [second] = listed["drafts"]
    async with http.delete(f"{base}/drafts/{second['id']}",
                           headers={"Authorization": f"Bearer {keys['send']}"}) as response:
        assert response.status == 204
    status, _, _ = await call(http, "POST", f"{base}/drafts/{second['id']}/send", keys["send"])
    assert status == 409
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 1
    _, listed, _ = await call(http, "GET", f"{base}/drafts", keys["read"])
    assert listed["drafts"] == []


async def test_reply_mode_off_writes_nothing(drafting, db):
    server, sink, keys, http = drafting
    base = f"{server.http_url}/api/v1/workspaces/acme"
    await call(http, "PATCH", f"{base}/agents/support", keys["admin"], json={"reply_mode": "off"})
    await asyncio.sleep(0.3)  # the router's mailbox cache (routing.cache_ttl) takes it up
    assert await asyncio.to_thread(deliver, server.port, message("hello there")) == 250
    # the message is stored, and no job was made for it in the same transaction (a job that
    # merely had not run yet would also leave nothing sent)
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'inbound'") == 1
    assert await db.fetchval("SELECT count(*) FROM agent_jobs") == 0
    await asyncio.sleep(0.5)
    assert await db.fetchval("SELECT count(*) FROM drafts") == 0
    assert sink.received == []


async def test_api_drafts_create_update_send_and_isolation(drafting, db):
    server, sink, keys, http = drafting
    base = f"{server.http_url}/api/v1/workspaces/acme"
    status, draft, _ = await call(http, "POST", f"{base}/agents/sales/drafts", keys["send"],
                                  json={"to": "bob@example.org", "subject": "Quote",
                                        "text": "Draft one."})
    assert status == 201 and draft["origin"] == "api" and draft["thread_id"] is None
    status, draft, _ = await call(http, "PATCH", f"{base}/drafts/{draft['id']}", keys["send"],
                                  json={"subject": "Your quote", "cc": ["ann@example.org"]})
    assert status == 200 and (draft["subject"], draft["cc"], draft["text"]) == (
        "Your quote", ["ann@example.org"], "Draft one.")
    status, answer, _ = await call(http, "PATCH", f"{base}/drafts/{draft['id']}", keys["send"],
                                   json={"to": "not-an-address", "text": "changed?"})
    assert status == 400 and "not an email address" in answer["error"]
    _, unchanged, _ = await call(http, "GET", f"{base}/drafts/{draft['id']}", keys["read"])
    assert (unchanged["to"], unchanged["text"]) == (["bob@example.org"], "Draft one.")
    # another workspace: 404 on every drafts route; a read key: 403 on writes
    globex = f"{server.http_url}/api/v1/workspaces/globex"
    for method, url, body in [("GET", f"{base}/drafts", None),
                              ("GET", f"{globex}/drafts/{draft['id']}", None),
                              ("PATCH", f"{globex}/drafts/{draft['id']}", {"text": "x"}),
                              ("POST", f"{globex}/drafts/{draft['id']}/send", None),
                              ("DELETE", f"{globex}/drafts/{draft['id']}", None),
                              ("POST", f"{base}/agents/sales/drafts", {"text": "x"})]:
        status, answer, _ = await call(http, method, url, keys["globex"], json=body)
        assert status == 404, (method, url, answer)
    for method, url, body in [("PATCH", f"{base}/drafts/{draft['id']}", {"text": "x"}),
                              ("POST", f"{base}/drafts/{draft['id']}/send", None),
                              ("DELETE", f"{base}/drafts/{draft['id']}", None),
                              ("POST", f"{base}/agents/sales/drafts", {"text": "x"})]:
        status, _, _ = await call(http, method, url, keys["read"], json=body)
        assert status == 403
    _, unchanged, _ = await call(http, "GET", f"{base}/drafts/{draft['id']}", keys["read"])
    assert (unchanged["status"], unchanged["text"]) == ("draft", "Draft one.")
    assert await db.fetchval("SELECT count(*) FROM drafts") == 1
    # a globex thread is not a thread for an acme draft, nor is a thread of another agent
    # (threads made directly: mail in would make the built-in agent answer)
    globex_thread, support_thread = [await db.fetchval(
        """INSERT INTO threads (workspace_id, agent_id, subject, correspondent)
           SELECT a.workspace_id, a.id, 'elsewhere', 'bob@example.org'
             FROM agents a JOIN workspaces w ON w.id = a.workspace_id
            WHERE w.slug = $1 AND a.handle = 'support' RETURNING id""", slug)
        for slug in ("globex", "acme")]
    for thread_id in (globex_thread, support_thread):
        status, answer, _ = await call(http, "POST", f"{base}/agents/sales/drafts",
                                       keys["send"], json={"text": "x", "thread_id": thread_id})
        assert status == 404 and "no such thread" in answer["error"], answer
    assert await db.fetchval("SELECT count(*) FROM drafts WHERE origin = 'api'") == 1
    status, sent, _ = await call(http, "POST", f"{base}/drafts/{draft['id']}/send",
                                 keys["send"])
    assert status == 201
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert sorted(received.rcpt_tos) == ["ann@example.org", "bob@example.org"]
    assert parse(received.data)["Subject"] == "Your quote"
    assert parse(received.data)["From"] == "sales@acme.agents.test"


async def test_drafts_cli_lists_sends_and_discards(drafting, db, database_url, tmp_path):
    server, sink, keys, http = drafting
    base = f"{server.http_url}/api/v1/workspaces/acme"
    ids = []
    for text in ("first", "second"):
        _, draft, _ = await call(http, "POST", f"{base}/agents/support/drafts", keys["send"],
                                 json={"to": "bob@example.org", "subject": text, "text": text})
        ids.append(draft["id"])

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "smtpd_agent", "drafts", *args,
                               "--workspace", "acme", "--state-dir", str(tmp_path / "cli")],
                              env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60, check=False)

    listed = await asyncio.to_thread(cli, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [d["id"] for d in json.loads(listed.stdout)] == ids
    sent = await asyncio.to_thread(cli, "send", str(ids[0]))
    assert sent.returncode == 0 and "queued for delivery" in sent.stdout, sent.stderr
    discarded = await asyncio.to_thread(cli, "discard", str(ids[1]))
    assert discarded.returncode == 0, discarded.stderr
    again = await asyncio.to_thread(cli, "send", str(ids[1]))
    assert again.returncode == 1 and "discarded" in again.stderr
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert parse(received.data)["Subject"] == "first"
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1
    listed = await asyncio.to_thread(cli, "list", "--json")
    assert json.loads(listed.stdout) == []
