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

DB = asyncpg.Pool | asyncpg.Connection

# What is searched: the subject, the From header and the message's new text (an inbound
# reply's extracted_text, else the plain body), each bounded, weighted A, B, C.
VECTOR = """
    setweight(to_tsvector('english'::regconfig, left(coalesce(m.subject, ''), 1000)), 'A') ||
    setweight(to_tsvector('english'::regconfig, left(coalesce(m.from_header, ''), 1000)), 'B') ||
    setweight(to_tsvector('english'::regconfig,
                          left(coalesce(m.extracted_text, m.text_body, ''), 100000)), 'C')"""


async def index_pending(db: DB, limit: int) -> int:
    """Index up to `limit` queued messages, oldest first; how many were taken."""
    taken: int = await db.fetchval(
        f"""WITH taken AS (
                DELETE FROM search_queue q
                 WHERE q.message_id IN (SELECT message_id FROM search_queue
                                         ORDER BY message_id LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING q.message_id, q.workspace_id),
            indexed AS (
                INSERT INTO message_search (message_id, workspace_id, search)
                SELECT m.id, m.workspace_id, {VECTOR}
                  FROM taken t
                  JOIN messages m ON m.id = t.message_id AND m.workspace_id = t.workspace_id
                ON CONFLICT (message_id) DO UPDATE SET search = excluded.search
                RETURNING 1)
            SELECT count(*) FROM taken""", limit)
    return taken

