-- Outgoing webhooks (issue 19, migration 0019, smtpd_agent/hooks): every event appended
-- to the outbox becomes, in the same transaction, one delivery per enabled endpoint of
-- its workspace that wants its type (event_types empty: every type). So a delivery
-- exists exactly when its event committed, and at most one per (endpoint, event)
-- (webhook_deliveries_once); an endpoint added later gets earlier events only by replay.
-- Each delivery's NOTIFY (notify_webhook_delivery.sql) wakes the delivery workers.
--
-- A trigger function goes with its trigger: re-applying this file drops the function
-- with CASCADE (store/database.py) and creates both again.
CREATE FUNCTION fan_out_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (workspace_id, endpoint_id, event_id, event_type,
                                    thread_id)
    SELECT NEW.workspace_id, e.id, NEW.id, NEW.type, NEW.thread_id
      FROM webhook_endpoints e
     WHERE e.workspace_id = NEW.workspace_id AND e.enabled
       AND (cardinality(e.event_types) = 0 OR NEW.type = ANY (e.event_types))
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER events_fan_out_webhooks AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION fan_out_webhooks();
