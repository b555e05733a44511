-- Full-text search is indexed after the COMMIT that stores a message, not in it (issue 20).
--
-- The generated `messages.search` column computed to_tsvector of the subject, From and
-- the new text inside the store transaction: about 0.9 ms of Postgres CPU per 5 KB
-- message, and 0.3 ms more for its GIN entry, three quarters of what storing a message
-- cost (python -m bench.store_cost). None of it decides the SMTP reply. The vector now
-- lives in `message_search`, written by the search indexer (store/search_index.py) from
-- `search_queue`, which store_message.sql fills in the transaction of the message: a
-- message is queued exactly when it is stored, and searchable once the indexer (woken by
-- the commit's event, in batches) has taken it, about a second later.
--
-- Existing vectors are copied over (one INSERT ... SELECT: a sequential scan of messages,
-- no to_tsvector again), then the column and its index go. Every row names its workspace,
-- like every other table's; the search joins on both.
CREATE TABLE message_search (
    message_id   bigint PRIMARY KEY,
    workspace_id bigint NOT NULL,
    search       tsvector NOT NULL,
    FOREIGN KEY (message_id, workspace_id) REFERENCES messages (id, workspace_id)
        ON DELETE CASCADE
);
CREATE INDEX message_search_search ON message_search USING gin (search);

-- Messages stored and not yet indexed. No foreign key: a queued message deleted before
-- it is indexed is skipped by the indexer's join, and the queue stays one narrow row.
CREATE TABLE search_queue (
    message_id   bigint PRIMARY KEY,
    workspace_id bigint NOT NULL
);

INSERT INTO message_search (message_id, workspace_id, search)
SELECT id, workspace_id, search FROM messages;

ALTER TABLE messages DROP COLUMN search;
