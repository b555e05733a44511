-- Append an event about one message (store/events.py): store_message calls it for every
-- inbound message, Python code (outbound worker, bounces, quarantine release) for the
-- rest, always in the transaction of the change it reports. The payload: ids, the
-- workspace's slug and the agent's handle, envelope, headers a reader sorts by and API
-- paths to fetch the rest; the message's text and snippet are joined when the event is
-- read (event_payload.sql), so the store transaction neither reads nor writes the body
-- again. Never the raw message, the HTML body or anything secret. `p_extra` adds what
-- the cause knows (a bounce's diagnostic, a delivery's relay reply).
CREATE FUNCTION message_event(p_workspace_id bigint, p_message_id bigint, p_type text,
                              p_extra jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_payload jsonb;
    v_thread_id bigint;
    v_base text;
BEGIN
    SELECT m.thread_id,
           '/api/v1/workspaces/' || w.slug,
           jsonb_build_object(
               'workspace', w.slug,
               'agent', a.handle,
               'address', m.rcpt_to,
               'message', jsonb_build_object(
                   'id', m.id, 'thread_id', m.thread_id, 'direction', m.direction,
                   'status', m.status, 'message_id', m.message_id, 'from', m.from_header,
                   'from_address', m.from_address, 'to', m.to_header, 'cc', m.cc_header,
                   'subject', m.subject, 'sent_at', m.sent_at, 'received_at', m.received_at,
                   'size', m.size, 'labels', to_jsonb(m.labels), 'spam', m.spam,
                   'quarantined', m.quarantined),
               'envelope', jsonb_build_object('mail_from', m.mail_from, 'rcpt_to', m.rcpt_to))
      INTO v_thread_id, v_base, v_payload
      FROM messages m
      JOIN workspaces w ON w.id = m.workspace_id
      JOIN agents a ON a.id = m.agent_id AND a.workspace_id = m.workspace_id
     WHERE m.id = p_message_id AND m.workspace_id = p_workspace_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'message_event: no message % in workspace %', p_message_id,
            p_workspace_id;
    END IF;
    v_payload := v_payload || jsonb_build_object(
        'links', jsonb_build_object(
            'thread', v_base || '/threads/' || v_thread_id,
            'raw', v_base || '/messages/' || p_message_id || '/raw'))
        || p_extra;
    RETURN append_event(p_workspace_id, p_type, v_thread_id, v_payload);
END;
$$;
