-- Tables and data only; the functions that use them live in store/functions/
-- and are re-applied by the migrator when their text changes.
--
-- 1. Raw bytes once per message and workspace. Each mailbox's row used to hold
--    its own copy (a message to 20 mailboxes: 20 copies); now the row names
--    the bytes by SHA-256 in raw_messages, as attachments name theirs in blobs.
--    Rows belong to a workspace, so one workspace never reads another's bytes.

CREATE TABLE raw_messages (
    workspace_id bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    sha256       bytea NOT NULL,
    size         integer NOT NULL,
    content      bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, sha256)
);

ALTER TABLE messages ADD COLUMN raw_sha256 bytea;
INSERT INTO raw_messages (workspace_id, sha256, size, content)
SELECT workspace_id, sha256(raw), octet_length(raw), raw FROM messages
ON CONFLICT (workspace_id, sha256) DO NOTHING;
UPDATE messages SET raw_sha256 = sha256(raw);
ALTER TABLE messages
    ALTER COLUMN raw_sha256 SET NOT NULL,
    ADD FOREIGN KEY (workspace_id, raw_sha256) REFERENCES raw_messages (workspace_id, sha256),
    DROP COLUMN raw;

-- 2. Both lease queues (agent jobs, outbound deliveries) named alike, for one
--    helper (store/lease.py), in the agent jobs' words: `status`; `run_at`, when
--    a row may be claimed (for a claimed row, when its lease runs out);
--    `attempts`; `lease_token`, new at every claim, so that only the current
--    holder can record a result. Deliveries kept the lease's end in a column of
--    its own (lease_until); it moves into run_at.

ALTER TABLE deliveries RENAME COLUMN state TO status;
ALTER TABLE deliveries RENAME COLUMN next_attempt_at TO run_at;
ALTER TABLE deliveries ADD COLUMN lease_token uuid;
UPDATE deliveries SET run_at = lease_until WHERE status = 'sending' AND lease_until IS NOT NULL;
ALTER TABLE deliveries DROP COLUMN lease_until;
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (run_at) WHERE status IN ('queued', 'deferred', 'sending');
