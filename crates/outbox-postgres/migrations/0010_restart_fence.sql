-- A database restart ends every held batch's session, and with it the row locks that kept other
-- relays off its keys, while the relays themselves live on and may still be in the sink with
-- those messages (until their delivery deadline, four fifths of the lease). Each delivery record
-- now says until when its relay may be delivering; a record written before the server started
-- (an orphan of the restart) fences its messages' keys until then: no relay claims them, and
-- recover() leaves the record alone, so a key is never in delivery at two relays at once. A
-- relay that lives on deletes its record as soon as it has given up the batch (its outcome could
-- not be recorded), which lifts the fence early; only a relay that died with the database keeps
-- its keys fenced to the end of its lease.
ALTER TABLE {schema}.{p}deliveries ADD COLUMN IF NOT EXISTS busy_until timestamptz;

-- The keys (and, for unkeyed messages, the ids) that orphans of a restart still fence. Records
-- of relays of the previous version have no busy_until: they fence for the default lease.
CREATE OR REPLACE FUNCTION {schema}.{p}fenced()
RETURNS TABLE (key text, id uuid)
LANGUAGE sql
STABLE
AS $fn$
    SELECT m.key, m.id
    FROM {schema}.{p}deliveries d
    CROSS JOIN LATERAL unnest(d.ids) AS x(id)
    JOIN {schema}.{p}messages m ON m.id = x.id
    WHERE d.started_at < pg_postmaster_start_time()
      AND coalesce(d.busy_until, d.started_at + interval '30 seconds') > now()
$fn$;

-- As in migration 7, but a fenced record is left for later.
CREATE OR REPLACE FUNCTION {schema}.{p}recover(p_lock_ns integer, p_max_attempts integer)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    n bigint;
BEGIN
    WITH orphans AS (
        DELETE FROM {schema}.{p}deliveries d
        WHERE NOT (d.started_at < pg_postmaster_start_time()
                   AND coalesce(d.busy_until, d.started_at + interval '30 seconds') > now())
          AND pg_try_advisory_xact_lock(p_lock_ns, d.lock_key)
        RETURNING d.ids, d.relay),
    counts AS (
        SELECT x.id, count(*) AS n, max(o.relay) AS relay
        FROM orphans o CROSS JOIN LATERAL unnest(o.ids) AS x(id)
        GROUP BY x.id)
    UPDATE {schema}.{p}messages m SET
        attempts = m.attempts + c.n,
        interrupted = true,
        last_error = format('delivery never finished: relay %s stopped (crash, kill, or lost database session) before recording an outcome', c.relay),
        status = CASE WHEN m.attempts + c.n >= p_max_attempts THEN 'dead' ELSE m.status END,
        dead_at = CASE WHEN m.attempts + c.n >= p_max_attempts THEN now() ELSE m.dead_at END
    FROM counts c
    WHERE m.id = c.id AND m.status = 'pending';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;
