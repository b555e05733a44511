-- Routing changes pushed to running servers (issue 16 item 11): the router caches the
-- mailboxes and receiving custom domains it found; any change to the rows it reads is
-- announced on channel smtpd_agent_routing (payload: the table), through each process's
-- one LISTEN connection (smtpd_agent/store/changes.py), so a disabled agent or a removed
-- domain stops routing at once and not after routing.cache_ttl.
--
-- A trigger function goes with its triggers: re-applying this file drops the function
-- with CASCADE (store/database.py) and creates both again. Updates that change nothing
-- routing reads (a re-check stamping checked_at, the DNS server bumping a zone serial)
-- stay silent: the WHEN clause compares the columns, as UPDATE OF fires on columns
-- merely SET.
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
