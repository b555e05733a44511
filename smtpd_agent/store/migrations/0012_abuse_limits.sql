-- Whom an agent may write to (issue 17): allow and block lists, the recipients
-- each agent has written to (for the cap on first-time recipients per day), and
-- what the workspace-wide reply caps count over.

-- An entry is an exact address ('bob@example.com') or a domain ('@example.com',
-- which covers its subdomains too), for receiving, sending or both; agent_id
-- NULL: the whole workspace. The rules that combine them are in smtpd_agent/acl.
CREATE TABLE acl_entries (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    agent_id     bigint,
    action       text NOT NULL CHECK (action IN ('allow', 'block')),
    direction    text NOT NULL DEFAULT 'both' CHECK (direction IN ('receive', 'send', 'both')),
    pattern      text NOT NULL CHECK (pattern = lower(pattern) AND pattern LIKE '%@_%'),
    note         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (agent_id, workspace_id) REFERENCES agents (id, workspace_id) ON DELETE CASCADE
);
-- one entry per scope, direction and pattern (an allow and a block of the same
-- pattern would be a contradiction: `acl add` replaces the action)
CREATE UNIQUE INDEX acl_entries_unique
    ON acl_entries (workspace_id, coalesce(agent_id, 0), direction, pattern);
CREATE INDEX acl_entries_allow ON acl_entries (workspace_id, direction) WHERE action = 'allow';

-- The first time each agent wrote to each address: a reply to someone it never
-- wrote to before counts against agent.new_recipients_per_day.
CREATE TABLE agent_recipients (
    workspace_id  bigint NOT NULL,
    agent_id      bigint NOT NULL,
    address       text NOT NULL CHECK (address = lower(address)),
    first_sent_at timestamptz NOT NULL DEFAULT now(),
    last_sent_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (agent_id, workspace_id) REFERENCES agents (id, workspace_id) ON DELETE CASCADE,
    PRIMARY KEY (agent_id, address)
);
CREATE INDEX agent_recipients_first ON agent_recipients (agent_id, first_sent_at);

-- The workspace-wide caps count the workspace's outbound messages of the last hour and day.
CREATE INDEX messages_workspace_outbound ON messages (workspace_id, received_at)
    WHERE direction = 'outbound';

-- A recipient the allow/block lists refuse is never tried: 'blocked', like 'suppressed'.
ALTER TABLE delivery_recipients DROP CONSTRAINT delivery_recipients_state_check;
ALTER TABLE delivery_recipients ADD CONSTRAINT delivery_recipients_state_check
    CHECK (state IN ('queued', 'deferred', 'sent', 'bounced', 'failed', 'suppressed', 'blocked'));
