-- Receiving core: workspaces, agents, threads, messages, attachments.
-- Every row carries its workspace_id; foreign keys include it, so a row can
-- never point at another workspace's row.

CREATE TABLE workspaces (
    id          bigserial PRIMARY KEY,
    slug        text NOT NULL UNIQUE
                CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    id            bigserial PRIMARY KEY,
    workspace_id  bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    handle        text NOT NULL CHECK (handle ~ '^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$'),
    display_name  text,
    system_prompt text,
    auto_reply    boolean NOT NULL DEFAULT true,
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, handle),
    UNIQUE (id, workspace_id)
);

CREATE TABLE threads (
    id                 bigserial PRIMARY KEY,
    workspace_id       bigint NOT NULL,
    agent_id           bigint NOT NULL,
    subject            text,
    normalized_subject text NOT NULL DEFAULT '',
    correspondent      text,
    message_count      integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_message_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (agent_id, workspace_id) REFERENCES agents (id, workspace_id) ON DELETE CASCADE,
    UNIQUE (id, workspace_id)
);
CREATE INDEX threads_agent_recent ON threads (agent_id, last_message_at DESC);
CREATE INDEX threads_subject_match ON threads (agent_id, normalized_subject, correspondent, last_message_at DESC);

CREATE TABLE messages (
    id             bigserial PRIMARY KEY,
    workspace_id   bigint NOT NULL,
    agent_id       bigint NOT NULL,
    thread_id      bigint NOT NULL,
    direction      text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    status         text NOT NULL DEFAULT 'received',
    dedup_key      text NOT NULL,
    message_id     text,
    in_reply_to    text[] NOT NULL DEFAULT '{}',
    "references"   text[] NOT NULL DEFAULT '{}',
    from_header    text,
    from_address   text,
    to_header      text,
    cc_header      text,
    reply_to       text,
    subject        text,
    sent_at        timestamptz,
    headers        jsonb NOT NULL DEFAULT '[]',
    text_body      text,
    html_body      text,
    raw            bytea NOT NULL,
    size           integer NOT NULL,
    mail_from      text,
    rcpt_to        text,
    client_ip      inet,
    helo           text,
    tls            boolean NOT NULL DEFAULT false,
    tls_version    text,
    session_id     text,
    queue_id       text,
    defects        text[] NOT NULL DEFAULT '{}',
    spf            text,
    dkim           text,
    dmarc          text,
    arc            text,
    auth_results   text,
    auth_detail    jsonb,
    quarantined    boolean NOT NULL DEFAULT false,
    scan_status    text,
    scan_signature text,
    received_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (agent_id, workspace_id) REFERENCES agents (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (thread_id, workspace_id) REFERENCES threads (id, workspace_id) ON DELETE CASCADE,
    UNIQUE (agent_id, direction, dedup_key),
    UNIQUE (id, workspace_id)
);
CREATE INDEX messages_thread ON messages (thread_id, received_at);
CREATE INDEX messages_agent_message_id ON messages (agent_id, message_id);

-- Attachment content, stored once per SHA-256 within a workspace.
CREATE TABLE blobs (
    workspace_id bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    sha256       bytea NOT NULL,
    size         integer NOT NULL,
    content      bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, sha256)
);

CREATE TABLE attachments (
    id             bigserial PRIMARY KEY,
    workspace_id   bigint NOT NULL,
    message_id     bigint NOT NULL,
    position       integer NOT NULL,
    filename       text,
    content_type   text NOT NULL,
    disposition    text,
    content_id     text,
    size           integer NOT NULL,
    sha256         bytea NOT NULL,
    scan_status    text,
    scan_signature text,
    FOREIGN KEY (message_id, workspace_id) REFERENCES messages (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (workspace_id, sha256) REFERENCES blobs (workspace_id, sha256),
    UNIQUE (message_id, position)
);
