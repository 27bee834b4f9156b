-- Lifecycle events of machines: one row per transition (create, resume,
-- hibernate, fork, snapshot, timeout, destroy, and failures with their
-- reason), for the SDK's list_lifecycle and the lifecycle stream.
-- `seq` orders them and pages a replay. It comes from the one-row counter
-- below, incremented in the inserting transaction: the counter row stays
-- locked until that transaction commits, so events become visible in `seq`
-- order and a reader that has seen `seq` N never finds a smaller one later
-- (a sequence or autoincrement would hand out numbers that commit out of
-- order). No column is NULL ('' = none); `metadata` is a JSON object.
CREATE TABLE IF NOT EXISTS lifecycle_seq (id INTEGER PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO lifecycle_seq (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS lifecycle_events (
    seq BIGINT PRIMARY KEY, namespace TEXT NOT NULL, machine_id TEXT NOT NULL,
    node_id TEXT NOT NULL, operation TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT NOT NULL, error_code TEXT NOT NULL, error_message TEXT NOT NULL,
    actor_kind TEXT NOT NULL, snapshot_id TEXT NOT NULL,
    source_machine_id TEXT NOT NULL, target_machine_id TEXT NOT NULL,
    occurred_at BIGINT NOT NULL, metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS lifecycle_events_by_machine ON lifecycle_events (machine_id, seq);
CREATE INDEX IF NOT EXISTS lifecycle_events_by_namespace ON lifecycle_events (namespace, seq);
