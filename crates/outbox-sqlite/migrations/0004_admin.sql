-- Operators' controls: topics whose delivery is paused, and the heartbeats of live relays.

-- Topics whose messages no relay claims until they are resumed (one row per paused topic).
CREATE TABLE IF NOT EXISTS {p}paused_topics (
    topic     TEXT    PRIMARY KEY,
    paused_at INTEGER NOT NULL
);

-- Each relay's last reported state (times in milliseconds since the epoch).
CREATE TABLE IF NOT EXISTS {p}relay_heartbeats (
    relay_id   TEXT    PRIMARY KEY,
    state      TEXT    NOT NULL,
    last_seen  INTEGER NOT NULL,
    started_at INTEGER NOT NULL
);

-- Dead letters listed by id (keyset pages) with filters.
CREATE INDEX IF NOT EXISTS {p}messages_dead_id ON {p}messages (id) WHERE status = 'dead';
