-- Machines, their snapshots and the idempotency keys of machine requests.
-- A machine belongs to a namespace and to the node (server identity,
-- DATA_DIR/node-id) that runs its VMM. `base_snapshot` is the machine
-- snapshot its disk sits on ('' = a template's), so a snapshot in use is
-- never deleted; `deadline_at` is the next timeout the server acts on
-- (0 = none). No column is NULL. `record` is the server's JSON.
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, node_id TEXT NOT NULL,
    status TEXT NOT NULL, template_id TEXT NOT NULL, base_snapshot TEXT NOT NULL,
    created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, deadline_at BIGINT NOT NULL,
    record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS machines_by_namespace ON machines (namespace, created_at);
CREATE INDEX IF NOT EXISTS machines_by_node ON machines (node_id, status);
CREATE TABLE IF NOT EXISTS machine_snapshots (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, machine_id TEXT NOT NULL,
    node_id TEXT NOT NULL, parent_id TEXT NOT NULL, created_at BIGINT NOT NULL,
    record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS machine_snapshots_by_machine ON machine_snapshots (machine_id, created_at);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    namespace TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL,
    target_id TEXT NOT NULL, created_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, scope, key));
