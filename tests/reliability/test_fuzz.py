"""Generated hostile input: command sequences and MIME bodies never crash a session.

Whatever a client sends, every reply is a well-formed SMTP reply line, no
session ends in the unexpected-exception path (smtp.internal_error), and
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpd_agent.message import parse_message
from tests.support import HOSTILE_MIME_LINES, REPLY_LINE, SESSION_LAYERS, smtp_send


@pytest.fixture(scope="module", params=SESSION_LAYERS)
def smtp_session(request: pytest.FixtureRequest) -> str:
    """The generated dialogues run against both session layers (smtp.session)."""
    return request.param

ADDRESSES = st.sampled_from(["<support@acme.agents.test>", "<>", "<a@b>", "<x@evil.test>",
                             "<support+tag@ACME.agents.test>", "support@acme.agents.test",
                             "<@route:a@b>", "<\"q\\\"uoted\"@acme.agents.test>", "<é@ü.test>",
                             "<" + "a" * 300 + "@acme.agents.test>"])
PARAMS = st.sampled_from(["", " SIZE=100", " SIZE=abc", " BODY=8BITMIME", " BODY=BINARYMIME",
                          " SMTPUTF8", " NOTIFY=NEVER", " SIZE=99999999999", " X=" + "y" * 600])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
COMMANDS = st.one_of(
    st.builds(lambda a, p: f"MAIL FROM:{a}{p}", ADDRESSES, PARAMS),
    st.builds(lambda a, p: f"RCPT TO:{a}{p}", ADDRESSES, PARAMS),
    st.sampled_from(["EHLO client.test", "HELO x", "EHLO", "RSET", "NOOP", "VRFY support",
                     "DATA", "BDAT 0 LAST", "BDAT 5", "BDAT x", "STARTTLS", "AUTH PLAIN AAAA",
                     "HELP", "EXPN all", "QUIT", "", " ", "\x00\x01", "DATA extra"]),
    TEXT,
)


def dialogue(port: int, lines: list[str], tail: bytes) -> list[bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    received = b""
    try:
        wire = b"".join(line.encode("utf-8", "surrogatepass") + b"\r\n" for line in lines)
        sock.sendall(wire + tail)
        sock.shutdown(socket.SHUT_WR)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        pass
    finally:
        sock.close()
    return [line for line in received.split(b"\r\n") if line]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(COMMANDS, max_size=12), tail=st.binary(max_size=300))
def test_generated_dialogues_get_well_formed_replies(fuzz_server, lines, tail):
    with structlog.testing.capture_logs() as events:
        replies = dialogue(fuzz_server.port, lines, tail)
    assert replies and replies[0].startswith(b"220")
    assert all(REPLY_LINE.match(line) for line in replies), replies
    assert not [e for e in events if e["event"] == "smtp.internal_error"], events
    assert any(e["event"].startswith("smtp.") for e in events)  # the server's log was seen


MIME_PIECES = st.sampled_from(HOSTILE_MIME_LINES)


@settings(max_examples=300, deadline=None)
@given(st.lists(MIME_PIECES | st.binary(max_size=60), max_size=40))
def test_generated_mime_never_breaks_the_parser(pieces):
    parse_message(b"".join(pieces))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(MIME_PIECES | st.binary(max_size=40), max_size=30))
def test_generated_mime_is_stored_or_refused_cleanly(fuzz_server, pieces):
    body = b"".join(pieces)
    body = (b"." + body if body.startswith(b".") else body).replace(b"\r\n.", b"\r\n..")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    code, line = asyncio.run(smtp_send(fuzz_server.port, body, "fuzz@example.org",
                                       ["support@acme.agents.test"]))
    assert code in (250, 552, 550), line
