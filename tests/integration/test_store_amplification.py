"""Store amplification (issue 16, defect 3) and text Postgres refuses (defect 4, store half).

A message's raw bytes and attachments are stored once per workspace, however many
mailboxes it is for; a group-commit batch is split by bytes as well as by count; a
message Postgres refuses as too large fails alone and for good (552), not the whole
batch with 451; NUL in the headers we store as text is removed, the message is stored."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from smtpd_agent.config import DatabaseSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage, Mailbox, Recipient
from smtpd_agent.smtp import replies
from smtpd_agent.store import directory
from smtpd_agent.store.database import create_pool, migrate
from smtpd_agent.store.messages import GroupCommit, StoreTooLarge, Verdicts, split_batch
from tests.support import DEFAULT_DOMAIN, enhanced, smtp_send

VERDICTS = Verdicts(spf="pass", dkim="none", dmarc="none", scan_status="skipped")
MAILBOXES = 20


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, DatabaseSettings(pool_max=4))
    async with pool.acquire() as connection:
        await migrate(connection)
    await directory.add_workspace(pool, "acme")
    for index in range(MAILBOXES):
        await directory.add_agent(pool, "acme", f"agent{index}")
    yield pool
    await pool.close()


async def mailboxes(pool: asyncpg.Pool, count: int) -> list[Mailbox]:
    found = []
    for index in range(count):
        agent = await directory.get_agent(pool, "acme", f"agent{index}")
        found.append(Mailbox(agent.workspace_id, "acme", agent.id, agent.handle,
                             f"acme.{DEFAULT_DOMAIN}"))
    return found


def with_attachment(tag: str, size: int, *to: Mailbox) -> InboundMessage:
    """A message with `size` random bytes attached (base64: incompressible, like real files)."""
    body = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
    raw = (f"From: alice@example.org\r\nTo: agents@acme.{DEFAULT_DOMAIN}\r\n"
           f"Subject: {tag}\r\nMessage-ID: <{tag}@example.org>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           "Content-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
           "Content-Type: application/octet-stream\r\n"
           "Content-Disposition: attachment; filename=data.bin\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\n").encode() + body + b"--b--\r\n"
    envelope = Envelope("s", "127.0.0.1", "client.test", "alice@example.org",
                        tuple(Recipient(m.address, m) for m in to))
    return InboundMessage(envelope, raw, parse_message(raw))


async def test_a_message_to_twenty_mailboxes_is_stored_once(pool):
    boxes = await mailboxes(pool, MAILBOXES)
    message = with_attachment("big", 3 * 1024 * 1024, *boxes)
    assert len(message.raw) > 4_000_000
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    stored = await store.store(message, VERDICTS, "q1")
    assert len(stored) == MAILBOXES
    assert await pool.fetchval("SELECT count(*) FROM messages") == MAILBOXES
    assert await pool.fetchval("SELECT count(*) FROM attachments") == MAILBOXES
    raws = await pool.fetch("SELECT size FROM raw_messages")
    assert len(raws) == 1 and raws[0]["size"] >= len(message.raw)
    assert await pool.fetchval("SELECT count(*) FROM blobs") == 1
    # every mailbox reads the same bytes
    assert await pool.fetchval("SELECT count(DISTINCT m.raw) FROM messages m") == 1
    # what the database holds for the message: about one copy of raw plus one of the blob
    held = await pool.fetchval(
        """SELECT sum(pg_total_relation_size(t)) FROM unnest(ARRAY['messages', 'raw_messages',
                  'blobs', 'attachments', 'threads']::regclass[]) AS t""")
    assert held < 2.5 * len(message.raw), held


async def test_a_batch_over_the_byte_budget_is_split(pool):
    [box] = await mailboxes(pool, 1)
    store = GroupCommit(pool, 30, batch_max=32, committers=1, batch_max_bytes=1_000_000)
    big = [with_attachment(f"big{i}", 300_000, box) for i in range(6)]
    await asyncio.gather(*(store.store(m, VERDICTS, f"q{i}") for i, m in enumerate(big)))
    # ~0.7 MB of content each (raw + attachment) under a 1 MB budget: one message per
    # statement, hence per transaction (the rows of one share an xmin)
    transactions = await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM messages")
    assert transactions == 6
    small = [with_attachment(f"small{i}", 1_000, box) for i in range(6)]
    await asyncio.gather(*(store.store(m, VERDICTS, f"s{i}") for i, m in enumerate(small)))
    assert await pool.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM messages WHERE subject LIKE 'small%'") == 1


def test_split_batch_takes_at_least_one_and_stops_at_either_limit():
    assert split_batch([1, 2, 3], [50, 50, 50], 32, 10) == ([1], [2, 3])
    assert split_batch([1, 2, 3], [5, 5, 5], 32, 10) == ([1, 2], [3])
    assert split_batch([1, 2, 3], [1, 1, 1], 2, 10) == ([1, 2], [3])


async def test_a_message_too_large_for_postgres_fails_alone_and_for_good(pool):
    """An index row over Postgres's limit (program_limit_exceeded): 552 for that message,
    the rest of its batch stored; not 451 for every message of the batch."""
    [box] = await mailboxes(pool, 1)
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    messages = [with_attachment(f"m{i}", 100, box) for i in range(8)]
    huge_id = f"<{secrets.token_urlsafe(6000)}@example.org>"  # incompressible, > 2704 bytes
    messages[3] = dataclasses.replace(
        messages[3], parsed=dataclasses.replace(messages[3].parsed, message_id=huge_id))
    outcomes = await asyncio.gather(*(store.store(m, VERDICTS, f"q{i}")
                                      for i, m in enumerate(messages)), return_exceptions=True)
    assert [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)] == [3]
    assert isinstance(outcomes[3], StoreTooLarge), outcomes[3]
    assert await pool.fetchval("SELECT count(*) FROM messages") == 7


NUL_HEADERS = (b"From: Alice\x00 <alice@example.org>\r\nTo: support@acme.agents.test\r\n"
               b"Subject: nul\x00 inside\r\nMessage-ID: <nul\x00id@example.org>\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\n"
               b"Content-Type: application/pd\x00f; name=\"a\x00.pdf\"\r\n"
               b"Content-Disposition: attachment; filename=\"a\x00.pdf\"\r\n\r\n"
               b"%PDF-1.4 not really\r\n--b--\r\n")


async def test_nul_in_message_id_from_and_content_type_is_stored(server, db):
    code, line = await smtp_send(server.port, NUL_HEADERS, "alice@example.org",
                                 ["support@acme.agents.test"])
    assert code == 250, line
    assert enhanced(line) == replies.queued("x").enhanced
    row = await db.fetchrow("SELECT message_id, from_header, from_address, subject, "
                            "messages.raw FROM messages")
    assert "\x00" not in "".join(v for v in (row["message_id"], row["from_header"],
                                            row["from_address"], row["subject"]) if v)
    assert row["subject"] == "nul inside"
    assert b"\x00" in row["raw"]  # the bytes as received are kept
    [attachment] = await db.fetch("SELECT content_type, filename FROM attachments")
    assert "\x00" not in attachment["content_type"] + (attachment["filename"] or "")
