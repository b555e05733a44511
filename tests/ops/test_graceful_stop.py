"""SIGTERM to a real `smtpd-agent serve` while a large message is in DATA.

The rule under test: the client gets 250 only for a message whose row is
committed, otherwise a 4xx (it will retry), and the process exits 0 so
systemd records a clean stop, not a failure to restart from.
"""

from __future__ import annotations

import signal
import socket
import time

import asyncpg
import pytest

from smtpd_agent.store import directory
from tests.support import SESSION_LAYERS, Dialogue, enhanced

@pytest.fixture(scope="module", params=SESSION_LAYERS)
def smtp_session(request: pytest.FixtureRequest) -> str:
    """A stop drains the sessions of both layers (smtp.session)."""
    return request.param


MESSAGE_ID = "<large-during-stop@example.org>"
LINE = b"x" * 76 + b"\r\n"


def large_message(address: str, size: int) -> tuple[bytes, bytes]:
    """A message of about `size` bytes, split into a first part and the rest (with the dot)."""
    header = (f"From: alice@example.org\r\nTo: {address}\r\nSubject: Big report\r\n"
              f"Message-ID: {MESSAGE_ID}\r\n\r\n").encode()
    body = LINE * (size // len(LINE))
    whole = header + body
    return whole[:1_000_000], whole[1_000_000:] + b".\r\n"


async def open_data(port: int, db: asyncpg.Connection) -> Dialogue:
    await directory.add_workspace(db, "acme", "Acme")
    await directory.add_agent(db, "acme", "support")
    dialogue = Dialogue.open(port, timeout=30)
    assert dialogue.reply()[0] == 220
    assert dialogue.command("EHLO client.example.org")[0] == 250
    assert dialogue.command("MAIL FROM:<alice@example.org>")[0] == 250
    assert dialogue.command("RCPT TO:<support@acme.agents.test>")[0] == 250
    assert dialogue.command("DATA")[0] == 354
    return dialogue


def listener_closed(port: int, within: float = 5.0) -> bool:
    """True once connecting is refused (STOPPING=1 is sent just before the listener closes)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            pass  # caught the listener while it closed (queued, then reset): look again
        time.sleep(0.05)
    return False


async def test_sigterm_mid_data_lets_the_message_finish_then_exits_0(serve_process, db):
    # Generous: the grace only runs out here if the machine is badly overloaded.
    server = serve_process(**{"smtp.shutdown_grace": 30})
    dialogue = await open_data(server.port, db)
    first, rest = large_message("support@acme.agents.test", 5_000_000)
    dialogue.send(first)
    server.signal(signal.SIGTERM)
    server.wait_for_state("STOPPING=1", timeout=10)
    assert listener_closed(server.port), "the listener still accepts after SIGTERM"

    try:
        dialogue.send(rest)
        code, lines = dialogue.reply()
    except OSError as error:
        raise AssertionError(f"{error!r}; server log:\n{server.log()}") from error
    assert code == 250, lines
    row = await db.fetchrow("SELECT size, subject FROM messages WHERE message_id = $1",
                            MESSAGE_ID)
    assert row is not None, "250 without a stored row"
    assert row["subject"] == "Big report" and row["size"] >= 5_000_000
    # Then the session is closed with a 421, as every session of a stopping server.
    code, lines = dialogue.reply()
    assert code == 421 and enhanced(lines[-1]).startswith("4.")
    assert server.process.wait(30) == 0, server.log()
    assert server.events("server.stopped")


async def test_sigterm_with_a_stalled_transfer_answers_4xx_after_the_grace(serve_process, db):
    server = serve_process(**{"smtp.shutdown_grace": 1})
    dialogue = await open_data(server.port, db)
    first, _ = large_message("support@acme.agents.test", 5_000_000)
    dialogue.send(first)
    server.signal(signal.SIGTERM)
    try:
        code, lines = dialogue.reply()
    except OSError as error:
        raise AssertionError(f"{error!r}; server log:\n{server.log()}") from error
    assert 400 <= code < 500, lines
    assert enhanced(lines[-1]).startswith("4.")
    assert dialogue.closed()
    assert server.process.wait(30) == 0, server.log()
    assert await db.fetchval("SELECT count(*) FROM messages") == 0



async def test_sigterm_between_bdat_chunks_lets_the_last_chunk_finish(serve_process, db):
    """CHUNKING (RFC 3030): a transaction between BDAT chunks counts as in transfer."""
    server = serve_process(**{"smtp.shutdown_grace": 30})
    await directory.add_workspace(db, "acme", "Acme")
    await directory.add_agent(db, "acme", "support")
    dialogue = Dialogue.open(server.port, timeout=30)
    assert dialogue.reply()[0] == 220
    assert dialogue.command("EHLO client.example.org")[0] == 250
    assert dialogue.command("MAIL FROM:<alice@example.org>")[0] == 250
    assert dialogue.command("RCPT TO:<support@acme.agents.test>")[0] == 250
    first, rest = large_message("support@acme.agents.test", 3_000_000)
    rest = rest[:-3]  # BDAT carries no dot terminator
    dialogue.send(f"BDAT {len(first)}\r\n".encode() + first)
    assert dialogue.reply()[0] == 250
    server.signal(signal.SIGTERM)
    server.wait_for_state("STOPPING=1", timeout=10)
    assert listener_closed(server.port)
    dialogue.send(f"BDAT {len(rest)} LAST\r\n".encode() + rest)
    code, lines = dialogue.reply()
    assert code == 250, lines
    assert await db.fetchval("SELECT size FROM messages WHERE message_id = $1",
                             MESSAGE_ID) >= 3_000_000
    assert dialogue.reply()[0] == 421
    assert server.process.wait(30) == 0, server.log()
