"""Pure decisions of the outbound queue: what a reply means, when to retry, what state follows.

No I/O here; the worker applies these to what the transports return, and the
tables in tests/unit/test_outbound_decisions.py pin them down.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..config import OutboundSettings

Kind = Literal["sent", "retry", "bounce", "fail"]
Stage = Literal["connect", "mail", "rcpt", "data", "api"]
DeliveryState = Literal["sent", "deferred", "bounced", "failed"]


@dataclass(frozen=True)
class Outcome:
    """What one recipient's reply means: sent, retry later, bounced (suppress?) or failed."""

    kind: Kind
    suppress: bool = False


ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


def classify_reply(code: int | None, enhanced: str | None, stage: Stage) -> Outcome:
    """RFC 5321 4.2.1: 2yz done, 4yz transient (retry), 5yz permanent (hard bounce).

    No code (connection refused, timeout, TLS failure) is transient. A permanent
    reply suppresses the address only when it is about the address: an RFC 3463
    address status (5.1.x) or a disabled mailbox (5.2.1), or a bare 5yz at RCPT;
    never a policy (5.7.x) or content refusal of the message. A 5yz to our own
    MAIL FROM is the relay refusing us: the message fails, nobody is suppressed.
    """
    if code is None or 400 <= code < 500:
        return Outcome("retry")
    if 200 <= code < 300:
        return Outcome("sent")
    if 500 <= code < 600:
        match = ENHANCED.match(enhanced or "")
        subject = match.group(2) if match else None
        detail = match.group(3) if match else None
        if stage == "mail":
            return Outcome("fail")
        address_status = subject == "1" or (subject == "2" and detail == "1")
        suppress = address_status or (stage == "rcpt" and subject is None)
        return Outcome("bounce", suppress=suppress)
    return Outcome("retry")  # 1yz/3yz where a final reply belongs: a confused server


def backoff(attempt: int, settings: OutboundSettings) -> float:
    """Seconds before attempt `attempt + 1`: retry_base doubling per attempt, capped at retry_max."""
    exponent = max(attempt - 1, 0)
    return min(settings.retry_base * (2 ** min(exponent, 32)), settings.retry_max)


@dataclass(frozen=True)
class Next:
    """The delivery's state after an attempt, and when to try again (deferred only)."""

    state: DeliveryState
    retry_in: float | None = None
    give_up: bool = False


def decide_delivery(outcomes: Sequence[Kind], attempt: int, age: float,
                    settings: OutboundSettings) -> Next:
    """The delivery's state from its recipients' outcomes after attempt number `attempt`.

    Any recipient still to retry keeps the message deferred until it is
    give_up_after seconds old; then it fails (the failure is recorded). Otherwise
    it is sent if anyone got it, bounced if every recipient bounced, else failed.
    """
    if "retry" in outcomes:
        delay = backoff(attempt, settings)
        if age + delay > settings.give_up_after:
            return Next("failed", give_up=True)
        return Next("deferred", retry_in=delay)
    if "sent" in outcomes:
        return Next("sent")
    if outcomes and all(kind == "bounce" for kind in outcomes):
        return Next("bounced")
    return Next("failed")


# Postfix "queued as X", Exim "id=X", others "<X> queued"
QUEUE_IDS = (re.compile(r"queued as\s+<?([A-Za-z0-9._@-]{4,})>?", re.IGNORECASE),
             re.compile(r"\bid=<?([A-Za-z0-9._@-]{4,})>?", re.IGNORECASE),
             re.compile(r"<([A-Za-z0-9._@-]{4,})>\s+queued", re.IGNORECASE))


def provider_id_from_reply(text: str) -> str | None:
    """The relay's queue id from its final 250 text ('2.0.0 Ok: queued as 4Bx...'), if any."""
    for pattern in QUEUE_IDS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's reply from a transport: code None means no reply (connection error)."""

    address: str
    code: int | None
    enhanced: str | None
    text: str
    stage: Stage

    @property
    def outcome(self) -> Outcome:
        return classify_reply(self.code, self.enhanced, self.stage)


@dataclass(frozen=True)
class SendResult:
    """What one attempt through a transport returned, per recipient."""

    recipients: tuple[RecipientResult, ...]
    provider_message_id: str | None = None
