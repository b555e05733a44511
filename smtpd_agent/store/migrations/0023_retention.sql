-- Retention of the event outbox and the webhook delivery log (store/retention.py,
-- events/retention.py): old rows are deleted in small batches by one node at a time.
--
-- No index on events.created_at: every stored message writes an event, and the pruner
-- walks the primary key instead (ids grow with time; store/retention.py).
-- webhook_deliveries_event: "does a delivery still need this event" for the pruner, and
-- the ON DELETE CASCADE of an event's deliveries, which would otherwise scan the table.
-- webhook_deliveries_finished: finished deliveries by status and age, for their pruning.
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (status, finished_at, id)
    WHERE status IN ('delivered', 'failed');

-- Per workspace, the newest event id retention has deleted: an SSE client resuming
-- after an older id has missed events and is told so (events/stream.py).
CREATE TABLE events_pruned (
    workspace_id bigint PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
    through_id   bigint NOT NULL,
    pruned_at    timestamptz NOT NULL DEFAULT now()
);
