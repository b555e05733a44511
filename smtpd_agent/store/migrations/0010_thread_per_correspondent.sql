-- Threads per correspondent (issue 17): a message joins a thread by In-Reply-To or
-- References only when that thread is its own correspondent's (threads.correspondent,
-- the From address that began it). Before, any Message-ID in the mailbox would do,
-- and whoever knew one could read its thread back in the agent's reply. Otherwise
-- the same as migration 0008.

CREATE OR REPLACE FUNCTION store_inbound_message(
    p_workspace_id bigint, p_agent_id bigint, p_dedup_key text, p_message_id text,
    p_in_reply_to text[], p_references text[], p_from_header text, p_from_address text,
    p_to_header text, p_cc_header text, p_reply_to text, p_subject text,
    p_normalized_subject text, p_sent_at timestamptz, p_headers jsonb, p_text_body text,
    p_html_body text, p_raw bytea, p_mail_from text, p_rcpt_to text, p_client_ip inet,
    p_helo text, p_tls boolean, p_tls_version text, p_session_id text, p_queue_id text,
    p_defects text[], p_spf text, p_dkim text, p_dmarc text, p_arc text, p_auth_results text,
    p_auth_detail jsonb, p_quarantined boolean, p_scan_status text, p_scan_signature text,
    p_received_at timestamptz, p_thread_window interval,
    p_att_filenames text[], p_att_content_types text[], p_att_dispositions text[],
    p_att_content_ids text[], p_att_sha256 bytea[], p_att_contents bytea[],
    p_att_scan_status text[], p_att_scan_signatures text[],
    OUT o_message_id bigint, OUT o_thread_id bigint, OUT o_duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_references text[];
    v_new_thread boolean := false;
BEGIN
    SELECT id, thread_id INTO o_message_id, o_thread_id FROM messages
     WHERE agent_id = p_agent_id AND direction = 'inbound' AND dedup_key = p_dedup_key;
    IF FOUND THEN
        o_duplicate := true;
        RETURN;
    END IF;
    o_duplicate := false;

    -- 1. a stored message this one refers to (In-Reply-To, References), in a thread
    --    of the same correspondent: naming someone else's Message-ID never joins
    --    (and so never reads) their conversation
    v_references := p_in_reply_to || p_references;
    IF cardinality(v_references) > 0 AND p_from_address IS NOT NULL THEN
        SELECT m.thread_id INTO o_thread_id FROM messages m
          JOIN threads t ON t.id = m.thread_id AND t.workspace_id = m.workspace_id
         WHERE m.agent_id = p_agent_id AND m.workspace_id = p_workspace_id
           AND m.message_id = ANY (v_references)
           AND lower(t.correspondent) = lower(p_from_address)
         ORDER BY m.received_at DESC LIMIT 1;
    END IF;
    -- 2. the same normalized subject from the same correspondent, recently
    IF o_thread_id IS NULL AND p_normalized_subject <> '' AND p_from_address IS NOT NULL THEN
        SELECT t.id INTO o_thread_id FROM threads t
         WHERE t.agent_id = p_agent_id AND t.workspace_id = p_workspace_id
           AND t.normalized_subject = p_normalized_subject AND t.correspondent = p_from_address
           AND t.last_message_at > now() - p_thread_window
         ORDER BY t.last_message_at DESC LIMIT 1;
    END IF;
    -- 3. a new thread, holding this message
    IF o_thread_id IS NULL THEN
        INSERT INTO threads (workspace_id, agent_id, subject, normalized_subject, correspondent,
                             message_count)
        VALUES (p_workspace_id, p_agent_id, p_subject, p_normalized_subject, p_from_address, 1)
        RETURNING id INTO o_thread_id;
        v_new_thread := true;
    END IF;

    INSERT INTO messages (
        workspace_id, agent_id, thread_id, direction, status, dedup_key, message_id, in_reply_to,
        "references", from_header, from_address, to_header, cc_header, reply_to, subject, sent_at,
        headers, text_body, html_body, raw, size, mail_from, rcpt_to, client_ip, helo, tls,
        tls_version, session_id, queue_id, defects, spf, dkim, dmarc, arc, auth_results,
        auth_detail, quarantined, scan_status, scan_signature, received_at)
    VALUES (
        p_workspace_id, p_agent_id, o_thread_id, 'inbound', 'received', p_dedup_key, p_message_id,
        p_in_reply_to, p_references, p_from_header, p_from_address, p_to_header, p_cc_header,
        p_reply_to, p_subject, p_sent_at, p_headers, p_text_body, p_html_body, p_raw,
        octet_length(p_raw), p_mail_from, p_rcpt_to, p_client_ip, p_helo, p_tls, p_tls_version,
        p_session_id, p_queue_id, p_defects, p_spf, p_dkim, p_dmarc, p_arc, p_auth_results,
        p_auth_detail, p_quarantined, p_scan_status, p_scan_signature,
        coalesce(p_received_at, now()))
    RETURNING id INTO o_message_id;

    IF cardinality(p_att_sha256) > 0 THEN
        INSERT INTO blobs (workspace_id, sha256, size, content)
        SELECT DISTINCT ON (a.sha256) p_workspace_id, a.sha256, octet_length(a.content), a.content
          FROM unnest(p_att_sha256, p_att_contents) AS a(sha256, content)
        ON CONFLICT (workspace_id, sha256) DO NOTHING;
        INSERT INTO attachments (workspace_id, message_id, position, filename, content_type,
                                 disposition, content_id, size, sha256, scan_status, scan_signature)
        SELECT p_workspace_id, o_message_id, a.ord - 1, a.filename, a.content_type, a.disposition,
               a.content_id, octet_length(a.content), a.sha256, a.scan_status, a.scan_signature
          FROM unnest(p_att_filenames, p_att_content_types, p_att_dispositions, p_att_content_ids,
                      p_att_sha256, p_att_contents, p_att_scan_status, p_att_scan_signatures)
               WITH ORDINALITY AS a(filename, content_type, disposition, content_id, sha256,
                                    content, scan_status, scan_signature, ord);
    END IF;

    IF NOT v_new_thread THEN
        UPDATE threads SET message_count = message_count + 1,
                           last_message_at = greatest(last_message_at, now())
         WHERE id = o_thread_id AND workspace_id = p_workspace_id;
    END IF;
END;
$$;
