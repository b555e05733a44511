-- One received message for one mailbox: stored once (a dedup key already
-- stored for the mailbox returns that row), in the thread it belongs to.
CREATE FUNCTION store_inbound_message(
    d inbound_delivery, c message_content, p_attachments message_attachment[],
    p_thread_window interval,
    OUT o_message_id bigint, OUT o_thread_id bigint, OUT o_duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_references text[];
    v_new_thread boolean := false;
BEGIN
    SELECT id, thread_id INTO o_message_id, o_thread_id FROM messages
     WHERE agent_id = d.agent_id AND direction = 'inbound' AND dedup_key = c.dedup_key;
    IF FOUND THEN
        o_duplicate := true;
        RETURN;
    END IF;
    o_duplicate := false;

    -- 1. a stored message this one refers to (In-Reply-To, References), in a thread
    --    of the same correspondent (threads.correspondent, the From that began it):
    --    naming someone else's Message-ID never joins, and so never reads, their
    --    conversation (issue 17)
    v_references := coalesce(c.in_reply_to, '{}') || coalesce(c."references", '{}');
    IF cardinality(v_references) > 0 AND c.from_address IS NOT NULL THEN
        SELECT m.thread_id INTO o_thread_id FROM messages m
          JOIN threads t ON t.id = m.thread_id AND t.workspace_id = m.workspace_id
         WHERE m.agent_id = d.agent_id AND m.workspace_id = d.workspace_id
           AND m.message_id = ANY (v_references)
           AND lower(t.correspondent) = lower(c.from_address)
         ORDER BY m.received_at DESC LIMIT 1;
    END IF;
    -- 2. the same normalized subject from the same correspondent, recently. Sorted by an
    --    expression no index gives, so that no index's order makes it look cheap to walk
    --    the agent's threads newest first (threads_agent_recent) until one matches: with
    --    no statistics yet (a new database, before autovacuum's first ANALYZE), plans did
    --    that for about half the messages, reading every recent thread of the agent each
    --    time (issue 20, bench/store_cost.py). threads_subject_match finds the few
    --    candidates by their equal columns; sorting those is nothing.
    IF o_thread_id IS NULL AND c.normalized_subject <> '' AND c.from_address IS NOT NULL THEN
        SELECT t.id INTO o_thread_id FROM threads t
         WHERE t.agent_id = d.agent_id AND t.workspace_id = d.workspace_id
           AND t.normalized_subject = c.normalized_subject AND t.correspondent = c.from_address
           AND t.last_message_at > now() - p_thread_window
         ORDER BY t.last_message_at + interval '0' DESC LIMIT 1;
    END IF;
    -- 3. a new thread, holding this message
    IF o_thread_id IS NULL THEN
        INSERT INTO threads (workspace_id, agent_id, subject, normalized_subject, correspondent,
                             message_count)
        VALUES (d.workspace_id, d.agent_id, c.subject, coalesce(c.normalized_subject, ''),
                c.from_address, 1)
        RETURNING id INTO o_thread_id;
        v_new_thread := true;
    END IF;

    o_message_id := store_message(d.workspace_id, d.agent_id, o_thread_id, v_new_thread,
                                  'inbound', 'received', d.rcpt_to, c, p_attachments);
END;
$$;
