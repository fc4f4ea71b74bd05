-- Table capture: rows written for a relay that reads the outbox table's inserts from a slot
-- carry the status 'captured'. No claim, no ready or key index and no status count of the
-- polling relay looks at them: the streaming relay delivers them and deletes them, or hands
-- them to the polling path (a failure, a delay, a key with messages waiting) as ordinary rows.
DO $do$
DECLARE
    c record;
BEGIN
    FOR c IN
        -- Found by the column it checks: its generated name may have been cut to 63 bytes.
        SELECT con.conname FROM pg_constraint con
        WHERE con.conrelid = '{schema}.{p}messages'::regclass AND con.contype = 'c'
          AND con.conkey = ARRAY[(SELECT a.attnum FROM pg_attribute a
                                  WHERE a.attrelid = con.conrelid AND a.attname = 'status')]
    LOOP
        EXECUTE format('ALTER TABLE {schema}.{p}messages DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$do$;

-- NOT VALID, then VALIDATE: the check of the existing rows does not block writers.
ALTER TABLE {schema}.{p}messages ADD CONSTRAINT {p}messages_status_check
    CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead', 'captured')) NOT VALID;
ALTER TABLE {schema}.{p}messages VALIDATE CONSTRAINT {p}messages_status_check;

-- The streaming relay settles a batch of captured rows by id. Planned as a plain statement, a
-- batch of a thousand ids against a table whose statistics are stale (an outbox emptied, then
-- refilled faster than autovacuum analyzes it) is estimated to match the whole table, and a
-- scan of the table makes each batch cost more the longer the backlog is. The unique index on
-- id is the plan at every size.
CREATE OR REPLACE FUNCTION {schema}.{p}captured_done(p_ids uuid[], p_keep boolean)
RETURNS bigint
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $fn$
DECLARE
    n bigint;
BEGIN
    IF p_keep THEN
        UPDATE {schema}.{p}messages SET status = 'delivered', delivered_at = now()
        WHERE id = ANY (p_ids) AND status = 'captured';
    ELSE
        DELETE FROM {schema}.{p}messages WHERE id = ANY (p_ids) AND status = 'captured';
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

-- How far the batch a streaming relay last handed to its sink reaches in the WAL (the end of
-- its last transaction). After a crash the next relay replays from the slot's confirmed
-- position; up to here, a captured row that is gone was delivered (or handed to the polling
-- relay) already and is not sent again.
ALTER TABLE {schema}.{p}capture_inflight ADD COLUMN IF NOT EXISTS end_lsn bigint;

-- Of these ids, the rows still captured; planned with the index on id, as above.
CREATE OR REPLACE FUNCTION {schema}.{p}captured_left(p_ids uuid[])
RETURNS SETOF uuid
LANGUAGE sql STABLE
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $fn$
    SELECT m.id FROM {schema}.{p}messages m WHERE m.id = ANY (p_ids) AND m.status = 'captured'
$fn$;

-- Of these keys, those with messages waiting in the table for the polling relay. With table
-- capture the table holds the stream's backlog too, and a plan that scans it (stale statistics,
-- a thousand keys) costs each batch the whole backlog; the index of waiting keys is small.
CREATE OR REPLACE FUNCTION {schema}.{p}keys_waiting(p_keys text[])
RETURNS SETOF text
LANGUAGE sql STABLE
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $fn$
    SELECT DISTINCT m.key FROM {schema}.{p}messages m
    WHERE m.key = ANY (p_keys) AND m.key IS NOT NULL AND m.status IN ('pending', 'in_flight')
$fn$;
