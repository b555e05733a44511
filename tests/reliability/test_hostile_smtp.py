"""Hostile SMTP clients (issue 16, defects 4-7) while a well-behaved one delivers alongside.

Each test drives one attack over real sockets against the real listener and,
meanwhile, a neighbour sends a message every few tenths of a second: every one
of its messages must get 250 within a few seconds, and the server's memory
and CPU must stay bounded (generous bounds: the server runs in this process, and
the figures that matter are in bench/hostile_smtp.py). Every test here fails
on the listener before issue 16 (4aece04).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import psutil
import pytest

from smtpd_agent.smtp import replies
from smtpd_agent.smtp.limits import LIVENESS_TTL
from tests.ports import wait_for_listeners
from tests.support import (
    DEFAULT_DOMAIN, SESSION_LAYERS, Dialogue, enhanced, make_settings, ServeProcess, ServerThread,
    smtp_send, start_with_acme_support)
from tests.tls import client_context, write_self_signed

RCPT = f"support@acme.{DEFAULT_DOMAIN}"
MAX_COMMANDS = 3_000
MIN_DATA_RATE = 4_000  # bytes/s, over windows of one second
DATA_BUDGET = 3_000_000
NEIGHBOUR_SECONDS = 3.0  # the longest a well-behaved client may wait for its 250
RSS_BOUND = 96 * 2**20  # growth of this process (server and clients) during one attack
CPU_BOUND = 30.0  # CPU seconds of this process during one attack


@dataclass
class Neighbour:
    """A well-behaved MTA sending one message after another while an attack runs."""

    port: int
    results: list[tuple[int, float]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        index = 0
        while not stop.is_set():
            index += 1
            payload = (b"Subject: neighbour %d\r\nMessage-ID: <n%d.%d@example.org>\r\n\r\n"
                       b"hello\r\n" % (index, os.getpid(), time.monotonic_ns()))
            started = time.monotonic()
            code, _ = await smtp_send(self.port, payload, "neighbour@example.org", [RCPT],
                                      timeout=NEIGHBOUR_SECONDS * 3)
            self.results.append((code, time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    def check(self) -> None:
        assert len(self.results) >= 2, "the neighbour did not get to send"
        assert [code for code, _ in self.results] == [250] * len(self.results), self.results
        slowest = max(seconds for _, seconds in self.results)
        assert slowest < NEIGHBOUR_SECONDS, f"neighbour waited {slowest:.2f}s for its 250"


class PeakRss:
    """Peak RSS growth of this process (the server runs in a thread of it), sampled."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


@asynccontextmanager
async def alongside(port: int) -> AsyncIterator[Neighbour]:
    """Run a neighbour during the block; then check its 250s and the memory bound."""
    neighbour = Neighbour(port)
    stop = asyncio.Event()
    rss = PeakRss()
    cpu = sum(rss.process.cpu_times()[:2])
    task = asyncio.create_task(neighbour.run(stop))
    await asyncio.sleep(0.3)
    try:
        yield neighbour
    finally:
        deadline = time.monotonic() + 60
        while len(neighbour.results) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await task
        growth = rss.growth()
        cpu = sum(rss.process.cpu_times()[:2]) - cpu
    neighbour.check()
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.0f} MB during the attack"
    assert cpu < CPU_BOUND, f"{cpu:.1f} CPU seconds during the attack"


@pytest.fixture(scope="module", params=SESSION_LAYERS)
def smtp_session(request: pytest.FixtureRequest) -> str:
    """Every attack here runs against both session layers (smtp.session)."""
    return request.param


@pytest.fixture(scope="module")
def hostile_server(cluster, dns_server_session, tmp_path_factory,
                   smtp_session) -> Iterator[ServerThread]:
    url = asyncio.run(cluster.new_database())
    state = tmp_path_factory.mktemp("hostile")
    cert, key = write_self_signed(state / "tls")
    settings = make_settings(url, state, **{"smtp.session": smtp_session,
        "dns.nameservers": [dns_server_session.nameserver], "smtp.command_timeout": 6,
        "smtp.max_commands": MAX_COMMANDS, "smtp.min_data_rate": MIN_DATA_RATE,
        "smtp.data_rate_window": 1.0, "smtp.data_memory_budget": DATA_BUDGET,
        "smtp.tls_cert": str(cert), "smtp.tls_key": str(key)})
    server = start_with_acme_support(url, settings)
    yield server
    server.stop()


async def open_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    writer.write(b"EHLO hostile.example\r\n")
    await read_reply(reader)
    return reader, writer


async def read_reply(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    async def read() -> bytes:
        while True:
            line = await reader.readline()
            if not line or line[3:4] != b"-":
                return line.rstrip(b"\r\n")
    return await asyncio.wait_for(read(), timeout)


async def received_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server writes until it closes the connection (or `timeout`)."""
    data = bytearray()

    async def read() -> None:
        while chunk := await reader.read(65536):
            data.extend(chunk)
    try:
        await asyncio.wait_for(read(), timeout)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    return bytes(data)


# -- defect 4: control characters in HELO/EHLO, MAIL and RCPT -----------------------------

@pytest.mark.parametrize("command, reply", [
    (b"EHLO bad\x00host.example", replies.HELO_CONTROL_CHARACTER),
    (b"HELO bad\x7fhost.example", replies.HELO_CONTROL_CHARACTER),
    (b"EHLO bad\rhost.example", replies.HELO_CONTROL_CHARACTER),
    (b"MAIL FROM:<a\x00b@example.org>", replies.SENDER_CONTROL_CHARACTER),
    (b"MAIL FROM:<a@example.org> SIZE=10\x01", replies.SENDER_CONTROL_CHARACTER),
    (b"RCPT TO:<support+x\rinjected@acme.agents.test>", replies.RECIPIENT_CONTROL_CHARACTER),
    (b"RCPT TO:<support+x\x00@acme.agents.test>", replies.RECIPIENT_CONTROL_CHARACTER),
    (b"RCPT TO:<support+\x1b[31m@acme.agents.test>", replies.RECIPIENT_CONTROL_CHARACTER),
])
async def test_control_characters_are_refused_and_never_routed(hostile_server, command, reply):
    async with alongside(hostile_server.port):
        dialogue = Dialogue.open(hostile_server.port)
        dialogue.reply()
        if not command.startswith((b"EHLO", b"HELO")):
            assert dialogue.command("EHLO client.example")[0] == 250
        if command.startswith(b"RCPT"):
            assert dialogue.command("MAIL FROM:<alice@example.org>")[0] == 250
        code, line = dialogue.command(command)
        assert (code, enhanced(line)) == (reply.code, reply.enhanced), line
        # The session goes on: the refused argument left nothing behind.
        if command.startswith((b"EHLO", b"HELO")):
            assert dialogue.command("EHLO client.example")[0] == 250
        if not command.startswith(b"RCPT"):
            assert dialogue.command("MAIL FROM:<alice@example.org>")[0] == 250
        assert dialogue.command(f"RCPT TO:<{RCPT}>")[0] == 250
        assert dialogue.command("DATA")[0] == 354
        dialogue.send(b"Subject: after\r\nMessage-ID: <after-%d@example.org>\r\n\r\nhi\r\n.\r\n"
                      % time.monotonic_ns())
        code, lines = dialogue.reply()
        assert code == 250, lines
        dialogue.close()


# -- defect 5: replies held while input is buffered ---------------------------------------

async def test_held_replies_are_written_once_a_few_kb_wait(hostile_server):
    """1,000 NOOPs and half of one more, in one write: the replies come back although
    input stays buffered (today: nothing until the client completes the line)."""
    async with alongside(hostile_server.port):
        reader, writer = await open_session(hostile_server.port)
        writer.write(b"NOOP\r\n" * 1_000 + b"NO")
        reply = str(replies.NOOP_OK).encode() + b"\r\n"
        received = bytearray()
        deadline = time.monotonic() + 30
        while len(received) < 1_000 * len(reply) - 4096 and time.monotonic() < deadline:
            try:
                received += await asyncio.wait_for(reader.read(65536), 0.5)
            except asyncio.TimeoutError:
                pass
        assert len(received) >= 1_000 * len(reply) - 4096, f"{len(received)} bytes back"
        writer.write(b"OP\r\nQUIT\r\n")
        assert b"221" in await received_until_closed(reader, 5)
        writer.close()


async def test_a_session_past_the_command_cap_is_closed(hostile_server):
    """Pipelined NOOPs whose writes end mid-line, paced to the server: replies keep
    coming and the session ends with 421 4.7.0 after smtp.max_commands."""
    async with alongside(hostile_server.port):
        reader, writer = await open_session(hostile_server.port)
        probe_reader, probe_writer = await open_session(hostile_server.port)
        received = asyncio.create_task(received_until_closed(reader, 20))
        chunk = b"OP\r\n" + b"NOOP\r\n" * 999 + b"NO"
        writer.write(b"NO")
        sent = 0
        try:
            while not received.done() and sent < 5_000_000:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                probe_writer.write(b"RSET\r\n")  # back only once the server took the write in
                await read_reply(probe_reader)
        except ConnectionError:
            pass
        data = await received
        writer.close()
        probe_writer.close()
    assert data.count(b"250 ") >= MAX_COMMANDS - 10, f"{data.count(b'250 ')} replies back"
    last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    assert last.startswith(b"421 4.7.0"), last
    assert sent < 2_000_000, "the server kept reading past the cap"


# -- defect 6: STARTTLS pipelined with a command -------------------------------------------

async def test_starttls_pipelined_with_a_command_is_answered_at_once(hostile_server):
    async with alongside(hostile_server.port):
        sock = socket.create_connection(("127.0.0.1", hostile_server.port), timeout=2)
        dialogue = Dialogue(sock)
        dialogue.reply()
        assert dialogue.command("EHLO client.example")[0] == 250
        dialogue.send(b"STARTTLS\r\nNOOP\r\n")
        code, lines = dialogue.reply()  # today: held until command_timeout; socket.timeout
        assert code == 220, lines
        assert not dialogue.buffer
        context = client_context()
        tls = await asyncio.to_thread(context.wrap_socket, sock, server_hostname="mx.test.local")
        upgraded = Dialogue(tls)
        # The plaintext NOOP was discarded: the first reply inside TLS is to our EHLO.
        code, line = upgraded.command("EHLO client.example")
        assert code == 250 and b"STARTTLS" not in line
        assert upgraded.command("MAIL FROM:<alice@example.org>")[1].startswith(b"250 2.1.0")
        upgraded.close()


# -- defect 7: slow DATA, in-flight DATA bytes, limits across processes ---------------------

async def test_data_below_the_minimum_rate_is_cut_off(hostile_server):
    async with alongside(hostile_server.port):
        reader, writer = await open_session(hostile_server.port)
        for command in (b"MAIL FROM:<slow@example.org>", f"RCPT TO:<{RCPT}>".encode(), b"DATA"):
            writer.write(command + b"\r\n")
            assert (await read_reply(reader))[:1] in (b"2", b"3")
        closing = asyncio.create_task(received_until_closed(reader, 8))
        try:
            while not closing.done():
                writer.write(b"x" * 100 + b"\r\n")  # ~400 bytes/s, under 4,000
                await asyncio.sleep(0.25)
        except ConnectionError:
            pass
        data = await closing
        writer.close()
    # the rate check's own reply: neither the command timeout (6 s) nor the client's guard
    assert data.startswith(str(replies.DATA_TOO_SLOW).encode()), data
    assert enhanced(data) == "4.4.2"


async def test_bdat_below_the_minimum_rate_is_cut_off_but_not_after_rset(hostile_server):
    async with alongside(hostile_server.port):
        reader, writer = await open_session(hostile_server.port)
        for command in (b"MAIL FROM:<slow@example.org>", f"RCPT TO:<{RCPT}>".encode(),
                        b"BDAT 100"):
            writer.write(command + b"\r\n" + (b"x" * 100 if command == b"BDAT 100" else b""))
            assert (await read_reply(reader))[:1] == b"2"
        # A transaction abandoned between chunks no longer has a rate to keep.
        writer.write(b"RSET\r\n")
        assert (await read_reply(reader))[:1] == b"2"
        await asyncio.sleep(2.5)
        writer.write(b"NOOP\r\n")
        assert (await read_reply(reader))[:1] == b"2"
        for command in (b"MAIL FROM:<slow@example.org>", f"RCPT TO:<{RCPT}>".encode()):
            writer.write(command + b"\r\n")
            assert (await read_reply(reader))[:1] == b"2"
        writer.write(b"BDAT 100000 LAST\r\n")
        closing = asyncio.create_task(received_until_closed(reader, 8))
        try:
            while not closing.done():
                writer.write(b"x" * 100)  # ~400 bytes/s, under 4,000
                await asyncio.sleep(0.25)
        except ConnectionError:
            pass
        data = await closing
        writer.close()
    # the rate check's own reply: neither the command timeout (6 s) nor the client's guard
    assert data.startswith(str(replies.DATA_TOO_SLOW).encode()), data


async def test_in_flight_data_is_bounded_by_the_budget(hostile_server):
    """Two sessions hold 1.4 MB each mid-DATA (sending fast enough not to be cut off);
    a 1.2 MB message then does not fit the 3 MB budget: 452 4.3.1, and it is read to its
    end; the neighbour's small messages (under the free share) still get 250."""
    async with alongside(hostile_server.port):
        holders = []
        for _ in range(2):
            reader, writer = await open_session(hostile_server.port)
            for command in (b"MAIL FROM:<big@example.org>", f"RCPT TO:<{RCPT}>".encode(),
                            b"DATA"):
                writer.write(command + b"\r\n")
                assert (await read_reply(reader))[:1] in (b"2", b"3")
            writer.write(b"Subject: hold\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1_400)
            await writer.drain()
            holders.append((reader, writer))

        stop = asyncio.Event()

        async def trickle() -> None:
            while not stop.is_set():
                for _, writer in holders:
                    writer.write((b"z" * 998 + b"\r\n") * 2)
                await asyncio.sleep(0.1)

        trickling = asyncio.create_task(trickle())
        await asyncio.sleep(0.5)
        body = (b"w" * 998 + b"\r\n") * 1_200
        code, line = await smtp_send(hostile_server.port, b"Subject: big\r\n\r\n" + body,
                                     "big@example.org", [RCPT], timeout=20)
        assert (code, enhanced(line)) == (452, "4.3.1"), line
        stop.set()
        await trickling
        for reader, writer in holders:
            writer.write(b".\r\n")
            code = int((await read_reply(reader, 20))[:3])
            assert code == 250
            writer.close()
    # With the holders done, the budget is free again: the same message goes through.
    code, line = await smtp_send(hostile_server.port, b"Subject: big\r\n\r\n" + body,
                                 "big@example.org", [RCPT], timeout=20)
    assert code == 250, line


LIMIT_PER_IP = 3


async def test_connection_limits_hold_across_processes_and_survive_a_crash(
        cluster, dns_server, tmp_path, smtp_session):
    """smtp.processes = 2: the per-IP limit counts both processes' sessions; a killed
    extra process's sessions stop counting. (Today each process allows the limit.)"""
    url = await cluster.new_database()
    server = ServeProcess({"DATABASE_URL": url,
                           "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN,
                           "SMTPD_AGENT_DNS_NAMESERVERS": dns_server.nameserver,
                           "SMTPD_AGENT_SMTP_PROCESSES": "2", "SMTPD_AGENT_AGENT_WORKERS": "0",
                           "SMTPD_AGENT_SMTP_SESSION": smtp_session,
                           "SMTPD_AGENT_SMTP_MAX_CONNECTIONS_PER_IP": str(LIMIT_PER_IP)},
                          tmp_path / "state").start()
    try:
        pids = await wait_for_listeners(server.port, 2)
        assert len(pids) == 2, server.log_tail()
        child = next(pid for pid in pids if pid != server.process.pid)

        def greet() -> tuple[Dialogue, int]:
            dialogue = Dialogue.open(server.port)
            return dialogue, dialogue.reply()[0]

        def owner(dialogue: Dialogue) -> int:
            port = dialogue.sock.getsockname()[1]
            return next(c.pid for c in psutil.net_connections("tcp")
                        if c.laddr.port == server.port and c.raddr and c.raddr.port == port)

        # Connections from one client, spread over both processes by the kernel: together
        # they get the limit, not the limit each.
        opened = [greet() for _ in range(4 * LIMIT_PER_IP)]
        codes = [code for _, code in opened]
        assert codes.count(220) == LIMIT_PER_IP, codes
        assert set(codes) == {220, replies.TOO_MANY_CONNECTIONS.code}
        for dialogue, _ in opened:
            dialogue.close()
        await asyncio.sleep(0.5)

        # Now let the extra process hold the whole limit, and check the first one counts it.
        held: list[Dialogue] = []
        for _ in range(60):
            if len(held) == LIMIT_PER_IP:
                break
            dialogue, code = greet()
            if code == 220 and owner(dialogue) == child:
                held.append(dialogue)
            else:
                dialogue.close()
                await asyncio.sleep(0.2)
        assert len(held) == LIMIT_PER_IP
        refused = [greet() for _ in range(2 * LIMIT_PER_IP)]
        assert {code for _, code in refused} == {replies.TOO_MANY_CONNECTIONS.code}
        for dialogue, _ in refused:
            dialogue.close()

        # A crashed process's sessions stop counting.
        os.kill(child, 9)
        await asyncio.sleep(LIVENESS_TTL + 0.5)
        again = [greet() for _ in range(LIMIT_PER_IP)]
        assert [code for _, code in again] == [220] * LIMIT_PER_IP
        for dialogue, _ in again + [(d, 0) for d in held]:
            dialogue.close()
    finally:
        server.stop()
