"""The steps every way in shares: one recipient step and one content step.

The SMTP listener (smtp/) and each provider webhook (http/webhooks.py) call
these and nothing else to decide about a recipient or about the bytes of a
message, so a recipient is routed, and a message's line endings, header size
and trace header are treated, the same whichever way it came. Each step
returns a typed decision; smtp/replies.py turns a decision into the reply
(and, for a webhook, the HTTP status). Nothing here knows aiosmtpd or aiohttp.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import Enum

import structlog

from .config import SmtpSettings
from .record import Envelope, ReceivedContent, Recipient
from .routing import RouteKind, Router
from .store.acl import AclCache
from .store.database import DatabaseUnavailable

log = structlog.get_logger("smtpd_agent.smtp")

BARE_LF = re.compile(rb"(?<!\r)\n")


def new_session_id() -> str:
    return secrets.token_hex(6)


# --- the recipient step ---------------------------------------------------------------------

class RcptVerdict(Enum):
    """What became of one recipient (RCPT TO, or one address a provider posted for)."""

    MAILBOX = "mailbox"
    BOUNCE = "bounce"  # a VERP address of our outbound mail: the bounce processor takes it
    UNKNOWN_MAILBOX = "unknown mailbox"
    RELAY_DENIED = "relay denied"
    TOO_MANY_RECIPIENTS = "too many recipients"
    TEMPFAIL = "routing lookup failed"
    SENDER_REFUSED = "sender refused by acl"  # the mailbox's allow/block list refuses MAIL FROM

    @property
    def accepted(self) -> bool:
        return self in (RcptVerdict.MAILBOX, RcptVerdict.BOUNCE)


@dataclass(frozen=True)
class RcptDecision:
    verdict: RcptVerdict
    address: str
    recipient: Recipient | None = None  # MAILBOX
    verp_token: str | None = None  # BOUNCE


@dataclass
class Recipients:
    """The recipients one transaction has accepted so far."""

    mailboxes: list[Recipient]
    bounce_tokens: list[str]

    @classmethod
    def empty(cls) -> Recipients:
        return cls([], [])

    def __len__(self) -> int:
        return len(self.mailboxes) + len(self.bounce_tokens)

    def add(self, decision: RcptDecision) -> None:
        if decision.recipient is not None:
            self.mailboxes.append(decision.recipient)
        elif decision.verp_token is not None:
            self.bounce_tokens.append(decision.verp_token)


async def route_recipient(router: Router, address: str, *, accepted: int, max_recipients: int,
                          mail_from: str, transport: str = "smtp",
                          acl: AclCache | None = None) -> RcptDecision:
    """Route one recipient of a transaction that has `accepted` recipients already; with
    `acl`, a mailbox whose allow/block lists refuse the envelope sender refuses it here."""
    fields = {} if transport == "smtp" else {"transport": transport}
    if accepted >= max_recipients:
        log.info("smtp.rcpt_rejected", rcpt=address, reason="too many recipients", **fields)
        return RcptDecision(RcptVerdict.TOO_MANY_RECIPIENTS, address)
    try:
        route = await router.route(address)
    except DatabaseUnavailable as error:
        log.error("smtp.rcpt_tempfail", rcpt=address, reason="routing lookup failed",
                  error=str(error), **fields)
        return RcptDecision(RcptVerdict.TEMPFAIL, address)
    if route.kind is RouteKind.RELAY_DENIED:
        log.info("smtp.rcpt_rejected", rcpt=address, mail_from=mail_from, reason=route.reason,
                 **({"hint": route.hint} if route.hint else {}), **fields)
        return RcptDecision(RcptVerdict.RELAY_DENIED, address)
    if route.kind is RouteKind.BOUNCE and route.verp_token is not None:
        log.debug("smtp.rcpt_accepted", rcpt=address, route="bounce", **fields)
        return RcptDecision(RcptVerdict.BOUNCE, address, verp_token=route.verp_token)
    if route.kind is not RouteKind.MAILBOX or route.mailbox is None:
        log.info("smtp.rcpt_rejected", rcpt=address, mail_from=mail_from,
                 reason="unknown mailbox", **fields)
        return RcptDecision(RcptVerdict.UNKNOWN_MAILBOX, address)
    mailbox = route.mailbox
    if acl is not None and mail_from not in ("", "<>"):
        try:
            decision = await acl.receiving(mailbox.workspace_id, mailbox.agent_id, mail_from)
        except DatabaseUnavailable as error:
            log.error("smtp.rcpt_tempfail", rcpt=address, reason="acl lookup failed",
                      error=str(error), **fields)
            return RcptDecision(RcptVerdict.TEMPFAIL, address)
        if decision.refused:
            log.info("smtp.rcpt_rejected", rcpt=address, mail_from=mail_from,
                     reason="sender refused by acl", acl=decision.reason, **fields)
            return RcptDecision(RcptVerdict.SENDER_REFUSED, address)
    log.debug("smtp.rcpt_accepted", rcpt=address, workspace=route.mailbox.workspace_slug,
              agent=route.mailbox.handle, **fields)
    return RcptDecision(RcptVerdict.MAILBOX, address,
                        recipient=Recipient(address=address, mailbox=route.mailbox,
                                            tag=route.tag))


# --- the content step -----------------------------------------------------------------------

class ContentVerdict(Enum):
    """What the content step made of a message's bytes."""

    ACCEPTED = "accepted"  # on to the pipeline
    TOO_BIG = "message too big"
    BARE_LF = "bare LF"
    HEADER_TOO_BIG = "header too big"


@dataclass(frozen=True)
class ContentDecision:
    verdict: ContentVerdict
    content: ReceivedContent | None = None  # ACCEPTED


def received_header(envelope: Envelope, hostname: str) -> str:
    """RFC 5321 section 4.4 trace header, with the RFC 3848 protocol name."""
    assert envelope.received_at is not None
    recipient = (f"\r\n\tfor <{envelope.recipients[0].address}>"
                 if len(envelope.recipients) == 1 else "")
    if envelope.transport != "smtp":
        # Posted by a provider's webhook: the hop we saw was the provider, over HTTPS.
        return (f"from {envelope.transport} webhook\r\n"
                f"\tby {hostname} (smtpd-agent) with HTTP id {envelope.queue_id}{recipient};\r\n"
                f"\t{format_datetime(envelope.received_at)}")
    protocol = "UTF8SMTP" if envelope.smtputf8 else "ESMTP" if envelope.esmtp else "SMTP"
    if envelope.tls and protocol != "SMTP":
        protocol += "S"
    elif envelope.tls:
        protocol = "ESMTPS"
    helo = "".join(ch for ch in envelope.helo if ch.isprintable() and ch not in "()\\")[:255]
    tls = f" ({envelope.tls_version})" if envelope.tls_version else ""
    return (f"from {helo or 'unknown'} ([{envelope.client_ip}])\r\n"
            f"\tby {hostname} (smtpd-agent) with {protocol}{tls} id {envelope.queue_id}"
            f"{recipient};\r\n"
            f"\t{format_datetime(envelope.received_at)}")


def accept_content(envelope: Envelope, data: bytes, settings: SmtpSettings, hostname: str, *,
                   too_big: bool = False, dot_stuffed: bool = False) -> ContentDecision:
    """Line endings (`smtp.bare_lf`), dot transparency, header size (`smtp.max_header_size`)
    and our Received header, for bytes that arrived whole (`too_big`: they did not).

    `dot_stuffed`: SMTP DATA content (RFC 5321 section 4.5.2), unstuffed after the line
    endings are settled, so that a bare LF before a dot is read as the line break it becomes.
    """
    rcpt = [r.address for r in envelope.recipients]
    fields = {} if envelope.transport == "smtp" else {"transport": envelope.transport}
    if too_big:
        log.info("smtp.rejected", reason="message too big", mail_from=envelope.mail_from,
                 rcpt=rcpt, **fields)
        return ContentDecision(ContentVerdict.TOO_BIG)
    if b"\n" in data and data.count(b"\n") != data.count(b"\r\n"):
        if settings.bare_lf == "reject":
            log.info("smtp.rejected", reason="bare LF", mail_from=envelope.mail_from, rcpt=rcpt,
                     **fields)
            return ContentDecision(ContentVerdict.BARE_LF)
        data = BARE_LF.sub(b"\r\n", data)
    if dot_stuffed:
        if data[:1] == b".":
            data = data[1:]
        data = data.replace(b"\r\n.", b"\r\n")
    header_end = data.find(b"\r\n\r\n")
    header_size = header_end if header_end >= 0 else len(data)
    if header_size > settings.max_header_size:
        log.info("smtp.rejected", reason="header too big", header_size=header_size,
                 mail_from=envelope.mail_from, rcpt=rcpt, **fields)
        return ContentDecision(ContentVerdict.HEADER_TOO_BIG)
    if envelope.received_at is None:
        envelope = replace(envelope, received_at=datetime.now(UTC))
    return ContentDecision(ContentVerdict.ACCEPTED, ReceivedContent(
        envelope, data, trace_headers=(("Received", received_header(envelope, hostname)),)))
