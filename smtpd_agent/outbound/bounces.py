"""Bounce processing: DSNs that reached a VERP address, and SES bounce/complaint notifications.

Place: the recipient step (ingress.py, for SMTP and the provider webhooks alike)
routes <prefix>-<token>@<bounce domain> here instead of to a mailbox
(routing.RouteKind.BOUNCE); the pipeline hands the bytes and the token to
`receive_dsn`. SES notifications (SNS HTTP subscription or a queue
consumer) go to `receive_ses`. A permanent failure marks the recipient (and,
once nobody is left, the message) bounced; a hard bounce about the address and
every complaint put it on the workspace's suppression list. The token is the
authentication: it is random and known only to the message's receivers.

Only what the delivery was about is touched: a DSN is a bounce only with a null
envelope sender (RFC 3464 2, RFC 5321 4.5.5; anything else at the VERP address
is an auto-reply or a forgery), its failed recipient is read from its
per-recipient fields (Final-Recipient, Original-Recipient) and must be one the
delivery was sent to, and an SES notification suppresses only addresses that
were recipients of the delivery SES names by its message id.
"""

from __future__ import annotations

import asyncpg
import structlog

from .decisions import classify_reply
from .dsn import DsnRecipient, SesEvent, parse_dsn, parse_ses_notification
from ..store.events import EventType
from .queue import (find_by_provider_id, find_by_token, normalize_address,
                    record_bounce, record_feedback, suppress)

log = structlog.get_logger(__name__)


class BounceProcessor:
    def __init__(self, db: asyncpg.Pool) -> None:
        self.db = db

    async def receive_dsn(self, token: str, raw: bytes, queue_id: str = "",
                          mail_from: str = "") -> str:
        """Apply one DSN for the message behind `token`; what was done, for the log."""
        if normalize_address(mail_from):
            log.info("bounce.ignored", reason="not a bounce: envelope sender is not null",
                     queue_id=queue_id)
            return "not a bounce"
        target = await find_by_token(self.db, token)
        if target is None:
            log.info("bounce.ignored", reason="unknown VERP token", queue_id=queue_id)
            return "unknown token"
        results = parse_dsn(raw)
        if not results:
            log.info("bounce.ignored", reason="not a DSN", queue_id=queue_id,
                     delivery_id=target.delivery_id, workspace_id=target.workspace_id)
            return "not a DSN"
        async with self.db.acquire() as connection, connection.transaction():
            known = {row["address"] for row in await connection.fetch(
                """SELECT address FROM delivery_recipients
                   WHERE delivery_id = $1 AND workspace_id = $2""",
                target.delivery_id, target.workspace_id)}
            state = None
            for result in results:
                address = self._attribute(result, known)
                if address is not None and result.action in ("delivered", "relayed"):
                    await record_feedback(connection, target, EventType.MESSAGE_DELIVERED,
                                          address, f"{result.action} {result.status}", "dsn")
                    log.info("bounce.delivery_reported", delivery_id=target.delivery_id,
                             workspace_id=target.workspace_id, address=address,
                             action=result.action, queue_id=queue_id)
                    continue
                if address is None or not result.permanent:
                    log.info("bounce.ignored", delivery_id=target.delivery_id,
                             workspace_id=target.workspace_id, address=result.address,
                             action=result.action, status=result.status,
                             reason="not ours" if address is None else "not permanent")
                    continue
                state = await record_bounce(connection, target, address, result.status,
                                            result.diagnostic, "dsn") or state
                outcome = classify_reply(550, result.status, "rcpt")
                if outcome.suppress:
                    await suppress(connection, target.workspace_id, address, "hard_bounce",
                                   source="dsn", detail=f"{result.status} {result.diagnostic}",
                                   delivery_id=target.delivery_id)
                log.info("bounce.recorded", delivery_id=target.delivery_id,
                         workspace_id=target.workspace_id, message_id=target.message_id,
                         address=address, status=result.status, suppressed=outcome.suppress,
                         delivery_state=state or "unchanged", queue_id=queue_id)
        return state or "recorded"

    @staticmethod
    def _attribute(result: DsnRecipient, known: set[str]) -> str | None:
        """The delivery's recipient a DSN block names (Final- or Original-Recipient), if any.

        Never guessed: a block naming nobody we sent to is about someone else's mail.
        """
        return next((address for address in map(normalize_address, result.addresses)
                     if address in known), None)

    async def receive_ses(self, body: bytes | str) -> SesEvent:
        """Apply one SES notification (bounce or complaint) to the message SES sent."""
        event = parse_ses_notification(body)
        target = (await find_by_provider_id(self.db, event.provider_message_id)
                  if event.provider_message_id else None)
        if target is None or event.kind not in ("bounce", "complaint", "delivery"):
            log.info("bounce.ses_ignored", kind=event.kind,
                     provider_message_id=event.provider_message_id,
                     reason="unknown message" if target is None else "not a bounce or complaint")
            return event
        async with self.db.acquire() as connection, connection.transaction():
            sent_to = {row["address"] for row in await connection.fetch(
                """SELECT address FROM delivery_recipients
                   WHERE delivery_id = $1 AND workspace_id = $2""",
                target.delivery_id, target.workspace_id)}
            for address in dict.fromkeys(map(normalize_address, event.addresses)):
                if address not in sent_to:
                    log.info("bounce.ses_ignored", kind=event.kind, address=address,
                             delivery_id=target.delivery_id, workspace_id=target.workspace_id,
                             reason="not a recipient of this delivery")
                    continue
                if event.kind == "bounce" and event.permanent:
                    await record_bounce(connection, target, address, "5.0.0", event.detail,
                                        "ses")
                    await suppress(connection, target.workspace_id, address, "hard_bounce",
                                   source="ses", detail=event.detail,
                                   delivery_id=target.delivery_id)
                elif event.kind == "complaint":
                    await suppress(connection, target.workspace_id, address, "complaint",
                                   source="ses", detail=event.detail,
                                   delivery_id=target.delivery_id)
                    await record_feedback(connection, target, EventType.MESSAGE_COMPLAINED,
                                          address, event.detail, "ses")
                elif event.kind == "delivery":
                    await record_feedback(connection, target, EventType.MESSAGE_DELIVERED,
                                          address, event.detail, "ses")
                log.info("bounce.ses_recorded", kind=event.kind, permanent=event.permanent,
                         delivery_id=target.delivery_id, workspace_id=target.workspace_id,
                         address=address)
        return event
