"""Parsing bounces: RFC 3464 delivery status notifications and SES notification JSON. Pure.

Place: bounces.py calls these on mail that reached a VERP address (over SMTP)
or on an SES bounce/complaint notification (SNS envelope or bare event).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from typing import Any, Literal


@dataclass(frozen=True)
class DsnRecipient:
    """One per-recipient block of a message/delivery-status part (RFC 3464 2.3)."""

    address: str  # Final-Recipient, else Original-Recipient
    action: str  # failed, delayed, delivered, relayed, expanded
    status: str  # RFC 3463 x.y.z
    diagnostic: str = ""
    # Original-Recipient (2.3.1): the address as we gave it in RCPT, if the MTA kept it.
    original: str = ""

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address the block names for the recipient, most specific first."""
        return tuple(a for a in dict.fromkeys((self.address, self.original)) if a)

    @property
    def permanent(self) -> bool:
        return self.action == "failed" and self.status.startswith("5.")


def _address(value: str) -> str:
    """`rfc822; user@example.com` -> user@example.com (RFC 3464 2.3.2)."""
    _, semicolon, address = value.partition(";")
    return (address if semicolon else value).strip().strip("<>").lower()


def _blocks(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    text = payload if isinstance(payload, str) else ""
    return [message_from_bytes(block.strip().encode() + b"\n", policy=policy.compat32)
            for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]


def parse_dsn(raw: bytes) -> list[DsnRecipient]:
    """The per-recipient results of a DSN; empty if `raw` is not one (no delivery-status part)."""
    message = message_from_bytes(raw, policy=policy.compat32)
    recipients = []
    for part in message.walk():
        if part.get_content_type() not in ("message/delivery-status",
                                           "message/global-delivery-status"):
            continue
        for block in _blocks(part):
            final = block.get("Final-Recipient") or block.get("Original-Recipient")
            if not final:
                continue  # the per-message block (Reporting-MTA, Arrival-Date, ...)
            original = block.get("Original-Recipient")
            recipients.append(DsnRecipient(
                address=_address(str(final)),
                action=str(block.get("Action", "")).strip().lower(),
                status=str(block.get("Status", "")).strip().split(" ")[0],
                diagnostic=" ".join(str(block.get("Diagnostic-Code", "")).split())[:500],
                original=_address(str(original)) if original else ""))
    return recipients


@dataclass(frozen=True)
class SesEvent:
    """A bounce or complaint from SES, as notification (notificationType) or event (eventType)."""

    kind: Literal["bounce", "complaint", "delivery", "other"]
    permanent: bool
    addresses: tuple[str, ...]
    provider_message_id: str
    detail: str = ""


SES_FEEDBACK = {"bounce", "complaint", "delivery"}


def is_ses_feedback(message: str) -> bool:
    """True if an SNS `Message` is SES feedback on mail we sent (not an inbound receipt)."""
    try:
        document = json.loads(message)
    except ValueError:
        return False
    return isinstance(document, dict) and str(
        document.get("notificationType") or document.get("eventType") or "").lower() in SES_FEEDBACK


def parse_ses_notification(body: bytes | str) -> SesEvent:
    """An SES notification, bare or inside an SNS `Notification` envelope (its `Message`)."""
    document: Any = json.loads(body)
    if isinstance(document, dict) and document.get("Type") == "Notification":
        document = json.loads(document["Message"])
    if not isinstance(document, dict):
        raise ValueError("not an SES notification")
    kind = str(document.get("notificationType") or document.get("eventType") or "").lower()
    message_id = str((document.get("mail") or {}).get("messageId", ""))
    if kind == "bounce":
        bounce = document.get("bounce") or {}
        addresses = tuple(str(r.get("emailAddress", "")).lower()
                          for r in bounce.get("bouncedRecipients", []) if r.get("emailAddress"))
        return SesEvent("bounce", bounce.get("bounceType") == "Permanent", addresses, message_id,
                        f"{bounce.get('bounceType')}/{bounce.get('bounceSubType')}")
    if kind == "complaint":
        complaint = document.get("complaint") or {}
        addresses = tuple(str(r.get("emailAddress", "")).lower()
                          for r in complaint.get("complainedRecipients", [])
                          if r.get("emailAddress"))
        return SesEvent("complaint", True, addresses, message_id,
                        str(complaint.get("complaintFeedbackType") or ""))
    if kind == "delivery":
        delivery = document.get("delivery") or {}
        addresses = tuple(str(r).lower() for r in delivery.get("recipients", [])
                          if isinstance(r, str))
        return SesEvent("delivery", False, addresses, message_id,
                        str(delivery.get("smtpResponse") or "")[:300])
    return SesEvent("other", False, (), message_id, kind)
