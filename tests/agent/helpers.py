"""Sending mail to the agent over real SMTP and waiting for its jobs."""

from __future__ import annotations

import asyncio
import time
from email import message_from_bytes, policy
from email.message import EmailMessage

import asyncpg

from tests.support import send_one

RCPT = "support@acme.agents.test"
FINAL = ("done", "skipped", "failed")


def mail(subject: str = "Where is my order?", sender: str = "alice@example.org",
         body: str = "Hello, where is order 42?", extra: str = "",
         message_id: str | None = None, to: str = RCPT) -> bytes:
    message_id = message_id or f"<{abs(hash((subject, sender, body, time.time())))}@example.org>"
    return (f"{extra}From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 21 Nov 2026 05:00:00 +0000\r\nMessage-ID: {message_id}\r\n"
            f"\r\n{body}\r\n").encode()


def deliver(port: int, raw: bytes, mail_from: str = "alice@example.org",
            rcpt: str = RCPT) -> int:
    code, lines = send_one(port, raw, mail_from, rcpt)
    assert code == 250, lines
    return code


async def wait_jobs(db: asyncpg.Connection, count: int = 1, timeout: float = 60.0,
                    statuses: tuple[str, ...] = FINAL) -> list[asyncpg.Record]:
    """The jobs, once `count` of them have reached one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.fetch("SELECT * FROM agent_jobs ORDER BY id")
        if sum(1 for r in rows if r["status"] in statuses) >= count:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not {statuses} in {timeout}s: "
                                 f"{[(r['id'], r['status'], r['last_error']) for r in rows]}")
        await asyncio.sleep(0.05)


def parse(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message
