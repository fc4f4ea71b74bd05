-- The consumer inbox: one row per message a consumer has processed, written in the consumer's
-- own transaction together with its effects.
CREATE TABLE IF NOT EXISTS {schema}.{p}inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX IF NOT EXISTS {p}inbox_processed ON {schema}.{p}inbox (processed_at);
