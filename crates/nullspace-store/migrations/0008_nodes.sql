-- Nodes: the servers sharing this store (many-node mode). A registration
-- starts a new epoch; the lease is renewed by the database's clock, so that
-- nodes with skewed clocks agree on who is alive. A write naming an older
-- epoch than the row's changes nothing (the process was fenced). `labels`
-- is JSON (arch, accel, qemu). Times are epoch ms of the database clock.
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, epoch BIGINT NOT NULL,
    status TEXT NOT NULL, lease_expires_at BIGINT NOT NULL,
    registered_at BIGINT NOT NULL, heartbeat_at BIGINT NOT NULL,
    max_machines BIGINT NOT NULL, memory_mib BIGINT NOT NULL,
    labels TEXT NOT NULL);
