-- The schema as it was created before migrations (CREATE TABLE IF NOT
-- EXISTS strings run at every open): a store made by that code is already
-- at this version, so these statements are no-ops on it.
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, namespace TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS templates (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
    doc TEXT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    UNIQUE (namespace, name));
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, template_id TEXT NOT NULL,
    status TEXT NOT NULL, source_type TEXT NOT NULL, backend TEXT NOT NULL,
    created_at BIGINT NOT NULL, record TEXT NOT NULL, definition TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS builds_by_template ON builds (template_id, created_at);
CREATE INDEX IF NOT EXISTS builds_by_status ON builds (status, created_at);
CREATE TABLE IF NOT EXISTS build_logs (
    build_id TEXT NOT NULL, seq BIGINT NOT NULL, entry TEXT NOT NULL,
    PRIMARY KEY (build_id, seq));
CREATE TABLE IF NOT EXISTS tags (
    template_id TEXT NOT NULL, tag TEXT NOT NULL, build_id TEXT NOT NULL,
    created_at BIGINT NOT NULL, PRIMARY KEY (template_id, tag));
CREATE TABLE IF NOT EXISTS aliases (
    namespace TEXT NOT NULL, alias TEXT NOT NULL, template_id TEXT NOT NULL,
    created_at BIGINT NOT NULL, PRIMARY KEY (namespace, alias));
CREATE TABLE IF NOT EXISTS blobs (
    namespace TEXT NOT NULL, blob_id TEXT NOT NULL, sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL, uploaded INTEGER NOT NULL, created_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, blob_id));
CREATE TABLE IF NOT EXISTS artifact_cache (
    namespace TEXT NOT NULL, cache_key TEXT NOT NULL, build_id TEXT NOT NULL,
    created_at BIGINT NOT NULL, PRIMARY KEY (namespace, cache_key));
CREATE TABLE IF NOT EXISTS claims (
    token_hash TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
    expires_at BIGINT NOT NULL);
