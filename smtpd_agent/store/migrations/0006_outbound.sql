-- Outbound delivery (issue 7): the durable queue of agent replies, per-recipient
-- results, every attempt, and the per-workspace suppression list.
--
-- An agent reply is a `messages` row (direction 'outbound', status 'queued',
-- raw = RFC 5322 bytes); `outbound.queue.enqueue()` adds its `deliveries` row in
-- the same transaction (a sweep catches rows that have none). Every row carries
-- its workspace_id, and foreign keys include it.

CREATE TABLE deliveries (
    id                  bigserial PRIMARY KEY,
    workspace_id        bigint NOT NULL,
    message_id          bigint NOT NULL,
    -- queued -> sending -> sent | deferred (-> sending ...) | bounced | failed
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'sending', 'sent', 'deferred', 'bounced', 'failed')),
    -- VERP: the Return-Path is <prefix>-<verp_token>@<bounce domain>
    verp_token          text NOT NULL UNIQUE CHECK (verp_token ~ '^[a-z0-9]{16,64}$'),
    mail_from           text,
    -- the message as sent: DKIM-signed once, before the first attempt; never re-signed
    signed              bytea,
    transport           text,
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    lease_until         timestamptz,
    last_attempt_at     timestamptz,
    last_error          text,
    provider_message_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    FOREIGN KEY (message_id, workspace_id) REFERENCES messages (id, workspace_id) ON DELETE CASCADE,
    UNIQUE (message_id),
    UNIQUE (id, workspace_id)
);
-- what a worker claims: due queued/deferred rows, and sending rows whose lease ran out
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state IN ('queued', 'deferred');
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'sending';
CREATE INDEX deliveries_provider_id ON deliveries (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

CREATE TABLE delivery_recipients (
    delivery_id   bigint NOT NULL,
    workspace_id  bigint NOT NULL,
    address       text NOT NULL,
    -- queued | deferred | sent | bounced | failed | suppressed (never tried: on the list)
    state         text NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'deferred', 'sent', 'bounced', 'failed', 'suppressed')),
    code          integer,
    enhanced      text,
    detail        text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (delivery_id, workspace_id) REFERENCES deliveries (id, workspace_id) ON DELETE CASCADE,
    PRIMARY KEY (delivery_id, address)
);

-- One row per attempt: when, what came back, and the delay chosen for the next one.
CREATE TABLE delivery_attempts (
    id            bigserial PRIMARY KEY,
    delivery_id   bigint NOT NULL,
    workspace_id  bigint NOT NULL,
    attempt       integer NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    transport     text NOT NULL,
    outcome       text NOT NULL,
    code          integer,
    detail        text,
    retry_in      double precision,
    FOREIGN KEY (delivery_id, workspace_id) REFERENCES deliveries (id, workspace_id) ON DELETE CASCADE
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, attempt);

-- Addresses a workspace must not write to again: hard bounces and complaints.
CREATE TABLE suppressions (
    workspace_id  bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    address       text NOT NULL CHECK (address = lower(address)),
    reason        text NOT NULL CHECK (reason IN ('hard_bounce', 'complaint', 'manual')),
    source        text NOT NULL,
    detail        text,
    delivery_id   bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, address)
);
