-- Changes pushed to running servers (issue 16, items 10 and 11), through the one
-- LISTEN connection of each process (smtpd_agent/store/changes.py).
--
-- Routing: the router caches mailboxes and receiving custom domains; any change to
-- the rows it reads is announced on channel smtpd_agent_routing (payload: the
-- table), so a disabled agent or a removed domain stops routing at once and not
-- after routing.cache_ttl. Updates that change nothing routing reads (a re-check
-- stamping checked_at, the DNS server bumping a zone serial) stay silent: the WHEN
-- clauses compare the columns, as UPDATE OF fires on columns merely SET.
--
-- Zones: a delegated zone is served in full only once verified (before, SOA and NS
-- only), so its state and verified_at now change its content too, and announce it on
-- smtpd_agent_zones like the columns of migration 0007. (A delegated domain verified
-- before this release keeps receiving and being served; its next re-check wants the
-- ownership TXT in the parent zone too, and marks it degraded, naming it, until then.)

CREATE FUNCTION notify_routing_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- one notification per table and transaction: Postgres folds identical payloads
    PERFORM pg_notify('smtpd_agent_routing', TG_TABLE_NAME);
    RETURN NULL;
END $$;

CREATE TRIGGER agents_routing_change AFTER INSERT OR DELETE OR UPDATE
    ON agents FOR EACH ROW EXECUTE FUNCTION notify_routing_change();
CREATE TRIGGER workspaces_routing_change AFTER INSERT OR DELETE OR UPDATE
    ON workspaces FOR EACH ROW EXECUTE FUNCTION notify_routing_change();
CREATE TRIGGER domains_routing_change AFTER INSERT OR DELETE
    ON domains FOR EACH ROW EXECUTE FUNCTION notify_routing_change();
CREATE TRIGGER domains_routing_update AFTER UPDATE ON domains FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name
          OR OLD.workspace_id IS DISTINCT FROM NEW.workspace_id
          OR OLD.state IS DISTINCT FROM NEW.state
          OR OLD.verified_at IS DISTINCT FROM NEW.verified_at
          OR OLD.mail_from IS DISTINCT FROM NEW.mail_from)
    EXECUTE FUNCTION notify_routing_change();

DROP TRIGGER domains_zone_change ON domains;
CREATE TRIGGER domains_zone_change AFTER INSERT OR DELETE
    ON domains FOR EACH ROW EXECUTE FUNCTION notify_zone_change();
CREATE TRIGGER domains_zone_update AFTER UPDATE ON domains FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name
          OR OLD.delegated IS DISTINCT FROM NEW.delegated
          OR OLD.state IS DISTINCT FROM NEW.state
          OR OLD.verified_at IS DISTINCT FROM NEW.verified_at)
    EXECUTE FUNCTION notify_zone_change();
