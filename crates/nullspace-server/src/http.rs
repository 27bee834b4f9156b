//! Routes and handlers. Auth runs first on every `/v1` route; handlers only
//! see an authenticated [`Caller`].

use nullspace_model::build::status::BuildStatus as Status;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use nullspace_model::build::status;
use nullspace_store::{BuildFilter, Caller};
use schemars::{Schema, SchemaGenerator};
use serde_json::Value;

use crate::builds::{self, is_terminal};
use crate::error::{ApiError, ApiResult};
use crate::machine_api;
use crate::model::*;
use crate::openapi::{Op, QueryKind, QueryParam, Route};
use crate::state::Shared;
use crate::templates;
use crate::validate;

/// Every route, documented: `router()` and `/openapi.json` are both built
/// from this table, so neither can have a path the other lacks.
pub fn routes() -> Vec<Route> {
    all_routes()
}

fn template_routes() -> Vec<Route> {
    const LOGS: &[QueryParam] = &[OFFSET, CURSOR_OFFSET, FOLLOW];
    const HISTORY: &[QueryParam] = &[LIMIT, CURSOR_PAGE, STATUS, BACKEND, SOURCE_TYPE];
    const FIELDS_ONLY: &[QueryParam] = &[FIELDS];
    const EXPORT: &[QueryParam] = &[COMPRESSION];
    vec![
        Op::post("/v1/templates/builds", "Start a background template build")
            .body::<BuildRequest>()
            .reply::<BuildRecord>(202)
            .to(build_background),
        Op::post(
            "/v1/templates/build",
            "Build and stream structured log entries (SSE) until `end`",
        )
        .body::<BuildRequest>()
        .sse()
        .to(build_stream),
        Op::get(
            "/v1/templates/builds/{build_id}",
            "Build status and log entries from `offset`",
        )
        .query(&[OFFSET])
        .reply::<BuildStatus>(200)
        .to(build_status),
        Op::get(
            "/v1/templates/builds/{build_id}/logs",
            "SSE replay of durable log entries (`offset`/`cursor`, `follow`)",
        )
        .query(LOGS)
        .sse()
        .to(build_logs),
        Op::post(
            "/v1/templates/builds/{build_id}/cancel",
            "Cancel a queued or running build",
        )
        .body::<CancelBody>()
        .reply::<BuildStatus>(200)
        .to(build_cancel),
        Op::post(
            "/v1/templates/builds/{build_id}/retry",
            "Retry a build from its sanitized persisted definition",
        )
        .body::<RetryBody>()
        .reply::<BuildRecord>(202)
        .to(build_retry),
        Op::post(
            "/v1/templates/builds/{build_id}/promote",
            "Move a tag to a ready build",
        )
        .body::<PromoteBody>()
        .reply::<TemplateInfo>(200)
        .to(build_promote),
        Op::post("/v1/templates/validate", "Validate a build request")
            .body::<BuildRequest>()
            .reply::<ValidateResult>(200)
            .to(validate_request),
        Op::post(
            "/v1/templates/plan",
            "The build plan: what a build of this request runs, with its digests; `view` picks another view of the same plan",
        )
        .query(&[crate::plan_views::VIEW])
        .body::<BuildRequest>()
        .reply::<crate::plan_views::PlanAnswer>(200)
        .to(plan_request),
        Op::get("/v1/templates", "List templates")
            .query(FIELDS_ONLY)
            .reply_with(200, template_list_schema)
            .to(list_templates),
        Op::post(
            "/v1/templates",
            "Deprecated blocking create: waits for the build",
        )
        .body::<BuildRequest>()
        .reply::<TemplateInfo>(200)
        .to(build_blocking_deprecated),
        Op::get("/v1/templates/refs/{ref}", "Get a template")
            .query(FIELDS_ONLY)
            .reply_with(200, template_masked_schema)
            .to(template_get),
        Op::delete("/v1/templates/refs/{ref}", "Delete a template").to(template_delete),
        Op::get(
            "/v1/templates/refs/{ref}/export",
            "Export a template as an OCI archive (image.oci.tar)",
        )
        .query(EXPORT)
        .reply_bytes()
        .to(template_export),
        Op::get(
            "/v1/templates/refs/{ref}/sbom",
            "The template's packages (listed when it was built) as SPDX 2.3 or CycloneDX 1.5 JSON",
        )
        .query(&[SBOM_FORMAT])
        .reply_bytes()
        .to(template_sbom),
        Op::get(
            "/v1/templates/refs/{ref}/disk",
            "The template as a bootable disk image (partition table, syslinux, kernel, initramfs, ext4 root) for plain QEMU",
        )
        .query(&[crate::export_disk::FORMAT])
        .reply_bytes()
        .to(template_disk),
        Op::get("/v1/templates/refs/{ref}/builds", "Build history")
            .query(HISTORY)
            .reply::<BuildPage>(200)
            .to(ref_builds),
        Op::get(
            "/v1/templates/{template_id}/builds",
            "Build history by template id",
        )
        .query(HISTORY)
        .reply::<BuildPage>(200)
        .to(ref_builds),
        Op::get("/v1/templates/refs/{ref}/tags", "List tags")
            .reply_list::<TagEntry>()
            .to(tags_get),
        Op::post("/v1/templates/refs/{ref}/tags", "Assign tags")
            .body::<TagsBody>()
            .reply::<TemplateInfo>(200)
            .to(tags_assign),
        Op::delete("/v1/templates/refs/{ref}/tags/{tag}", "Remove a tag").to(tag_remove),
        Op::get("/v1/templates/refs/{ref}/aliases", "List aliases")
            .reply_list::<AliasEntry>()
            .to(aliases_get),
        Op::delete(
            "/v1/templates/refs/{ref}/aliases/{alias}",
            "Remove an alias",
        )
        .to(alias_remove),
        Op::post(
            "/v1/templates/refs/{ref}/rename",
            "Rename (the old name becomes an alias)",
        )
        .body::<RenameBody>()
        .reply::<TemplateInfo>(200)
        .to(template_rename),
        Op::patch("/v1/templates/refs/{ref}/visibility", "Set visibility")
            .body::<VisibilityBody>()
            .reply::<TemplateInfo>(200)
            .to(template_visibility),
        Op::post(
            "/v1/templates/blobs/preflight",
            "Announce context files; answers which blobs are missing",
        )
        .body::<PreflightBody>()
        .reply::<PreflightResult>(200)
        .to(blobs_preflight),
        Op::put("/v1/templates/blobs/{blob_id}", "Upload a context blob")
            .bytes()
            .to(blob_put),
        Op::post("/v1/templates/claims", "Reserve a template name")
            .body::<ClaimBody>()
            .reply::<NameClaim>(201)
            .to(claim_create),
        Op::delete("/v1/templates/claims/{token}", "Release a name claim").to(claim_release),
        Op::get("/v1/templates/namespaces/{slug}", "Get a namespace")
            .reply::<NamespaceInfo>(200)
            .to(namespace_get),
        Op::get(
            "/v1/snapshots",
            "List machine snapshots (`machine_id` or `sandbox_id` picks the dialect)",
        )
        .query(SNAPSHOT_LIST)
        .reply_list::<crate::machine_model::MachineSnapshotInfo>()
        .to(machine_api::snapshot_list),
        Op::get("/v1/snapshots/{snapshot_id}", "Get a machine snapshot")
            .reply::<crate::machine_model::MachineSnapshotInfo>(200)
            .to(machine_api::snapshot_get),
        Op::delete(
            "/v1/snapshots/{snapshot_id}",
            "Delete a machine snapshot (not while a machine or snapshot is layered on it)",
        )
        .to(machine_api::snapshot_delete),
        Op::get("/openapi.json", "This document")
            .public()
            .reply_with(200, any_object_schema)
            .to(crate::openapi::document),
        Op::get(
            "/metrics",
            "The node's figures (Prometheus text): capacity held, and per VM shape the pool's stock, hits, misses and refill times",
        )
        .text()
        .to(crate::metrics::handler),
        Op::get("/healthz", "Liveness: `ok`")
            .public()
            .text()
            .to(|| async { "ok" }),
    ]
}

/// The machine routes under one prefix, for one dialect ([`machine_api`]).
macro_rules! machine_routes {
    ($p:literal, $f:expr, $snap:ty) => {{
        use crate::machine_model as mm;
        use nullspace_model::machine_files as mf;
        vec![
            Op::post(
                $p,
                "Create a machine; answers when it runs commands (Idempotency-Key de-duplicates)",
            )
            .body::<mm::CreateMachineBody>()
            .reply::<mm::MachineInfo>(201)
            .to(machine_api::create::<{ $f }>),
            Op::get(
                $p,
                "List machines (running and paused unless `state` says otherwise)",
            )
            .query(MACHINE_LIST)
            .reply_with(200, machine_page_schema)
            .to(machine_api::list::<{ $f }>),
            Op::get(concat!($p, "/{id}"), "Get a machine")
                .query(FIELDS_ONLY_M)
                .reply_with(200, machine_masked_schema)
                .to(machine_api::get::<{ $f }>),
            Op::delete(concat!($p, "/{id}"), "Destroy a machine")
                .reply::<mm::Destroyed>(200)
                .to(machine_api::destroy::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/exec"),
                "Run a command (foreground: its result; background: its pid)",
            )
            .body::<mm::ExecBody>()
            .reply::<mm::ExecResult>(200)
            .to(machine_api::exec::<{ $f }>),
            Op::get(
                concat!($p, "/{id}/processes"),
                "Processes started through the API",
            )
            .reply_list::<mm::ProcessEntry>()
            .to(machine_api::processes::<{ $f }>),
            Op::get(
                concat!($p, "/{id}/processes/{pid}/logs"),
                "A background process's output and exit code",
            )
            .reply::<mm::ProcessLogs>(200)
            .to(machine_api::process_logs::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/processes/{pid}/kill"),
                "Kill a process (its process group)",
            )
            .to(machine_api::kill_process::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/files/write"),
                "Write a file (utf8 or base64 content)",
            )
            .body::<mm::WriteFileBody>()
            .reply::<mm::FileInfo>(200)
            .to(machine_api::files_write::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/files/read"),
                "Read a file as text (or base64)",
            )
            .body::<mm::PathBody>()
            .reply::<mm::FileContent>(200)
            .to(machine_api::files_read::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/info"), "A path's metadata")
                .body::<mm::PathBody>()
                .reply::<mm::FileInfo>(200)
                .to(machine_api::files_info::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/exists"), "Whether a path exists")
                .body::<mm::PathBody>()
                .reply::<mm::Exists>(200)
                .to(machine_api::files_exists::<{ $f }>),
            Op::get(
                concat!($p, "/{id}/files"),
                "List a directory (`depth` levels)",
            )
            .query(FILES_LIST)
            .reply_list::<mm::FileInfo>()
            .to(machine_api::files_list::<{ $f }>),
            Op::get(concat!($p, "/{id}/file"), "Download a file (raw bytes)")
                .query(FILE_PATH)
                .reply_bytes()
                .to(machine_api::file_get::<{ $f }>),
            Op::put(concat!($p, "/{id}/file"), "Upload a file (raw body)")
                .query(FILE_PATH)
                .bytes()
                .to(machine_api::file_put::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/snapshots"),
                "Snapshot memory and disk; the machine runs on",
            )
            .reply::<$snap>(201)
            .to(machine_api::create_snapshot::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/hibernate"),
                "Pause: snapshot memory and disk, stop the VM",
            )
            .reply::<$snap>(200)
            .to(machine_api::hibernate::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/resume"),
                "Resume a paused machine (0.1.9: by snapshot id)",
            )
            .reply::<mm::MachineInfo>(200)
            .to(machine_api::resume::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/fork"),
                "A new machine from a snapshot of this one (copy-on-write disk)",
            )
            .reply::<mm::MachineInfo>(201)
            .to(machine_api::fork::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/timeout"),
                "Set the timeout (from now) and its action",
            )
            .body::<mm::TimeoutBody>()
            .reply::<mm::TimeoutLease>(200)
            .to(machine_api::set_timeout::<{ $f }>),
            Op::get(
                concat!($p, "/{id}/ws"),
                "Streaming exec over a WebSocket (`channel=exec`)",
            )
            .query(WS_CHANNEL)
            .websocket()
            .to(machine_api::ws::<{ $f }>),
            // ---- files: remove, rename, mkdir, permissions, batch, search, find, replace; metrics ----
            Op::post(concat!($p, "/{id}/files/remove"), "Remove a file or a directory with its contents")
                .body::<mm::PathBody>()
                .to(machine_api::files_remove::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/rename"), "Rename (move) a path")
                .body::<mf::RenameBody>()
                .reply::<mm::FileInfo>(200)
                .to(machine_api::files_rename::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/mkdir"), "Make a directory and its parents")
                .body::<mm::PathBody>()
                .to(machine_api::files_mkdir::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/permissions"), "Set a path's permission bits (octal)")
                .body::<mf::PermissionsBody>()
                .to(machine_api::files_permissions::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/files/batch-write"),
                "Write several files (multipart: a manifest part, then one part per file)",
            )
            .bytes()
            .reply::<mf::BatchWriteResult>(200)
            .to(machine_api::files_batch_write::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/search"), "Paths whose name matches a glob")
                .body::<mf::PatternBody>()
                .reply_list::<String>()
                .to(machine_api::files_search::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/find"), "Lines of files that match a pattern")
                .body::<mf::PatternBody>()
                .reply_list::<mf::SearchMatch>()
                .to(machine_api::files_find::<{ $f }>),
            Op::post(concat!($p, "/{id}/files/replace"), "Replace a pattern in files")
                .body::<mf::ReplaceBody>()
                .reply::<mf::ReplaceResult>(200)
                .to(machine_api::files_replace::<{ $f }>),
            Op::get(concat!($p, "/{id}/metrics"), "CPU, memory, disk and network of the guest")
                .reply_list::<mf::MachineMetrics>()
                .to(machine_api::metrics::<{ $f }>),


            // ---- upload sessions and signed URLs ----
            Op::post(concat!($p, "/{id}/uploads"), "Create a resumable upload session")
                .body::<nullspace_model::upload::CreateUploadRequest>()
                .reply::<nullspace_model::upload::CreateUploadResponse>(200)
                .to(machine_api::upload_create::<{ $f }>),
            Op::get(
                concat!($p, "/{id}/uploads/{upload_id}"),
                "An upload session's status (which parts are in)",
            )
            .reply::<nullspace_model::upload::UploadSessionInfo>(200)
            .to(machine_api::upload_status::<{ $f }>),
            Op::delete(
                concat!($p, "/{id}/uploads/{upload_id}"),
                "Abort an upload session (its parts are removed)",
            )
            .to(machine_api::upload_abort::<{ $f }>),
            Op::put(
                concat!($p, "/{id}/uploads/{upload_id}/parts/{part_number}"),
                "Upload one part (numbered from 0, any order; an identical replay is accepted)",
            )
            .bytes()
            .reply::<nullspace_model::upload::UploadSessionInfo>(200)
            .to(machine_api::upload_part::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/uploads/{upload_id}/complete"),
                "Verify (sha256) and publish an upload into the machine",
            )
            .body::<nullspace_model::upload::CompleteUploadRequest>()
            .reply::<nullspace_model::upload::CompleteUploadResponse>(200)
            .to(machine_api::upload_complete::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/files/upload-url"),
                "A signed, expiring URL that uploads one file without the API key",
            )
            .body::<nullspace_model::upload::TransferUrlRequest>()
            .reply::<nullspace_model::upload::SignedUploadUrl>(200)
            .to(machine_api::upload_url::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/files/download-url"),
                "A signed, expiring URL that downloads one file without the API key",
            )
            .body::<nullspace_model::upload::TransferUrlRequest>()
            .reply::<nullspace_model::upload::SignedDownloadUrl>(200)
            .to(machine_api::download_url::<{ $f }>),
            Op::get(
                concat!("/signed", $p, "/{id}/file"),
                "Download the file a signed grant names (no API key: the token is the grant)",
            )
                .public()
                .query(SIGNED_TOKEN)
                .reply_bytes()
                .to(machine_api::signed_get::<{ $f }>),
            Op::put(
                concat!("/signed", $p, "/{id}/file"),
                "Upload (replace) the file a signed grant names (no API key: the token is the grant)",
            )
                .public()
                .query(SIGNED_TOKEN)
                .bytes()
                .to(machine_api::signed_put::<{ $f }>),


            // ---- ports and preview URLs ----
            Op::post(concat!($p, "/{id}/host"), "Where a port of the machine is reached: host and signed URLs")
                .body::<nullspace_model::machine::ports::HostBody>()
                .reply::<nullspace_model::machine::ports::HostInfo>(200)
                .to(machine_api::host::<{ $f }>),
            Op::get(concat!($p, "/{id}/ports/{port}/preview-url"), "A signed preview URL of a port (default lifetime)")
                .reply::<nullspace_model::machine::ports::PreviewUrl>(200)
                .to(machine_api::preview_url::<{ $f }>),
            Op::post(concat!($p, "/{id}/ports/{port}/signed-preview-url"), "A signed preview URL of a port, expiring as asked")
                .body::<nullspace_model::machine::ports::GrantBody>()
                .reply::<nullspace_model::machine::ports::PreviewUrl>(200)
                .to(machine_api::signed_preview_url::<{ $f }>),
            Op::post(concat!($p, "/{id}/ports/{port}/preview-proxy-target"), "A header token for a proxy in front of a port")
                .body::<nullspace_model::machine::ports::GrantBody>()
                .reply::<nullspace_model::machine::ports::PreviewProxyTarget>(200)
                .to(machine_api::proxy_target::<{ $f }>),
            Op::post(concat!($p, "/{id}/ports/{port}/readiness"), "Wait until a port accepts connections (tcp) or answers (http)")
                .body::<nullspace_model::machine::ports::ReadinessBody>()
                .reply::<nullspace_model::machine::ports::PreviewReadiness>(200)
                .to(machine_api::readiness::<{ $f }>),
            Op::get(concat!($p, "/{id}/preview-urls"), "The machine's preview grants (`port` filters)")
                .reply::<nullspace_model::machine::ports::PreviewGrantList>(200)
                .to(machine_api::list_grants::<{ $f }>),
            Op::delete(concat!($p, "/{id}/preview-urls/{grant_id}"), "Revoke a preview grant (at once)")
                .reply::<nullspace_model::machine::ports::RevokedGrant>(200)
                .to(machine_api::revoke_grant::<{ $f }>),

            // ---- terminals and directory watch ----
            Op::get(concat!($p, "/{id}/pty"), "Running terminal sessions")
                .reply_list::<nullspace_model::terminal::PtySessionInfo>()
                .to(machine_api::pty_list::<{ $f }>),
            Op::get(concat!($p, "/{id}/pty/{sid}"), "A terminal session")
                .reply::<nullspace_model::terminal::PtySessionInfo>(200)
                .to(machine_api::pty_get::<{ $f }>),
            Op::delete(concat!($p, "/{id}/pty/{sid}"), "End a terminal session")
                .to(machine_api::pty_kill::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/pty/{sid}/resize"),
                "Set a terminal session's window size",
            )
            .body::<nullspace_model::terminal::ResizeBody>()
            .reply::<nullspace_model::terminal::PtySessionInfo>(200)
            .to(machine_api::pty_resize::<{ $f }>),


            // ---- lifecycle events, git, stdin ----
            Op::get(
                concat!($p, "/{id}/lifecycle"),
                "The machine's lifecycle events (operation, status, from/to filters; offset/limit; order)",
            )
            .reply::<nullspace_model::machine::lifecycle::LifecycleEventList>(200)
            .to(machine_api::lifecycle_events::<{ $f }>),
            Op::get(
                concat!($p, "/{id}/lifecycle/ws"),
                "Lifecycle events over a WebSocket: replayed after a cursor, then followed",
            )
            .websocket()
            .to(machine_api::lifecycle_ws::<{ $f }>),
            Op::post(concat!($p, "/{id}/git/clone"), "git clone in the machine")
                .body::<nullspace_model::machine::git::GitCloneBody>()
                .reply::<nullspace_model::machine::git::GitCloneReply>(200)
                .to(machine_api::git_clone::<{ $f }>),
            Op::get(concat!($p, "/{id}/git/status"), "git status of a repository (`path`)")
                .reply::<nullspace_model::machine::git::GitStatusReply>(200)
                .to(machine_api::git_status::<{ $f }>),
            Op::get(concat!($p, "/{id}/git/log"), "git log of a repository (`path`, `limit`)")
                .reply::<nullspace_model::machine::git::GitLogReply>(200)
                .to(machine_api::git_log::<{ $f }>),
            Op::get(concat!($p, "/{id}/git/branch"), "A repository's branches (`path`)")
                .reply::<nullspace_model::machine::git::GitBranchList>(200)
                .to(machine_api::git_branches::<{ $f }>),
            Op::post(concat!($p, "/{id}/git/branch"), "Create or delete a branch")
                .body::<nullspace_model::machine::git::GitBranchBody>()
                .reply::<nullspace_model::machine::git::GitOk>(200)
                .to(machine_api::git_branch::<{ $f }>),
            Op::post(concat!($p, "/{id}/git/checkout"), "git checkout (optionally a new branch)")
                .body::<nullspace_model::machine::git::GitCheckoutBody>()
                .reply::<nullspace_model::machine::git::GitOk>(200)
                .to(machine_api::git_checkout::<{ $f }>),
            Op::post(concat!($p, "/{id}/git/add"), "git add (no files: everything)")
                .body::<nullspace_model::machine::git::GitAddBody>()
                .reply::<nullspace_model::machine::git::GitOk>(200)
                .to(machine_api::git_add::<{ $f }>),
            Op::post(concat!($p, "/{id}/git/commit"), "git commit; the new commit's hash")
                .body::<nullspace_model::machine::git::GitCommitBody>()
                .reply::<nullspace_model::machine::git::GitCommitReply>(200)
                .to(machine_api::git_commit::<{ $f }>),
            Op::post(concat!($p, "/{id}/git/pull"), "git pull")
                .body::<nullspace_model::machine::git::GitSyncBody>()
                .reply::<nullspace_model::machine::git::GitSyncReply>(200)
                .to(machine_api::git_pull::<{ $f }>),
            Op::post(concat!($p, "/{id}/git/push"), "git push")
                .body::<nullspace_model::machine::git::GitSyncBody>()
                .reply::<nullspace_model::machine::git::GitSyncReply>(200)
                .to(machine_api::git_push::<{ $f }>),
            Op::post(
                concat!($p, "/{id}/processes/{pid}/stdin"),
                "Write to a background process's stdin (it stays open)",
            )
            .body::<nullspace_model::machine::stdin::StdinBody>()
            .to(machine_api::send_stdin::<{ $f }>),


        ]
    }};
}

/// SSH access and egress policies (SDK 1.0.x only: 0.1.9 has no such calls).
fn ssh_routes() -> Vec<Route> {
    use nullspace_model::machine::ssh as s;
    vec![
        Op::post(
            "/v1/machines/{id}/ssh-access",
            "Mint certificate-backed SSH access: a short-lived OpenSSH user certificate for the given public key, to log into this machine through the server's SSH endpoint",
        )
        .body::<s::SshAccessBody>()
        .reply::<s::SshAccessReply>(200)
        .to(machine_api::ssh::ssh_access::<{ machine_api::MACHINE }>),
        Op::patch(
            "/v1/machines/{id}/egress",
            "Replace a machine's egress policy (allow_all, deny_all, custom CIDR lists, rate limit); a running machine's rules change before the answer",
        )
        .body::<nullspace_model::machine::egress::EgressBody>()
        .reply::<nullspace_model::machine::egress::EgressReply>(200)
        .to(machine_api::egress::update_egress),
    ]
}

/// Template warm pools (SDK 1.0.x), `machine_api::warm_pools`.
fn warm_pool_routes() -> Vec<Route> {
    use machine_api::warm_pools as w;
    use nullspace_model::machine::warm_pool as wp;
    const P: &str = "/v1/template-warm-pools";
    const ONE: &str = "/v1/template-warm-pools/{id}";
    vec![
        Op::post(
            P,
            "Create a warm pool: min_ready..max_ready prepared machines of a template build and shape",
        )
        .body::<wp::CreateWarmPoolBody>()
        .reply::<wp::WarmPoolInfo>(200)
        .to(w::create),
        Op::get(P, "The namespace's warm pools")
            .query(WARM_POOL_LIST)
            .reply::<wp::WarmPoolList>(200)
            .to(w::list),
        Op::get(ONE, "A warm pool")
            .reply::<wp::WarmPoolInfo>(200)
            .to(w::get),
        Op::get(
            "/v1/template-warm-pools/{id}/status",
            "A warm pool's counts (target, ready, warming, claimed …)",
        )
        .reply::<wp::WarmPoolCounts>(200)
        .to(w::status),
        Op::patch(ONE, "Change a warm pool (bounds, policy, template ref, labels)")
            .body::<wp::UpdateWarmPoolBody>()
            .reply::<wp::WarmPoolInfo>(200)
            .to(w::update),
        Op::delete(ONE, "Delete a warm pool (its ready machines end)").to(w::delete),
        Op::post(
            "/v1/template-warm-pools/{id}/enable",
            "Keep and serve the pool",
        )
        .reply::<wp::WarmPoolInfo>(200)
        .to(w::enable),
        Op::post(
            "/v1/template-warm-pools/{id}/disable",
            "Stop keeping and serving the pool",
        )
        .reply::<wp::WarmPoolInfo>(200)
        .to(w::disable),
        Op::post(
            "/v1/template-warm-pools/{id}/drain",
            "Give the pool's ready machines back; not kept until enabled",
        )
        .reply::<wp::WarmPoolInfo>(200)
        .to(w::drain),
        Op::post(
            "/v1/template-warm-pools/{id}/reconcile",
            "Move the pool to its template ref's current build",
        )
        .reply::<wp::WarmPoolInfo>(200)
        .to(w::reconcile),
    ]
}

/// Volumes (SDK 1.0.x only: 0.1.9 has none), `machine_api::volumes`.
fn volume_routes() -> Vec<Route> {
    use machine_api::volumes as v;
    use nullspace_model::machine as mm;
    use nullspace_model::machine::volume as vm;
    vec![
        Op::post(
            "/v1/volumes",
            "Create a volume (an ext4 image of max_size_bytes, default 1 GiB)",
        )
        .body::<vm::CreateVolumeBody>()
        .reply::<vm::VolumeInfo>(200)
        .to(v::create),
        Op::get("/v1/volumes", "The namespace's volumes")
            .reply_list::<vm::VolumeInfo>()
            .to(v::list),
        Op::get("/v1/volumes/by-name/{name}", "A volume by name")
            .reply::<vm::VolumeInfo>(200)
            .to(v::get_by_name),
        Op::get("/v1/volumes/{id}", "A volume")
            .reply::<vm::VolumeInfo>(200)
            .to(v::get),
        Op::delete(
            "/v1/volumes/{id}",
            "Delete a volume (refused while attached)",
        )
        .to(v::delete),
        Op::get(
            "/v1/volumes/{id}/attachments",
            "The machines a volume is attached to",
        )
        .reply_list::<vm::VolumeAttachment>()
        .to(v::volume_attachments),
        Op::get(
            "/v1/volumes/{id}/files",
            "List a volume directory (no machine may have it read-write)",
        )
        .query(VOLUME_FILES_LIST)
        .reply_list::<mm::FileInfo>()
        .to(v::files_list),
        Op::post(
            "/v1/volumes/{id}/files/read",
            "Read a volume file (utf8 or base64)",
        )
        .body::<mm::PathBody>()
        .reply::<vm::VolumeReadReply>(200)
        .to(v::files_read),
        Op::post(
            "/v1/volumes/{id}/files/write",
            "Write a volume file (utf8 or base64 content)",
        )
        .body::<mm::WriteFileBody>()
        .reply::<mm::FileInfo>(200)
        .to(v::files_write),
        Op::post("/v1/volumes/{id}/files/info", "A volume path's metadata")
            .body::<mm::PathBody>()
            .reply::<mm::FileInfo>(200)
            .to(v::files_info),
        Op::post(
            "/v1/volumes/{id}/files/exists",
            "Whether a volume path exists",
        )
        .body::<mm::PathBody>()
        .reply::<mm::Exists>(200)
        .to(v::files_exists),
        Op::post(
            "/v1/volumes/{id}/files/mkdir",
            "Make a volume directory and its parents",
        )
        .body::<mm::PathBody>()
        .to(v::files_mkdir),
        Op::post(
            "/v1/volumes/{id}/files/remove",
            "Remove a volume file or empty directory",
        )
        .body::<mm::PathBody>()
        .to(v::files_remove),
        Op::post(
            "/v1/machines/{id}/volumes",
            "Attach a volume to a running machine and mount it",
        )
        .body::<vm::VolumeMountBody>()
        .reply::<vm::VolumeAttachment>(201)
        .to(v::machine_attach),
        Op::get(
            "/v1/machines/{id}/volumes",
            "A machine's volume attachments",
        )
        .reply_list::<vm::VolumeAttachment>()
        .to(v::machine_list),
        Op::delete(
            "/v1/machines/{id}/volumes/{attachment_id}",
            "Unmount and detach a volume",
        )
        .reply::<vm::VolumeAttachment>(200)
        .to(v::machine_detach),
        Op::get(
            "/v1/machines/{id}/volumes/{attachment_id}/health",
            "Whether the volume is still mounted in the guest",
        )
        .reply::<vm::VolumeAttachment>(200)
        .to(v::machine_health),
        Op::post(
            "/v1/machines/{id}/volumes/{attachment_id}/remount",
            "Unmount and mount a volume again",
        )
        .reply::<vm::VolumeAttachment>(200)
        .to(v::machine_remount),
    ]
}

/// Every route: the template API, then machines under both prefixes.
fn all_routes() -> Vec<Route> {
    let mut r = template_routes();
    r.extend(machine_routes!(
        "/v1/machines",
        machine_api::MACHINE,
        crate::machine_model::MachineSnapshotInfo
    ));
    r.extend(ssh_routes());
    r.extend(volume_routes());
    r.extend(warm_pool_routes());
    r.extend(machine_routes!(
        "/v1/sandboxes",
        machine_api::SANDBOX,
        crate::machine_model::SandboxSnapshotInfo
    ));
    r
}

/// The most bytes a buffered request body (JSON, a file written whole)
/// may have; streamed uploads (blobs, upload parts) have their own bounds.
pub const BODY_LIMIT: usize = 64 << 20;

pub fn router(state: Shared) -> Router {
    let mut authed = Router::new();
    let mut public = Router::new();
    for Route { op, handler } in routes() {
        let r = if op.auth { &mut authed } else { &mut public };
        *r = std::mem::take(r).route(op.path, handler);
    }
    authed
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .merge(public)
        // The preview proxy by path: the guest's own paths, not API
        // operations, so not in the table (by host name: the layer below).
        .merge(crate::preview::routes())
        // E2B's SDK dialect: its own auth (X-API-KEY, the sandbox's
        // access token) and error shapes, not API operations here.
        .merge(crate::e2b::routes(state.clone()))
        .fallback(machine_api::not_offered::fallback)
        .method_not_allowed_fallback(machine_api::not_offered::method_not_allowed)
        // Context blobs are streamed to disk; JSON bodies are bounded.
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::preview::by_host,
        ))
        // Many nodes: a request for another node's machine goes to it.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::cluster::forward::to_owner,
        ))
        // The edge, outermost: error answers in one JSON shape, and bodies
        // a handler left unread drained (`edge`).
        .layer(middleware::from_fn(crate::edge::errors::json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::edge::drain::drain_unread,
        ))
        .with_state(state)
}

// ---- query parameters (documented and parsed from the same lists) ----------

const OFFSET: QueryParam = QueryParam {
    name: "offset",
    description: "First log entry to return (0-based)",
    kind: QueryKind::Offset,
};
const CURSOR_OFFSET: QueryParam = QueryParam {
    name: "cursor",
    description: "Alias of `offset` for reconnecting clients; `offset` wins",
    kind: QueryKind::Offset,
};
const FOLLOW: QueryParam = QueryParam {
    name: "follow",
    description: "Keep streaming new entries until the build is terminal",
    kind: QueryKind::Bool,
};
const LIMIT: QueryParam = QueryParam {
    name: "limit",
    description: "Page size (default 20)",
    kind: QueryKind::Range(1, 100),
};
const CURSOR_PAGE: QueryParam = QueryParam {
    name: "cursor",
    description: "`next_cursor` of the previous page",
    kind: QueryKind::Text,
};
const BUILD_STATUSES: &[&str] = status::BuildStatus::NAMES;
const BACKENDS: &[&str] = status::Backend::NAMES;
const SOURCE_TYPES: &[&str] = status::SourceType::NAMES;
const STATUS: QueryParam = QueryParam {
    name: "status",
    description: "Only builds with this status",
    kind: QueryKind::OneOf(BUILD_STATUSES),
};
const BACKEND: QueryParam = QueryParam {
    name: "backend",
    description: "Only builds run by this backend",
    kind: QueryKind::OneOf(BACKENDS),
};
const SOURCE_TYPE: QueryParam = QueryParam {
    name: "source_type",
    description: "Only builds of this source type",
    kind: QueryKind::OneOf(SOURCE_TYPES),
};
const COMPRESSION: QueryParam = QueryParam {
    name: "compression",
    description: "Layer compression: `gzip` (default) or `zstd`",
    kind: QueryKind::OneOf(&["gzip", "zstd"]),
};
const SBOM_FORMAT: QueryParam = QueryParam {
    name: "format",
    description: "`spdx-json` (default) or `cyclonedx-json`",
    kind: QueryKind::OneOf(&["spdx-json", "cyclonedx-json"]),
};
const FIELDS: QueryParam = QueryParam {
    name: "fields",
    description: "Comma-separated keys to keep in each template",
    kind: QueryKind::Text,
};

const FIELDS_ONLY_M: &[QueryParam] = &[FIELDS_M];
const FIELDS_M: QueryParam = QueryParam {
    name: "fields",
    description: "Comma-separated keys to keep",
    kind: QueryKind::Text,
};
const MACHINE_LIST: &[QueryParam] = &[
    QueryParam {
        name: "limit",
        description: "Page size (default 50)",
        kind: QueryKind::Range(1, 100),
    },
    QueryParam {
        name: "next_token",
        description: "`next_token` of the previous page",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "state",
        description: "Comma-separated statuses (default: creating,running,paused)",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "template",
        description: "Only machines created from this template ref",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "metadata",
        description: "A JSON object: only machines whose metadata has these key/values",
        kind: QueryKind::Text,
    },
    FIELDS_M,
];
const GUEST_PATH: QueryParam = QueryParam {
    name: "path",
    description: "An absolute path in the machine",
    kind: QueryKind::Text,
};
const GUEST_USER: QueryParam = QueryParam {
    name: "user",
    description: "As this user (default: the template's)",
    kind: QueryKind::Text,
};
const FILE_PATH: &[QueryParam] = &[GUEST_PATH, GUEST_USER];
const WARM_POOL_LIST: &[QueryParam] = &[
    QueryParam {
        name: "template",
        description: "Only pools of this template ref (or id)",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "state",
        description: "Only pools in this state",
        kind: QueryKind::OneOf(&["enabled", "disabled", "draining", "deleted"]),
    },
    QueryParam {
        name: "label",
        description: "key=value (or a key) every listed pool has; repeatable",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "status",
        description: "Only pools that stand so",
        kind: QueryKind::OneOf(&["ready", "warming", "degraded", "draining", "unavailable"]),
    },
    QueryParam {
        name: "limit",
        description: "At most this many",
        kind: QueryKind::Offset,
    },
];

const VOLUME_FILES_LIST: &[QueryParam] = &[
    QueryParam {
        name: "path",
        description: "A path in the volume (default /)",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "depth",
        description: "Levels below `path` (default 1)",
        kind: QueryKind::Range(1, 32),
    },
];
const FILES_LIST: &[QueryParam] = &[
    GUEST_PATH,
    QueryParam {
        name: "depth",
        description: "Levels below `path` (default 1)",
        kind: QueryKind::Range(1, 32),
    },
    GUEST_USER,
];
const SIGNED_TOKEN: &[QueryParam] = &[QueryParam {
    name: "token",
    description: "The signed grant `upload-url` or `download-url` returned",
    kind: QueryKind::Text,
}];
const WS_CHANNEL: &[QueryParam] = &[QueryParam {
    name: "channel",
    description: "`exec`, `pty`; none: `file_watch` frames",
    kind: QueryKind::OneOf(&["exec", "pty"]),
}];
const SNAPSHOT_LIST: &[QueryParam] = &[
    QueryParam {
        name: "machine_id",
        description: "Snapshots of this machine (answers with `machine_id`)",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "sandbox_id",
        description: "Snapshots of this sandbox (answers with `sandbox_id`)",
        kind: QueryKind::Text,
    },
    QueryParam {
        name: "metadata",
        description: "A JSON object the snapshots' metadata must contain",
        kind: QueryKind::Text,
    },
];

fn any_object_schema(_: &mut SchemaGenerator) -> Schema {
    schemars::json_schema!({"type": "object"})
}

/// A `TemplateInfo`, or with `fields` only the named keys of one.
fn template_masked_schema(g: &mut SchemaGenerator) -> Schema {
    let info = serde_json::Value::from(g.subschema_for::<TemplateInfo>());
    schemars::json_schema!({"anyOf": [info, {"type": "object", "description": "with `fields`: only those keys"}]})
}

/// A `MachineInfo`, or with `fields` only the named keys of one.
fn machine_masked_schema(g: &mut SchemaGenerator) -> Schema {
    let info = serde_json::Value::from(g.subschema_for::<crate::machine_model::MachineInfo>());
    schemars::json_schema!({"anyOf": [info, {"type": "object", "description": "with `fields`: only those keys"}]})
}

fn machine_page_schema(g: &mut SchemaGenerator) -> Schema {
    let page = serde_json::Value::from(g.subschema_for::<crate::machine_model::MachinePage>());
    let item = serde_json::Value::from(machine_masked_schema(g));
    schemars::json_schema!({"anyOf": [page, {
        "type": "object",
        "description": "with `fields`: items with only those keys",
        "properties": {"items": {"type": "array", "items": item}, "has_next": {"type": "boolean"}, "next_token": {"type": "string"}},
        "required": ["items", "has_next"],
    }]})
}

fn template_list_schema(g: &mut SchemaGenerator) -> Schema {
    let item = serde_json::Value::from(template_masked_schema(g));
    schemars::json_schema!({"type": "array", "items": item})
}

async fn auth(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "Authorization: Bearer <API key> is required",
        )
        .into_response();
    };
    match state.store.authenticate(&token).await {
        Ok(Some(caller)) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Ok(None) => ApiError::unauthorized("the API key is not valid").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// JSON bodies: a malformed one is a clear 400 in the API's error shape.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    e.status(),
                    "request_too_large",
                    format!("request body: over the {} MiB limit", BODY_LIMIT >> 20),
                )
            } else {
                ApiError::invalid(format!("request body: {e}"))
            }
        })?;
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"{}")
        } else {
            bytes
        };
        // No field of the API carries a NUL, and Postgres cannot store one.
        if bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) || bytes.contains(&0) {
            let at = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| nul_field(&v, String::new()));
            return Err(ApiError::invalid(match at {
                Some((field, value)) => format!(
                    "request body: field {field} ({:?}) contains a NUL character, which no field allows",
                    &value[..value.floor_char_boundary(128)]
                ),
                None => "request body: NUL characters are not allowed".into(),
            }));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::invalid(format!(
                "request body is not valid JSON for this endpoint: {e}"
            ))
        })
    }
}

/// Where the first string (key or value) of `v` holding a NUL is (`field
/// "files[0]"`) and the string. The parser's depth limit bounds the walk.
fn nul_field(v: &serde_json::Value, at: String) -> Option<(String, String)> {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Some((format!("field {at:?}"), s.clone())),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_field(x, format!("{at}[{i}]"))),
        Value::Object(o) => o.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                return Some((format!("a field name in {at:?}"), k.clone()));
            }
            nul_field(
                x,
                if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                },
            )
        }),
        _ => None,
    }
}

// ---- builds ---------------------------------------------------------------

async fn build_background(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Response> {
    let rec = builds::create(&s, &c, req, None).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

async fn build_blocking_deprecated(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Response> {
    // Deprecated blocking create: wait for the build, answer with the artifact.
    let rec = builds::create(&s, &c, req, None).await?;
    let mut rx = s.hub.subscribe(&rec.build_id);
    loop {
        let (_, cur) = builds::load(&s, &c, &rec.build_id).await?;
        if cur.status.is_terminal() {
            if cur.status == Status::Ready {
                return Ok(Json(templates::info_by_id(&s, &cur.template_id).await?).into_response());
            }
            let detail = cur.error_detail.clone();
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "build_error",
                cur.error.unwrap_or_else(|| format!("build {}", cur.status)),
            );
            if let Some(d) = detail {
                e = e.with_detail(d);
            }
            return Err(e);
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
    }
}

async fn build_stream(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Response> {
    let rec = builds::create(&s, &c, req, None).await?;
    Ok(sse(s, rec.build_id, 0, true))
}

fn parse_offset(raw: &HashMap<String, String>, key: &str) -> ApiResult<Option<i64>> {
    match raw.get(key) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("{key} must be a non-negative integer"))),
    }
}

async fn build_status(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<BuildStatus>> {
    let offset = parse_offset(&q, OFFSET.name)?.unwrap_or(0);
    status_snapshot(&s, &c, &id, offset).await.map(Json)
}

async fn status_snapshot(s: &Shared, c: &Caller, id: &str, offset: i64) -> ApiResult<BuildStatus> {
    // Record first, entries second: a terminal status implies every entry.
    let (_, rec) = builds::load(s, c, id).await?;
    let entries = s.store.logs(id, offset).await?;
    let next = entries.last().map(|e| e.0 + 1).unwrap_or(offset);
    let entries: Vec<LogEntry> = entries
        .iter()
        .filter_map(|e| serde_json::from_str(&e.1).ok())
        .collect();
    Ok(BuildStatus {
        build: rec,
        entries,
        next_offset: next,
    })
}

async fn build_logs(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    builds::load(&s, &c, &id).await?;
    // `offset` wins over `cursor` (an alias kept for reconnecting clients).
    let offset = match parse_offset(&q, OFFSET.name)? {
        Some(o) => o,
        None => parse_offset(&q, CURSOR_OFFSET.name)?.unwrap_or(0),
    };
    let follow = match q.get(FOLLOW.name).map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => {
            return Err(ApiError::invalid(format!(
                "follow must be true or false, not {v:?}"
            )));
        }
    };
    Ok(sse(s, id, offset, follow))
}

/// A log stream: replays durable entries from `offset`; with `follow`,
/// forwards new ones until the build is terminal and drained. Each entry is
/// one axum SSE event, `id: <offset>` / `event: log` / `data: <json>` (the
/// SDK's parser reads exactly these fields); idle streams get a `: ping`
/// comment every 10 s (clients time out reads after 30 s).
fn sse(s: Shared, build_id: String, offset: i64, follow: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut rx_notify = s.hub.subscribe(&build_id);
        let mut next = offset;
        loop {
            let status = match s.store.build(&build_id).await {
                Ok(Some(row)) => row.status,
                _ => break,
            };
            let entries = match s.store.logs(&build_id, next).await {
                Ok(e) => e,
                Err(_) => break,
            };
            for (off, e) in entries {
                let event = Event::default().id(off.to_string()).event("log").data(e);
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                next = off + 1;
            }
            if !follow || is_terminal(&status) {
                break;
            }
            // A stopping server ends its streams (clients reconnect to
            // another server with `offset`), so shutdown never waits on them.
            if s.shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(1), rx_notify.recv()) => match r {
                    Ok(Ok(())) | Err(_) => {}
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                    Ok(Err(_)) => rx_notify = s.hub.subscribe(&build_id),
                },
                _ = s.shutdown.cancelled() => {}
                // The client went away.
                _ = tx.closed() => return,
            }
        }
    });
    let mut rx = rx;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(10))
                .text("ping"),
        )
        .into_response()
}

async fn build_cancel(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<CancelBody>,
) -> ApiResult<Json<BuildStatus>> {
    builds::cancel(&s, &c, &id, b.reason).await?;
    status_snapshot(&s, &c, &id, 0).await.map(Json)
}

async fn build_retry(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RetryBody>,
) -> ApiResult<Response> {
    let (row, rec) = builds::load(&s, &c, &id).await?;
    if !rec.status.is_terminal() {
        return Err(ApiError::conflict(
            "template_build_conflict",
            format!(
                "build {id} is {}; only finished builds can be retried",
                rec.status
            ),
        ));
    }
    let def: Definition = serde_json::from_str(&row.definition).map_err(ApiError::internal)?;
    if def.had_inline_context {
        return Err(ApiError::conflict(
            "template_build_conflict",
            format!(
                "build {id} is not retryable: its inline context bytes were not persisted (upload the context as blobs)"
            ),
        ));
    }
    if def.base_image_auth_kind.is_some() && b.base_image_auth.is_none() {
        return Err(ApiError::invalid(format!(
            "build {id} used private base-image credentials ({}); send fresh base_image_auth to retry",
            def.base_image_auth_kind.as_deref().unwrap_or("?")
        )));
    }
    let given: Vec<String> = b
        .build_secrets
        .iter()
        .flatten()
        .map(|s| s.id.clone())
        .collect();
    let mut want = def.secret_ids.clone();
    let mut have = given.clone();
    want.sort();
    have.sort();
    if want != have {
        return Err(ApiError::invalid(format!(
            "retry must resupply the same build_secrets ids ({}); old values are never replayed",
            want.join(", ")
        )));
    }
    let mut req = def.request.clone();
    if let Some(t) = b.tags {
        req.tags = Some(t);
    }
    req.base_image_auth = b.base_image_auth;
    req.registry_auth = b.registry_auth;
    req.build_secrets = b.build_secrets;
    req.name = Some(rec.name.clone());
    let original = rec
        .original_build_id
        .clone()
        .unwrap_or_else(|| rec.build_id.clone());
    let new = builds::create(&s, &c, req, Some((rec.build_id.clone(), original))).await?;
    Ok((StatusCode::ACCEPTED, Json(new)).into_response())
}

async fn build_promote(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PromoteBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::promote(&s, &c, &id, &b.tag).await.map(Json)
}

async fn ref_builds(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<BuildPage>> {
    let (row, _) = templates::resolve(&s, &c, &r, true).await?;
    let limit = match q.get(LIMIT.name) {
        None => 20,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::invalid("limit must be 1-100"))?,
    };
    let enum_param = |k: &str, allowed: &[&str]| -> ApiResult<Option<String>> {
        match q.get(k) {
            None => Ok(None),
            Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v.clone())),
            Some(v) => Err(ApiError::invalid(format!(
                "{k} {v:?} must be one of {}",
                allowed.join(", ")
            ))),
        }
    };
    let filter = BuildFilter {
        status: enum_param(STATUS.name, BUILD_STATUSES)?,
        backend: enum_param(BACKEND.name, BACKENDS)?,
        source_type: enum_param(SOURCE_TYPE.name, SOURCE_TYPES)?,
    };
    let before = match q.get(CURSOR_PAGE.name) {
        None => None,
        Some(cur) => {
            let (t, id) = cur
                .split_once('.')
                .filter(|(_, id)| builds::plausible_id(id))
                .ok_or_else(|| ApiError::invalid("cursor is malformed"))?;
            Some((
                t.parse::<i64>()
                    .map_err(|_| ApiError::invalid("cursor is malformed"))?,
                id.to_string(),
            ))
        }
    };
    let rows = s.store.builds(&row.id, &filter, limit + 1, before).await?;
    let more = rows.len() as i64 > limit;
    let page = &rows[..rows.len().min(limit as usize)];
    let builds: Vec<BuildRecord> = page
        .iter()
        .filter_map(|r| serde_json::from_str(&r.record).ok())
        .collect();
    let next_cursor = if more {
        page.last().map(|r| format!("{}.{}", r.created_at, r.id))
    } else {
        None
    };
    Ok(Json(BuildPage {
        builds,
        next_cursor,
    }))
}

// ---- validate and plan -----------------------------------------------------

async fn validate_request(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> Json<ValidateResult> {
    Json(ValidateResult::of(&validate::plan(
        &req,
        &c.namespace,
        &s.engines,
    )))
}

async fn plan_request(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Json<crate::plan_views::PlanAnswer>> {
    let view = crate::plan_views::parse_view(q.get("view").map(String::as_str))?;
    let plan =
        validate::plan(&req, &c.namespace, &s.engines).map_err(|i| validate::rejection(&i))?;
    Ok(Json(
        crate::plan_views::answer(&s, &c.namespace, &req, plan, view).await,
    ))
}

// ---- blobs -----------------------------------------------------------------

const MAX_BLOB_BYTES: i64 = 1 << 30;

fn upload_error(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "file_upload_error", message)
}

async fn blobs_preflight(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(b): JsonBody<PreflightBody>,
) -> ApiResult<Json<PreflightResult>> {
    if b.files.len() > validate::MAX_CONTEXT_FILES {
        return Err(upload_error(format!(
            "at most {} context files",
            validate::MAX_CONTEXT_FILES
        )));
    }
    let mut out = Vec::with_capacity(b.files.len());
    for f in &b.files {
        if f.entry_type == "dir" {
            out.push(PreflightAnswer {
                path: f.path.clone(),
                entry_type: "dir".into(),
                mode: f.mode.clone(),
                blob_id: None,
                missing: None,
            });
            continue;
        }
        if f.entry_type != "file" {
            return Err(upload_error(format!(
                "{:?}: entry_type {:?} is not file or dir",
                f.path, f.entry_type
            )));
        }
        let sha = f.sha256.as_deref().unwrap_or_default();
        let digest = nullspace_digest::Digest::parse(&format!("sha256:{sha}")).map_err(|_| {
            upload_error(format!(
                "{:?}: sha256 must be 64 lowercase hex characters",
                f.path
            ))
        })?;
        let size = f
            .size_bytes
            .filter(|n| (0..=MAX_BLOB_BYTES).contains(n))
            .ok_or_else(|| {
                upload_error(format!(
                    "{:?}: size_bytes must be 0-{MAX_BLOB_BYTES}",
                    f.path
                ))
            })?;
        let blob_id = format!("blob_{}", digest.hex());
        let have = s
            .store
            .blob_meta(&c.namespace, &blob_id)
            .await?
            .is_some_and(|m| m.2)
            && s.artifacts.contains(&digest);
        let missing = !have || f.force_upload == Some(true);
        if !have {
            s.store
                .put_blob_meta(&c.namespace, &blob_id, sha, size, false)
                .await?;
        }
        out.push(PreflightAnswer {
            path: f.path.clone(),
            entry_type: "file".into(),
            mode: None,
            blob_id: Some(blob_id),
            missing: Some(missing),
        });
    }
    Ok(Json(PreflightResult { files: out }))
}

async fn blob_put(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(blob_id): Path<String>,
    _h: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    if !builds::plausible_id(&blob_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "blob_not_found",
            format!("blob {blob_id:?} was not announced by a preflight"),
        ));
    }
    let Some((sha, size, _)) = s.store.blob_meta(&c.namespace, &blob_id).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "blob_not_found",
            format!("blob {blob_id:?} was not announced by a preflight"),
        ));
    };
    let expected =
        nullspace_digest::Digest::parse(&format!("sha256:{sha}")).map_err(ApiError::internal)?;
    // Stream the body to a temp file through the verifier.
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    // A spool its writer holds: the collector leaves it alone until dropped.
    let mut spool = s.artifacts.spool("blob").map_err(ApiError::internal)?;
    let mut f = tokio::fs::File::from_std(spool.file.try_clone().map_err(ApiError::internal)?);
    let mut hasher = nullspace_digest::Hasher::new(nullspace_digest::Algorithm::Sha256);
    let mut n: i64 = 0;
    use tokio::io::AsyncWriteExt;
    let res: ApiResult<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| upload_error(format!("reading the upload: {e}")))?;
            n += chunk.len() as i64;
            if n > size {
                return Err(upload_error(format!(
                    "blob {blob_id}: more than the {size} bytes announced"
                )));
            }
            hasher.update(&chunk);
            f.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        f.flush().await.map_err(ApiError::internal)?;
        if n != size {
            return Err(upload_error(format!(
                "blob {blob_id}: {n} bytes uploaded, {size} announced"
            )));
        }
        if hasher.clone().finish() != expected {
            return Err(upload_error(format!(
                "blob {blob_id}: content does not match its sha256"
            )));
        }
        Ok(())
    }
    .await;
    // Dropping the spool removes it.
    res?;
    drop(f);
    let artifacts = s.artifacts.clone();
    tokio::task::spawn_blocking(move || {
        artifacts
            .writing()
            .and_then(|w| w.commit_spool(&mut spool, &expected))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    s.store
        .put_blob_meta(&c.namespace, &blob_id, &sha, size, true)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- templates -------------------------------------------------------------

/// `fields=a,b`: only those keys of an object (templates and machines).
pub(crate) fn mask(v: Value, fields: Option<&String>) -> Value {
    let Some(fields) = fields else { return v };
    let keep: Vec<&str> = fields
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .collect(),
        ),
        other => other,
    }
}

async fn list_templates(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let list = templates::list(&s, &c).await?;
    Ok(Json(Value::Array(
        list.into_iter()
            .map(|i| {
                mask(
                    serde_json::to_value(i).unwrap_or_default(),
                    q.get(FIELDS.name),
                )
            })
            .collect(),
    )))
}

async fn template_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (row, qualifier) = templates::resolve(&s, &c, &r, false).await?;
    // `name:tag` and `name:tb_…` exist only when that tag or build does
    // (`Template.exists` must agree with what `Machine.create` accepts).
    if !matches!(qualifier, nullspace_model::refs::Qualifier::None) {
        templates::resolve_build(&s, &c, &r).await?;
    }
    let info = templates::info(&s, &row).await?;
    Ok(Json(mask(
        serde_json::to_value(info).map_err(ApiError::internal)?,
        q.get(FIELDS.name),
    )))
}

/// Streams the archive; `X-Manifest-Digest` names the image.
async fn template_export(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let compression = match q.get(COMPRESSION.name).map(String::as_str) {
        None | Some("gzip") => nullspace_build::export::LayerCompression::Gzip,
        Some("zstd") => nullspace_build::export::LayerCompression::Zstd,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "compression {other:?}: expected gzip or zstd"
            )));
        }
    };
    let e = crate::export::export_archive(&s, &c, &r, compression).await?;
    let file = tokio::fs::File::from_std(e.file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (header::CONTENT_LENGTH, e.size.to_string()),
            (
                axum::http::HeaderName::from_static("x-manifest-digest"),
                e.manifest_digest,
            ),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)),
    )
        .into_response())
}

async fn template_sbom(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let format: nullspace_sbom::Format = q
        .get(SBOM_FORMAT.name)
        .map(String::as_str)
        .unwrap_or("spdx-json")
        .parse()
        .map_err(ApiError::invalid)?;
    let doc = crate::sbom::document(&s, &c, &r, format).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response())
}

async fn template_disk(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let format = crate::export_disk::parse_format(q.get("format").map(String::as_str))?;
    crate::export_disk::disk(&s, &c, &r, format).await
}

async fn template_delete(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
) -> ApiResult<StatusCode> {
    templates::delete(&s, &c, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn tags_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
) -> ApiResult<Json<Value>> {
    templates::tags(&s, &c, &r).await.map(Json)
}

async fn tags_assign(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    JsonBody(b): JsonBody<TagsBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::assign_tags(&s, &c, &r, &b.tags).await.map(Json)
}

async fn tag_remove(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((r, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    templates::remove_tag(&s, &c, &r, &tag).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn aliases_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
) -> ApiResult<Json<Value>> {
    templates::aliases(&s, &c, &r).await.map(Json)
}

async fn alias_remove(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((r, alias)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    templates::remove_alias(&s, &c, &r, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn template_rename(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    JsonBody(b): JsonBody<RenameBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::rename(&s, &c, &r, &b.new_name).await.map(Json)
}

async fn template_visibility(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    JsonBody(b): JsonBody<VisibilityBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::set_visibility(&s, &c, &r, &b.visibility)
        .await
        .map(Json)
}

async fn claim_create(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(b): JsonBody<ClaimBody>,
) -> ApiResult<Response> {
    let v = templates::reserve(&s, &c, &b.template_ref).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn claim_release(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(token): Path<String>,
) -> ApiResult<StatusCode> {
    if !s.store.release_claim(&c.namespace, &token).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "claim_not_found",
            "claim not found",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn namespace_get(
    Extension(c): Extension<Caller>,
    Path(slug): Path<String>,
) -> ApiResult<Json<NamespaceInfo>> {
    if slug == c.namespace {
        return Ok(Json(NamespaceInfo {
            slug,
            kind: "user".into(),
            is_default: true,
        }));
    }
    if slug == "nullspace" {
        return Ok(Json(NamespaceInfo {
            slug,
            kind: "system".into(),
            is_default: false,
        }));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "namespace_not_found",
        format!("namespace {slug:?} not found"),
    ))
}

#[cfg(test)]
mod nul_tests {
    use super::nul_field;
    use serde_json::json;

    #[test]
    fn a_nul_is_found_by_field() {
        let v = json!({"user": "app", "path": "/tmp/a\0b"});
        assert_eq!(
            nul_field(&v, String::new()),
            Some(("field \"path\"".into(), "/tmp/a\0b".into()))
        );
        let v = json!({"files": ["/ok", "/b\0"]});
        assert_eq!(
            nul_field(&v, String::new()).unwrap().0,
            "field \"files[1]\""
        );
        assert_eq!(nul_field(&json!({"ok": [1, "x"]}), String::new()), None);
    }
}
