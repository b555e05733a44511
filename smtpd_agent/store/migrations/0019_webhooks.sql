-- Signed outgoing webhooks (issue 19): each workspace's endpoints, one delivery per
-- (endpoint, event) of the outbox (0018; made by functions/fan_out_webhooks.sql), and
-- every attempt of a delivery.
--
-- The secret is the `whsec_` string sealed with Fernet under the at-rest secret
-- (domains.key_file, as the DKIM private keys): a dump alone does not give it, and
-- no statement reads it back to a client. While a secret is rotated out it keeps
-- signing beside the new one until previous_secret_until.

CREATE TABLE webhook_endpoints (
    id                    bigserial PRIMARY KEY,
    workspace_id          bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    url                   text NOT NULL CHECK (length(url) <= 2048),
    description           text CHECK (length(description) <= 500),
    -- empty: every event type
    event_types           text[] NOT NULL DEFAULT '{}' CHECK (cardinality(event_types) <= 50),
    enabled               boolean NOT NULL DEFAULT true,
    secret                bytea NOT NULL,
    previous_secret       bytea,
    previous_secret_until timestamptz,
    -- failed attempts in a row, and since when (webhooks.disable_after_*)
    consecutive_failures  integer NOT NULL DEFAULT 0,
    failing_since         timestamptz,
    disabled_at           timestamptz,
    disabled_reason       text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (id, workspace_id)
);
CREATE INDEX webhook_endpoints_workspace ON webhook_endpoints (workspace_id) WHERE enabled;

-- A lease queue (store/lease.py: status, run_at, attempts, lease_token). thread_id
-- orders deliveries: one of a thread waits while an earlier one of the same thread
-- and endpoint is pending or sending. replay: made by the API's replay (replay_of: the
-- delivery replayed, if there was one); the fan-out makes at most one original per
-- (endpoint, event).
CREATE TABLE webhook_deliveries (
    id            bigserial PRIMARY KEY,
    workspace_id  bigint NOT NULL,
    endpoint_id   bigint NOT NULL,
    event_id      bigint NOT NULL,
    event_type    text NOT NULL,
    thread_id     bigint,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sending', 'delivered', 'failed')),
    run_at        timestamptz NOT NULL DEFAULT now(),
    attempts      integer NOT NULL DEFAULT 0,
    lease_token   uuid,
    replay        boolean NOT NULL DEFAULT false,
    replay_of     bigint,
    last_status   integer,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    FOREIGN KEY (endpoint_id, workspace_id)
        REFERENCES webhook_endpoints (id, workspace_id) ON DELETE CASCADE,
    FOREIGN KEY (event_id) REFERENCES events (id) ON DELETE CASCADE,
    UNIQUE (id, workspace_id)
);
CREATE UNIQUE INDEX webhook_deliveries_once ON webhook_deliveries (endpoint_id, event_id)
    WHERE NOT replay;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (run_at)
    WHERE status IN ('pending', 'sending');
CREATE INDEX webhook_deliveries_thread ON webhook_deliveries (endpoint_id, thread_id, id)
    WHERE status IN ('pending', 'sending') AND thread_id IS NOT NULL;
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, id);

-- The delivery log: one row per attempt, never the secret or the body sent.
-- retry_at: when the delivery is due again after this attempt (the stored schedule).
CREATE TABLE webhook_attempts (
    id            bigserial PRIMARY KEY,
    workspace_id  bigint NOT NULL,
    delivery_id   bigint NOT NULL,
    attempt       integer NOT NULL,
    started_at    timestamptz NOT NULL,
    duration_ms   integer NOT NULL,
    status_code   integer,
    outcome       text NOT NULL CHECK (outcome IN ('delivered', 'failed', 'refused')),
    error         text CHECK (length(error) <= 500),
    response      text CHECK (length(response) <= 500),
    retry_at      timestamptz,
    FOREIGN KEY (delivery_id, workspace_id)
        REFERENCES webhook_deliveries (id, workspace_id) ON DELETE CASCADE
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
