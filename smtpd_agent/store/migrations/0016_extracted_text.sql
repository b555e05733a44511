-- Content an LLM can use (issue 18): an inbound message's new text, without the quoted
-- history and the signature (extract/reply.py), computed once at store time. NULL for
-- outbound messages and for mail stored before this migration; readers fall back to the
-- body then.
ALTER TABLE messages ADD COLUMN extracted_text text;
