"""What a webhook carries: the outbox event as the Standard Webhooks body.

Provisional until the outbox (store/events.py) lands: the body is
{"type", "timestamp", "data"} (the specification's recommended shape) with the event's
payload as data, and webhook-id "evt_<id>", the same for every attempt and replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

DISABLED_EVENT = "webhook.disabled"
EVENT_TYPES = frozenset({
    "message.received", "message.quarantined", "message.sent", "message.delivered",
    "message.deferred", "message.bounced", "message.complained", "draft.created",
    "domain.verified", "domain.degraded", DISABLED_EVENT})


@dataclass(frozen=True)
class Body:
    message_id: str
    content: bytes


async def event_body(db: asyncpg.Pool | asyncpg.Connection, workspace_id: int,
                     event_id: int) -> Body | None:
    raise NotImplementedError


async def record_disabled(connection: asyncpg.Connection, workspace_id: int, endpoint_id: int,
                          reason: str, deliveries_failed: int) -> None:
    raise NotImplementedError
