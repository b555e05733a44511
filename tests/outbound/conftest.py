"""Outbound test parts: an SMTP relay sink and a local SES endpoint (moto), both on loopback,
and helpers that store agent replies the way the agent worker does (issue 6's contract)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import format_datetime, make_msgid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smtpd_agent.store import directory
from smtpd_agent.store.database import init_connection
from smtpd_agent.store.messages import OutboundRow, store_outbound
from tests.support import DEFAULT_DOMAIN, LoopbackController

AGENT = f"support@acme.{DEFAULT_DOMAIN}"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float


@dataclass
class RelaySink:
    """Records what it accepts; `script` holds replies to give at RCPT, one per RCPT, in order
    (a reply of None accepts), so a test can say "451 twice, then 250"."""

    script: list[str | None] = field(default_factory=list)
    data_script: list[str | None] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    rcpt_times: list[float] = field(default_factory=list)
    connections: int = 0
    # seconds each RCPT takes to answer (keeps an attempt in flight for a kill to land in)
    rcpt_delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        with self.lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        with self.lock:
            self.rcpt_times.append(time.monotonic())
            reply = self.script.pop(0) if self.script else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            reply = self.data_script.pop(0) if self.data_script else None
            if reply is not None:
                return reply
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          bytes(envelope.original_content), time.monotonic()))
            number = len(self.received)
        return f"250 2.0.0 Ok: queued as SINK{number:04d}"

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.received) >= count:
                return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"relay got {len(self.received)} messages, expected {count}")


@pytest.fixture
def relay() -> Iterator[tuple[RelaySink, str]]:
    """The sink, and the outbound.relay URL that reaches it."""
    sink = RelaySink()
    controller = LoopbackController(sink, ready_timeout=10)
    controller.start()
    yield sink, f"smtp://127.0.0.1:{controller.port}?tls=none"
    controller.stop()


def fast(relay_url: str, **more: Any) -> dict[str, Any]:
    """Outbound settings that make a test's retries take fractions of a second."""
    return {"outbound.relay": relay_url, "outbound.poll_interval": 0.05,
            "outbound.retry_base": 0.3, "outbound.retry_max": 2.0, "outbound.lease": 5,
            "outbound.timeout": 5, **more}


async def make_agent(db: asyncpg.Connection, slug: str = "acme", handle: str = "support") -> Any:
    try:
        await directory.add_workspace(db, slug)
    except directory.DirectoryError:
        pass
    return await directory.add_agent(db, slug, handle)


def reply_bytes(to: str, subject: str = "Re: your order", sender: str = AGENT,
                message_id: str | None = None) -> bytes:
    domain = sender.rpartition("@")[2]
    return (f"From: Acme Support <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {format_datetime(datetime.now(UTC))}\r\n"
            f"Message-ID: {message_id or make_msgid(domain=domain)}\r\n"
            "In-Reply-To: <q1@example.org>\r\nReferences: <q1@example.org>\r\n"
            "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            "Your order ships today.\r\n").encode()


async def store_reply(db: asyncpg.Connection, agent: Any, to: str, **kwargs: Any) -> int:
    """An agent reply as the agent worker stores it: direction outbound, status queued."""
    raw = reply_bytes(to, **kwargs)
    sender = kwargs.get("sender", AGENT)
    thread_id = await db.fetchval(
        """INSERT INTO threads (workspace_id, agent_id, subject, correspondent)
           VALUES ($1, $2, 'Re: your order', $3) RETURNING id""",
        agent.workspace_id, agent.id, to)
    await init_connection(db)
    return await store_outbound(db, OutboundRow(
        workspace_id=agent.workspace_id, agent_id=agent.id, thread_id=thread_id,
        dedup_key=make_msgid(), message_id=None, in_reply_to=(), references=(),
        from_header=None, from_address=sender, to_address=to, subject="Re: your order",
        headers=(), text_body=None, html_body=None, raw=raw))


async def wait_state(db: asyncpg.Connection, message_id: int, states: set[str],
                     timeout: float = 60.0) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = await db.fetchrow("SELECT * FROM deliveries WHERE message_id = $1", message_id)
        if row is not None and row["status"] in states:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery of message {message_id}: {dict(row) if row else None}")


def self_signed(directory: Path) -> tuple[Path, Path]:
    """(cert, key) PEM files for 127.0.0.1, the cert being its own CA (trust it as relay_ca_file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(
                "127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "relay.pem", directory / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class SecureRelay:
    sink: RelaySink
    url: str
    ca_file: Path
    logins: list[str]


# aiosmtpd leaves its own (server-side) socket of a TLS session unclosed after QUIT; the leak
# is the sink's (the port in the warning is the sink's), so it is ignored for TLS sinks only.
SINK_SOCKET_LEAK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(params=[pytest.param("starttls", marks=SINK_SOCKET_LEAK),
                        pytest.param("implicit", marks=SINK_SOCKET_LEAK)])
def secure_relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecureRelay]:
    """The sink behind TLS (STARTTLS required, or implicit TLS) demanding AUTH."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins: list[str] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = auth_data.login == b"agent@relay" and auth_data.password == b"s3cret:pw"
        logins.append(f"{mechanism} {auth_data.login.decode()} {ok}")
        return AuthResult(success=ok)

    sink = RelaySink()
    tls = {"tls_context": context, "require_starttls": True} \
        if request.param == "starttls" else {"ssl_context": context}
    controller = LoopbackController(sink, ready_timeout=10,
                                    authenticator=authenticator, auth_required=True,
                                    # aiosmtpd does not count implicit TLS as TLS for AUTH:
                                    # ask it only of STARTTLS
                                    auth_require_tls=request.param == "starttls", **tls)
    controller.start()
    yield SecureRelay(sink, f"smtp://agent%40relay:s3cret%3Apw@127.0.0.1:{controller.port}"
                            f"?tls={request.param}", cert, logins)
    controller.stop()
    gc.collect()  # the implicit-TLS sink's leaked socket goes now, under its warning filter
