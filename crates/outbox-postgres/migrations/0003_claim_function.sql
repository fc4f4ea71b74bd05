-- The claim, as a function whose plan does not depend on table statistics. A queue's statistics
-- are always stale: after a burst the planner may still believe few rows are pending, sort the
-- whole backlog on every claim, and turn a catch-up drain quadratic. Walking the ready index in
-- order and stopping at the limit is right at any backlog size, so the function forbids the rest.
CREATE OR REPLACE FUNCTION {schema}.{p}claim(p_limit bigint, p_relay text, p_lease_ms bigint)
RETURNS SETOF {schema}.{p}messages
LANGUAGE sql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
AS $fn$
    WITH candidates AS (
        SELECT c.seq FROM {schema}.{p}messages c
        WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= now()
          AND (c.key IS NULL OR NOT EXISTS (
              SELECT 1 FROM {schema}.{p}messages e
              WHERE e.key = c.key AND e.seq < c.seq AND e.status IN ('pending', 'in_flight')))
        ORDER BY c.available_at, c.seq
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED)
    UPDATE {schema}.{p}messages m
    SET status = 'in_flight', locked_by = p_relay, attempts = m.attempts + 1,
        available_at = now() + p_lease_ms * interval '1 millisecond'
    FROM candidates WHERE m.seq = candidates.seq
    RETURNING m.*
$fn$;

-- Queue tables churn: keep their statistics and free space fresh.
ALTER TABLE {schema}.{p}messages SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
