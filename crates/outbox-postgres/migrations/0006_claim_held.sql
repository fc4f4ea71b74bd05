-- The claim that holds its rows with locks in the caller's open transaction instead of writing
-- a lease: the relay delivers, then deletes (or fails) the rows in that same transaction. The
-- lease UPDATE of migration 3 changes indexed columns and so writes a new entry in every index
-- of the table; a lock writes nothing but the row's lock bits, which roughly halves what a
-- drained message costs the database.
--
-- Rows locked by another relay's open transaction are still visible as pending, so the NOT
-- EXISTS keeps a key to one message in flight across relays exactly as it does for leases.
-- p_scan bounds the walk as in migration 5 (NULL: unbounded). The lease becomes the
-- transaction's idle timeout: a relay stuck longer than that in delivery loses its session,
-- and with it its locks.
CREATE OR REPLACE FUNCTION {schema}.{p}claim_held(p_limit bigint, p_scan bigint, p_lease_ms bigint)
RETURNS SETOF {schema}.{p}messages
LANGUAGE plpgsql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
AS $fn$
DECLARE
    bound_at timestamptz;
    bound_seq bigint;
BEGIN
    PERFORM set_config('idle_in_transaction_session_timeout', p_lease_ms::text, true);
    IF p_scan IS NOT NULL THEN
        SELECT w.available_at, w.seq INTO bound_at, bound_seq
        FROM {schema}.{p}messages w
        WHERE w.status IN ('pending', 'in_flight') AND w.available_at <= now()
        ORDER BY w.available_at, w.seq
        OFFSET p_scan - 1 LIMIT 1;
    END IF;
    IF bound_seq IS NULL THEN
        bound_at := 'infinity';
        bound_seq := 9223372036854775807;
    END IF;
    RETURN QUERY
        SELECT c.* FROM {schema}.{p}messages c
        WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= now()
          AND (c.available_at, c.seq) <= (bound_at, bound_seq)
          AND (c.key IS NULL OR NOT EXISTS (
              SELECT 1 FROM {schema}.{p}messages e
              WHERE e.key = c.key AND e.seq < c.seq AND e.status IN ('pending', 'in_flight')))
        ORDER BY c.available_at, c.seq
        LIMIT p_limit
        FOR UPDATE OF c SKIP LOCKED;
END
$fn$;
