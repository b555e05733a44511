-- An event's payload as consumers get it (store/events.py COLUMNS: the stream, webhook
-- bodies, replays), read like a column: `SELECT e.event_payload FROM events e`.
-- A message's event stores ids, envelope, headers and links (message_event.sql); its
-- text, which never changes once stored, is joined here when the event is read: the
-- message's new text (extracted_text, else the plain body) up to 8000 characters, a
-- 200-character snippet and whether the text was cut (the bounds of store/events.py).
-- Storing the text in every event doubled the bytes written per received message and
-- cost the store transaction about 0.2 ms of Postgres CPU a message (issue 20).
-- Events that carry their own text (drafts, events stored before this change) are
-- returned as stored; so is a message event whose message no longer exists.
CREATE FUNCTION event_payload(e events) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN e.payload ? 'text' OR NOT (e.payload ? 'message') THEN e.payload
        ELSE e.payload || coalesce((
            SELECT jsonb_build_object(
                       'snippet', left(btrim(regexp_replace(left(t.text, 1000), '\s+', ' ', 'g')),
                                       200),
                       'text', left(t.text, 8000),
                       'text_truncated', length(t.text) > 8000)
              FROM (SELECT coalesce(m.extracted_text, m.text_body, '') AS text
                      FROM messages m
                     WHERE m.id = (e.payload -> 'message' ->> 'id')::bigint
                       AND m.workspace_id = e.workspace_id) AS t), '{}'::jsonb)
    END
$$;
