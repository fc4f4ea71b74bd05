-- Captured rows (table capture) are delivered by the relay streaming from the slot, never by a
-- polling relay, so their inserts must not NOTIFY: next to a capture relay the polling relay is
-- parked nearly all the time, and every NOTIFY takes a lock that serialises committing writers.
-- The insert of captured rows sets `outbox.captured_insert` for its transaction; this trigger
-- reads it at the end of that statement and clears it, so a later insert of polled rows in the
-- same transaction still wakes the relays.
CREATE OR REPLACE FUNCTION {schema}.{p}wake_parked() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('outbox.captured_insert', true) = 'on' THEN
        PERFORM set_config('outbox.captured_insert', '', true);
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.{p}relays WHERE parked_until > now()) THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN NULL;
END
$fn$;
