-- The event outbox (issue 19, store/events.py): one row per thing an agent elsewhere
-- may want to hear of, written by store/functions/append_event.sql in the same
-- transaction as its cause, so an event exists exactly when its cause committed.
-- Read by the SSE stream (events/stream.py) and the webhook worker.
--
-- id: the SSE id and the cursor. txid: the writing transaction (pg_current_xact_id());
-- readers go in (txid, id) order and stop at the oldest transaction still open, so a
-- cursor never passes an event that commits later (ids are handed out at INSERT, not at
-- COMMIT). event_id: the public id (webhook-id), stable across redeliveries.
CREATE TABLE events (
    id           bigserial PRIMARY KEY,
    event_id     text NOT NULL UNIQUE
                 DEFAULT 'evt_' || replace(gen_random_uuid()::text, '-', ''),
    workspace_id bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type         text NOT NULL CHECK (type ~ '^[a-z]+(\.[a-z_]+)+$'),
    thread_id    bigint,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_workspace_order ON events (workspace_id, txid, id);
CREATE INDEX events_order ON events (txid, id);
