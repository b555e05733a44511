-- Attachments of drafts (issue 18): a draft written over the API keeps its files until it
-- is sent (then the sent message stores its own attachment rows, naming the same blobs)
-- or discarded (then these rows go, and blobs nothing else names with them). The
-- content lives once per workspace in blobs, like every attachment's.
CREATE TABLE draft_attachments (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL,
    draft_id     bigint NOT NULL,
    position     integer NOT NULL,
    filename     text NOT NULL,
    content_type text NOT NULL,
    size         integer NOT NULL,
    sha256       bytea NOT NULL,
    FOREIGN KEY (draft_id, workspace_id) REFERENCES drafts (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (workspace_id, sha256) REFERENCES blobs (workspace_id, sha256),
    UNIQUE (draft_id, position)
);
CREATE INDEX draft_attachments_blob ON draft_attachments (workspace_id, sha256);

-- Whether any attachment still names a blob (a discarded draft's blob goes only if not);
-- without it that question, and every DELETE FROM blobs, reads all attachments.
CREATE INDEX attachments_blob ON attachments (workspace_id, sha256);
