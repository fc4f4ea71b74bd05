-- Claims by key runs, partition ownership and attempts counted for deliveries that never finish.
--
-- A message whose last held delivery ended without an outcome (its relay was killed, crashed or
-- lost its session) is marked here when its attempt is counted, so the relay delivers it alone.
ALTER TABLE {schema}.{p}messages ADD COLUMN IF NOT EXISTS interrupted boolean NOT NULL DEFAULT false;

-- One row per held batch in delivery, written (and committed) before the batch reaches the sink
-- and deleted by the transaction that records its outcome. The batch's transaction holds the
-- advisory lock (lock_ns, lock_key) from its claim on, so a row whose lock is free belongs to a
-- delivery that ended without an outcome: recover() counts an attempt for each of its messages.
CREATE TABLE IF NOT EXISTS {schema}.{p}deliveries (
    lock_key   integer     PRIMARY KEY,
    relay      text        NOT NULL,
    ids        uuid[]      NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- The messages after each keyed head of `heads`: up to p_limit per key, after its first p_skip,
-- and p_total in all.
-- They are locked like the heads, but a run must never skip one of its messages, so a row that
-- another transaction holds (or that stopped being undelivered meanwhile) comes back unlocked with
-- available_at in the year 9999: the caller sees a message that is not due and cuts the run there.
CREATE OR REPLACE FUNCTION {schema}.{p}claim_followers(
    heads {schema}.{p}messages[], p_skip integer, p_limit integer, p_total integer)
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
        WHERE m.seq IN (SELECT f.seq FROM f) AND m.status IN ('pending', 'in_flight')
        FOR UPDATE OF m SKIP LOCKED)
    SELECT * FROM l
    UNION ALL
    SELECT f.seq, f.id, f.topic, f.type, f.key, f.partition, f.payload, f.content_type,
           f.headers, f.created_at, '9999-12-31 00:00:00+00'::timestamptz, f.status, f.attempts, f.last_error,
           f.locked_by, f.delivered_at, f.dead_at, f.interrupted
    FROM f WHERE f.seq NOT IN (SELECT l.seq FROM l)
$fn$;

-- Undelivered keyed rows whose delivery time is not their enqueue time: delayed, backing off
-- after a failure, released, or leased. Only these can be older than a key's first row in the
-- claim's window and still be undelivered, so the claim's probe reads this index alone. Rows
-- enqueued for now (available_at = created_at) never enter it, so writers do not pay for it.
CREATE INDEX IF NOT EXISTS {p}messages_rescheduled ON {schema}.{p}messages (key, seq)
    WHERE key IS NOT NULL AND status IN ('pending', 'in_flight') AND available_at > created_at;

-- The claim. It reads a window of the first p_scan deliverable rows in the ready index's order
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
    p_lock_ns integer, p_lock_key integer, p_widen boolean)
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
    keyed integer;
    room integer;
    per_key integer;
    got bigint;
BEGIN
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
            LIMIT p_limit
            FOR UPDATE OF m SKIP LOCKED) x;
    END IF;

    IF heads IS NULL AND p_widen THEN
        SELECT array_agg(h) INTO heads
        FROM (
            SELECT c.* FROM {schema}.{p}messages c
            WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= now()
              AND (p_owned IS NULL OR c.key IS NULL OR p_owned[c.partition + 1])
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
    IF per_key <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM {schema}.{p}claim_followers(heads, 0, per_key, room);
    GET DIAGNOSTICS got = ROW_COUNT;
    IF got >= room THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM {schema}.{p}claim_followers(heads, per_key, room - got::integer, room - got::integer);
END
$fn$;

-- Counts an attempt for each message of a delivery that ended without an outcome (see
-- {p}deliveries) and makes those that reach p_max_attempts dead. Rows locked by a claim in
-- progress are waited for, so an attempt is counted once whatever that claim does.
CREATE OR REPLACE FUNCTION {schema}.{p}recover(p_lock_ns integer, p_max_attempts integer)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    n bigint;
BEGIN
    WITH orphans AS (
        DELETE FROM {schema}.{p}deliveries d
        WHERE pg_try_advisory_xact_lock(p_lock_ns, d.lock_key)
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
