-- Indexes the store path pays for, or misreads (issue 20; python -m bench.store_cost).
--
-- 1. A message's RFC Message-ID is looked up by store_inbound_message.sql to thread a
--    reply (`message_id = ANY (references) AND agent_id = ...`). The index led with
--    agent_id, which the duplicate check (`agent_id, direction, dedup_key`: the unique
--    index) also leads with: with no statistics yet (a new database, before autovacuum's
--    first ANALYZE) the plan that store_inbound_message cached for the duplicate check
--    took this index and read every message of the agent, for every message stored:
--    Postgres CPU per message grew with the mailbox (0.6 -> 1.9 ms over 8,000 messages)
--    until an ANALYZE. Led by message_id, the index serves the reference lookup by its
--    values, and nothing else can mistake it for the duplicate check.
DROP INDEX messages_agent_message_id;
CREATE INDEX messages_message_id ON messages (message_id, agent_id);

-- 2. The labels index covers only messages that carry a label of their own. Every
--    inbound message is stored labelled {unread}: one GIN key shared by nearly every row,
--    whose posting list each insert extends, for an index that selects little on that
--    key anyway. The filter by a custom label (store/inbox.threads_page) states the same
--    predicate and so can use this index; the filter by 'unread' walks the agent's
--    threads newest first, as every list does.
DROP INDEX messages_labels;
CREATE INDEX messages_labels ON messages USING gin (labels)
    WHERE labels <> '{unread}'::text[] AND labels <> '{}'::text[];
