-- Group commit: several received messages stored by one statement, hence one
-- transaction, one WAL flush and one round trip (store/messages.py batches
-- the messages that arrive while earlier ones are being committed).
--
-- inbound_delivery is one message for one mailbox, the arguments of
-- store_inbound_message plus whether the mailbox answers (agent job).

CREATE TYPE inbound_delivery AS (
    workspace_id bigint, agent_id bigint, auto_reply boolean, dedup_key text, message_id text,
    in_reply_to text[], "references" text[], from_header text, from_address text,
    to_header text, cc_header text, reply_to text, subject text, normalized_subject text,
    sent_at timestamptz, headers jsonb, text_body text, html_body text, raw bytea,
    mail_from text, rcpt_to text, client_ip inet, helo text, tls boolean, tls_version text,
    session_id text, queue_id text, defects text[], spf text, dkim text, dmarc text, arc text,
    auth_results text, auth_detail jsonb, quarantined boolean, scan_status text,
    scan_signature text, received_at timestamptz,
    att_filenames text[], att_content_types text[], att_dispositions text[],
    att_content_ids text[], att_sha256 bytea[], att_contents bytea[],
    att_scan_status text[], att_scan_signatures text[]);

-- Stores every delivery in order; a row per delivery: its position (1-based),
-- the stored (or already stored) message, its thread, and the agent job made.
-- The job commits with the message or not at all; whether to answer is the
-- worker's decision, not the store's.
CREATE FUNCTION store_inbound_batch(p_deliveries inbound_delivery[], p_thread_window interval)
RETURNS TABLE (o_position integer, o_message_id bigint, o_thread_id bigint,
               o_duplicate boolean, o_job_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    d inbound_delivery;
BEGIN
    o_position := 0;
    FOREACH d IN ARRAY p_deliveries LOOP
        o_position := o_position + 1;
        SELECT s.o_message_id, s.o_thread_id, s.o_duplicate
          INTO o_message_id, o_thread_id, o_duplicate
          FROM store_inbound_message(
              d.workspace_id, d.agent_id, d.dedup_key, d.message_id, d.in_reply_to,
              d."references", d.from_header, d.from_address, d.to_header, d.cc_header,
              d.reply_to, d.subject, d.normalized_subject, d.sent_at, d.headers, d.text_body,
              d.html_body, d.raw, d.mail_from, d.rcpt_to, d.client_ip, d.helo, d.tls,
              d.tls_version, d.session_id, d.queue_id, d.defects, d.spf, d.dkim, d.dmarc, d.arc,
              d.auth_results, d.auth_detail, d.quarantined, d.scan_status, d.scan_signature,
              d.received_at, p_thread_window, d.att_filenames, d.att_content_types,
              d.att_dispositions, d.att_content_ids, d.att_sha256, d.att_contents,
              d.att_scan_status, d.att_scan_signatures) AS s;
        o_job_id := NULL;
        IF d.auto_reply AND NOT o_duplicate THEN
            INSERT INTO agent_jobs (workspace_id, agent_id, thread_id, message_id)
            VALUES (d.workspace_id, d.agent_id, o_thread_id, o_message_id)
            RETURNING id INTO o_job_id;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- A new thread is inserted with its first message counted, so only a reply to
-- an existing thread pays for the UPDATE (a non-HOT update: last_message_at is
-- indexed). Otherwise the same as migration 0005.
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

    -- 1. a stored message this one refers to (In-Reply-To, References)
    v_references := p_in_reply_to || p_references;
    IF cardinality(v_references) > 0 THEN
        SELECT m.thread_id INTO o_thread_id FROM messages m
         WHERE m.agent_id = p_agent_id AND m.workspace_id = p_workspace_id
           AND m.message_id = ANY (v_references)
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
