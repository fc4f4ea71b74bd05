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
