CREATE TABLE IF NOT EXISTS {p}messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    topic        TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    key          TEXT,
    partition    INTEGER NOT NULL,
    payload      BLOB    NOT NULL,
    content_type TEXT    NOT NULL,
    headers      TEXT    NOT NULL DEFAULT '{}',
    -- Unix milliseconds. available_at: deliverable time while pending, lease expiry in flight.
    created_at   INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    status       TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    locked_by    TEXT,
    delivered_at INTEGER,
    dead_at      INTEGER
);

CREATE INDEX IF NOT EXISTS {p}messages_ready
    ON {p}messages (available_at, seq) WHERE status IN ('pending', 'in_flight');

CREATE INDEX IF NOT EXISTS {p}messages_key
    ON {p}messages (key, seq) WHERE key IS NOT NULL AND status IN ('pending', 'in_flight');

CREATE INDEX IF NOT EXISTS {p}messages_delivered
    ON {p}messages (delivered_at) WHERE status = 'delivered';
