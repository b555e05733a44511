"""Full-text search of messages, indexed after the COMMIT that stores them (migration 0021).

store_message.sql queues every message it writes (`search_queue`, in the message's own
transaction); `index_pending` takes a batch from the queue and writes the vectors to
`message_search` (its GIN index answers store/mailbox.search). Computing the vector in
the store transaction cost three quarters of that transaction's Postgres CPU and none of
it decides the SMTP reply (issue 20); the indexer (mailbox/indexer.py) runs it after.
Several indexers (processes, hosts) take disjoint batches (FOR UPDATE SKIP LOCKED); a
batch is queued-and-indexed in one transaction, so a crash leaves its messages queued.
"""

from __future__ import annotations

import asyncpg

from .events import transaction

DB = asyncpg.Pool | asyncpg.Connection

# What is searched: the subject, the From header and the message's new text (an inbound
# reply's extracted_text, else the plain body), each bounded, weighted A, B, C.
VECTOR = """
    setweight(to_tsvector('english'::regconfig, left(coalesce(m.subject, ''), 1000)), 'A') ||
    setweight(to_tsvector('english'::regconfig, left(coalesce(m.from_header, ''), 1000)), 'B') ||
    setweight(to_tsvector('english'::regconfig,
                          left(coalesce(m.extracted_text, m.text_body, ''), 100000)), 'C')"""


async def index_pending(db: DB, limit: int) -> int:
    """Index up to `limit` queued messages, oldest first, in one transaction; how many
    were taken. The messages are then read by their ids (an array: the primary key,
    whatever plan is cached), never joined by a plan that could scan the table."""
    async with transaction(db) as connection:
        taken = await connection.fetch(
            """DELETE FROM search_queue
                WHERE message_id IN (SELECT message_id FROM search_queue ORDER BY message_id
                                      LIMIT $1 FOR UPDATE SKIP LOCKED)
               RETURNING message_id""", limit)
        if taken:
            await connection.execute(
                f"""INSERT INTO message_search (message_id, workspace_id, search)
                    SELECT m.id, m.workspace_id, {VECTOR}
                      FROM messages m WHERE m.id = ANY($1::bigint[])
                    ON CONFLICT (message_id) DO UPDATE SET search = excluded.search""",
                [r["message_id"] for r in taken])
    return len(taken)
