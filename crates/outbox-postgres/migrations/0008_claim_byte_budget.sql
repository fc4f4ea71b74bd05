-- A claim bounded by the bytes of its payloads as well as by its count, so that a batch of big
-- messages cannot take a relay's memory (claim_runs gains p_max_bytes; the claim of migration 7
-- stays, calling this one without a bound, for relays of the previous version during an upgrade).

-- The prefix of `rows` in delivery order whose payloads fit in p_budget bytes: by key rank (a
-- key's first message, then its second, …; unkeyed rows rank with the first) then seq, so that
-- every key keeps the start of its run (outbox_core::pick cuts a batch the same way). With p_first, the first row is kept even when it alone is
-- bigger than the budget: a message never becomes unclaimable by its size.
CREATE OR REPLACE FUNCTION {schema}.{p}within_budget(
    rows {schema}.{p}messages[], p_budget bigint, p_first boolean)
RETURNS {schema}.{p}messages[]
LANGUAGE sql
STABLE
AS $fn$
    SELECT array_agg(x.r ORDER BY x.n)
    FROM (
        SELECT y.r, row_number() OVER w AS n, sum(octet_length((y.r).payload)) OVER w AS upto
        FROM (
            SELECT r, CASE WHEN r.key IS NULL THEN 1
                      ELSE row_number() OVER (PARTITION BY r.key ORDER BY r.seq) END AS rank
            FROM unnest(rows) r) y
        WINDOW w AS (ORDER BY y.rank, (y.r).seq)) x
    WHERE x.upto <= p_budget OR (p_first AND x.n = 1)
$fn$;

-- The claim, as in migration 7, bounded by bytes as well (p_max_bytes, NULL: no bound). It reads a window of the first p_scan deliverable rows in the ready index's order
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
        RETURN QUERY SELECT * FROM {schema}.{p}claim_followers(heads, 0, per_key, room);
        GET DIAGNOSTICS got = ROW_COUNT;
    ELSE
        SELECT array_agg(f), coalesce(sum(octet_length(f.payload)), 0) INTO follow, size
        FROM {schema}.{p}claim_followers(heads, 0, per_key, room) f;
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
    FROM {schema}.{p}claim_followers(heads, per_key, room - got::integer, room - got::integer) f;
    IF used + size > p_max_bytes THEN
        follow := {schema}.{p}within_budget(follow, p_max_bytes - used, false);
    END IF;
    RETURN QUERY SELECT * FROM unnest(follow);
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.{p}claim_runs(
    p_limit integer, p_scan integer, p_lease_ms bigint, p_owned boolean[],
    p_lock_ns integer, p_lock_key integer, p_widen boolean)
RETURNS SETOF {schema}.{p}messages
LANGUAGE sql
AS $fn$
    SELECT * FROM {schema}.{p}claim_runs(
        p_limit, p_scan, p_lease_ms, p_owned, p_lock_ns, p_lock_key, p_widen, NULL::bigint)
$fn$;
