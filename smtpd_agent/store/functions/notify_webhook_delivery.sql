-- A webhook delivery queued (by the fan-out of an event, fan_out_webhooks.sql, or a
-- replay) wakes the delivery workers of every process at COMMIT, on channel
-- smtpd_agent_webhooks (payload: the workspace id; Postgres folds repeats within a
-- transaction). Only deliveries notify: an event that no endpoint wants wakes no worker.
--
-- A trigger function goes with its trigger: re-applying this file drops the function
-- with CASCADE (store/database.py) and creates both again.
CREATE FUNCTION notify_webhook_delivery() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('smtpd_agent_webhooks', NEW.workspace_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_deliveries_notify AFTER INSERT ON webhook_deliveries
    FOR EACH ROW EXECUTE FUNCTION notify_webhook_delivery();
