-- Log-based capture: the batch a relay streaming from a slot has handed to its sink, one row per
-- slot, replaced by each batch. A relay that dies in the sink (crash, kill, out of memory)
-- leaves it behind; the next relay on the slot replays the same messages from the slot and,
-- finding them here, counts the attempt that never ended instead of delivering them straight
-- away: they go to the outbox table, where a message that kills its relay every time goes dead
-- after its attempts and the rest of its batch is delivered.
CREATE TABLE IF NOT EXISTS {schema}.{p}capture_inflight (
    slot       text        PRIMARY KEY,
    ids        uuid[]      NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
