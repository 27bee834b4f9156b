-- Builds owned by leases. `owner` is the server process that runs the build
-- (status building) or holds its request-time credentials (a waiting build
-- only that server can run); `lease_expires_at` is renewed by that server,
-- and only a build whose lease expired is recovered. `attempt` counts
-- claims, so each run has its own work directory. A cancel request lives
-- in its own columns: any server can set it, the owner polls it.
ALTER TABLE builds ADD COLUMN owner TEXT;
ALTER TABLE builds ADD COLUMN lease_expires_at BIGINT;
ALTER TABLE builds ADD COLUMN attempt BIGINT NOT NULL DEFAULT 0;
ALTER TABLE builds ADD COLUMN cancel_requested_at BIGINT;
ALTER TABLE builds ADD COLUMN cancel_requested_by TEXT;
ALTER TABLE builds ADD COLUMN cancel_reason TEXT;
ALTER TABLE builds ADD COLUMN finished_at BIGINT;
CREATE INDEX builds_by_owner ON builds (owner, status);
