-- Delegated zones (issue 11): a customer delegates a subdomain to our name
-- servers and we serve every record of it from here.
--
-- domains.delegated: the zone is ours to serve; `domain check` verifies the
-- delegation (the NS set) instead of each record.
-- domains.zone_serial / zone_hash: the SOA serial (RFC 1035 3.3.13) and a hash
-- of the zone's records without the SOA. The DNS server recomputes the hash
-- whenever it loads a zone and bumps the serial when the hash changed, so any
-- change (new selector, retired key, MX hosts in the settings) bumps it once,
-- even with several DNS hosts (the UPDATE is conditional on the old hash).
--
-- dkim_keys.activated_at: NULL while a rotated-in key is published but not yet
-- used for signing (it must be served, or verified, first); older rows sign as
-- before. dkim_keys.retire_after: when a rotated-out key stops being published.

ALTER TABLE domains ADD COLUMN delegated boolean NOT NULL DEFAULT false;
ALTER TABLE domains ADD COLUMN zone_serial bigint NOT NULL DEFAULT 1 CHECK (zone_serial > 0);
ALTER TABLE domains ADD COLUMN zone_hash text;
CREATE INDEX domains_delegated ON domains (name) WHERE delegated;

ALTER TABLE dkim_keys ADD COLUMN activated_at timestamptz DEFAULT now();
ALTER TABLE dkim_keys ADD COLUMN retire_after timestamptz;

-- A change to a delegated zone's content is announced on channel smtpd_agent_zones
-- (payload: the domain), so every DNS server drops its cached copy at once instead of
-- waiting for dns_server.cache_ttl. Columns that do not change a zone (state,
-- checked_at, ...) do not notify.
CREATE FUNCTION notify_zone_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
BEGIN
    PERFORM pg_notify('smtpd_agent_zones', coalesce(changed->>'name', changed->>'domain'));
    RETURN NULL;
END $$;

CREATE TRIGGER domains_zone_change AFTER INSERT OR DELETE OR UPDATE OF delegated, name
    ON domains FOR EACH ROW EXECUTE FUNCTION notify_zone_change();
CREATE TRIGGER dkim_keys_zone_change AFTER INSERT OR DELETE OR UPDATE
    ON dkim_keys FOR EACH ROW EXECUTE FUNCTION notify_zone_change();
