"""Programmable mailboxes over real HTTP (issue 18): scoped keys, admin routes, send and
reply through the real server, its outbound worker and DKIM signing, received by the relay
sink on loopback; tenant isolation on every new route."""

from __future__ import annotations

import asyncio
import base64
from email import message_from_bytes
from email.policy import default

import aiohttp
import pytest

from smtpd_agent.outbound.queue import suppress
from smtpd_agent.store import directory
from smtpd_agent.store.apikeys import KEY_PREFIX, Scope, create_key, hash_key
from tests.http.test_api import bearer, deliver, message
from tests.outbound.conftest import fast, relay  # noqa: F401
from tests.outbound.test_relay import dkim_verify, publish_default_domain
from tests.support import DEFAULT_DOMAIN

pytestmark = pytest.mark.timeout(90)

ALL = frozenset(Scope)


async def open_mailbox(start_server, db, url, database_url, dns_server, **overrides):
    """The server sending through the sink at `url`, acme (support, sales) and globex
    (support), and keys: acme read / send / admin / all, globex all."""
    server = start_server(**fast(url, **overrides))
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_workspace(db, "globex", "Globex")
    await directory.add_agent(db, "acme", "support", display_name="Acme Support")
    await directory.add_agent(db, "acme", "sales")
    await directory.add_agent(db, "globex", "support")
    await publish_default_domain(server, database_url, dns_server)
    keys = {
        "read": (await create_key(db, "acme")).key,
        "send": (await create_key(db, "acme", scopes=frozenset({Scope.SEND}))).key,
        "admin": (await create_key(db, "acme", scopes=frozenset({Scope.ADMIN}))).key,
        "all": (await create_key(db, "acme", scopes=ALL)).key,
        "globex": (await create_key(db, "globex", scopes=ALL)).key,
    }
    return server, keys


@pytest.fixture
async def mailbox(start_server, db, relay, database_url, dns_server):  # noqa: F811
    sink, url = relay
    server, keys = await open_mailbox(start_server, db, url, database_url, dns_server)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield server, sink, keys, http


def parse(raw: bytes):
    return message_from_bytes(raw, policy=default)


async def call(http, method, url, key, **kwargs):
    async with http.request(method, url, headers={**bearer(key), **kwargs.pop("headers", {})},
                            **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers


async def test_send_reaches_the_sink_dkim_signed_and_sits_in_a_new_thread(mailbox, db,
                                                                          dns_server):
    server, sink, keys, http = mailbox
    base = f"{server.http_url}/api/v1/workspaces/acme"
    status, sent, _ = await call(http, "POST", f"{base}/agents/support/messages", keys["send"],
                                 json={"to": ["Bob@Example.org"], "cc": "carol@example.org",
                                       "bcc": ["dave@example.net"], "subject": "Your order",
                                       "text": "It ships today.", "html": "<p>It ships today.</p>"})
    assert status == 201, sent
    assert sent["status"] == "queued" and sent["delivery"]["status"] in {"queued", "sending",
                                                                           "sent"}
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert sorted(received.rcpt_tos) == ["bob@example.org", "carol@example.org",
                                         "dave@example.net"]
    mail = parse(received.data)
    assert mail["From"] == f"Acme Support <support@acme.{DEFAULT_DOMAIN}>"
    assert mail["To"] == "bob@example.org" and mail["Cc"] == "carol@example.org"
    assert mail["Bcc"] is None and b"dave@example.net" not in received.data
    assert mail["Subject"] == "Your order" and mail["Message-ID"] == sent["message_id"]
    assert mail["Auto-Submitted"] is None
    assert mail.get_body(("plain",)).get_content().strip() == "It ships today."
    assert mail.get_body(("html",)).get_content().strip() == "<p>It ships today.</p>"
    verdicts = await asyncio.to_thread(dkim_verify, received.data, dns_server.nameserver)
    assert sorted(verdicts) == [(b"ed25519-sha256", DEFAULT_DOMAIN.encode(), True),
                                (b"rsa-sha256", DEFAULT_DOMAIN.encode(), True)]
    # stored in a thread of its own, and its delivery state is on the message
    for _ in range(100):
        status, thread, _ = await call(http, "GET", f"{base}/threads/{sent['thread_id']}",
                                       keys["read"])
        if thread["messages"][0]["status"] == "sent":
            break
        await asyncio.sleep(0.05)
    [stored] = thread["messages"]
    assert (stored["id"], stored["direction"], stored["status"]) == (sent["id"], "outbound",
                                                                     "sent")
    assert stored["delivery"]["status"] == "sent"
    assert {(r["address"], r["state"]) for r in stored["delivery"]["recipients"]} == {
        ("bob@example.org", "sent"), ("carol@example.org", "sent"), ("dave@example.net", "sent")}
    assert thread["correspondent"] == "bob@example.org"


async def test_reply_answers_in_the_thread_with_its_headers(mailbox, db):
    server, sink, keys, http = mailbox
    raw = message("where is my order")
    assert await asyncio.to_thread(deliver, server.port, raw) == 250
    base = f"{server.http_url}/api/v1/workspaces/acme"
    _, inbox, _ = await call(http, "GET", f"{base}/agents/support/inbox", keys["read"])
    [thread] = inbox["threads"]
    status, sent, _ = await call(http, "POST", f"{base}/threads/{thread['id']}/reply",
                                 keys["send"], json={"text": "On its way."})
    assert status == 201, sent
    assert sent["thread_id"] == thread["id"]
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert received.rcpt_tos == ["alice@example.org"]
    mail = parse(received.data)
    assert mail["From"] == f"Acme Support <support@acme.{DEFAULT_DOMAIN}>"
    assert mail["To"] == "alice@example.org"
    assert mail["Subject"] == "Re: where is my order"
    assert mail["In-Reply-To"] == "<where-is-my-order@example.org>"
    assert mail["References"] == "<where-is-my-order@example.org>"
    _, thread_now, _ = await call(http, "GET", f"{base}/threads/{thread['id']}", keys["read"])
    assert [m["direction"] for m in thread_now["messages"]] == ["inbound", "outbound"]
    assert thread_now["message_count"] == 2
    # a second reply, to our own, keeps the chain; `to` given overrides the thread's
    status, second, _ = await call(http, "POST", f"{base}/threads/{thread['id']}/reply",
                                   keys["send"], json={"text": "PS", "to": "ops@example.org"})
    assert status == 201
    got = await asyncio.to_thread(sink.wait_for, 2)
    assert got[1].rcpt_tos == ["ops@example.org"]
    assert parse(got[1].data)["In-Reply-To"] == "<where-is-my-order@example.org>"


async def test_one_idempotency_key_sends_once(mailbox, db):
    server, sink, keys, http = mailbox
    url = f"{server.http_url}/api/v1/workspaces/acme/agents/sales/messages"
    body = {"to": "bob@example.org", "subject": "Hello", "text": "Once."}
    headers = {"Idempotency-Key": "order-42-hello"}
    first = await call(http, "POST", url, keys["send"], json=body, headers=headers)
    second = await call(http, "POST", url, keys["send"], json=body, headers=headers)
    assert first[0] == 201 and second[0] == 200
    assert second[1]["id"] == first[1]["id"] and second[2]["Idempotent-Replayed"] == "true"
    reused = await call(http, "POST", url, keys["send"], json={**body, "text": "Twice?"},
                        headers=headers)
    assert reused[0] == 422 and "Idempotency-Key" in reused[1]["error"]
    await asyncio.to_thread(sink.wait_for, 1)
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 1
    # concurrent retries with a fresh key: still one message
    headers = {"Idempotency-Key": "concurrent"}
    results = await asyncio.gather(*(call(http, "POST", url, keys["send"], json=body,
                                          headers=headers) for _ in range(5)))
    assert sorted(r[0] for r in results) == [200, 200, 200, 200, 201]
    assert len({r[1]["id"] for r in results}) == 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 2


async def test_multipart_attachments_are_sent(mailbox):
    server, sink, keys, http = mailbox
    form = aiohttp.FormData()
    form.add_field("to", "bob@example.org")
    form.add_field("subject", "Invoice")
    form.add_field("text", "Attached.")
    form.add_field("attachment", b"%PDF-1.4 fake", filename="invoice.pdf",
                   content_type="application/pdf")
    status, sent, _ = await call(
        http, "POST", f"{server.http_url}/api/v1/workspaces/acme/agents/support/messages",
        keys["send"], data=form)
    assert status == 201, sent
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    [part] = list(parse(received.data).iter_attachments())
    assert part.get_filename() == "invoice.pdf" and part.get_content_type() == "application/pdf"
    assert part.get_content() == b"%PDF-1.4 fake"
    # JSON with base64 attachments takes the same way
    status, _, _ = await call(
        http, "POST", f"{server.http_url}/api/v1/workspaces/acme/agents/support/messages",
        keys["send"], json={"to": "bob@example.org", "text": "x", "attachments": [
            {"filename": "a.txt", "content_type": "text/plain",
             "content_base64": base64.b64encode(b"hello").decode()}]})
    assert status == 201
    received = (await asyncio.to_thread(sink.wait_for, 2))[1]
    [part] = list(parse(received.data).iter_attachments())
    assert part.get_content() == "hello"


async def test_suppressed_recipient_is_a_422_naming_the_rule(mailbox, db):
    server, sink, keys, http = mailbox
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    await suppress(db, workspace_id, "gone@example.org", "hard_bounce", source="test")
    status, body, _ = await call(
        http, "POST", f"{server.http_url}/api/v1/workspaces/acme/agents/support/messages",
        keys["send"], json={"to": ["bob@example.org"], "bcc": "gone@example.org", "text": "x"})
    assert status == 422 and "suppression list" in body["error"]
    assert "gone@example.org" in body["error"] and body["rule"] == "suppression"
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert await db.fetchval("SELECT count(*) FROM threads") == 0
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_bad_requests_are_400_and_store_nothing(mailbox, db):
    server, sink, keys, http = mailbox
    url = f"{server.http_url}/api/v1/workspaces/acme/agents/support/messages"
    # each refusal says what is wrong with the request
    for body, says in (
            ({"to": "bob@example.org"}, "text or html"), ({"text": "x"}, "to: at least one"),
            ({"to": "not an address", "text": "x"}, "not an email address"),
            ({"to": "a@b.org\r\nBcc: x@y.org", "text": "x"}, "not an email address"),
            ({"to": 5, "text": "x"}, "to: a string or a list"),
            ({"to": [f"u{i}@example.org" for i in range(51)], "text": "x"},
             "at most 50 recipients"),
            ({"to": "bob@example.org", "text": "x", "subject": "a" * 999}, "subject: at most"),
            ({"to": "bob@example.org", "text": "x\x00"}, "text: a string"),
            ({"to": "bob@example.org", "text": "x", "attachments": [
                {"filename": "a", "content_type": "text/plain", "content_base64": "!!"}]},
             "not base64"),
            ([1, 2], "expected a JSON object")):
        status, answer, _ = await call(http, "POST", url, keys["send"], json=body)
        assert status == 400 and says in answer["error"], (body, answer)
    status, answer, _ = await call(http, "POST", url, keys["send"], data=b"{", headers={
        "Content-Type": "application/json"})
    assert status == 400 and "expected a JSON object" in answer["error"]
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_scopes_are_enforced_on_every_route(mailbox):
    server, sink, keys, http = mailbox
    base = f"{server.http_url}/api/v1/workspaces/acme"
    send = ("POST", f"{base}/agents/support/messages", {"to": "b@example.org", "text": "x"})
    reply = ("POST", f"{base}/threads/1/reply", {"text": "x"})
    admin = [("POST", f"{base}/agents", {"handle": "new"}), ("GET", f"{base}/keys", None),
             ("POST", f"{base}/keys", {"scopes": ["read"]}), ("DELETE", f"{base}/keys/1", None),
             ("PATCH", f"{base}/agents/support", {"reply_mode": "off"})]
    reads = [("GET", f"{base}/agents", None), ("GET", f"{base}/agents/support", None),
             ("GET", f"{base}/agents/support/inbox", None), ("GET", f"{base}/threads/1", None)]
    cases = {"read": [send, reply, *admin], "send": [*admin, *reads],
             "admin": [send, reply, *reads]}
    for key, forbidden in cases.items():
        for method, url, body in forbidden:
            status, answer, _ = await call(http, method, url, keys[key], json=body)
            assert status == 403, (key, method, url, answer)
            assert "scope" in answer["error"]
    # no key at all: 401 everywhere
    for method, url, body in [send, reply, *admin]:
        async with http.request(method, url, json=body) as response:
            assert response.status == 401


async def test_another_workspace_gets_404_on_every_new_route(mailbox, db):
    server, sink, keys, http = mailbox
    assert await asyncio.to_thread(deliver, server.port, message("private")) == 250
    thread_id = await db.fetchval("SELECT id FROM threads")
    acme = f"{server.http_url}/api/v1/workspaces/acme"
    globex = f"{server.http_url}/api/v1/workspaces/globex"
    key_id = await db.fetchval("SELECT min(id) FROM api_keys")
    routes = [("POST", f"{acme}/agents/support/messages", {"to": "b@example.org", "text": "x"}),
              ("POST", f"{acme}/threads/{thread_id}/reply", {"text": "x"}),
              ("POST", f"{acme}/agents", {"handle": "spy"}), ("GET", f"{acme}/keys", None),
              ("POST", f"{acme}/keys", {"scopes": ["admin"]}),
              ("DELETE", f"{acme}/keys/{key_id}", None),
              ("GET", f"{acme}/agents/support", None),
              ("PATCH", f"{acme}/agents/support", {"reply_mode": "off"}),
              # through its own slug, naming acme's rows
              ("POST", f"{globex}/threads/{thread_id}/reply", {"text": "x"}),
              ("DELETE", f"{globex}/keys/{key_id}", None),
              ("GET", f"{globex}/agents/sales", None),
              ("PATCH", f"{globex}/agents/sales", {"reply_mode": "off"}),
              ("POST", f"{globex}/agents/sales/messages", {"to": "b@example.org", "text": "x"})]
    for method, url, body in routes:
        status, answer, _ = await call(http, method, url, keys["globex"], json=body)
        assert status == 404, (method, url, answer)
    await asyncio.sleep(0.3)
    assert sink.received == []
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 0
    assert await db.fetchval("SELECT reply_mode FROM agents WHERE handle = 'support' AND "
                             "workspace_id = (SELECT id FROM workspaces WHERE slug = 'acme')") \
        == "auto"
    assert await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", key_id) is None


async def test_admin_manages_agents_and_keys(mailbox, db):
    server, sink, keys, http = mailbox
    base = f"{server.http_url}/api/v1/workspaces/acme"
    status, agent, _ = await call(http, "POST", f"{base}/agents", keys["admin"], json={
        "handle": "Billing", "display_name": "Acme Billing", "system_prompt": "Be brief.",
        "reply_mode": "draft"})
    assert status == 201, agent
    assert (agent["handle"], agent["reply_mode"], agent["system_prompt"]) == (
        "billing", "draft", "Be brief.")
    status, answer, _ = await call(http, "POST", f"{base}/agents", keys["admin"],
                                   json={"handle": "billing", "system_prompt": "Overwrite?"})
    assert status == 409 and "already exists" in answer["error"]
    status, answer, _ = await call(http, "POST", f"{base}/agents", keys["admin"],
                                   json={"handle": "bad handle!"})
    assert status == 400 and "handle" in answer["error"]
    status, answer, _ = await call(http, "POST", f"{base}/agents", keys["admin"],
                                   json={"handle": "x", "reply_mode": "sometimes"})
    assert status == 400 and "reply_mode" in answer["error"]
    # none of the refused ones changed or added an agent
    assert [(r["handle"], r["system_prompt"]) for r in await db.fetch(
        """SELECT handle, system_prompt FROM agents WHERE workspace_id =
               (SELECT id FROM workspaces WHERE slug = 'acme') ORDER BY handle""")] == [
        ("billing", "Be brief."), ("sales", None), ("support", None)]
    # the read key sees it, without its prompt
    _, listed, _ = await call(http, "GET", f"{base}/agents", keys["read"])
    assert "billing" in [a["handle"] for a in listed["agents"]]
    _, seen, _ = await call(http, "GET", f"{base}/agents/billing", keys["read"])
    assert "system_prompt" not in seen and seen["reply_mode"] == "draft"
    # update prompt and reply mode; 'off' also stops the agent job at the store
    status, changed, _ = await call(http, "PATCH", f"{base}/agents/billing", keys["admin"],
                                    json={"system_prompt": "Be kind.", "reply_mode": "off"})
    assert status == 200 and (changed["system_prompt"], changed["reply_mode"],
                              changed["auto_reply"]) == ("Be kind.", "off", False)
    # disable: it can no longer send
    status, changed, _ = await call(http, "PATCH", f"{base}/agents/billing", keys["admin"],
                                    json={"enabled": False})
    assert status == 200 and changed["enabled"] is False
    status, answer, _ = await call(http, "POST", f"{base}/agents/billing/messages", keys["all"],
                                   json={"to": "b@example.org", "text": "x"})
    assert status == 409 and "disabled" in answer["error"]
    # keys: create with scopes (shown once), list, use, revoke
    status, created, _ = await call(http, "POST", f"{base}/keys", keys["admin"],
                                    json={"name": "ci", "scopes": ["send", "read"]})
    assert status == 201 and created["scopes"] == ["read", "send"]
    assert created["key"].startswith("sak_")
    _, listed, _ = await call(http, "GET", f"{base}/keys", keys["admin"])
    mine = [k for k in listed["keys"] if k["id"] == created["id"]]
    assert mine and mine[0]["scopes"] == ["read", "send"] and "key" not in mine[0]
    status, _, _ = await call(http, "POST", f"{base}/agents/support/messages", created["key"],
                              json={"to": "b@example.org", "text": "x"})
    assert status == 201
    keys_before = await db.fetchval("SELECT count(*) FROM api_keys")
    status, answer, _ = await call(http, "POST", f"{base}/keys", keys["admin"],
                                   json={"scopes": ["root"]})
    assert status == 400 and "scopes" in answer["error"]
    assert await db.fetchval("SELECT count(*) FROM api_keys") == keys_before
    async with http.delete(f"{base}/keys/{created['id']}", headers=bearer(keys["admin"])) as r:
        assert r.status == 204
    status, _, _ = await call(http, "GET", f"{base}/agents", created["key"])
    assert status == 401


async def test_a_key_made_before_scopes_can_read_only(mailbox, db):
    """Keys of before migration 0014 have no scopes written: the column's default, read."""
    server, sink, keys, http = mailbox
    old = KEY_PREFIX + "made-before-scopes-existed-0123456789"
    await db.execute(
        """INSERT INTO api_keys (workspace_id, prefix, key_hash)
           VALUES ((SELECT id FROM workspaces WHERE slug = 'acme'), 'sak_ma', $1)""",
        hash_key(old))
    base = f"{server.http_url}/api/v1/workspaces/acme"
    status, _, _ = await call(http, "GET", f"{base}/agents", old)
    assert status == 200
    status, answer, _ = await call(http, "POST", f"{base}/agents/support/messages", old,
                                   json={"to": "b@example.org", "text": "x"})
    assert status == 403 and "scope" in answer["error"]
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_a_blocked_recipient_is_a_422_naming_the_allow_block_rule(mailbox, db):
    from smtpd_agent.acl import AclAction, AclDirection
    from smtpd_agent.store.acl import add_entry
    server, sink, keys, http = mailbox
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    await add_entry(db, workspace_id, None, AclAction.BLOCK, AclDirection.SEND, "@rival.example")
    status, body, _ = await call(
        http, "POST", f"{server.http_url}/api/v1/workspaces/acme/agents/support/messages",
        keys["send"], json={"to": ["bob@example.org"], "cc": "ceo@rival.example", "text": "x"})
    assert status == 422 and "allow/block" in body["error"] and "rival.example" in body["error"]
    assert body["rule"] == "acl"
    # the refusal is the shared decision the built-in agent's replies get (agent/recipients.py)
    from smtpd_agent.agent import recipients
    agent_id = await db.fetchval("SELECT id FROM agents WHERE handle = 'support' AND "
                                 "workspace_id = $1", workspace_id)
    shared = await recipients.check(db, workspace_id, agent_id,
                                    ["bob@example.org", "ceo@rival.example"])
    assert shared is not None and (body["error"], body["rule"]) == (shared.error,
                                                                    shared.rule.value)
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0
