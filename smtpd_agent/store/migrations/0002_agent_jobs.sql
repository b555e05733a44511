-- Agent replies: one job per inbound message for a mailbox with auto-reply on,
-- created in the store transaction. A job is claimed by moving `run_at` to the
-- end of its lease (status 'running'), so one partial index serves both "due"
-- and "lease expired": a crashed worker's job becomes due again by itself.

CREATE TABLE agent_jobs (
    id               bigserial PRIMARY KEY,
    workspace_id     bigint NOT NULL,
    agent_id         bigint NOT NULL,
    thread_id        bigint NOT NULL,
    message_id       bigint NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'skipped', 'failed')),
    -- pending: when it may run next (backoff); running: when its lease expires.
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    -- Changes at every claim; only the holder of the current token may finish the job.
    lease_token      uuid,
    worker           text,
    skip_reason      text,
    last_error       text,
    reply_message_id bigint,
    model            text,
    input_tokens     integer,
    output_tokens    integer,
    latency_ms       integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    FOREIGN KEY (agent_id, workspace_id) REFERENCES agents (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (thread_id, workspace_id) REFERENCES threads (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (message_id, workspace_id) REFERENCES messages (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (reply_message_id, workspace_id) REFERENCES messages (id, workspace_id),
    -- One job per inbound message, hence at most one reply to it.
    UNIQUE (message_id)
);
CREATE INDEX agent_jobs_due ON agent_jobs (run_at) WHERE status IN ('pending', 'running');
CREATE INDEX agent_jobs_agent ON agent_jobs (agent_id, created_at DESC);

-- Rate limits count recent replies per agent and per correspondent.
CREATE INDEX messages_outbound_recent ON messages (agent_id, rcpt_to, received_at)
    WHERE direction = 'outbound';
