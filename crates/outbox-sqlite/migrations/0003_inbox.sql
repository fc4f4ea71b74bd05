CREATE TABLE IF NOT EXISTS {p}inbox (
    consumer     TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX IF NOT EXISTS {p}inbox_processed ON {p}inbox (processed_at);
