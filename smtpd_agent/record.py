"""The typed record that flows through the pipeline.

The listener freezes aiosmtpd's mutable session and envelope into these at
the DATA boundary; each stage (authenticate, scan, store) reads them and
returns its own result; nothing downstream touches aiosmtpd objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from .message import ParsedMessage


@dataclass(frozen=True)
class Mailbox:
    """An agent's mailbox that a recipient address routed to."""

    workspace_id: int
    workspace_slug: str
    agent_id: int
    handle: str
    domain: str
    auto_reply: bool = True

    @property
    def address(self) -> str:
        return f"{self.handle}@{self.domain}"


@dataclass(frozen=True)
class Recipient:
    """One accepted RCPT TO, as the client wrote it, and where it goes."""

    address: str
    mailbox: Mailbox
    tag: str | None = None


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session knows about one transaction."""

    session_id: str
    client_ip: str
    helo: str
    mail_from: str
    recipients: tuple[Recipient, ...]
    tls: bool = False
    tls_version: str | None = None
    smtputf8: bool = False
    received_at: datetime | None = None

    @property
    def null_sender(self) -> bool:
        return self.mail_from in ("", "<>")


@dataclass(frozen=True)
class InboundMessage:
    """One received message: envelope, the bytes as received, and their parse."""

    envelope: Envelope
    raw: bytes
    parsed: ParsedMessage
    trace_headers: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True)
class ReceivedContent:
    """The message bytes of one transaction, after transparency and line-ending rules."""

    data: bytes
    session_id: str
    queue_id: str
    client_ip: str
    helo: str
    mail_from: str
    recipients: tuple[Recipient, ...]
    tls: bool
    tls_version: str | None
    smtputf8: bool
    esmtp: bool
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # "smtp", or the provider whose webhook posted the message ("ses", "sendgrid", ...).
    transport: str = "smtp"
    # False when a provider gave us only parsed fields, not the message as sent: there
    # is no signature left to verify, so authentication records "none" instead of "fail".
    authenticable: bool = True
    # VERP tokens of RCPTs routed to the bounce processor (outbound/bounces.py)
    bounce_tokens: tuple[str, ...] = ()
