"""Fixtures shared by every test: Postgres, a database per test, the running server."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from smtpd_agent.auth import adapters
from smtpd_agent.store import directory
from tests.clamd import APT_PACKAGES, Clamd, find_clamd
from tests.dnsserver import DnsTestServer
from tests.ports import held_closed_port
from tests.rspamd import APT_PACKAGES as RSPAMD_PACKAGES
from tests.rspamd import Rspamd, find_rspamd
from tests.support import (DEFAULT_DOMAIN, OPEN_DIALOGUES, TEST_SESSION, EmbeddedCluster,
                           ServerThread, make_settings, required)


@pytest.fixture(scope="session", autouse=True)
def library_adapters() -> None:
    """dkimpy's RSA through OpenSSL, installed once as the runtime does at start-up."""
    adapters.install()


@pytest.fixture(scope="session")
def dns_server_session() -> Iterator[DnsTestServer]:
    """An authoritative DNS server on loopback; the only DNS any test may reach."""
    with DnsTestServer() as server:
        yield server


@pytest.fixture
def dns_server(dns_server_session: DnsTestServer) -> Iterator[DnsTestServer]:
    """The session's DNS server with empty zones, for this test to fill."""
    dns_server_session.clear()
    yield dns_server_session
    dns_server_session.clear()


@pytest.fixture(autouse=True)
def close_dialogues() -> Iterator[None]:
    yield
    while OPEN_DIALOGUES:
        OPEN_DIALOGUES.pop().close()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """The real Postgres for the session (pgserver's embedded server)."""
    try:
        cluster = EmbeddedCluster(tmp_path_factory.mktemp("postgres"))
    except Exception as error:  # a missing Postgres must fail, never skip, in CI
        pytest.fail(f"cannot start the embedded Postgres: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture
async def database_url(cluster: EmbeddedCluster) -> str:
    return await cluster.new_database()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection for the test's own reads; the schema is the server's (migrated at start)."""
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
def smtp_session() -> str:
    """The SMTP session layer (smtp.session) of the servers a test starts. A module that
    tests the protocol overrides it with params=SESSION_LAYERS to run under both."""
    return TEST_SESSION


@pytest.fixture
def start_server(database_url: str, tmp_path: Path, dns_server: DnsTestServer,
                 smtp_session: str) -> Iterator[Callable[..., ServerThread]]:
    """Start the real server with setting overrides: start_server(**{"smtp.max_recipients": 2})."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        overrides.setdefault("dns.nameservers", [dns_server.nameserver])
        overrides.setdefault("smtp.session", smtp_session)
        settings = make_settings(database_url, tmp_path / f"state{len(started)}", **overrides)
        server = ServerThread(settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
async def server(start_server: Callable[..., ServerThread], db: asyncpg.Connection) -> ServerThread:
    """The server with defaults and two workspaces: acme (support, sales) and globex (support)."""
    running = start_server()
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_workspace(db, "globex", "Globex")
    await directory.add_agent(db, "acme", "support", display_name="Acme Support")
    await directory.add_agent(db, "acme", "sales")
    await directory.add_agent(db, "globex", "support")
    return running


@pytest.fixture(scope="session")
def clamd_session() -> Iterator[Clamd]:
    binary = required(find_clamd(), "clamd", " ".join(APT_PACKAGES))
    # /tmp, not pytest's deep tmp_path: a Unix socket path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="smtpd-agent-clamd-"))
    server = Clamd(root=root, binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clamd(clamd_session: Clamd) -> Iterator[Clamd]:
    """The session's clamd, guaranteed running (and not paused) before and after each test."""
    clamd_session.start()
    yield clamd_session
    if clamd_session.running:
        clamd_session.resume()
    else:
        clamd_session.start()


@pytest.fixture(scope="session")
def rspamd_session(dns_server_session: DnsTestServer) -> Iterator[Rspamd]:
    """A real rspamd with a config of its own, started once per session (tests/rspamd.py)."""
    binary = required(find_rspamd(), "rspamd", " ".join(RSPAMD_PACKAGES))
    root = Path(tempfile.mkdtemp(prefix="smtpd-agent-rspamd-"))
    server = Rspamd(root=root, binary=binary, nameserver=dns_server_session.nameserver)
    try:
        server.start()
    except Exception as error:
        server.stop()
        pytest.fail(f"cannot start rspamd: {error}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def rspamd(rspamd_session: Rspamd) -> Rspamd:
    """The session's rspamd, running."""
    assert rspamd_session.running, rspamd_session.output_tail()
    return rspamd_session


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (an unreachable peer)."""
    with held_closed_port() as port:
        yield port


@pytest.fixture
def domain() -> str:
    return DEFAULT_DOMAIN
