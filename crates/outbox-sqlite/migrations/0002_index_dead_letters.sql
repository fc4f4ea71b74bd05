CREATE INDEX IF NOT EXISTS {p}messages_dead
    ON {p}messages (dead_at) WHERE status = 'dead';
