"""The typed record that flows through the pipeline.

Every way in builds the same record: the SMTP listener freezes aiosmtpd's
mutable session and envelope into an `Envelope` at the DATA boundary, a
provider webhook builds one from the verified post (ingress.py has the steps
both share). Each stage (authenticate, scan, store) reads it and returns its
own result; nothing downstream touches aiosmtpd or aiohttp objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

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
class Iprev:
    """The client's reverse DNS, confirmed forward (RFC 8601 section 3): computed once per
    connection at connect, kept with every message of it (the spam stage reads it too)."""

    result: str  # pass / fail / temperror / permerror
    ip: str
    name: str = ""  # the confirmed name on pass, else the first PTR name (if any)

    @property
    def confirmed_name(self) -> str:
        """The client's name only when forward-confirmed, else "": what rspamd's `Hostname`
        header expects (it reads a missing or "unknown" name as an unresolved client)."""
        return self.name if self.result == "pass" else ""


@dataclass(frozen=True)
class Envelope:
    """What the way in knows about one transaction, whichever way it was."""

    session_id: str
    client_ip: str
    helo: str
    mail_from: str  # "" for the null sender
    recipients: tuple[Recipient, ...]
    tls: bool = False
    tls_version: str | None = None
    smtputf8: bool = False
    received_at: datetime | None = None
    queue_id: str = ""
    esmtp: bool = True
    # "smtp", or the provider whose webhook posted the message ("ses", "sendgrid", ...).
    transport: str = "smtp"
    # False when a provider gave us only parsed fields, not the message as sent: there
    # is no signature left to verify, so authentication records "none" instead of "fail".
    authenticable: bool = True
    # VERP tokens of recipients routed to the bounce processor (outbound/bounces.py)
    bounce_tokens: tuple[str, ...] = ()
    iprev: Iprev | None = None  # None: not computed (a webhook, or edge.iprev off)
    # DNSBL zones (edge.dnsbl) listing the client, when edge.dnsbl_action = "mark"
    dnsbl: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReceivedContent:
    """One received message as every way in hands it to the pipeline: the envelope, the
    bytes after the content step (line endings, header size), and our trace header."""

    envelope: Envelope
    data: bytes
    trace_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class InboundMessage:
    """One received message: envelope, the bytes as received, and their parse."""

    envelope: Envelope
    raw: bytes
    parsed: ParsedMessage
    trace_headers: tuple[tuple[str, str], ...] = field(default=())
    # the new text without quoted history and signature (extract/reply.py), set by the
    # pipeline's content step before the store; None only before that step
    extracted_text: str | None = None


@dataclass(frozen=True)
class StoredInbound:
    """A stored inbound message as an answer to it needs it: its threading headers, whom
    it came from and which of our addresses it was for. The built-in agent's reply
    (agent/jobs.load_inbound) and a reply over the API (store/mailbox.reply_target) read
    the same columns into it (store/mailbox.STORED_INBOUND)."""

    message_id: str | None
    references: tuple[str, ...]
    in_reply_to: tuple[str, ...]
    subject: str | None
    from_address: str | None
    reply_to: str | None
    rcpt_to: str | None
