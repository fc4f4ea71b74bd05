-- Relays that are idle register here; writers notify only while one is registered, so a busy
-- outbox never pays for NOTIFY's commit-time lock.
CREATE TABLE IF NOT EXISTS {schema}.{p}relays (
    relay_id     text PRIMARY KEY,
    parked_until timestamptz NOT NULL
);

CREATE OR REPLACE FUNCTION {schema}.{p}wake_parked() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.{p}relays WHERE parked_until > now()) THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS {p}wake_parked ON {schema}.{p}messages;
CREATE TRIGGER {p}wake_parked AFTER INSERT ON {schema}.{p}messages
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{p}wake_parked();

CREATE INDEX IF NOT EXISTS {p}messages_dead
    ON {schema}.{p}messages (dead_at) WHERE status = 'dead';
