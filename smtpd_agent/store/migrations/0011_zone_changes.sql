-- A delegated zone is served in full only once verified (issue 16 item 10; before, its
-- SOA, NS and glue only), so its state and verified_at now change its content too and
-- are announced on smtpd_agent_zones like the columns of migration 0007. Updates that
-- change none of them (a re-check stamping checked_at, the zone serial bump) stay silent.
-- (A delegated domain verified before this release keeps receiving and being served; its
-- next re-check wants the ownership TXT in the parent zone too, and marks it degraded,
-- naming it, until then.) The routing triggers are in functions/notify_routing_change.sql.

DROP TRIGGER domains_zone_change ON domains;
CREATE TRIGGER domains_zone_change AFTER INSERT OR DELETE
    ON domains FOR EACH ROW EXECUTE FUNCTION notify_zone_change();
CREATE TRIGGER domains_zone_update AFTER UPDATE ON domains FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name
          OR OLD.delegated IS DISTINCT FROM NEW.delegated
          OR OLD.state IS DISTINCT FROM NEW.state
          OR OLD.verified_at IS DISTINCT FROM NEW.verified_at)
    EXECUTE FUNCTION notify_zone_change();
