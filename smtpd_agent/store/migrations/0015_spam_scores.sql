-- Spam scoring (issue 17, spam.py): rspamd's verdict per message, and the quarantine.
-- spam: labelled by rspamd's action (add header / rewrite subject), held from the agent.
-- spam_status: 'scored', or 'unscored' when rspamd was configured but unreachable;
-- NULL when no rspamd is configured. spam_symbols: {symbol: score}.
-- released_at: when an operator released a held (spam or DMARC-quarantined) message.
ALTER TABLE messages
    ADD COLUMN spam          boolean NOT NULL DEFAULT false,
    ADD COLUMN spam_status   text CHECK (spam_status IN ('scored', 'unscored')),
    ADD COLUMN spam_action   text,
    ADD COLUMN spam_score    double precision,
    ADD COLUMN spam_required double precision,
    ADD COLUMN spam_symbols  jsonb,
    ADD COLUMN released_at   timestamptz;

-- The quarantine: held inbound messages, newest first, per workspace.
CREATE INDEX messages_held ON messages (workspace_id, received_at DESC)
    WHERE direction = 'inbound' AND (spam OR quarantined) AND released_at IS NULL;
