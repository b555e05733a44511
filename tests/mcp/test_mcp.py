"""The MCP server (issue 19) through the official SDK's own client: over stdio with the real
`smtpd-agent mcp` subprocess, and over streamable HTTP against the real server's /mcp on
loopback. Replies leave through the real outbound worker and DKIM signing to the relay
sink; scopes and workspaces are enforced as tool errors a model can read."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP, default
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import ClientSession
from prometheus_client.parser import text_string_to_metric_families
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from smtpd_agent.outbound.queue import suppress
from smtpd_agent.store.apikeys import hash_key
from tests.http.test_api import bearer, deliver
from tests.http.test_mailbox_api import open_mailbox
from tests.outbound.conftest import relay  # noqa: F401
from tests.outbound.test_relay import dkim_verify
from tests.support import DEFAULT_DOMAIN, wait_searchable

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
ALL_TOOLS = {"list_inboxes", "list_threads", "get_thread", "search_messages",
             "get_attachment_text", "send_message", "reply_to_thread", "create_draft",
             "send_draft", "change_labels"}
SENDING = {"send_message", "reply_to_thread", "create_draft", "send_draft", "change_labels"}
NOTES = "Order 4711: two boxes, fragile.\n" + "x" * 3000


async def metric(http: aiohttp.ClientSession, server: Any, name: str,
                 labels: dict[str, str] | None = None) -> float:
    """The sum of `name`'s samples on /metrics whose labels include `labels`."""
    async with http.get(f"{server.http_url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in (labels or {}).items()):
                total += sample.value
    return total


def inbound(subject: str = "where is my order") -> bytes:
    mail = EmailMessage()
    mail["From"] = "Alice <alice@example.org>"
    mail["To"] = f"support@acme.{DEFAULT_DOMAIN}"
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    mail.set_content("My parcel never arrived, please check the shipment.\n")
    mail.add_attachment(NOTES.encode(), maintype="text", subtype="plain", filename="notes.txt")
    mail.add_attachment(b"%PDF-1.4\n%%EOF\n", maintype="application", subtype="pdf",
                        filename="invoice.pdf")
    return mail.as_bytes(policy=SMTP)


@pytest.fixture
async def mailbox(start_server, db, relay, database_url, dns_server):  # noqa: F811
    sink, url = relay
    server, keys = await open_mailbox(start_server, db, url, database_url, dns_server,
                                      **{"mcp.max_request_size": 65536})
    assert await asyncio.to_thread(deliver, server.port, inbound(),
                                   f"support@acme.{DEFAULT_DOMAIN}") == 250
    await wait_searchable(db)
    yield server, sink, keys


@asynccontextmanager
async def over_http(server: Any, key: str | None) -> AsyncIterator[ClientSession]:
    headers = bearer(key) if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http, \
            streamable_http_client(f"{server.http_url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def over_stdio(database_url: str, tmp_path: Path, key: str | None = None,
                     key_file: Path | None = None) -> AsyncIterator[ClientSession]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("SMTPD_AGENT_")}
    env |= {"DATABASE_URL": database_url, "SMTPD_AGENT_LOG_FORMAT": "json",
            "SMTPD_AGENT_SERVER_STATE_DIR": str(tmp_path / "mcp-state")}
    if key is not None:
        env["SMTPD_AGENT_API_KEY"] = key
    args = ["-m", "smtpd_agent", "mcp"] + (["--api-key-file", str(key_file)] if key_file else [])
    params = StdioServerParameters(command=sys.executable, args=args, env=env, cwd=REPO)
    with open(tmp_path / "mcp-stderr.log", "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield session


async def call(session: ClientSession, name: str, **arguments: Any) -> tuple[bool, Any]:
    """(is_error, the structured result or the error's text)."""
    result = await session.call_tool(name, arguments)
    if result.is_error:
        return True, result.content[0].text
    assert json.loads(result.content[0].text) == result.structured_content
    return False, result.structured_content


async def find_and_reply(session: ClientSession, sink: Any, dns_server: Any) -> int:
    """The must-show: list the tools, find the thread by search, reply; the sink gets the
    reply DKIM-signed for the agent's domain. Returns the thread id."""
    listed = (await session.list_tools()).tools
    assert {tool.name for tool in listed} == ALL_TOOLS
    for tool in listed:
        assert tool.description and len(tool.description) > 60
        assert tool.input_schema["type"] == "object"
        assert tool.annotations.read_only_hint is (tool.name not in SENDING)
    by_name = {tool.name: tool for tool in listed}
    assert by_name["reply_to_thread"].annotations.destructive_hint is True
    assert by_name["send_draft"].annotations.idempotent_hint is True
    assert "to" not in by_name["reply_to_thread"].input_schema["properties"]

    error, found = await call(session, "search_messages", query="parcel shipment")
    assert not error, found
    [hit] = found["results"]
    assert hit["subject"] == "where is my order" and "**parcel**" in hit["snippet"]
    error, sent = await call(session, "reply_to_thread", thread_id=hit["thread_id"],
                             text="It left the warehouse this morning.")
    assert not error, sent
    assert sent["thread_id"] == hit["thread_id"] and sent["to"] == "alice@example.org"
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert received.rcpt_tos == ["alice@example.org"]
    mail = message_from_bytes(received.data, policy=default)
    assert mail["From"] == f"Acme Support <support@acme.{DEFAULT_DOMAIN}>"
    assert mail["Subject"] == "Re: where is my order"
    assert mail["In-Reply-To"] == "<where-is-my-order@example.org>"
    assert mail.get_body(("plain",)).get_content().strip() == \
        "It left the warehouse this morning."
    verdicts = await asyncio.to_thread(dkim_verify, received.data, dns_server.nameserver)
    assert sorted(verdicts) == [(b"ed25519-sha256", DEFAULT_DOMAIN.encode(), True),
                                (b"rsa-sha256", DEFAULT_DOMAIN.encode(), True)]
    return hit["thread_id"]


async def test_http_client_finds_a_thread_and_replies_dkim_signed(mailbox, dns_server, db):
    server, sink, keys = mailbox
    async with over_http(server, keys["all"]) as session:
        thread_id = await find_and_reply(session, sink, dns_server)
        error, thread = await call(session, "get_thread", thread_id=thread_id)
        assert not error, thread
        assert [m["direction"] for m in thread["messages"]] == ["inbound", "outbound"]
        first = thread["messages"][0]
        assert first["text"].startswith("My parcel never arrived")
        assert first["authentication"].keys() == {"spf", "dkim", "dmarc"}
        assert "unread" in first["labels"]
        notes, pdf = first["attachments"]
        error, text = await call(session, "get_attachment_text", attachment_id=notes["id"],
                                 max_chars=30)
        assert not error and text["text"] == NOTES[:30] and text["text_truncated"] is True
        error, text = await call(session, "get_attachment_text", attachment_id=pdf["id"])
        assert not error and text["text"] is None and "application/pdf" in text["note"]
        error, labels = await call(session, "change_labels", message_id=first["id"],
                                   add=["handled"], remove=["unread"])
        assert not error and labels["labels"] == ["handled"]
        error, threads = await call(session, "list_threads", agent="support", label="unread")
        assert not error and threads["threads"] == []
    assert await db.fetchval("SELECT labels FROM messages WHERE id = $1",
                             first["id"]) == ["handled"]


async def test_stdio_subprocess_finds_a_thread_and_replies_dkim_signed(mailbox, dns_server,
                                                                       database_url, tmp_path):
    server, sink, keys = mailbox
    async with over_stdio(database_url, tmp_path, key=keys["all"]) as session:
        await find_and_reply(session, sink, dns_server)
        error, inboxes = await call(session, "list_inboxes")
        assert not error
        assert [(i["handle"], i["address"]) for i in inboxes["inboxes"]] == [
            ("sales", f"sales@acme.{DEFAULT_DOMAIN}"),
            ("support", f"support@acme.{DEFAULT_DOMAIN}")]


async def test_drafts_wait_for_send_draft_and_send_once(mailbox, dns_server, db):
    server, sink, keys = mailbox
    async with over_http(server, keys["all"]) as session:
        error, draft = await call(session, "create_draft", agent="sales",
                                  to=["bob@example.net"], subject="Quote",
                                  text="Here is the quote.")
        assert not error, draft
        draft_id = draft["draft"]["id"]
        assert draft["draft"]["status"] == "draft"
        await asyncio.sleep(0.5)
        assert sink.received == []
        error, sent = await call(session, "send_draft", draft_id=draft_id)
        assert not error, sent
        [received] = await asyncio.to_thread(sink.wait_for, 1)
        assert received.rcpt_tos == ["bob@example.net"]
        assert message_from_bytes(received.data, policy=default)["From"] == \
            f"sales@acme.{DEFAULT_DOMAIN}"
        error, again = await call(session, "send_draft", draft_id=draft_id)
        assert error and "sent already" in again
        # the same checks as the API: a suppressed address is refused, naming the rule
        acme = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
        await suppress(db, acme, "gone@example.net", "hard_bounce", source="test")
        error, refused = await call(session, "send_message", agent="support",
                                    to=["gone@example.net"], text="Hello")
        assert error and "suppression list" in refused
    assert len(sink.received) == 1


async def test_a_read_key_sees_every_tool_but_cannot_send(mailbox, db, database_url,
                                                          tmp_path):
    server, sink, keys = mailbox
    thread_id = await db.fetchval("SELECT id FROM threads")
    before = await db.fetchval("SELECT count(*) FROM messages")
    async with over_http(server, keys["read"]) as session:
        assert {t.name for t in (await session.list_tools()).tools} == ALL_TOOLS
        error, text = await call(session, "reply_to_thread", thread_id=thread_id, text="hi")
        assert error and "'send' scope" in text and "nothing was done" in text
        error, found = await call(session, "search_messages", query="parcel")
        assert not error and len(found["results"]) == 1
    key_file = tmp_path / "read.key"
    key_file.write_text(keys["read"] + "\n")
    async with over_stdio(database_url, tmp_path, key_file=key_file) as session:
        for name, arguments in (
                ("send_message", {"agent": "support", "to": ["x@example.org"], "text": "hi"}),
                ("create_draft", {"agent": "support", "text": "hi"}),
                ("change_labels", {"message_id": 1, "add": ["x"]})):
            error, text = await call(session, name, **arguments)
            assert error and "'send' scope" in text, (name, text)
        error, thread = await call(session, "get_thread", thread_id=thread_id)
        assert not error and thread["id"] == thread_id
        # the key is looked up on every call: revoking it stops a running process at once
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1",
                         hash_key(keys["read"]))
        error, text = await call(session, "get_thread", thread_id=thread_id)
        assert error and "not valid any more" in text
    assert await db.fetchval("SELECT count(*) FROM messages") == before
    assert await db.fetchval("SELECT count(*) FROM drafts") == 0
    assert sink.received == []


async def test_another_workspace_gets_only_not_found(mailbox, db):
    server, sink, keys = mailbox
    ids = await db.fetchrow(
        """SELECT m.id AS message, m.thread_id AS thread, min(a.id) AS attachment
             FROM messages m JOIN attachments a ON a.message_id = m.id GROUP BY m.id""")
    async with over_http(server, keys["all"]) as session:
        error, draft = await call(session, "create_draft", agent="support", text="later")
        assert not error
    async with over_http(server, keys["globex"]) as session:
        error, inboxes = await call(session, "list_inboxes")
        assert [i["address"] for i in inboxes["inboxes"]] == [
            f"support@globex.{DEFAULT_DOMAIN}"]
        error, found = await call(session, "search_messages", query="parcel")
        assert not error and found["results"] == []
        error, threads = await call(session, "list_threads", agent="support")
        assert not error and threads["threads"] == []
        for name, arguments, text in (
                ("get_thread", {"thread_id": ids["thread"]}, "no thread"),
                ("get_attachment_text", {"attachment_id": ids["attachment"]}, "no attachment"),
                ("reply_to_thread", {"thread_id": ids["thread"], "text": "hi"}, "no such thread"),
                ("change_labels", {"message_id": ids["message"], "add": ["x"]}, "no message"),
                ("send_draft", {"draft_id": draft["draft"]["id"]}, "no such draft"),
                ("list_threads", {"agent": "sales"}, "no inbox 'sales'")):
            error, message = await call(session, name, **arguments)
            assert error and text in message, (name, message)
    assert await db.fetchval("SELECT labels FROM messages WHERE id = $1",
                             ids["message"]) == ["unread"]
    assert sink.received == []


async def test_bad_calls_are_tool_errors_a_model_can_read(mailbox):
    server, sink, keys = mailbox
    async with over_http(server, keys["all"]) as session:
        for name, arguments, text in (
                ("get_thread", {}, "thread_id: required"),
                ("get_thread", {"thread_id": "seven"}, "thread_id: expected an integer"),
                ("get_thread", {"thread_id": 0}, "thread_id: 1-"),
                ("get_thread", {"thread_id": 1, "verbose": True}, "unknown argument 'verbose'"),
                ("send_message", {"agent": "support", "to": ["not an address"], "text": "x"},
                 "not an email address"),
                ("search_messages", {"query": "   "}, "give some words"),
                ("list_threads", {"agent": "support", "cursor": "garbage"}, "cursor"),
                ("change_labels", {"message_id": 1, "add": ["Not A Label"]}, "label"),
                ("no_such_tool", {}, "no tool named 'no_such_tool'")):
            result = await session.call_tool(name, arguments)
            assert result.is_error, (name, result)
            message = result.content[0].text
            assert text in message and "Traceback" not in message, (name, message)


async def test_http_needs_a_valid_key_and_bounds_the_body(mailbox):
    server, sink, keys = mailbox
    url = f"{server.http_url}/mcp"
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(url, json=ping) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.post(url, json=ping, headers=bearer("sak_not-a-key")) as response:
            assert response.status == 401
        big = {**ping, "params": {"pad": "x" * 70000}}
        async with http.post(url, json=big, headers=bearer(keys["all"])) as response:
            assert response.status == 413
        # stateless: no server-initiated stream to open, no session to end
        for method in ("GET", "DELETE"):
            async with http.request(method, url, headers=bearer(keys["all"])) as response:
                assert response.status == 405, (method, response.status)
                assert response.headers["Allow"] == "POST"
        # each refusal counted by reason, before any tool ran
        assert await metric(http, server, "smtpd_agent_mcp_requests_rejected_total",
                            {"reason": "unauthorized"}) == 2
        assert await metric(http, server, "smtpd_agent_mcp_requests_rejected_total",
                            {"reason": "too_large"}) == 1
        assert await metric(http, server, "smtpd_agent_mcp_tool_calls_total") == 0


async def test_requests_beyond_mcp_concurrency_get_503(start_server, db, relay,  # noqa: F811
                                                       database_url, dns_server):
    sink, url = relay
    server, keys = await open_mailbox(start_server, db, url, database_url, dns_server,
                                      **{"mcp.concurrency": 1})
    # a client that sends half its body holds the one slot while it is read
    async def hold_the_slot():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        writer.write(f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     f"{keys['all']}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"jsonrpc\": ".encode())
        await writer.drain()
        return reader, writer

    async def was_answered(reader):
        try:
            return bool(await asyncio.wait_for(reader.read(12), timeout=0.05))
        except TimeoutError:
            return False

    reader, writer = await hold_the_slot()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for _ in range(100):
                async with http.post(f"{server.http_url}/mcp", headers=bearer(keys["all"]),
                                     json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as r:
                    if r.status == 503:
                        assert r.headers["Retry-After"] == "1"
                        break
                # the server may take the two requests in either order: when this one got
                # the slot first, the holder was the one refused, so it holds it again
                if await was_answered(reader):
                    writer.close()
                    reader, writer = await hold_the_slot()
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("a second request was served while the slot was held")
    finally:
        writer.close()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        assert await metric(http, server, "smtpd_agent_mcp_requests_rejected_total",
                            {"reason": "busy"}) >= 1
    # the slot is free again once that client is gone
    async with over_http(server, keys["all"]) as session:
        error, inboxes = await call(session, "list_inboxes")
        assert not error and len(inboxes["inboxes"]) == 2


async def test_tool_calls_are_counted_by_tool_and_outcome(mailbox, db):
    """ok, a tool error, and a call the key's scopes do not allow, each counted apart."""
    server, sink, keys = mailbox
    thread_id = await db.fetchval("SELECT id FROM threads")
    async with over_http(server, keys["read"]) as session:
        error, _ = await call(session, "get_thread", thread_id=thread_id)
        assert not error
        error, _ = await call(session, "get_thread", thread_id=thread_id + 1000)
        assert error
        error, text = await call(session, "reply_to_thread", thread_id=thread_id, text="hi")
        assert error and "'send' scope" in text
        error, _ = await call(session, "no_such_tool")
        assert error
    calls = "smtpd_agent_mcp_tool_calls_total"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        assert await metric(http, server, calls, {"tool": "get_thread", "outcome": "ok"}) == 1
        assert await metric(http, server, calls,
                            {"tool": "get_thread", "outcome": "error"}) == 1
        assert await metric(http, server, calls,
                            {"tool": "reply_to_thread", "outcome": "refused"}) == 1
        assert await metric(http, server, calls, {"tool": "unknown", "outcome": "error"}) == 1
        assert await metric(http, server, calls) == 4
        assert await metric(http, server, "smtpd_agent_mcp_requests_rejected_total") == 0
    assert sink.received == []


async def test_openapi_describes_mcp(mailbox):
    server, sink, keys = mailbox
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
            http.get(f"{server.http_url}/openapi.json") as response:
        spec = await response.json()
    mcp = spec["paths"]["/mcp"]
    post = mcp["post"]
    assert post["security"] == [{"bearer": []}]
    assert {"200", "401", "413", "503"} <= set(post["responses"])
    assert set(mcp["get"]["responses"]) == set(mcp["delete"]["responses"]) == {"405"}
    example = post["requestBody"]["content"]["application/json"]["examples"]["call_tool"]
    assert example["value"]["method"] == "tools/call"
    # the example is a request the server answers as described
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
            http.post(f"{server.http_url}/mcp", json=example["value"],
                      headers={**bearer(keys["read"]),
                               "Accept": "application/json, text/event-stream"}) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["id"] == example["value"]["id"] and answer["result"]["isError"] is False
    assert "threads" in answer["result"]["structuredContent"]
