CREATE TABLE IF NOT EXISTS {schema}.{p}messages (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    type         text        NOT NULL,
    key          text,
    partition    integer     NOT NULL,
    payload      bytea       NOT NULL,
    content_type text        NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When the row is next actionable: deliverable time while pending, lease expiry while in flight.
    available_at timestamptz NOT NULL DEFAULT now(),
    status       text        NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead')),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    locked_by    text,
    delivered_at timestamptz,
    dead_at      timestamptz
);

CREATE INDEX IF NOT EXISTS {p}messages_ready
    ON {schema}.{p}messages (available_at, seq) WHERE status IN ('pending', 'in_flight');

CREATE INDEX IF NOT EXISTS {p}messages_key
    ON {schema}.{p}messages (key, seq) WHERE key IS NOT NULL AND status IN ('pending', 'in_flight');

CREATE INDEX IF NOT EXISTS {p}messages_delivered
    ON {schema}.{p}messages (delivered_at) WHERE status = 'delivered';
