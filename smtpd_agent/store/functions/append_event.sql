-- Append one event to the outbox (migration 0018, store/events.py): called inside the
-- transaction of its cause, by store_message and by Python code through
-- store.events.append. The transaction id is taken before the row's id so that an
-- event's id is never handed out ahead of its transaction id (the readers' order).
-- The NOTIFY reaches listeners at COMMIT (payload: the workspace id; Postgres folds
-- repeats within a transaction) and never for a rolled-back change.
CREATE FUNCTION append_event(p_workspace_id bigint, p_type text, p_thread_id bigint,
                             p_payload jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_txid xid8 := pg_current_xact_id();
    v_id bigint;
BEGIN
    INSERT INTO events (workspace_id, txid, type, thread_id, payload)
    VALUES (p_workspace_id, v_txid, p_type, p_thread_id, p_payload)
    RETURNING id INTO v_id;
    PERFORM pg_notify('smtpd_agent_events', p_workspace_id::text);
    RETURN v_id;
END;
$$;
