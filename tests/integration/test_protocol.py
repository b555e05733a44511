"""The SMTP dialogue, raw over a socket: replies, limits, smuggling, garbage, BDAT."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from smtpd_agent.smtp import replies
from smtpd_agent.store import directory
from tests.support import SESSION_LAYERS, Dialogue, enhanced

@pytest.fixture(scope="module", params=SESSION_LAYERS)
def smtp_session(request: pytest.FixtureRequest) -> str:
    """Every test here runs against both session layers (smtp.session)."""
    return request.param


MESSAGE = (b"From: alice@example.org\r\nTo: support@acme.agents.test\r\n"
           b"Subject: %s\r\nMessage-ID: <%s@example.org>\r\n\r\nbody line\r\n")


def message(tag: str) -> bytes:
    return MESSAGE % (tag.encode(), tag.encode())


def start_transaction(port: int, rcpts: tuple[str, ...] = ("support@acme.agents.test",)) -> Dialogue:
    dialogue = Dialogue.open(port)
    code, _ = dialogue.reply()
    assert code == 220
    assert dialogue.command("EHLO client.example.org")[0] == 250
    assert dialogue.command("MAIL FROM:<alice@example.org>")[0] == 250
    for rcpt in rcpts:
        assert dialogue.command(f"RCPT TO:<{rcpt}>")[0] == 250
    return dialogue


def bdat(dialogue: Dialogue, chunk: bytes, last: bool = False) -> tuple[int, bytes]:
    dialogue.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
    code, lines = dialogue.reply()
    return code, lines[-1]


def assert_reply(reply: tuple[int, bytes], expected: replies.Reply) -> None:
    code, line = reply
    assert code == expected.code, line
    assert enhanced(line) == expected.enhanced, line


async def count(db, table: str = "messages") -> int:
    return await db.fetchval(f"SELECT count(*) FROM {table}")


async def assert_still_serving(port: int, db, tag: str = "still-serving") -> None:
    """A fresh connection after the abuse delivers normally."""
    before = await count(db)
    dialogue = start_transaction(port)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(message(tag) + b".\r\n")
    code, line = dialogue.reply()
    assert code == 250 and enhanced(line[-1]) == "2.0.0"
    dialogue.command("QUIT")
    assert await count(db) == before + 1


async def test_unknown_mailbox_and_foreign_domain(server, db):
    dialogue = Dialogue.open(server.port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    assert_reply(dialogue.command("MAIL FROM:<alice@example.org>"), replies.MAIL_OK)
    assert_reply(dialogue.command("RCPT TO:<nobody@acme.agents.test>"), replies.MAILBOX_UNKNOWN)
    assert_reply(dialogue.command("RCPT TO:<support@nosuchworkspace.agents.test>"),
                 replies.MAILBOX_UNKNOWN)
    assert_reply(dialogue.command("RCPT TO:<postmaster@agents.test>"), replies.MAILBOX_UNKNOWN)
    for foreign in ("victim@gmail.com", "support@acme.agents.test.evil.com",
                    "support@acmeagents.test", '"support@acme.agents.test"@evil.com'):
        assert_reply(dialogue.command(f"RCPT TO:<{foreign}>"), replies.RELAY_DENIED)
    # nothing accepted: DATA has no recipient
    assert dialogue.command("DATA")[0] == 503
    dialogue.command("QUIT")
    assert await count(db) == 0


async def test_too_many_recipients(start_server, db):
    running = start_server(**{"smtp.max_recipients": 2})
    await directory.add_workspace(db, "acme")
    for handle in ("a", "b", "c"):
        await directory.add_agent(db, "acme", handle)
    dialogue = Dialogue.open(running.port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    dialogue.command("MAIL FROM:<alice@example.org>")
    assert_reply(dialogue.command("RCPT TO:<a@acme.agents.test>"), replies.RCPT_OK)
    assert_reply(dialogue.command("RCPT TO:<b@acme.agents.test>"), replies.RCPT_OK)
    assert_reply(dialogue.command("RCPT TO:<c@acme.agents.test>"), replies.TOO_MANY_RECIPIENTS)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(message("two-of-three") + b".\r\n")
    assert dialogue.reply()[0] == 250
    assert await count(db) == 2


async def test_oversize_message_is_refused_at_mail_and_at_data(start_server, db):
    running = start_server(**{"smtp.max_message_size": 10_000})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    dialogue = Dialogue.open(running.port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    assert_reply(dialogue.command("MAIL FROM:<alice@example.org> SIZE=20000"),
                 replies.MESSAGE_TOO_BIG)
    assert dialogue.command("MAIL FROM:<alice@example.org>")[0] == 250
    assert dialogue.command("RCPT TO:<support@acme.agents.test>")[0] == 250
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(message("big") + (b"x" * 998 + b"\r\n") * 30 + b".\r\n")
    assert_reply((lambda r: (r[0], r[1][-1]))(dialogue.reply()), replies.MESSAGE_TOO_BIG)
    assert await count(db) == 0
    await assert_still_serving(running.port, db)


async def test_one_megabyte_header_line_is_refused(server, db):
    dialogue = start_transaction(server.port)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(b"X-Huge: " + b"a" * 1_048_576 + b"\r\n" + message("huge-header") + b".\r\n")
    code, lines = dialogue.reply()
    assert_reply((code, lines[-1]), replies.HEADER_TOO_BIG)
    assert await count(db) == 0
    await assert_still_serving(server.port, db)


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\n.\r"])
async def test_smuggling_terminators_do_not_end_data(server, db, smuggle):
    """Only <CR><LF>.<CR><LF> ends DATA; the smuggled transaction stays inside the first message."""
    dialogue = start_transaction(server.port)
    assert dialogue.command("DATA")[0] == 354
    smuggled = (b"MAIL FROM:<admin@acme.agents.test>\r\nRCPT TO:<support@acme.agents.test>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\nforged\r\n")
    dialogue.send(message("carrier").rstrip(b"\r\n") + smuggle + smuggled + b".\r\n")
    code, lines = dialogue.reply()
    assert code == 250, lines
    assert dialogue.command("QUIT")[0] == 221
    rows = await db.fetch("SELECT subject, messages.raw FROM messages")
    assert [r["subject"] for r in rows] == ["carrier"]
    assert b"Subject: smuggled" in rows[0]["raw"]


async def test_bare_lf_is_normalized_by_default(server, db):
    dialogue = start_transaction(server.port)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(b"Subject: bare\nMessage-ID: <bare@example.org>\n\nline one\nline two\r\n.\r\n")
    assert dialogue.reply()[0] == 250
    raw = await db.fetchval("SELECT messages.raw FROM messages")
    assert raw.endswith(b"Subject: bare\r\nMessage-ID: <bare@example.org>\r\n\r\nline one\r\nline two\r\n")
    assert await db.fetchval("SELECT subject FROM messages") == "bare"


async def test_bare_lf_is_refused_when_configured(start_server, db):
    running = start_server(**{"smtp.bare_lf": "reject"})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    dialogue = start_transaction(running.port)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(b"Subject: bare\n\nline one\n.\nMAIL FROM:<x@y>\r\n.\r\n")
    code, lines = dialogue.reply()
    assert_reply((code, lines[-1]), replies.BARE_LF)
    assert await count(db) == 0
    await assert_still_serving(running.port, db)


async def test_dot_stuffing_is_undone(server, db):
    dialogue = start_transaction(server.port)
    dialogue.command("DATA")
    dialogue.send(b"Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n.\r\n")
    assert dialogue.reply()[0] == 250
    raw = await db.fetchval("SELECT messages.raw FROM messages")
    assert raw.endswith(b"\r\n\r\n.leading dot\r\n..two dots\r\n")


async def test_empty_message_and_pipelined_quit(server, db):
    dialogue = Dialogue.open(server.port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    # PIPELINING: the whole transaction and QUIT in one write
    dialogue.send(b"MAIL FROM:<>\r\nRCPT TO:<support@acme.agents.test>\r\nDATA\r\n")
    assert [dialogue.reply()[0] for _ in range(3)] == [250, 250, 354]
    dialogue.send(b".\r\nQUIT\r\n")
    assert dialogue.reply()[0] == 250
    assert dialogue.reply()[0] == 221
    row = await db.fetchrow("SELECT mail_from, messages.raw FROM messages")
    assert row["mail_from"] == "" and row["raw"].startswith(b"Authentication-Results:")


async def test_binary_garbage_gets_replies_and_server_survives(server, db):
    dialogue = Dialogue.open(server.port)
    dialogue.reply()
    dialogue.send(os.urandom(4096).replace(b"\n", b"") + b"\r\n")
    code, line = dialogue.reply()
    assert 500 <= code < 600 and enhanced(line[-1]) is not None
    dialogue.send(b"\x00\xff\xfe HELO\r\n")
    assert 500 <= dialogue.reply()[0] < 600
    dialogue.close()
    await assert_still_serving(server.port, db)


async def test_abrupt_disconnect_mid_data_stores_nothing(server, db):
    dialogue = start_transaction(server.port)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(message("cut-short")[:40])
    dialogue.sock.shutdown(socket.SHUT_RDWR)
    dialogue.close()
    await asyncio.sleep(0.3)
    assert await count(db) == 0
    await assert_still_serving(server.port, db)


async def test_every_reply_of_a_session_carries_an_enhanced_code(server):
    dialogue = Dialogue.open(server.port)
    [greeting] = dialogue.reply()[1]
    assert greeting.startswith(b"220 mx.test.local ") and enhanced(greeting) is None  # RFC 2034
    lines = [dialogue.command("MAIL FROM:<a@b.c>")[1]]
    dialogue.command("EHLO client.example.org")  # RFC 2034: EHLO replies carry no code
    for command in ("RCPT TO:<x@acme.agents.test>",
                    "MAIL FROM:<a@b.c>", "MAIL FROM:<a@b.c>", "RCPT TO:<support@acme.agents.test>",
                    "RCPT TO:<bad address>", "VRFY support", "NOOP", "RSET", "DATA",
                    "EXPN list", "HELP", "FOO bar", "STARTTLS", "MAIL FROM:<a@b.c> SIZE=abc"):
        lines.append(dialogue.command(command)[1])
    assert [line for line in lines if enhanced(line) is None] == []
    # a 4xx never carries a 5.x.x code and vice versa
    assert all(enhanced(line)[0] == chr(line[0]) for line in lines)


async def test_per_ip_connection_limit(start_server, db):
    running = start_server(**{"smtp.max_connections_per_ip": 2})
    first, second = Dialogue.open(running.port), Dialogue.open(running.port)
    assert first.reply()[0] == 220 and second.reply()[0] == 220
    third = Dialogue.open(running.port)
    code, lines = third.reply()
    assert_reply((code, lines[-1]), replies.TOO_MANY_CONNECTIONS)
    assert third.closed()
    first.command("QUIT")
    first.close()
    await asyncio.sleep(0.2)
    fourth = Dialogue.open(running.port)
    assert fourth.reply()[0] == 220


async def test_command_timeout_answers_421(start_server):
    running = start_server(**{"smtp.command_timeout": 0.5})
    dialogue = Dialogue.open(running.port)
    dialogue.reply()
    code, lines = dialogue.reply()
    assert_reply((code, lines[-1]), replies.TIMEOUT)
    assert dialogue.closed()


async def test_activity_keeps_a_session_alive_past_the_command_timeout(start_server):
    running = start_server(**{"smtp.command_timeout": 0.6})
    dialogue = Dialogue.open(running.port)
    dialogue.reply()
    for _ in range(6):  # 1.8 s of a slow but live client
        time.sleep(0.3)
        assert dialogue.command("NOOP")[0] == 250
    code, lines = dialogue.reply()  # then silence: the timeout, counted from the last command
    assert_reply((code, lines[-1]), replies.TIMEOUT)


async def test_data_timeout_applies_inside_data(start_server, db):
    running = start_server(**{"smtp.command_timeout": 3600, "smtp.data_timeout": 0.5})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    dialogue = start_transaction(running.port)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(b"Subject: stalled\r\n")
    # The command timeout is an hour and the client's socket gives up after 10 s (Dialogue):
    # a timeout reply at all is the data timeout's.
    code, lines = dialogue.reply()
    assert_reply((code, lines[-1]), replies.TIMEOUT)


class TestBdat:
    async def test_chunks_make_one_message(self, server, db):
        dialogue = start_transaction(server.port)
        body = message("bdat")
        first, second = body[:30], body[30:]
        assert bdat(dialogue, first)[0] == 250
        code, line = bdat(dialogue, second, last=True)
        assert code == 250 and b"queued" in line
        raw = await db.fetchval("SELECT messages.raw FROM messages")
        assert raw.endswith(b"\r\n" + body)

    async def test_dot_lines_are_content_in_bdat(self, server, db):
        dialogue = start_transaction(server.port)
        body = b"Subject: dots\r\n\r\n.\r\n..x\r\n"
        assert bdat(dialogue, body, last=True)[0] == 250
        assert (await db.fetchval("SELECT messages.raw FROM messages")).endswith(b"\r\n\r\n.\r\n..x\r\n")

    async def test_bdat_without_recipient_is_consumed_and_refused(self, server, db):
        dialogue = Dialogue.open(server.port)
        dialogue.reply()
        dialogue.command("EHLO client.example.org")
        payload = b"MAIL FROM:<evil@x>\r\n"
        code, line = bdat(dialogue, payload, last=True)
        assert code == 503 and enhanced(line) == "5.5.1"
        assert dialogue.command("NOOP")[0] == 250  # the payload was not read as a command
        assert await count(db) == 0

    async def test_oversize_bdat_is_refused_after_last(self, start_server, db):
        running = start_server(**{"smtp.max_message_size": 1000})
        await directory.add_workspace(db, "acme")
        await directory.add_agent(db, "acme", "support")
        dialogue = start_transaction(running.port)
        chunk = b"x" * 800
        assert bdat(dialogue, chunk)[0] == 250
        assert_reply(bdat(dialogue, chunk, last=True), replies.MESSAGE_TOO_BIG)
        assert dialogue.command("NOOP")[0] == 250
        assert await count(db) == 0

    async def test_bdat_without_a_size_is_refused_and_closed(self, server):
        dialogue = start_transaction(server.port)
        code, line = dialogue.command("BDAT lots")
        assert code == 501 and enhanced(line) == "5.5.4"
        assert dialogue.closed()

    async def test_data_after_bdat_is_a_bad_sequence(self, server):
        dialogue = start_transaction(server.port)
        assert bdat(dialogue, b"hello")[0] == 250
        assert_reply(dialogue.command("DATA"), replies.BAD_SEQUENCE)
