"""The native session layer against aiosmtpd's, dialogue for dialogue (smtp.session).

Two real servers, one per layer, each with a database of its own and the same
settings, get the same raw bytes over a socket; the replies must agree line for line:
the reply code, the enhanced code and the text, once the ids that differ by nature
(session ids, queue ids) are blanked. The dialogues are the existing protocol cases
(tests/integration/test_protocol.py, test_hostile_smtp.py, test_fuzz.py) and
dialogues hypothesis generates from the commands, parameters and content those use.

Every dialogue is sent in one write and ends with "<CR><LF>.<CR><LF>QUIT<CR><LF>", so
that a session inside DATA ends its message and every session ends with QUIT (or the
timeout); the client then reads until the server closes. The differences the native
layer documents (smtp/session.py: end of input, STARTTLS and AUTH inside TLS, SIZE
with non-ASCII digits) are outside what is sent here.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import (REPLY_LINE, SESSION_LAYERS, ServerThread, make_settings,
                           start_with_acme_support)
from tests.tls import client_context, write_self_signed

RCPT = "support@acme.agents.test"
TAIL = b"\r\n.\r\nQUIT\r\n"
# What differs between two servers by nature: our session id (12 hex digits) and the
# queue id made of it.
IDS = re.compile(rb"\b[0-9a-f]{12}(\.\d+)?\b")
MAX_MESSAGE_SIZE = 4000


def start_pair(cluster, dns_server_session, tmp_path_factory,
               **overrides: object) -> dict[str, ServerThread]:
    """One server per session layer, alike in everything else."""
    running: dict[str, ServerThread] = {}
    try:
        for layer in SESSION_LAYERS:
            url = asyncio.run(cluster.new_database())
            settings = make_settings(url, tmp_path_factory.mktemp(f"differential-{layer}"), **{
                "dns.nameservers": [dns_server_session.nameserver],
                "smtp.session": layer, "smtp.command_timeout": 5, "smtp.data_timeout": 2,
                "smtp.max_message_size": MAX_MESSAGE_SIZE, "smtp.max_header_size": 1500,
                "smtp.max_recipients": 3, "smtp.max_commands": 60, **overrides})
            running[layer] = start_with_acme_support(url, settings)
    except BaseException:
        for server in running.values():
            server.stop()
        raise
    return running


@pytest.fixture(scope="module")
def servers(cluster, dns_server_session, tmp_path_factory) -> Iterator[dict[str, ServerThread]]:
    running = start_pair(cluster, dns_server_session, tmp_path_factory)
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def tls_servers(cluster, dns_server_session,
                tmp_path_factory) -> Iterator[dict[str, ServerThread]]:
    """The pair with a certificate: STARTTLS offered."""
    cert, key = write_self_signed(tmp_path_factory.mktemp("differential-tls"))
    running = start_pair(cluster, dns_server_session, tmp_path_factory,
                         **{"smtp.tls_cert": str(cert), "smtp.tls_key": str(key)})
    yield running
    for server in running.values():
        server.stop()


def converse(port: int, wire: bytes, pieces: list[int] | None = None) -> list[bytes]:
    """Send `wire` and the tail, in one write or in writes of the sizes `pieces` (a few
    milliseconds apart, so that the server reads them apart); every reply line until the
    server closes.

    Replies are read as they come, by a thread, while the pieces go out: a server that
    closes early (a BDAT whose size cannot be read) answers a later piece with a reset,
    and a reset discards what the client had not read yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunks: list[bytes] = []

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, OSError):
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    data = wire + TAIL
    try:
        for size in pieces or ():
            piece, data = data[:size], data[size:]
            if piece:
                sock.sendall(piece)
                time.sleep(0.002)
        sock.sendall(data)
    except (ConnectionResetError, BrokenPipeError):
        pass
    reader.join(30)
    sock.close()
    return b"".join(chunks).split(b"\r\n")


def normalized(lines: list[bytes]) -> list[bytes]:
    return [IDS.sub(b"<id>", line) for line in lines]


def assert_same_replies(servers: dict[str, ServerThread], wire: bytes,
                        pieces: list[int] | None = None) -> list[bytes]:
    answers = {layer: normalized(converse(server.port, wire, pieces))
               for layer, server in servers.items()}
    reference = answers["aiosmtpd"]
    assert answers["native"] == reference, wire
    assert reference[0].startswith(b"220 ")
    assert all(REPLY_LINE.match(line) for line in reference if line), reference
    return reference


def lines(*commands: bytes | str) -> bytes:
    return b"".join((c.encode() if isinstance(c, str) else c) + b"\r\n" for c in commands)


MESSAGE = (b"From: alice@example.org\r\nTo: support@acme.agents.test\r\n"
           b"Subject: differential\r\nMessage-ID: <differential-%d@example.org>\r\n\r\nbody\r\n")
TRANSACTION = lines("EHLO client.example.org", "MAIL FROM:<alice@example.org>", f"RCPT TO:<{RCPT}>")
SMUGGLED = (b"MAIL FROM:<admin@acme.agents.test>\r\nRCPT TO:<support@acme.agents.test>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nforged\r\n")

# The dialogues of the existing protocol tests, and the corners of the command parser.
CASES = {
    "replies of a session": lines(
        "MAIL FROM:<a@b.c>", "EHLO client.example.org", "RCPT TO:<x@acme.agents.test>",
        "MAIL FROM:<a@b.c>", "MAIL FROM:<a@b.c>", f"RCPT TO:<{RCPT}>", "RCPT TO:<bad address>",
        "VRFY support", "NOOP", "RSET", "DATA", "EXPN list", "HELP", "FOO bar", "STARTTLS",
        "MAIL FROM:<a@b.c> SIZE=abc"),
    "unknown and foreign recipients": lines(
        "EHLO client.example.org", "MAIL FROM:<alice@example.org>",
        "RCPT TO:<nobody@acme.agents.test>", "RCPT TO:<support@nosuchworkspace.agents.test>",
        "RCPT TO:<postmaster@agents.test>", "RCPT TO:<victim@gmail.com>",
        "RCPT TO:<support@acme.agents.test.evil.com>", 'RCPT TO:<"support@acme.agents.test"@evil.com>',
        "DATA"),
    "too many recipients": lines("EHLO c", "MAIL FROM:<a@b.c>", *[f"RCPT TO:<{RCPT}>"] * 5),
    "size at MAIL and at DATA": lines("EHLO c", "MAIL FROM:<a@b.c> SIZE=20000",
                                      "MAIL FROM:<a@b.c> SIZE=100", f"RCPT TO:<{RCPT}>", "DATA")
    + (b"x" * 998 + b"\r\n") * 6 + b".\r\n",
    "header too big": TRANSACTION + lines("DATA") + b"X-Huge: " + b"a" * 3000 + b"\r\n\r\nb\r\n.\r\n",
    **{f"smuggling {smuggle!r}": TRANSACTION + lines("DATA") + MESSAGE % 1
       + smuggle + SMUGGLED + b".\r\n"
       for smuggle in (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\n.\r")},
    "bare LF": TRANSACTION + lines("DATA") + b"Subject: bare\n\nline one\n.\nMAIL FROM:<x@y>\r\n.\r\n",
    "dot stuffing": TRANSACTION + lines("DATA") + b"Subject: dots\r\n\r\n..a\r\n...b\r\n.\r\n",
    "empty message, pipelined": lines("EHLO c", "MAIL FROM:<>", f"RCPT TO:<{RCPT}>", "DATA")
    + b".\r\nQUIT\r\n",
    "binary garbage": bytes(range(256)).replace(b"\n", b"") + b"\r\n\x00\xff\xfe HELO\r\n",
    "bdat in chunks": TRANSACTION + b"BDAT 30\r\n" + (MESSAGE % 2)[:30]
    + b"BDAT %d LAST\r\n" % (len(MESSAGE % 2) - 30) + (MESSAGE % 2)[30:],
    "bdat dots are content": TRANSACTION + b"BDAT 18 LAST\r\nSubject: x\r\n\r\n.\r\n..x\r\n",
    "bdat without recipient": lines("EHLO c") + b"BDAT 20 LAST\r\nMAIL FROM:<evil@x>\r\n"
    + lines("NOOP"),
    "bdat too big": TRANSACTION + b"BDAT 3000\r\n" + b"x" * 3000 + b"BDAT 3000 LAST\r\n"
    + b"x" * 3000 + lines("NOOP"),
    "bdat without a size": TRANSACTION + lines("BDAT lots", "NOOP"),
    "data after bdat": TRANSACTION + b"BDAT 5\r\nhello" + lines("DATA"),
    "bdat before ehlo": b"BDAT 5 LAST\r\nhello" + lines("NOOP"),
    "bdat without mail": lines("EHLO c") + b"BDAT 3\r\nabc" + lines("MAIL FROM:<a@b>", "RSET"),
    "control characters": lines("EHLO bad\x00host", "HELO bad\x7fhost", "EHLO bad\rhost",
                                "EHLO c", "MAIL FROM:<a\x00b@example.org>",
                                "MAIL FROM:<a@example.org> SIZE=10\x01", "MAIL FROM:<a@b.c>",
                                "RCPT TO:<support+x\rinjected@acme.agents.test>",
                                "RCPT TO:<support+\x1b[31m@acme.agents.test>"),
    "helo, no ehlo": lines("HELO c", "MAIL FROM:<a@b.c> SIZE=10", "MAIL FROM:<a@b.c>",
                           f"RCPT TO:<{RCPT}> NOTIFY=NEVER", f"RCPT TO:<{RCPT}>", "HELP MAIL",
                           "AUTH PLAIN AAAA"),
    "help": lines("HELP", "HELP mail", "HELP nothing", "EHLO c", "HELP RCPT", "HELP expn",
                  "HELP STARTTLS"),
    "auth": lines("AUTH PLAIN", "EHLO c", "AUTH", "AUTH PLAIN AAAA", "AUTH LOGIN a b c"),
    "parameters": lines("EHLO c", "MAIL FROM:<a@b.c> BODY=BINARYMIME",
                        "MAIL FROM:<a@b.c> BODY", "MAIL FROM:<a@b.c> SMTPUTF8=yes",
                        "MAIL FROM:<a@b.c> SIZE", "MAIL FROM:<a@b.c> SIZE=", "MAIL FROM:<a@b.c> X-Y=1",
                        "MAIL FROM:<a@b.c> FOO", "MAIL FROM:<a@b.c> BODY=8bitmime SMTPUTF8 SIZE=5",
                        f"RCPT TO:<{RCPT}> FOO=bar", f"RCPT TO:<{RCPT}> =x", "RSET",
                        "MAIL FROM: <a@b.c>", "MAIL FROM:a@b.c", "MAIL FROM:<>", "RSET",
                        "MAIL FROM:<a@b.c> (comment)", "MAIL FROM:<@route:a@b.c>",
                        "MAIL FROM:<\"q\\\"uoted\"@acme.agents.test>", "MAIL TO:<a@b.c>",
                        "RCPT FROM:<a@b.c>", "RCPT TO:", "RCPT", "MAIL", "mail from:<x@y.z>"),
    "long lines": lines("NOOP " + "x" * 600, "MAIL FROM:<" + "a" * 520 + "@b.c>", "EHLO c",
                        "MAIL FROM:<" + "a" * 520 + "@b.c>", "NOOP " + "y" * 1200, "NOOP"),
    "an endless line": b"NOOP " + b"z" * 5000 + b"\r\nNOOP\r\n",
    "unknown commands end the session": lines("FOO", "BAR", "NOOP", "BAZ", "QUX", "QUUX", "NOOP"),
    "empty lines and whitespace": lines("", " ", "\t", "NOOP\t", "NOOP  ", "  NOOP", "RSET x",
                                        "QUIT x", "DATA x", "EHLO", "HELO", "VRFY", "VRFY <>",
                                        "VRFY <a b>"),
    "lines end at LF": b"NOOP\nNOOP\r\r\nEHLO c\n\rNOOP\r\n",
    "non-ASCII": "EHLO ünïcode\r\nMAIL FROM:<é@ü.test> SMTPUTF8\r\nRCPT TO:<support@acme.agents.test>\r\n"
    .encode() + b"VRFY \xff\xfe\r\nNO\xffOP\r\n",
    "command cap": lines(*["NOOP"] * 70),
    "nested transactions": TRANSACTION + lines("DATA") + MESSAGE % 3 + b".\r\n"
    + lines("MAIL FROM:<b@c.d>", f"RCPT TO:<{RCPT}>", "DATA") + MESSAGE % 3 + b".\r\n"
    + lines("RSET", "DATA", "MAIL FROM:<a@b.c>", "RSET", "RCPT TO:<x@y.z>"),
    "rset inside bdat": TRANSACTION + b"BDAT 4\r\nabcd" + lines("RSET", "MAIL FROM:<a@b.c>",
                                                                f"RCPT TO:<{RCPT}>")
    + b"BDAT 0 LAST\r\n",
    "ehlo twice resets": TRANSACTION + lines("EHLO again", "RCPT TO:<x@acme.agents.test>", "DATA"),
}


@pytest.mark.parametrize("wire", list(CASES.values()), ids=list(CASES))
def test_the_protocol_cases_get_the_same_replies(servers, wire):
    assert_same_replies(servers, wire)


def test_the_harness_sees_a_difference(servers):
    """The comparison is not vacuous: two different dialogues give different replies."""
    first = normalized(converse(servers["aiosmtpd"].port, lines("NOOP")))
    second = normalized(converse(servers["native"].port, lines("FOO")))
    assert first != second


ADDRESSES = st.sampled_from([f"<{RCPT}>", "<>", "<a@b>", "<x@evil.test>",
                             "<support+tag@ACME.agents.test>", RCPT, "<@route:a@b>",
                             "<\"q\\\"uoted\"@acme.agents.test>", "<é@ü.test>",
                             "<" + "a" * 300 + "@acme.agents.test>", "<nobody@acme.agents.test>",
                             "<a b>", "<a@b> (c)", ""])
PARAMS = st.sampled_from(["", " SIZE=100", " SIZE=abc", " BODY=8BITMIME", " BODY=BINARYMIME",
                          " SMTPUTF8", " NOTIFY=NEVER", " SIZE=99999999999", " X=" + "y" * 600,
                          " SIZE=", " body=7bit", "  SIZE=5  SMTPUTF8"])
WORD = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
               max_size=30)
CONTENT = st.lists(st.sampled_from([
    b"Subject: gen\r\n", b"\r\n", b"body\r\n", b".\r\n", b"..\r\n", b".x\r\n", b"bare\n",
    b"cr\r", b"\n.\n", b"\r\n.\n", b"MAIL FROM:<x@y>\r\n", b"x" * 998 + b"\r\n",
    b"From: a@b.c\r\n", b"\xff\xfe\r\n"]), max_size=8).map(b"".join)
COMMAND = st.one_of(
    st.builds(lambda a, p: f"MAIL FROM:{a}{p}".encode("utf-8", "surrogateescape") + b"\r\n",
              ADDRESSES, PARAMS),
    st.builds(lambda a, p: f"RCPT TO:{a}{p}".encode("utf-8", "surrogateescape") + b"\r\n",
              ADDRESSES, PARAMS),
    st.sampled_from([b"EHLO client.test\r\n", b"HELO x\r\n", b"EHLO\r\n", b"RSET\r\n",
                     b"NOOP\r\n", b"VRFY support\r\n", b"DATA\r\n", b"BDAT 0 LAST\r\n",
                     b"BDAT x\r\n", b"STARTTLS\r\n", b"AUTH PLAIN AAAA\r\n", b"HELP\r\n",
                     b"HELP data\r\n", b"EXPN all\r\n", b"\r\n", b" \r\n", b"\x00\x01\r\n",
                     b"DATA extra\r\n", b"noop\n", b"QUIT\r\n", b"rset\r\n"]),
    st.builds(lambda word: word.encode() + b"\r\n", WORD),
    # DATA with its content (refused or not: the bytes are then read as commands)
    CONTENT.map(lambda body: b"DATA\r\n" + body + b".\r\n"),
    # BDAT with a chunk of the size it announces
    st.tuples(CONTENT, st.booleans()).map(
        lambda chunk: b"BDAT %d%s\r\n" % (len(chunk[0]), b" LAST" if chunk[1] else b"")
        + chunk[0]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(COMMAND, max_size=14))
def test_generated_dialogues_get_the_same_replies(servers, steps):
    assert_same_replies(servers, b"".join(steps))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(COMMAND, max_size=10))
def test_generated_transactions_get_the_same_replies(servers, steps):
    """After a valid EHLO, MAIL and RCPT: the commands reach the later states."""
    assert_same_replies(servers, TRANSACTION + b"".join(steps))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(COMMAND, max_size=10), st.lists(st.integers(1, 40), max_size=40))
def test_dialogues_read_in_pieces_get_the_same_replies(servers, steps, pieces):
    """Commands, content and the terminator cut anywhere across reads."""
    assert_same_replies(servers, TRANSACTION + b"".join(steps), pieces)


def converse_over_tls(port: int, before: bytes, wire: bytes) -> list[bytes]:
    """`before` in the clear, then STARTTLS (with whatever the client pipelines after it,
    which the server must drop), the handshake, and `wire` with the tail inside TLS."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    received = b""
    try:
        sock.sendall(before + b"STARTTLS\r\nNOOP\r\nMAIL FROM:<injected@evil.test>\r\n")
        while not received.endswith(b"220 2.0.0 Ready to start TLS\r\n"):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        tls = client_context().wrap_socket(sock, server_hostname="mx.test.local")
        tls.sendall(wire + TAIL)
        while chunk := tls.recv(65536):
            received += chunk
        tls.close()
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    return normalized(received.split(b"\r\n"))


TLS_CASES = {
    "a message": TRANSACTION + lines("DATA") + MESSAGE % 4 + b".\r\n",
    "state is reset": lines("MAIL FROM:<a@b.c>", "EHLO c", "HELP STARTTLS", "NOOP"),
    "bdat": TRANSACTION + b"BDAT 12 LAST\r\nSubject: t\r\n\r\n",
    # STARTTLS again is left out: a documented difference (test below).
    "commands": CASES["replies of a session"].replace(b"STARTTLS\r\n", b""),
}


@pytest.mark.parametrize("before", [lines("EHLO c"), lines("EHLO c", "MAIL FROM:<a@b.c>"), b""],
                         ids=["after EHLO", "inside a transaction", "before EHLO"])
@pytest.mark.parametrize("wire", list(TLS_CASES.values()), ids=list(TLS_CASES))
def test_starttls_dialogues_get_the_same_replies(tls_servers, before, wire):
    """Pipelined plaintext after STARTTLS is dropped, and the session starts afresh."""
    answers = {layer: converse_over_tls(server.port, before, wire)
               for layer, server in tls_servers.items()}
    assert answers["native"] == answers["aiosmtpd"]
    assert b"injected" not in b"".join(answers["native"])


def test_starttls_inside_tls_is_refused_by_the_native_layer(tls_servers):
    """The documented difference: 554 5.5.1, and the session goes on (aiosmtpd would
    start a second handshake inside the first)."""
    replies = converse_over_tls(tls_servers["native"].port, lines("EHLO c"),
                                lines("EHLO c", "STARTTLS", "NOOP"))
    after = replies[replies.index(b"220 2.0.0 Ready to start TLS") + 1:]
    assert b"554 5.5.1 TLS already active" in after
    assert after[after.index(b"554 5.5.1 TLS already active") + 1] == b"250 2.0.0 OK"
