-- Template warm pools: a namespace's standing order for prepared machines
-- of one template and shape. `record` is the server's JSON document of the
-- pool (bounds, policies, labels, times); the columns are what queries
-- select on. Names are unique within a namespace. Times are epoch ms.
CREATE TABLE IF NOT EXISTS warm_pools (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
    template_id TEXT NOT NULL, state TEXT NOT NULL, record TEXT NOT NULL,
    created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS warm_pools_by_name ON warm_pools (namespace, name);
CREATE INDEX IF NOT EXISTS warm_pools_by_template ON warm_pools (template_id);
