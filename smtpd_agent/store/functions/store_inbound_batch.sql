-- Group commit: several received messages stored by one statement, hence one
-- transaction, one WAL flush and one round trip (store/messages.py batches
-- the messages that arrive while earlier ones are being committed).
--
-- Each message's content (raw bytes, attachments) is sent once, however many
-- mailboxes it is for; each delivery names its content by position (1-based).
-- A row per delivery, in order: its position, the stored (or already stored)
-- message, its thread, and the agent job made. The job commits with the
-- message or not at all; whether to answer is the worker's decision. Mail
-- labelled spam gets no job: it is held from the agent until released
-- (store/quarantine.py queues the job then).
CREATE FUNCTION store_inbound_batch(
    p_contents message_content[], p_attachments message_attachment[],
    p_deliveries inbound_delivery[], p_thread_window interval)
RETURNS TABLE (o_position integer, o_message_id bigint, o_thread_id bigint,
               o_duplicate boolean, o_job_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    d inbound_delivery;
    v_content integer;
    c message_content;
    v_attachments message_attachment[];
BEGIN
    o_position := 0;
    FOREACH d IN ARRAY p_deliveries LOOP
        o_position := o_position + 1;
        -- a message's deliveries come together: pick its content out once
        IF v_content IS DISTINCT FROM d.content_position THEN
            v_content := d.content_position;
            c := p_contents[v_content];
            v_attachments := ARRAY(SELECT a FROM unnest(p_attachments) AS a
                                    WHERE a.content_position = v_content ORDER BY a.position);
        END IF;
        SELECT s.o_message_id, s.o_thread_id, s.o_duplicate
          INTO o_message_id, o_thread_id, o_duplicate
          FROM store_inbound_message(d, c, v_attachments, p_thread_window) AS s;
        o_job_id := NULL;
        IF d.auto_reply AND NOT o_duplicate
           AND NOT coalesce(c.spam, false) THEN
            INSERT INTO agent_jobs (workspace_id, agent_id, thread_id, message_id)
            VALUES (d.workspace_id, d.agent_id, o_thread_id, o_message_id)
            RETURNING id INTO o_job_id;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;
