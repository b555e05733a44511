-- Search the new text of a message (issue 18): an inbound reply's extracted_text (migration
-- 0016; without the quoted history and the signature), so a word quoted from another
-- message no longer makes an old reply match. Outbound mail and mail stored before 0016
-- have no extracted_text: their text body is searched as before. What follows from
-- extracted_text's bounds: new text past content.extract_max_chars (20,000 characters by
-- default) is no longer searched; HTML-only mail, whose text_body is empty, now is.
--
-- A generated column may read any plain column of its row, extracted_text included.
-- Postgres 16 cannot change a generated expression in place (SET EXPRESSION is 17+):
-- the column is dropped (with its index) and added again. That rewrites the messages
-- table under an ACCESS EXCLUSIVE lock (to_tsvector of every row again) and rebuilds the
-- GIN index: mail is not stored while it runs (SMTP answers 4xx, senders retry). Measured
-- by bench/search_migration.py (bench/results/2026-12-02-search-migration.md: about 1 ms a
-- row on a loaded 2-core VM); plan it for a quiet hour on a large table.
ALTER TABLE messages DROP COLUMN search;
ALTER TABLE messages ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english'::regconfig, left(coalesce(subject, ''), 1000)), 'A') ||
    setweight(to_tsvector('english'::regconfig, left(coalesce(from_header, ''), 1000)), 'B') ||
    setweight(to_tsvector('english'::regconfig,
                          left(coalesce(extracted_text, text_body, ''), 100000)), 'C')
) STORED;
CREATE INDEX messages_search ON messages USING gin (search);
