-- Every message row is written here, inbound and outbound (the agent's replies, and
-- what the mailbox API sends); inbound mail arrives labelled 'unread':
-- the raw bytes once per workspace (raw_messages), the row naming them, the
-- attachments' content once per workspace (blobs) and their rows, the thread's
-- counters and a place in the search queue (indexed after the COMMIT, migration 0021).
-- A thread created for this message already counts it
-- (p_new_thread), so only a reply to an existing thread pays for the UPDATE
-- (a non-HOT update: last_message_at is indexed). An inbound message is announced in
-- the event outbox in the same transaction (message_event.sql): message.received, or
-- message.quarantined when it is held from the agent (spam, DMARC quarantine).
CREATE FUNCTION store_message(
    p_workspace_id bigint, p_agent_id bigint, p_thread_id bigint, p_new_thread boolean,
    p_direction text, p_status text, p_rcpt_to text, c message_content,
    p_attachments message_attachment[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_message_id bigint;
BEGIN
    INSERT INTO raw_messages (workspace_id, sha256, size, content)
    VALUES (p_workspace_id, c.raw_sha256, octet_length(c.raw), c.raw)
    ON CONFLICT (workspace_id, sha256) DO NOTHING;

    INSERT INTO messages (
        workspace_id, agent_id, thread_id, direction, status, dedup_key, message_id, in_reply_to,
        "references", from_header, from_address, to_header, cc_header, reply_to, subject, sent_at,
        headers, text_body, html_body, raw_sha256, size, mail_from, rcpt_to, client_ip, helo, tls,
        tls_version, session_id, queue_id, defects, spf, dkim, dmarc, arc, auth_results,
        auth_detail, quarantined, scan_status, scan_signature, spam, spam_status, spam_action,
        spam_score, spam_required, spam_symbols, received_at, iprev, labels, extracted_text)
    VALUES (
        p_workspace_id, p_agent_id, p_thread_id, p_direction, p_status, c.dedup_key, c.message_id,
        coalesce(c.in_reply_to, '{}'), coalesce(c."references", '{}'), c.from_header,
        c.from_address, c.to_header, c.cc_header, c.reply_to, c.subject, c.sent_at,
        coalesce(c.headers, '[]'), c.text_body, c.html_body, c.raw_sha256, octet_length(c.raw),
        c.mail_from, p_rcpt_to, c.client_ip, c.helo, coalesce(c.tls, false), c.tls_version,
        c.session_id, c.queue_id, coalesce(c.defects, '{}'), c.spf, c.dkim, c.dmarc, c.arc,
        c.auth_results, c.auth_detail, coalesce(c.quarantined, false), c.scan_status,
        c.scan_signature, coalesce(c.spam, false), c.spam_status, c.spam_action, c.spam_score,
        c.spam_required, c.spam_symbols, coalesce(c.received_at, now()), c.iprev,
        CASE WHEN p_direction = 'inbound' THEN ARRAY['unread'] ELSE '{}'::text[] END,
        c.extracted_text)
    RETURNING id INTO v_message_id;

    IF cardinality(p_attachments) > 0 THEN
        INSERT INTO blobs (workspace_id, sha256, size, content)
        SELECT DISTINCT ON (a.sha256) p_workspace_id, a.sha256, octet_length(a.content), a.content
          FROM unnest(p_attachments) AS a
        ON CONFLICT (workspace_id, sha256) DO NOTHING;
        INSERT INTO attachments (workspace_id, message_id, position, filename, content_type,
                                 disposition, content_id, size, sha256, scan_status, scan_signature)
        SELECT p_workspace_id, v_message_id, a.position, a.filename, a.content_type,
               a.disposition, a.content_id, octet_length(a.content), a.sha256, a.scan_status,
               a.scan_signature
          FROM unnest(p_attachments) AS a;
    END IF;

    INSERT INTO search_queue (message_id, workspace_id) VALUES (v_message_id, p_workspace_id);

    IF NOT p_new_thread THEN
        UPDATE threads SET message_count = message_count + 1,
                           last_message_at = greatest(last_message_at, now())
         WHERE id = p_thread_id AND workspace_id = p_workspace_id;
    END IF;

    IF p_direction = 'inbound' THEN
        PERFORM message_event(p_workspace_id, v_message_id,
            CASE WHEN coalesce(c.spam, false) OR coalesce(c.quarantined, false)
                 THEN 'message.quarantined' ELSE 'message.received' END);
    END IF;
    RETURN v_message_id;
END;
$$;
