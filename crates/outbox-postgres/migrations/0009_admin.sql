-- Operators' controls: topics whose delivery is paused, and the heartbeats of live relays.

-- Topics whose messages no relay claims until they are resumed. Small (one row per paused
-- topic); the claim reads it once per call.
CREATE TABLE IF NOT EXISTS {schema}.{p}paused_topics (
    topic     text        PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- Each relay's last reported state, written every few seconds (migration 2's relays table is
-- the wake-up registry of idle relays, and only holds those).
CREATE TABLE IF NOT EXISTS {schema}.{p}relay_heartbeats (
    relay_id   text        PRIMARY KEY,
    state      text        NOT NULL,
    last_seen  timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz NOT NULL DEFAULT now()
);

-- Dead letters listed by id (keyset pages) with filters.
CREATE INDEX IF NOT EXISTS {p}messages_dead_id
    ON {schema}.{p}messages (id) WHERE status = 'dead';

-- claim_followers of migration 7, where a follower of a paused topic comes back unlocked and
-- not due, like one locked elsewhere: the run stops before it, and the key keeps its order.
-- Its rows are locked by one probe of the primary key per follower whatever the statistics
-- say: written as a join (`seq IN (SELECT …)`), with statistics taken while the table was empty
-- (an analyze after a quiet night) the planner walked the whole table once per follower, and a
-- claim of 900 followers behind 20,000 pending rows took 15 s instead of 10 ms.
CREATE OR REPLACE FUNCTION {schema}.{p}claim_followers(
    heads {schema}.{p}messages[], p_skip integer, p_limit integer, p_total integer,
    p_paused text[])
RETURNS SETOF {schema}.{p}messages
LANGUAGE sql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET jit = off
AS $fn$
    WITH f AS MATERIALIZED (
        SELECT n.* FROM unnest(heads) h
        CROSS JOIN LATERAL (
            SELECT n.* FROM {schema}.{p}messages n
            WHERE n.key = h.key AND n.seq > h.seq AND n.status IN ('pending', 'in_flight')
            ORDER BY n.key, n.seq
            OFFSET p_skip LIMIT p_limit) n
        WHERE h.key IS NOT NULL
        LIMIT p_total),
    l AS MATERIALIZED (
        SELECT m.* FROM {schema}.{p}messages m
        WHERE m.seq = ANY (ARRAY(SELECT f.seq FROM f WHERE p_paused IS NULL OR f.topic <> ALL (p_paused)))
          AND m.status IN ('pending', 'in_flight')
        FOR UPDATE OF m SKIP LOCKED)
    SELECT * FROM l
    UNION ALL
    SELECT f.seq, f.id, f.topic, f.type, f.key, f.partition, f.payload, f.content_type,
           f.headers, f.created_at, '9999-12-31 00:00:00+00'::timestamptz, f.status, f.attempts, f.last_error,
           f.locked_by, f.delivered_at, f.dead_at, f.interrupted
    FROM f WHERE f.seq NOT IN (SELECT l.seq FROM l)
$fn$;

-- The claim of migration 8, which leaves paused topics alone: the paused set is read once per call
-- (NULL when nothing is paused, which leaves every query as it was). An unkeyed paused row is not
-- in the window; a keyed one is, so that its key sits out and keeps its order; a run stops at a
-- paused message (claim_followers returns it unlocked and not due).
--
-- As in migration 8, bounded by bytes as well (p_max_bytes, NULL: no bound). It reads a window of the first p_scan deliverable rows in the ready index's order
-- that this relay may claim: unkeyed rows, and rows of the partitions in p_owned (NULL: all).
-- In the window each key's oldest row is its head, unless an older row of the key was
-- rescheduled; the first p_limit heads that are not locked elsewhere are claimed (locked), and
-- each keyed head brings the run of its key's next messages (see claim_followers). The caller
-- (outbox_core::pick) decides where a run must stop. p_lease_ms, when set, becomes the
-- transaction's idle timeout; p_lock_key, when set, is the advisory lock of the delivery record.
--
-- The window keeps a claim's cost independent of the backlog: a hot key with a million messages
-- costs one probe, not a million. When the window holds nothing claimable and p_widen is set, the
-- claim walks the whole backlog once (heads only) so that nothing behind a blocked key waits.
CREATE OR REPLACE FUNCTION {schema}.{p}claim_runs(
    p_limit integer, p_scan integer, p_lease_ms bigint, p_owned boolean[],
    p_lock_ns integer, p_lock_key integer, p_widen boolean, p_max_bytes bigint)
RETURNS SETOF {schema}.{p}messages
LANGUAGE plpgsql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
-- Rows are found by their seq, one index probe each: a hash or merge join would read the table.
SET enable_hashjoin = off
SET enable_mergejoin = off
-- The few sorts left cost "disabled" and push the estimate past JIT's threshold: compiling the
-- query would cost a claim a quarter of a second.
SET jit = off
AS $fn$
DECLARE
    w_ctid tid[];
    w_seq bigint[];
    w_key text[];
    heads {schema}.{p}messages[];
    follow {schema}.{p}messages[];
    cut integer;
    used bigint := 0;
    size bigint;
    keyed integer;
    room integer;
    per_key integer;
    got bigint;
    paused text[];
BEGIN
    SELECT array_agg(t.topic) INTO paused FROM {schema}.{p}paused_topics t;
    IF p_lease_ms IS NOT NULL THEN
        PERFORM set_config('idle_in_transaction_session_timeout', p_lease_ms::text, true);
    END IF;
    IF p_lock_key IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(p_lock_ns, p_lock_key);
    END IF;

    -- The window is read without locks, so that a key whose oldest row is in delivery elsewhere
    -- (locked) shows that row as its first: locking it fails below and the key sits out. An older
    -- row of the key outside the window can only be one whose delivery time moved (delayed,
    -- backing off, leased): the probe looks for those in their own small index, which the
    -- delivered rows' dead entries never clutter.
    SELECT array_agg(c.ctid), array_agg(c.seq), array_agg(c.key), count(c.key)
    INTO w_ctid, w_seq, w_key, keyed
    FROM (
        SELECT c.ctid, c.seq, c.key FROM {schema}.{p}messages c
        WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= now()
          AND (p_owned IS NULL OR c.key IS NULL OR p_owned[c.partition + 1])
          AND (paused IS NULL OR c.key IS NOT NULL OR c.topic <> ALL (paused))
        ORDER BY c.available_at, c.seq
        LIMIT p_scan) c;

    IF keyed = 0 THEN
        -- Unkeyed rows only: no runs to add, the locked rows are the batch.
        RETURN QUERY
            SELECT m.* FROM {schema}.{p}messages m
            WHERE m.ctid = ANY (w_ctid)
              AND m.status IN ('pending', 'in_flight') AND m.available_at <= now()
            LIMIT p_limit
            FOR UPDATE OF m SKIP LOCKED;
        GET DIAGNOSTICS got = ROW_COUNT;
        IF got > 0 OR NOT p_widen THEN
            RETURN;
        END IF;
    ELSE
        SELECT array_agg(cand.ctid) INTO w_ctid
        FROM (
            SELECT w.ctid FROM unnest(w_ctid, w_seq, w_key) AS w(ctid, seq, key)
            WHERE w.key IS NULL
            UNION ALL
            SELECT f.ctid FROM (
                SELECT DISTINCT ON (w.key) w.ctid, w.seq, w.key
                FROM unnest(w_ctid, w_seq, w_key) AS w(ctid, seq, key)
                WHERE w.key IS NOT NULL
                ORDER BY w.key, w.seq) f
            WHERE NOT EXISTS (
                SELECT 1 FROM {schema}.{p}messages e
                WHERE e.key = f.key AND e.seq < f.seq AND e.status IN ('pending', 'in_flight')
                  AND e.available_at > e.created_at)) cand;

        -- Found by their place in the table (no index descent), oldest first; a row updated
        -- since the window was read is followed to its new version and checked again.
        SELECT array_agg(x.msg) INTO heads
        FROM (
            SELECT m AS msg FROM {schema}.{p}messages m
            WHERE m.ctid = ANY (w_ctid)
              AND m.status IN ('pending', 'in_flight') AND m.available_at <= now()
              AND (paused IS NULL OR m.topic <> ALL (paused))
            LIMIT p_limit
            FOR UPDATE OF m SKIP LOCKED) x;
    END IF;

    IF heads IS NULL AND p_widen THEN
        SELECT array_agg(h) INTO heads
        FROM (
            SELECT c.* FROM {schema}.{p}messages c
            WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= now()
              AND (p_owned IS NULL OR c.key IS NULL OR p_owned[c.partition + 1])
              AND (paused IS NULL OR c.topic <> ALL (paused))
              AND (c.key IS NULL OR NOT EXISTS (
                  SELECT 1 FROM (
                      SELECT e.seq FROM {schema}.{p}messages e
                      WHERE e.key = c.key AND e.seq < c.seq AND e.status IN ('pending', 'in_flight')
                      ORDER BY e.key DESC, e.seq DESC LIMIT 1) older))
            ORDER BY c.available_at, c.seq
            LIMIT p_limit
            FOR UPDATE OF c SKIP LOCKED) h;
    END IF;
    IF heads IS NULL THEN
        RETURN;
    END IF;

    -- The byte budget: heads in seq order while their payloads fit, and always the first.
    -- A head cut here stays locked, unclaimed, until this transaction ends; its key sits out.
    -- Sums are cheap; the cut (a sort) runs only when the budget is passed.
    IF p_max_bytes IS NOT NULL THEN
        SELECT coalesce(sum(octet_length(h.payload)), 0) INTO used FROM unnest(heads) h;
        IF used > p_max_bytes THEN
            heads := {schema}.{p}within_budget(heads, p_max_bytes, true);
            SELECT coalesce(sum(octet_length(h.payload)), 0) INTO used FROM unnest(heads) h;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM unnest(heads);

    SELECT count(h.key) INTO keyed FROM unnest(heads) h;
    IF keyed = 0 THEN
        RETURN;
    END IF;
    -- Each key first brings its fair share of the room left; when some keys have less than
    -- that, the others may bring what is still missing (a hot key next to quiet ones fills the
    -- batch). The caller cuts the batch in waves, which shares it between keys.
    room := p_limit - cardinality(heads);
    per_key := room / keyed;
    IF per_key <= 0 OR used >= p_max_bytes THEN
        RETURN;
    END IF;
    -- Runs are cut in wave order (each key's next message, then the one after), so a key's
    -- run is cut, never reordered; the second round only runs when the first fit whole.
    IF p_max_bytes IS NULL THEN
        RETURN QUERY SELECT * FROM {schema}.{p}claim_followers(heads, 0, per_key, room, paused);
        GET DIAGNOSTICS got = ROW_COUNT;
    ELSE
        SELECT array_agg(f), coalesce(sum(octet_length(f.payload)), 0) INTO follow, size
        FROM {schema}.{p}claim_followers(heads, 0, per_key, room, paused) f;
        got := coalesce(cardinality(follow), 0);
        IF used + size > p_max_bytes THEN
            follow := {schema}.{p}within_budget(follow, p_max_bytes - used, false);
            cut := got - coalesce(cardinality(follow), 0);
        END IF;
        used := used + size;
        RETURN QUERY SELECT * FROM unnest(follow);
    END IF;
    IF got >= room OR cut > 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(f), coalesce(sum(octet_length(f.payload)), 0) INTO follow, size
    FROM {schema}.{p}claim_followers(heads, per_key, room - got::integer, room - got::integer, paused) f;
    IF used + size > p_max_bytes THEN
        follow := {schema}.{p}within_budget(follow, p_max_bytes - used, false);
    END IF;
    RETURN QUERY SELECT * FROM unnest(follow);
END
$fn$;
