"""The reply as an RFC 5322 message, from the model's text and the stored original.

Stage 6 of the pipeline, after the API call. Every address and threading
header comes from our own records (the agent, the stored original's verdicts);
the model supplies only the body, so no text in the incoming mail can redirect
the reply, change its sender or add recipients.
"""

from __future__ import annotations

import html
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from ..message import Attachment
from ..record import StoredInbound

# Only reply prefixes are folded: "Re: Re: Aw: x" -> "Re: x" (RFC 5322 section 3.6.5).
REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|antw|vs|rif|r)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
# A long References chain is trimmed to the first and the last ones (RFC 5322 allows it).
MAX_REFERENCES = 20
# Bytes of randomness in a reply's Message-ID (192 bits, base64url: RFC 5322 atext).
MESSAGE_ID_BYTES = 24


@dataclass(frozen=True)
class Original:
    """The inbound message being answered, from the store."""

    message_id: str | None
    references: tuple[str, ...]
    subject: str | None
    in_reply_to: tuple[str, ...] = ()

    @classmethod
    def of(cls, inbound: StoredInbound) -> Original:
        return cls(inbound.message_id, inbound.references, inbound.subject,
                   inbound.in_reply_to)


@dataclass(frozen=True)
class ComposedReply:
    message_id: str
    from_header: str
    from_address: str
    to_address: str
    subject: str
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    text: str
    html: str
    headers: tuple[tuple[str, str], ...]
    raw: bytes


def reply_subject(subject: str | None) -> str:
    """One `Re:`, whitespace (and any smuggled CR/LF) folded to single spaces."""
    stripped = " ".join(REPLY_PREFIX.sub("", subject or "").split())
    return f"Re: {stripped}" if stripped else "Re:"


def reply_references(original: Original) -> tuple[str, ...]:
    """RFC 5322 section 3.6.4: parent's References (else its one In-Reply-To), then its id."""
    parents = original.references or (original.in_reply_to if len(original.in_reply_to) == 1
                                       else ())
    own = (original.message_id,) if original.message_id else ()
    chain = list(dict.fromkeys(parents + own))
    if len(chain) > MAX_REFERENCES:
        chain = chain[:1] + chain[-(MAX_REFERENCES - 1):]
    return tuple(chain)


def new_message_id(domain: str) -> str:
    """An unguessable Message-ID: knowing one of ours must not let anyone predict the next
    (make_msgid is time, pid and a non-cryptographic random number)."""
    return f"<{secrets.token_urlsafe(MESSAGE_ID_BYTES)}@{domain}>"


def text_to_html(text: str) -> str:
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    body = "\n".join("<p>" + html.escape(p).replace("\n", "<br>\n") + "</p>" for p in paragraphs)
    return f"<!DOCTYPE html>\n<html><body>\n{body}\n</body></html>\n"


@dataclass(frozen=True)
class Outgoing:
    """A message an agent sends: every address and threading header from our records, the
    body from the model or the API caller. Bcc never becomes a header (the queue gets it)."""

    from_name: str | None
    from_address: str
    to: tuple[str, ...]
    subject: str
    text: str | None = None
    html: str | None = None
    cc: tuple[str, ...] = ()
    in_reply_to: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    auto_submitted: str | None = None


@dataclass(frozen=True)
class ComposedMessage:
    message_id: str
    from_header: str
    to_header: str
    cc_header: str | None
    subject: str
    text: str | None
    html: str | None
    headers: tuple[tuple[str, str], ...]
    raw: bytes


def _address(address: str) -> Address:
    local, _, domain = address.rpartition("@")
    return Address(username=local, domain=domain)


def compose_message(outgoing: Outgoing, now: datetime) -> ComposedMessage:
    """The one composition of every message we send: the built-in agent's replies and what
    API callers send or reply. Text only, HTML only, or both as alternatives; attachments
    after them (multipart/mixed)."""
    local, _, domain = outgoing.from_address.rpartition("@")
    message = EmailMessage(policy=SMTP)
    message["From"] = Address(display_name=outgoing.from_name or "", username=local,
                              domain=domain)
    message["To"] = [_address(a) for a in outgoing.to]
    if outgoing.cc:
        message["Cc"] = [_address(a) for a in outgoing.cc]
    message["Subject"] = " ".join(outgoing.subject.split())
    message["Date"] = format_datetime(now)
    message_id = new_message_id(domain)
    message["Message-ID"] = message_id
    if outgoing.in_reply_to:
        message["In-Reply-To"] = outgoing.in_reply_to[0]
    if outgoing.references:
        message["References"] = " ".join(outgoing.references)
    if outgoing.auto_submitted:
        # RFC 3834 section 5: mark it, so other responders do not answer us back.
        message["Auto-Submitted"] = outgoing.auto_submitted
        message["X-Auto-Response-Suppress"] = "All"
    text = outgoing.text.strip() + "\n" if outgoing.text is not None else None
    html_body = outgoing.html
    if text is not None:
        message.set_content(text)
        if html_body is not None:
            message.add_alternative(html_body, subtype="html")
    else:
        message.set_content(html_body or "", subtype="html")
    for attachment in outgoing.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(attachment.content, maintype=maintype, subtype=subtype,
                               filename=attachment.filename)
    raw = message.as_bytes(policy=SMTP)
    return ComposedMessage(
        message_id=message_id, from_header=str(message["From"]), to_header=str(message["To"]),
        cc_header=str(message["Cc"]) if outgoing.cc else None, subject=str(message["Subject"]),
        text=text, html=html_body,
        headers=tuple((name, str(value)) for name, value in message.items()), raw=raw)


def compose_reply(original: Original, agent_name: str | None, agent_address: str,
                  to_address: str, text: str, now: datetime) -> ComposedReply:
    """The built-in agent's answer: one recipient, `Re:` subject, marked auto-replied."""
    subject = reply_subject(original.subject)
    references = reply_references(original)
    in_reply_to = (original.message_id,) if original.message_id else ()
    body = text.strip() + "\n"
    composed = compose_message(Outgoing(
        from_name=agent_name, from_address=agent_address, to=(to_address,), subject=subject,
        text=body, html=text_to_html(body), in_reply_to=in_reply_to, references=references,
        auto_submitted="auto-replied"), now)
    return ComposedReply(
        message_id=composed.message_id, from_header=composed.from_header,
        from_address=agent_address, to_address=to_address, subject=subject,
        in_reply_to=in_reply_to, references=references, text=composed.text or body,
        html=composed.html or "", headers=composed.headers, raw=composed.raw)
