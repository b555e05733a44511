-- Programmable mailboxes (issue 18): scoped API keys, per-agent reply mode, and
-- the Idempotency-Key record of messages sent over the API.

-- read: the inbox; send: send and reply as the workspace's agents; admin: agents
-- and keys. Keys made before scopes existed keep what they could do: read.
ALTER TABLE api_keys ADD COLUMN scopes text[] NOT NULL DEFAULT '{read}'
    CHECK (scopes <@ ARRAY['read', 'send', 'admin']::text[] AND cardinality(scopes) > 0);

-- auto: the built-in agent answers (today); draft: it writes a draft for a person
-- or program to send; off: it does not answer. auto_reply stays the switch the
-- store reads when it creates the agent job (true unless reply_mode is 'off').
ALTER TABLE agents ADD COLUMN reply_mode text NOT NULL DEFAULT 'auto'
    CHECK (reply_mode IN ('auto', 'draft', 'off'));
UPDATE agents SET reply_mode = 'off' WHERE NOT auto_reply;

-- One sent message per (workspace, Idempotency-Key) for 24 hours; the request's
-- hash tells a retry from a different request reusing the key.
CREATE TABLE api_idempotency (
    workspace_id    bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    idempotency_key text NOT NULL,
    request_sha256  bytea NOT NULL,
    message_id      bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, idempotency_key),
    FOREIGN KEY (message_id, workspace_id) REFERENCES messages (id, workspace_id) ON DELETE CASCADE
);
CREATE INDEX api_idempotency_created ON api_idempotency (created_at);

-- Drafts: what an agent would send, waiting for a person or program to send or
-- discard it. Written over the API, or by the built-in agent when its reply_mode
-- is 'draft' (job_id: the agent job that wrote it). Sending composes and stores
-- the message like any other send (then sent_message_id names it); nothing of a
-- draft is queued before that.
CREATE TABLE drafts (
    id              bigserial PRIMARY KEY,
    workspace_id    bigint NOT NULL,
    agent_id        bigint NOT NULL,
    thread_id       bigint,
    status          text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'sent', 'discarded')),
    origin          text NOT NULL CHECK (origin IN ('api', 'agent')),
    to_addresses    text[] NOT NULL DEFAULT '{}',
    cc_addresses    text[] NOT NULL DEFAULT '{}',
    bcc_addresses   text[] NOT NULL DEFAULT '{}',
    subject         text,
    text_body       text,
    html_body       text,
    job_id          bigint,
    sent_message_id bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (agent_id, workspace_id) REFERENCES agents (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (thread_id, workspace_id) REFERENCES threads (id, workspace_id) ON DELETE CASCADE,
    UNIQUE (id, workspace_id)
);
CREATE INDEX drafts_pending ON drafts (workspace_id, created_at) WHERE status = 'draft';

-- Labels per message: 'unread' on every inbound message as it is stored
-- (functions/store_message.sql), custom ones set over the API.
ALTER TABLE messages ADD COLUMN labels text[] NOT NULL DEFAULT '{}'
    CHECK (cardinality(labels) <= 50);
CREATE INDEX messages_labels ON messages USING gin (labels);

-- Full-text search over subject, From and the text body (bounded: to_tsvector of a
-- huge body must never refuse a message), kept by Postgres itself.
ALTER TABLE messages ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english'::regconfig, left(coalesce(subject, ''), 1000)), 'A') ||
    setweight(to_tsvector('english'::regconfig, left(coalesce(from_header, ''), 1000)), 'B') ||
    setweight(to_tsvector('english'::regconfig, left(coalesce(text_body, ''), 100000)), 'C')
) STORED;
CREATE INDEX messages_search ON messages USING gin (search);
