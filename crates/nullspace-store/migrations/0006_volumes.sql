-- Volumes: an ext4 image per volume under DATA_DIR/volumes/<id>, owned by a
-- namespace (names unique within it). The columns `rw_holder` (the machine
-- that has it read-write, '' when none) and `ro_count` (read-only
-- attachments) are the server's own per-volume lock: an attach updates
-- them conditionally on the volume's row, in the transaction that inserts
-- the attachment, so two attaches never both win (QEMU's image lock is
-- only a backstop). Times are epoch ms; booleans are 0/1.
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
    size_bytes BIGINT NOT NULL, created_at BIGINT NOT NULL,
    rw_holder TEXT NOT NULL, ro_count BIGINT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS volumes_by_name ON volumes (namespace, name);
-- A machine's use of a volume: the spare disk (`slot`) it is on, where the
-- guest mounts it, and how; `state` attached | detached | error.
CREATE TABLE IF NOT EXISTS volume_attachments (
    id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, machine_id TEXT NOT NULL,
    namespace TEXT NOT NULL, slot BIGINT NOT NULL, mount_path TEXT NOT NULL,
    read_only BIGINT NOT NULL, subpath TEXT NOT NULL, state TEXT NOT NULL,
    last_error TEXT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS volume_attachments_slot ON volume_attachments (machine_id, slot);
CREATE UNIQUE INDEX IF NOT EXISTS volume_attachments_once ON volume_attachments (machine_id, volume_id);
CREATE INDEX IF NOT EXISTS volume_attachments_by_volume ON volume_attachments (volume_id);
