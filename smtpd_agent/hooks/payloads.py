"""What a webhook carries: an outbox event (store/events.py) as the Standard Webhooks body.

The body is Event.body() (the stream's data too): the specification's recommended shape,
{"type", "timestamp", "data"}, plus "id": the event's public id, which is also the webhook-id of every attempt and replay
(receivers deduplicate on it). "data" is the event's payload as the outbox stored it:
ids, envelope, subject, snippet, bounded text and links; never secrets. The one event
this feature writes itself, webhook.disabled, is made here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..store import events

DISABLED_EVENT = events.EventType.WEBHOOK_DISABLED
EVENT_TYPES = frozenset(str(kind) for kind in events.EventType)


@dataclass(frozen=True)
class Body:
    """The webhook-id and the exact bytes signed and sent."""

    message_id: str
    content: bytes


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def event_body(db: asyncpg.Pool | asyncpg.Connection, workspace_id: int,
                     event_id: int) -> Body | None:
    """The body of event `event_id` of `workspace_id` (Event.body(), what the stream sends
    as data too); None if there is no such event."""
    row = await db.fetchrow(
        f"""SELECT {events.COLUMNS} FROM events e WHERE e.id = $1 AND e.workspace_id = $2""",
        event_id, workspace_id)
    if row is None:
        return None
    event = events.Event.from_row(row)
    return Body(event.event_id, encode(event.body()))


async def record_disabled(connection: asyncpg.Connection, workspace_id: int, endpoint_id: int,
                          url: str, reason: str, deliveries_failed: int) -> int:
    """The workspace's event saying its endpoint was disabled, in the caller's transaction
    (the one that disabled it); the event's id."""
    slug = await connection.fetchval("SELECT slug FROM workspaces WHERE id = $1",
                                     workspace_id)
    base = f"/api/v1/workspaces/{slug}/webhooks/{endpoint_id}"
    return await events.append(connection, workspace_id, DISABLED_EVENT, {
        "workspace": slug, "endpoint": {"id": endpoint_id, "url": url},
        "reason": reason, "deliveries_failed": deliveries_failed,
        "links": {"endpoint": base, "deliveries": f"{base}/deliveries"}})
