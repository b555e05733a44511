-- HTTP surface: inbox API keys (stored hashed) and webhook replay protection.

-- A key is shown once at creation; only its SHA-256 is kept. Keys are 256 bits
-- of randomness, so a fast hash is enough (no password stretching needed).
CREATE TABLE api_keys (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    prefix       text NOT NULL,
    key_hash     bytea NOT NULL UNIQUE,
    name         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_workspace ON api_keys (workspace_id);

-- Signed webhook tokens already used (Mailgun's token), so a captured request
-- cannot be posted again; rows older than the freshness window are useless
-- and are deleted as new ones arrive. Shared by every host through Postgres.
CREATE TABLE webhook_replays (
    provider text NOT NULL,
    token    text NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, token)
);
CREATE INDEX webhook_replays_seen ON webhook_replays (seen_at);
