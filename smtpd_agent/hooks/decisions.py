"""Pure decisions of webhook delivery: what a response means, when to retry, when an
endpoint has failed long enough to be disabled. No I/O; tests/unit/test_hooks.py pins
them down table by table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from ..config import WebhookSettings


class DeliveryState(StrEnum):
    PENDING = "pending"  # due at run_at (first try, or a retry)
    SENDING = "sending"  # leased by a worker until run_at
    DELIVERED = "delivered"  # the endpoint answered 2xx
    FAILED = "failed"  # gave up, or the endpoint was disabled or deleted


class Outcome(StrEnum):
    """What one attempt came to."""

    DELIVERED = "delivered"
    REFUSED = "refused"  # the SSRF policy refused the address; nothing was sent
    FAILED = "failed"  # an answer other than 2xx, a timeout, a connection error


def outcome_of(status: int | None, refused: bool = False) -> Outcome:
    """2xx is delivered; anything else (3xx included: redirects are not followed, a
    receiver must give its final URL) is a failure to retry."""
    if refused:
        return Outcome.REFUSED
    if status is not None and 200 <= status < 300:
        return Outcome.DELIVERED
    return Outcome.FAILED


def backoff(attempt: int, settings: WebhookSettings) -> float:
    """Seconds before attempt `attempt + 1`: retry_base doubling, at most retry_max."""
    return min(settings.retry_base * (2 ** min(max(attempt - 1, 0), 32)), settings.retry_max)


@dataclass(frozen=True)
class Next:
    """The delivery after an attempt: its state, and when it is due again (pending only)."""

    state: DeliveryState
    retry_in: float | None = None
    give_up: bool = False


def after_attempt(outcome: Outcome, attempt: int, age: float,
                  settings: WebhookSettings) -> Next:
    """Delivered, or pending again after backoff(attempt), or failed when the next try
    would come later than give_up_after seconds after the event."""
    if outcome is Outcome.DELIVERED:
        return Next(DeliveryState.DELIVERED)
    delay = backoff(attempt, settings)
    if age + delay > settings.give_up_after:
        return Next(DeliveryState.FAILED, give_up=True)
    return Next(DeliveryState.PENDING, retry_in=delay)


def should_disable(consecutive_failures: int, failing_since: datetime | None,
                   now: datetime, settings: WebhookSettings) -> bool:
    """Disable an endpoint that failed disable_after_failures times in a row, over at
    least disable_after_seconds (a short outage with many events does not count).
    disable_after_failures 0: never."""
    if settings.disable_after_failures <= 0 or failing_since is None:
        return False
    return (consecutive_failures >= settings.disable_after_failures
            and (now - failing_since).total_seconds() >= settings.disable_after_seconds)
