-- Retention of the event outbox and the webhook delivery log (store/retention.py,
-- events/retention.py): old rows are deleted in small batches by one node at a time.
--
-- events_created: the pruner walks events oldest first, in (created_at, id) order, and
-- resumes each batch after the last row it looked at (rows it keeps are not read again).
-- webhook_deliveries_event: "does a delivery still need this event" for the pruner, and
-- the ON DELETE CASCADE of an event's deliveries, which would otherwise scan the table.
-- webhook_deliveries_finished: finished deliveries by status and age, for their pruning.
CREATE INDEX events_created ON events (created_at, id);
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
