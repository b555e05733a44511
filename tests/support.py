"""Test harness: a real Postgres, the real server on a loopback port, raw SMTP dialogues.

The server runs in its own thread with its own event loop, exactly as in
production (real sockets, real asyncpg pool); tests talk to it over TCP and
read Postgres with their own connection.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiosmtpd.controller import Controller

from smtpd_agent.app import App, MailServer
from smtpd_agent.http import HttpServer
from smtpd_agent.config import Settings, load_settings
from smtpd_agent.store import directory
from smtpd_agent.store.database import migration_files

DEFAULT_DOMAIN = "agents.test"
# Short enough that DNS timeout tests stay fast, long enough for a loaded CI box.
TEST_DNS_TIMEOUT = 0.5
# Nothing listens here: a server built without a test DNS server can never reach real DNS.
UNREACHABLE_DNS = "127.0.0.1:9"
REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")
IN_CI = os.environ.get("CI", "").lower() == "true"


def required(binary: str | None, name: str, packages: str) -> str:
    """A program a test needs (clamd, rspamd, dig...): its path. Without it the test skips,
    or with CI=true fails: CI must not pass by skipping what it could not run."""
    import pytest  # here: bench/ imports this module too, and runs without pytest

    if binary is None:
        reason = f"{name} not installed (apt-get install -y {packages})"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return binary
# The SMTP session layers (smtp.session). The protocol suites run under both; the rest of
# the suite under SMTPD_AGENT_TEST_SESSION (default native, the product's default), so
# that the whole suite can be run against the reference layer too:
# SMTPD_AGENT_TEST_SESSION=aiosmtpd ./scripts/test tests
SESSION_LAYERS = ("aiosmtpd", "native")
TEST_SESSION = os.environ.get("SMTPD_AGENT_TEST_SESSION", "native")


class EmbeddedCluster:
    """One pgserver instance for the test session; each test gets its own database."""

    def __init__(self, root: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        root.mkdir(parents=True, exist_ok=True)
        self.pgdata = root / "pgdata"
        self.server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self._names = itertools.count(1)

    def url(self, database: str = "postgres") -> str:
        return self.server.get_uri(database)

    async def new_database(self) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        connection = await asyncpg.connect(self.url())
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return self.url(name)

    def stop(self) -> None:
        self.server.cleanup()


def make_settings(database_url: str, state_dir: Path, **overrides: Any) -> Settings:
    values = {
        "database.url": database_url,
        "server.state_dir": str(state_dir),
        "server.default_domain": DEFAULT_DOMAIN,
        "server.hostname": "mx.test.local",
        "smtp.host": "127.0.0.1",
        "smtp.port": 0,
        "http.port": 0,
        "routing.cache_ttl": 0.5,
        "database.pool_min": 1,
        "database.pool_max": 4,
        "database.connect_timeout": 3,
        "smtp.shutdown_grace": 2,
        "dns.nameservers": [UNREACHABLE_DNS],
        "dns.timeout": TEST_DNS_TIMEOUT,
        "auth.timeout": 3,
        "smtp.session": TEST_SESSION,
        # one accepting process unless a test asks for more (the default is one per CPU)
        "smtp.processes": 1,
    }
    values.update(overrides)
    state_dir.mkdir(parents=True, exist_ok=True)
    empty = state_dir / "empty.toml"
    empty.write_text("")
    return load_settings(path=empty, env={}, overrides=values)


class ServerThread:
    """The real MailServer, in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = App(settings)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="smtpd-agent-test", daemon=True)

    @property
    def port(self) -> int:
        port = self.app.service(MailServer).port
        assert port is not None
        return port

    @property
    def http_port(self) -> int:
        port = self.app.service(HttpServer).port
        assert port is not None
        return port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _run(self) -> None:
        """The loop is closed on every way out (a failed start, a stop that raised): an
        unclosed loop's self-pipe (a Unix socket pair) would be left to the collector."""
        asyncio.set_event_loop(self.loop)
        try:
            try:
                self.loop.run_until_complete(self.app.start())
            except BaseException as error:  # reported to the starting thread
                self._error = error
                return
            finally:
                self._ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.app.stop())
        finally:
            self.loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        elif self._thread.ident is None:  # never started: its loop never ran to close itself
            self.loop.close()


OPEN_DIALOGUES: list[Dialogue] = []


@dataclass
class Dialogue:
    """A raw SMTP client over a socket, for what aiosmtplib refuses to send."""

    sock: socket.socket
    buffer: bytes = b""

    @classmethod
    def open(cls, port: int, timeout: float = 10.0) -> Dialogue:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        dialogue = cls(sock)
        OPEN_DIALOGUES.append(dialogue)
        return dialogue

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[bytes]]:
        """Read one (possibly multi-line) reply: its code and its lines."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            match = REPLY_LINE.match(line)
            assert match, f"not a reply line: {line!r}"
            lines.append(line)
            if match.group(2) == b" ":
                return int(match.group(1)), lines

    def command(self, line: bytes | str) -> tuple[int, bytes]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        code, lines = self.reply()
        return code, lines[-1]

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


def send_one(port: int, raw: bytes, mail_from: str, rcpt: str, *,
             ehlo: str = "mail.sender.test", timeout: float = 10.0) -> tuple[int, list[bytes]]:
    """One message to one recipient in a session of its own; the reply to the end of DATA.
    `raw` goes as given (a caller whose lines may start with a dot stuffs them)."""
    dialogue = Dialogue.open(port, timeout)
    try:
        dialogue.reply()
        dialogue.command(f"EHLO {ehlo}")
        assert dialogue.command(f"MAIL FROM:<{mail_from}>")[0] == 250
        assert dialogue.command(f"RCPT TO:<{rcpt}>")[0] == 250
        assert dialogue.command("DATA")[0] == 354
        dialogue.send(raw + b".\r\n")
        reply = dialogue.reply()
        dialogue.command("QUIT")
    finally:
        dialogue.close()
    return reply


def enhanced(line: bytes) -> str | None:
    match = re.match(rb"^\d{3}[ -](\d\.\d{1,3}\.\d{1,3}) ", line)
    return match.group(1).decode() if match else None


async def smtp_send(port: int, payload: bytes, mail_from: str, rcpts: list[str],
                    timeout: float = 30.0, timings: dict[str, float] | None = None,
                    pipelining: bool = False) -> tuple[int, bytes]:
    """Send one message over a new connection, as an MTA would; (code, last reply line).

    The payload is the message as it goes after DATA (dot-stuffed, without the final dot).
    A connection error comes back as code 0, so load tests can retry like a real sender.
    `timings["data"]` receives the seconds from the final dot to the reply; with
    `pipelining`, MAIL, RCPT and DATA go in one write (RFC 2920), as smtp-source sends them.
    """

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line.rstrip(b"\r\n")

    async def dialogue() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            commands = [b"MAIL FROM:<%s>" % mail_from.encode(),
                        *(b"RCPT TO:<%s>" % r.encode() for r in rcpts), b"DATA"]
            await reply(reader)  # greeting
            writer.write(b"EHLO client.example.org\r\n")
            await reply(reader)
            if pipelining:
                writer.write(b"".join(c + b"\r\n" for c in commands))
            for command in commands:
                if not pipelining:
                    writer.write(command + b"\r\n")
                line = await reply(reader)
                if not (line.startswith(b"2") or line.startswith(b"354")):
                    return int(line[:3]), line
            writer.write(payload + b".\r\n")
            started = time.perf_counter()
            line = await reply(reader)
            if timings is not None:
                timings["data"] = time.perf_counter() - started
            writer.write(b"QUIT\r\n")
            return int(line[:3]), line
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    try:
        return await asyncio.wait_for(dialogue(), timeout)
    except (ConnectionError, OSError, asyncio.TimeoutError) as error:
        return 0, str(error).encode()


REPO = Path(__file__).resolve().parents[1]


def serve_events(log_path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The JSON log events `serve` wrote to `log_path` from byte `offset` on."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def wait_for_ready(process: subprocess.Popen, log_path: Path, offset: int = 0,
                   timeout: float = 90) -> dict[str, Any]:
    """The `server.ready` event of a `serve` started with log.format json and log.level info
    or debug: every service is up, and it names the ports bound. Tests start serve with
    port 0 and read the port here, so no port is probed free, closed, and taken by another
    process before serve binds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = process.poll() is not None
        for event in serve_events(log_path, offset):
            if event.get("event") == "server.ready":
                return event
        if exited:
            raise RuntimeError(f"serve exited {process.returncode}: "
                               + log_tail(log_path, offset))
        time.sleep(0.1)
    raise RuntimeError(f"serve not ready within {timeout}s: " + log_tail(log_path, offset))


async def migrate_until(connection: Any, last: int) -> None:
    """Apply the numbered migrations up to `last` only, recorded as the migrator records
    them: a database as a deployment at that version has it, for upgrade tests."""
    await connection.execute(
        """CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                           applied_at timestamptz NOT NULL DEFAULT now())""")
    for version, name, sql in migration_files():
        if version <= last:
            await connection.execute(sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def wait_searchable(db: Any, guard: float = 60.0) -> None:
    """Until the search indexer has taken every stored message (store/search.py indexes
    after the COMMIT): a test that searches right after a 250 waits for this first."""
    deadline = time.monotonic() + guard
    while await db.fetchval("SELECT count(*) FROM search_queue"):
        if time.monotonic() > deadline:
            raise AssertionError(f"messages still queued for search after {guard}s")
        await asyncio.sleep(0.05)


def log_tail(log_path: Path, offset: int = 0, lines: int = 30) -> str:
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ServeProcess:
    """`smtpd-agent serve` as a real subprocess, for tests that kill or signal it.

    The first start binds port 0 (SMTP and HTTP) and learns the ports from serve's
    `server.ready` line. A restart binds the SMTP port it had, as a restarted MTA does, so
    clients that were cut off reconnect to the same address (only that rebind, after a
    kill, names a port; another process could take it in between, never on a first start)."""

    def __init__(self, env: dict[str, str], state_dir: Path) -> None:
        # one accepting process (the default is one per CPU) unless the test asks for
        # more, in env or in a config file of its own
        processes = {} if "SMTPD_AGENT_CONFIG" in env else {"SMTPD_AGENT_SMTP_PROCESSES": "1"}
        self.env = {**os.environ, "SMTPD_AGENT_LOG_FORMAT": "json",
                    "SMTPD_AGENT_SMTP_SESSION": TEST_SESSION, **processes, **env}
        self.env.pop("DATABASE_URL", None) if "DATABASE_URL" not in env else None
        level = self.env.get("SMTPD_AGENT_LOG_LEVEL", "info").lower()
        assert level in ("debug", "info"), "the ports are read from the info line server.ready"
        self.state_dir = state_dir
        self.port = 0
        self.http_port = 0
        self.process: subprocess.Popen | None = None
        self.log_path = state_dir / "serve.log"

    def start(self, timeout: float = 90) -> ServeProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        # --http-port 0, never the default 8001: two of these (or a developer's serve)
        # must not collide.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpd_agent", "serve", "--state-dir", str(self.state_dir),
             "--port", str(self.port), "--http-port", "0"], cwd=REPO,
            env=self.env, stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        try:
            ready = wait_for_ready(self.process, self.log_path, offset, timeout)
        except BaseException:
            self.kill()  # the caller never gets a handle to stop it with
            raise
        self.port, self.http_port = ready["smtp_port"], ready["http_port"]
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, 0, lines)


class LoopbackController(Controller):
    """aiosmtpd's threaded Controller on 127.0.0.1, bound to port 0: `port` is read from the
    bound socket before the controller's start-up self-connection uses it. (Controller asks
    for a port number up front; a probed free one can be taken before it binds.)"""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0, **kwargs)

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        async def bind() -> asyncio.AbstractServer:
            server = await super(LoopbackController, self)._create_server()
            self.port = server.sockets[0].getsockname()[1]
            return server
        return bind()


def start_with_acme_support(url: str, settings: Settings) -> ServerThread:
    """A running server whose database has the workspace acme and its agent support (no
    auto-reply): what the hostile-client suites deliver to alongside their attacks."""
    server = ServerThread(settings).start()
    asyncio.run(add_acme_support(url))
    return server


async def add_acme_support(url: str) -> None:
    """The workspace acme and its agent support (no auto-reply), on a connection of its own."""
    connection = await asyncpg.connect(url)
    try:
        await directory.add_workspace(connection, "acme")
        await directory.add_agent(connection, "acme", "support", auto_reply=False)
    finally:
        await connection.close()


# Lines that make MIME hard to parse (broken boundaries, encodings and charsets, RFC 2047 and
# 2231 garbage, NUL and 8-bit bytes, dot lines): hypothesis strings them together for the
# fuzz test over SMTP and for the parse_message differential test.
HOSTILE_MIME_LINES = [
    b"Content-Type: multipart/mixed; boundary=x\r\n", b"--x\r\n", b"--x--\r\n", b"--y\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Type: text/plain; charset=x-nope\r\n", b"Subject: =?utf-8?B?////?=\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%ff%fe\r\n", b"\r\n", b"=\r\n",
    b"Content-Type: message/rfc822\r\n", b"Message-ID: <a@b>\r\n", b"From: =?x?q?=ZZ?=\r\n",
    b"\xff\xfe\x00garbage\r\n", b".\r\n", b"..\r\n", b"Content-Type: multipart/alternative\r\n",
    b"QUJDRA\r\n",
]
