-- The claim a relay makes while earlier batches are still in delivery. When every key at the
-- head of the backlog already has a message in flight, the full claim would examine the whole
-- backlog to find nothing; this one examines only the oldest p_scan deliverable rows. It may
-- miss claimable rows further back, so a relay with nothing in flight uses the full claim.
CREATE OR REPLACE FUNCTION {schema}.{p}claim_window(
    p_limit bigint, p_scan bigint, p_relay text, p_lease_ms bigint)
RETURNS SETOF {schema}.{p}messages
LANGUAGE sql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $fn$
    WITH candidates AS (
        SELECT c.seq
        FROM (SELECT w.seq FROM {schema}.{p}messages w
              WHERE w.status IN ('pending', 'in_flight') AND w.available_at <= now()
              ORDER BY w.available_at, w.seq
              LIMIT p_scan) s
        JOIN {schema}.{p}messages c ON c.seq = s.seq
        WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= now()
          AND (c.key IS NULL OR NOT EXISTS (
              SELECT 1 FROM {schema}.{p}messages e
              WHERE e.key = c.key AND e.seq < c.seq AND e.status IN ('pending', 'in_flight')))
        LIMIT p_limit
        FOR UPDATE OF c SKIP LOCKED)
    UPDATE {schema}.{p}messages m
    SET status = 'in_flight', locked_by = p_relay, attempts = m.attempts + 1,
        available_at = now() + p_lease_ms * interval '1 millisecond'
    FROM candidates WHERE m.seq = candidates.seq
    RETURNING m.*
$fn$;
