-- Domains: custom domains a workspace brings, and the DKIM key store shared by
-- `domain add`, outbound signing (issue 7) and delegated zones (issue 11).
--
-- Every row carries its workspace_id. Keys of the operator's default domain
-- belong to the one *operator workspace* made here: slug '_operator' (an
-- underscore can never be a host-name label, so it can never be a mail domain
-- <slug>.<default domain>), flagged `operator`, hidden from `workspace list`
-- and never holding agents. Deleting a workspace deletes its domains and keys.

ALTER TABLE workspaces ADD COLUMN operator boolean NOT NULL DEFAULT false;
ALTER TABLE workspaces DROP CONSTRAINT workspaces_slug_check;
ALTER TABLE workspaces ADD CONSTRAINT workspaces_slug_check
    CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$' OR (operator AND slug = '_operator'));
CREATE UNIQUE INDEX workspaces_one_operator ON workspaces (operator) WHERE operator;
INSERT INTO workspaces (slug, name, operator) VALUES ('_operator', 'Operator', true);

CREATE TABLE domains (
    id              bigserial PRIMARY KEY,
    workspace_id    bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name            text NOT NULL UNIQUE CHECK (name = lower(name) AND name LIKE '%.%'),
    -- pending: added, never verified; verified: every required record passed;
    -- degraded: was verified, a later check found a record broken (still receives).
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'verified', 'degraded')),
    ownership_token text NOT NULL,
    mail_from       text NOT NULL,
    verified_at     timestamptz,
    checked_at      timestamptz,
    -- names of the records that failed the last check, for `domain list`
    failing         text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (state = 'pending' OR verified_at IS NOT NULL),
    UNIQUE (id, workspace_id)
);
CREATE INDEX domains_workspace ON domains (workspace_id);

CREATE TABLE dkim_keys (
    id            bigserial PRIMARY KEY,
    workspace_id  bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    -- the d= domain the key signs for
    domain        text NOT NULL CHECK (domain = lower(domain)),
    selector      text NOT NULL CHECK (selector ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    algorithm     text NOT NULL CHECK (algorithm IN ('rsa-2048', 'ed25519')),
    -- PKCS#8 DER, encrypted with the service's secret (Fernet); never leaves the service
    private_key   bytea NOT NULL,
    -- the base64 p= value published in DNS
    public_key    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    retired_at    timestamptz,
    UNIQUE (domain, selector),
    UNIQUE (id, workspace_id)
);
CREATE INDEX dkim_keys_active ON dkim_keys (workspace_id, domain) WHERE retired_at IS NULL;
