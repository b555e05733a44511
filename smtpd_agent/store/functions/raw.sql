-- A message's bytes as stored (raw_messages, once per workspace and SHA-256),
-- read like a column: `SELECT m.raw FROM messages m` (attribute notation).
-- Joined within the row's own workspace only.
CREATE FUNCTION raw(m messages) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT r.content FROM raw_messages r
     WHERE r.workspace_id = m.workspace_id AND r.sha256 = m.raw_sha256
$$;
