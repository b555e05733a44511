-- The deployment's identity (issue 21): the operator's default domain, recorded by
-- the first `serve` or `migrate` against this database. Every management command
-- then uses it unless given another one (which is refused with both values named), and a
-- server configured with another one refuses to start. Changing it is deliberate:
-- `smtpd-agent deployment set-domain`. Not workspace data: one row per database.
CREATE TABLE deployment (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    default_domain  text NOT NULL CHECK (default_domain <> ''),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    changed_at      timestamptz
);

-- The hosts that served this deployment, with the greeting name each used (several MX
-- hosts share one database, so this is a list, not part of the identity).
CREATE TABLE deployment_hosts (
    hostname        text PRIMARY KEY,
    last_started_at timestamptz NOT NULL DEFAULT now()
);
