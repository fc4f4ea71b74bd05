-- The claim a relay makes while earlier batches are still in delivery. When every key at the
-- head of the backlog already has a message in flight, the full claim would examine the whole
-- backlog to find nothing; this one stops at the p_scan-th deliverable row. It may miss
-- claimable rows further back, so a relay with nothing in flight uses the full claim.
--
-- The bound is a position in the ready index, so the claim keeps the plan of migration 3 (an
-- ordered walk of that index, now with an upper bound) whatever the table statistics say.
CREATE OR REPLACE FUNCTION {schema}.{p}claim_window(
    p_limit bigint, p_scan bigint, p_relay text, p_lease_ms bigint)
RETURNS SETOF {schema}.{p}messages
LANGUAGE sql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
AS $fn$
    WITH bound AS (
        SELECT coalesce(max(b.available_at), 'infinity') AS available_at,
               coalesce(max(b.seq), 9223372036854775807) AS seq
        FROM (SELECT w.available_at, w.seq FROM {schema}.{p}messages w
              WHERE w.status IN ('pending', 'in_flight') AND w.available_at <= now()
              ORDER BY w.available_at, w.seq
              OFFSET p_scan - 1 LIMIT 1) b),
    candidates AS (
        SELECT c.seq FROM {schema}.{p}messages c
        WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= now()
          AND (c.available_at, c.seq) <= (SELECT bound.available_at, bound.seq FROM bound)
          AND (c.key IS NULL OR NOT EXISTS (
              SELECT 1 FROM {schema}.{p}messages e
              WHERE e.key = c.key AND e.seq < c.seq AND e.status IN ('pending', 'in_flight')))
        ORDER BY c.available_at, c.seq
        LIMIT p_limit
        FOR UPDATE OF c SKIP LOCKED)
    UPDATE {schema}.{p}messages m
    SET status = 'in_flight', locked_by = p_relay, attempts = m.attempts + 1,
        available_at = now() + p_lease_ms * interval '1 millisecond'
    FROM candidates WHERE m.seq = candidates.seq
    RETURNING m.*
$fn$;
