-- Preview grants: expiring access to one port of one machine, which the
-- server hands out as signed URLs and checks on every proxied request (so
-- a revoked grant stops working at once). Rows of their own rather than a
-- field of the machine's record: that record is rewritten whole by every
-- lifecycle change, and a revocation must never be lost to a stale copy.
-- Times are epoch ms; `revoked_at` 0 = not revoked.
CREATE TABLE IF NOT EXISTS preview_grants (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, machine_id TEXT NOT NULL,
    port INTEGER NOT NULL, auth_mode TEXT NOT NULL, issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, revoked_at BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS preview_grants_by_machine ON preview_grants (machine_id, port);
