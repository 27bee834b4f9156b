//! Resumable upload sessions (the SDK's `…/uploads` calls): a session is
//! created with its target, declared size and kind; its parts arrive in any
//! order and are spooled to the host disk; its status says which parts are
//! in (for resume); completion checks every part is there, verifies the
//! whole sha256, and streams the spool into the guest under a temporary
//! name that is renamed into place at the end (`publish`), unpacking a
//! directory archive on the way (`archive`).
//!
//! Parts are numbered from 0 (as the SDK sends them); each has exactly the
//! size the session fixed (`part_size`, the last one the remainder). A part
//! sent again is accepted when identical and refused when it differs.
//!
//! Spool: `DATA_DIR/uploads/<upload id>/<part number>`, written through a
//! temporary file and renamed, removed when the session completes, fails,
//! is aborted or expires, and swept whole when the server starts (sessions
//! live in this process only).
//!
//! **Host memory bound.** Whatever the sizes, the engine holds:
//! - per part request in flight: one body frame (hyper's, at most its read
//!   buffer, ~400 KiB) plus a sha256 state;
//! - per completion in flight: one [`CHUNK`] (256 KiB) read from the spool,
//!   the agent request carrying it (base64, ~350 KiB), a tar header and at
//!   most [`archive::EXTENSION_MAX`] of PAX/GNU name extensions;
//! - per session: its record and 48 bytes per part (at most
//!   `max_upload_bytes / part_size` parts: 2048 with the defaults).
//!
//! [`Limits::memory_bound`] states the total: about 1.4 MiB per request in
//! flight plus at most 25 MiB for a full table of the largest sessions with
//! the default [`Limits`] (the test `the_memory_bound_is_stated_and_small`
//! holds it under 64 MiB with 16 requests in flight).

pub mod archive;
pub mod publish;
mod spool;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use publish::{GuestFiles, Published};

/// Bytes moved per read of the spool and per write to the guest (the
/// agent's largest data field).
pub const CHUNK: usize = nullspace_model::agent::MAX_CHUNK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    DirectoryTar,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::DirectoryTar => "directory_tar",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "file" => Some(Kind::File),
            "directory_tar" => Some(Kind::DirectoryTar),
            _ => None,
        }
    }
}

/// What to do when the target exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// A file is replaced; a directory's entries are added to it.
    Merge,
    /// The target is replaced whole.
    Replace,
    /// Refused.
    Error,
}

impl Conflict {
    pub fn as_str(self) -> &'static str {
        match self {
            Conflict::Merge => "merge",
            Conflict::Replace => "replace",
            Conflict::Error => "error",
        }
    }
    pub fn parse(s: &str) -> Option<Conflict> {
        match s {
            "merge" => Some(Conflict::Merge),
            "replace" => Some(Conflict::Replace),
            "error" => Some(Conflict::Error),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Uploading,
    Staged,
    Completing,
    Completed,
    Aborted,
    Expired,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Uploading => "uploading",
            Status::Staged => "staged",
            Status::Completing => "completing",
            Status::Completed => "completed",
            Status::Aborted => "aborted",
            Status::Expired => "expired",
            Status::Failed => "failed",
        }
    }
    /// No more parts or completion.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Aborted | Status::Expired | Status::Failed
        )
    }
}

/// Why an upload call was refused, as the SDK's `UploadFailureReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InsufficientStagingSpace,
    SizeLimitExceeded,
    InvalidPartChecksum,
    PartOutOfRange,
    PartSizeMismatch,
    WholeChecksumMismatch,
    UploadExpired,
    UploadAborted,
    UploadAlreadyCompleted,
    TargetConflict,
    DirectoryExtractInvalidPath,
    DirectoryExtractInvalidSymlink,
    DirectoryExtractUnsupportedEntry,
    MissingParts,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InsufficientStagingSpace => "insufficient_staging_space",
            Reason::SizeLimitExceeded => "size_limit_exceeded",
            Reason::InvalidPartChecksum => "invalid_part_checksum",
            Reason::PartOutOfRange => "part_out_of_range",
            Reason::PartSizeMismatch => "part_size_mismatch",
            Reason::WholeChecksumMismatch => "whole_checksum_mismatch",
            Reason::UploadExpired => "upload_expired",
            Reason::UploadAborted => "upload_aborted",
            Reason::UploadAlreadyCompleted => "upload_already_completed",
            Reason::TargetConflict => "target_conflict",
            Reason::DirectoryExtractInvalidPath => "directory_extract_invalid_path",
            Reason::DirectoryExtractInvalidSymlink => "directory_extract_invalid_symlink",
            Reason::DirectoryExtractUnsupportedEntry => "directory_extract_unsupported_entry",
            Reason::MissingParts => "missing_parts",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("upload {id} does not exist on this machine")]
    NotFound { id: String },
    #[error("upload request: {0}")]
    Invalid(String),
    #[error("upload of {length} bytes is larger than the limit of {max} bytes")]
    TooLarge { length: u64, max: u64 },
    #[error(
        "machine {machine} has {staged} bytes of uploads staged; {length} more would pass its quota of {quota} bytes"
    )]
    Quota {
        machine: String,
        staged: u64,
        length: u64,
        quota: u64,
    },
    /// The host's spool file system is full (its path stays out of the
    /// message: clients see it).
    #[error(
        "the server's upload spool has {available} bytes free; {needed} are needed ({length} for this upload, {pending} still due to open sessions, {reserve} kept free)"
    )]
    DiskFull {
        path: PathBuf,
        available: u64,
        needed: u64,
        length: u64,
        pending: u64,
        reserve: u64,
    },
    #[error("{0} upload sessions are open; complete or abort one first")]
    TooManySessions(usize),
    #[error("upload {id}: part number {raw:?} is not a number from 0 to {last}")]
    MalformedPart { id: String, raw: String, last: u32 },
    #[error("upload {id}: part {part} is beyond the declared size (parts 0 to {last})")]
    PartOutOfRange { id: String, part: u32, last: u32 },
    #[error("upload {id}: part {part} must be {expected} bytes, got {got}")]
    PartSize {
        id: String,
        part: u32,
        expected: u64,
        /// What arrived ("more than N" when cut off).
        got: String,
    },
    #[error("upload {id}: part {part} has sha256 {actual}, the request says {expected}")]
    PartChecksum {
        id: String,
        part: u32,
        expected: String,
        actual: String,
    },
    #[error(
        "upload {id}: part {part} was already received with other content (sha256 {kept}, this one {sent})"
    )]
    PartDiffers {
        id: String,
        part: u32,
        kept: String,
        sent: String,
    },
    #[error("upload {id}: {count} of {total} parts are missing (first: part {first})")]
    MissingParts {
        id: String,
        count: u32,
        total: u32,
        first: u32,
    },
    #[error("upload {id}: the uploaded bytes have sha256 {actual}, expected {expected}")]
    WholeChecksum {
        id: String,
        expected: String,
        actual: String,
    },
    #[error("upload {id} expired; create a new upload")]
    Expired { id: String },
    #[error("upload {id} was aborted")]
    Aborted { id: String },
    #[error("upload {id} already completed")]
    AlreadyCompleted { id: String },
    #[error("upload {id} failed earlier: {why}")]
    Failed { id: String, why: String },
    #[error("upload {id} is being completed by another request")]
    Completing { id: String },
    #[error("upload target {path} {why}")]
    TargetConflict { path: String, why: &'static str },
    #[error("directory upload entry {entry:?}: {rule}")]
    Entry {
        entry: String,
        rule: String,
        reason: Reason,
    },
    #[error("upload spool {}: {source}", path.display())]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the request body of upload {id} part {part}: {message}")]
    Body {
        id: String,
        part: u32,
        message: String,
    },
    #[error("guest {op} {path}: {source}")]
    Guest {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl UploadError {
    /// The SDK's failure reason, when one applies.
    pub fn reason(&self) -> Option<Reason> {
        use UploadError::*;
        Some(match self {
            TooLarge { .. } => Reason::SizeLimitExceeded,
            Quota { .. } | DiskFull { .. } | TooManySessions(_) => Reason::InsufficientStagingSpace,
            MalformedPart { .. } | PartOutOfRange { .. } => Reason::PartOutOfRange,
            PartSize { .. } => Reason::PartSizeMismatch,
            PartChecksum { .. } | PartDiffers { .. } => Reason::InvalidPartChecksum,
            MissingParts { .. } => Reason::MissingParts,
            WholeChecksum { .. } => Reason::WholeChecksumMismatch,
            Expired { .. } => Reason::UploadExpired,
            Aborted { .. } => Reason::UploadAborted,
            AlreadyCompleted { .. } => Reason::UploadAlreadyCompleted,
            TargetConflict { .. } => Reason::TargetConflict,
            Entry { reason, .. } => *reason,
            NotFound { .. }
            | Invalid(_)
            | Failed { .. }
            | Completing { .. }
            | Spool { .. }
            | Body { .. }
            | Guest { .. } => return None,
        })
    }

    /// The part the error is about.
    pub fn part(&self) -> Option<u32> {
        use UploadError::*;
        match self {
            PartOutOfRange { part, .. }
            | PartSize { part, .. }
            | PartChecksum { part, .. }
            | PartDiffers { part, .. }
            | Body { part, .. } => Some(*part),
            MissingParts { first, .. } => Some(*first),
            _ => None,
        }
    }

    /// Trying the same call again may work.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            UploadError::Completing { .. }
                | UploadError::Body { .. }
                | UploadError::Guest { .. }
                | UploadError::Spool { .. }
                | UploadError::TooManySessions(_)
                | UploadError::Quota { .. }
                | UploadError::DiskFull { .. }
        )
    }
}

/// Sizes and counts the engine holds to.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_upload_bytes: u64,
    pub part_size: u64,
    /// Parts a client should send at once (advice to the SDK).
    pub max_concurrency: u32,
    /// Declared bytes of open sessions per machine.
    pub machine_staging_quota_bytes: u64,
    /// A session's lifetime from its creation.
    pub ttl: Duration,
    /// Open sessions on this server.
    pub max_sessions: usize,
    /// How long a finished session's record answers status calls.
    pub keep_finished: Duration,
    /// Bytes the spool's file system keeps free: a session is refused when
    /// its size, the bytes still due to open sessions and this would not
    /// fit (checked at creation, and before a signed `PUT` spools).
    pub spool_reserve_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_upload_bytes: 16 << 30,
            part_size: 8 << 20,
            max_concurrency: 4,
            machine_staging_quota_bytes: 32 << 30,
            ttl: Duration::from_secs(6 * 3600),
            max_sessions: 256,
            keep_finished: Duration::from_secs(24 * 3600),
            spool_reserve_bytes: 512 << 20,
        }
    }
}

impl Limits {
    /// Most host memory the engine's data path holds with `requests` part
    /// or completion requests in flight (see the module doc): a body frame
    /// or a spool chunk with its agent request, and the name extensions.
    pub fn memory_bound(&self, requests: usize) -> usize {
        let per_request = 512 * 1024 + CHUNK + CHUNK * 4 / 3 + 4096 + 3 * archive::EXTENSION_MAX;
        let parts = self.max_upload_bytes.div_ceil(self.part_size.max(1)) as usize;
        let per_session = 1024 + parts * std::mem::size_of::<Option<Part>>();
        requests * per_request + self.max_sessions * per_session
    }
}

/// The machine a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub namespace: String,
    pub machine: String,
}

/// A create request, as the SDK sends it (the route layer parsed the
/// enums; the target is the SDK's path, absolute or relative to the
/// guest's working directory).
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub owner: Owner,
    pub kind: Kind,
    /// Echoed back (`restartable_file`, `spooled_stream`, `directory_archive`).
    pub source_kind: String,
    pub target_path: String,
    pub user: Option<String>,
    pub content_length: u64,
    pub conflict: Conflict,
    /// Whole-content sha256 (lowercase hex) known at creation.
    pub whole_sha256: Option<String>,
}

/// A session as the status call reports it.
#[derive(Debug, Clone)]
pub struct Info {
    pub id: String,
    pub kind: Kind,
    pub source_kind: String,
    pub target_path: String,
    pub user: Option<String>,
    pub content_length: u64,
    pub accepted_bytes: u64,
    pub part_size: u64,
    pub part_count: u32,
    pub max_concurrency: u32,
    pub status: Status,
    pub conflict: Conflict,
    /// The lowest part not yet received (`None`: all are in).
    pub next_part: Option<u32>,
    pub received: Vec<u32>,
    pub whole_sha256: Option<String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub expires_at: SystemTime,
    /// What completion published.
    pub published: Option<Published>,
}

#[derive(Debug, Clone, Copy)]
struct Part {
    size: u64,
    sha256: [u8; 32],
}

#[derive(Debug)]
struct Session {
    id: String,
    req: NewUpload,
    target: String,
    part_size: u64,
    parts: Vec<Option<Part>>,
    status: Status,
    created_at: SystemTime,
    updated_at: SystemTime,
    expires_at: SystemTime,
    published: Option<Published>,
    failure: Option<String>,
}

impl Session {
    fn part_count(&self) -> u32 {
        self.parts.len() as u32
    }

    /// Declared bytes not received yet.
    fn bytes_due(&self) -> u64 {
        let got: u64 = self.parts.iter().flatten().map(|p| p.size).sum();
        self.req.content_length.saturating_sub(got)
    }

    fn expected_size(&self, n: u32) -> u64 {
        let start = n as u64 * self.part_size;
        (self.req.content_length - start).min(self.part_size)
    }

    fn info(&self, limits: &Limits) -> Info {
        let received: Vec<u32> = (0..self.part_count())
            .filter(|&n| self.parts[n as usize].is_some())
            .collect();
        Info {
            id: self.id.clone(),
            kind: self.req.kind,
            source_kind: self.req.source_kind.clone(),
            target_path: self.target.clone(),
            user: self.req.user.clone(),
            content_length: self.req.content_length,
            accepted_bytes: self.parts.iter().flatten().map(|p| p.size).sum(),
            part_size: self.part_size,
            part_count: self.part_count(),
            max_concurrency: limits.max_concurrency,
            status: self.status,
            conflict: self.req.conflict,
            next_part: (0..self.part_count()).find(|&n| self.parts[n as usize].is_none()),
            received,
            whole_sha256: self.req.whole_sha256.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            expires_at: self.expires_at,
            published: self.published,
        }
    }

    /// Refuses what a finished session cannot do.
    fn check_open(&self) -> Result<(), UploadError> {
        let id = self.id.clone();
        match self.status {
            Status::Completed => Err(UploadError::AlreadyCompleted { id }),
            Status::Aborted => Err(UploadError::Aborted { id }),
            Status::Expired => Err(UploadError::Expired { id }),
            Status::Failed => Err(UploadError::Failed {
                id,
                why: self.failure.clone().unwrap_or_default(),
            }),
            Status::Completing => Err(UploadError::Completing { id }),
            _ => Ok(()),
        }
    }
}

/// What [`Uploads::begin_complete`] hands the publisher.
#[derive(Debug, Clone)]
pub struct Job {
    pub owner: Owner,
    pub id: String,
    pub kind: Kind,
    pub target: String,
    pub user: Option<String>,
    pub conflict: Conflict,
    pub expected_sha256: Option<String>,
    /// Part files in order with their sizes.
    pub parts: Vec<(PathBuf, u64)>,
}

/// The outcome of [`Uploads::begin_complete`].
#[derive(Debug)]
pub enum Begin {
    /// Completed earlier (a retried complete): its status.
    Done(Info),
    /// Publish this, then call [`Uploads::finish`].
    Publish(Job),
}

/// Every upload session of this server.
pub struct Uploads {
    root: PathBuf,
    limits: Limits,
    sessions: Mutex<HashMap<String, Session>>,
}

fn lower_hex(b: &[u8]) -> String {
    hex::encode(b)
}

fn valid_sha256(s: &str) -> bool {
    nullspace_model::upload::rules::valid_sha256(s)
}

/// `path` without `.` and empty components, refusing `..`, NUL and
/// overlong names: absolute stays absolute, relative stays relative. A
/// refusal names the path and the user it would be written as.
pub fn normalize_target(path: &str, user: Option<&str>) -> Result<String, UploadError> {
    let as_user = match user {
        Some(u) => format!("as user {:?}", &u[..u.floor_char_boundary(64)]),
        None => "as the machine's default user".to_string(),
    };
    let shown = &path[..path.floor_char_boundary(128)];
    let bad = |why: &str| {
        Err(UploadError::Invalid(format!(
            "target path {shown:?} ({as_user}) {why}"
        )))
    };
    nullspace_model::upload::rules::normalize_target(path).or_else(|rule| bad(&rule.to_string()))
}

impl Uploads {
    /// The engine with its spool in `root` (`DATA_DIR/uploads`).
    pub fn open(root: &Path, limits: Limits) -> Result<Uploads, UploadError> {
        std::fs::create_dir_all(root).map_err(|source| UploadError::Spool {
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Uploads {
            root: root.to_path_buf(),
            limits,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// Removes what a previous server process left in the spool (its
    /// sessions died with it). Called when serving starts, before requests.
    pub fn clear_spool(&self) -> Result<(), UploadError> {
        let err = |source| UploadError::Spool {
            path: self.root.clone(),
            source,
        };
        for e in std::fs::read_dir(&self.root).map_err(err)? {
            let p = e.map_err(err)?.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|source| UploadError::Spool { path: p, source })?;
        }
        Ok(())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// The session `id` of `owner` (another machine's is not found).
    fn get<'a>(
        map: &'a mut HashMap<String, Session>,
        owner: &Owner,
        id: &str,
    ) -> Result<&'a mut Session, UploadError> {
        match map.get_mut(id) {
            Some(s) if &s.req.owner == owner => Ok(s),
            _ => Err(UploadError::NotFound { id: id.to_string() }),
        }
    }

    pub fn create(&self, req: NewUpload) -> Result<Info, UploadError> {
        let target = normalize_target(&req.target_path, req.user.as_deref())?;
        if req.content_length > self.limits.max_upload_bytes {
            return Err(UploadError::TooLarge {
                length: req.content_length,
                max: self.limits.max_upload_bytes,
            });
        }
        if let Some(h) = &req.whole_sha256
            && !valid_sha256(h)
        {
            return Err(UploadError::Invalid(format!(
                "whole_checksum_sha256 {h:?} is not 64 lowercase hex digits"
            )));
        }
        if let Some(u) = &req.user
            && (u.is_empty() || u.len() > 255 || u.contains(['\0', '/']))
        {
            return Err(UploadError::Invalid(format!(
                "user {u:?} is not a user name"
            )));
        }
        let part_size = self.limits.part_size.max(1);
        // An empty upload still has one (empty) part: the SDK sends it.
        let part_count = req.content_length.div_ceil(part_size).max(1);
        let id = new_id("up");
        let now = SystemTime::now();
        let mut map = self.lock();
        self.expire_locked(&mut map, now);
        let open: Vec<&Session> = map.values().filter(|s| !s.status.is_terminal()).collect();
        if open.len() >= self.limits.max_sessions {
            return Err(UploadError::TooManySessions(open.len()));
        }
        let staged: u64 = open
            .iter()
            .filter(|s| s.req.owner == req.owner)
            .map(|s| s.req.content_length)
            .sum();
        if staged + req.content_length > self.limits.machine_staging_quota_bytes {
            return Err(UploadError::Quota {
                machine: req.owner.machine.clone(),
                staged,
                length: req.content_length,
                quota: self.limits.machine_staging_quota_bytes,
            });
        }
        let pending = open.iter().map(|s| s.bytes_due()).sum();
        self.check_disk(req.content_length, pending)?;
        let dir = self.dir(&id);
        std::fs::create_dir(&dir).map_err(|source| UploadError::Spool {
            path: dir.clone(),
            source,
        })?;
        let s = Session {
            id: id.clone(),
            target,
            part_size,
            parts: vec![None; part_count as usize],
            status: Status::Created,
            created_at: now,
            updated_at: now,
            expires_at: now + self.limits.ttl,
            published: None,
            failure: None,
            req,
        };
        let info = s.info(&self.limits);
        map.insert(id, s);
        Ok(info)
    }

    /// Refuses `length` more bytes when the spool's file system cannot hold
    /// them besides the `pending` bytes open sessions may still send and the
    /// reserve: a full host disk fails the create, not a part halfway.
    fn check_disk(&self, length: u64, pending: u64) -> Result<(), UploadError> {
        let st = rustix::fs::statvfs(&self.root).map_err(|e| UploadError::Spool {
            path: self.root.clone(),
            source: e.into(),
        })?;
        let available = st.f_bavail.saturating_mul(st.f_frsize);
        let reserve = self.limits.spool_reserve_bytes;
        let needed = length.saturating_add(pending).saturating_add(reserve);
        if needed > available {
            return Err(UploadError::DiskFull {
                path: self.root.clone(),
                available,
                needed,
                length,
                pending,
                reserve,
            });
        }
        Ok(())
    }

    pub fn status(&self, owner: &Owner, id: &str) -> Result<Info, UploadError> {
        let mut map = self.lock();
        self.expire_locked(&mut map, SystemTime::now());
        Ok(Self::get(&mut map, owner, id)?.info(&self.limits))
    }

    /// Receives part `number` (as written in the URL) from `body`, spooling
    /// it; `part_sha256` is the client's digest of it, when sent.
    pub async fn put_part<S, B, E>(
        &self,
        owner: &Owner,
        id: &str,
        number: &str,
        part_sha256: Option<&str>,
        body: S,
    ) -> Result<Info, UploadError>
    where
        S: futures_util::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let (n, expected) = {
            let mut map = self.lock();
            self.expire_locked(&mut map, SystemTime::now());
            let s = Self::get(&mut map, owner, id)?;
            s.check_open()?;
            let last = s.part_count() - 1;
            let n = parse_part(number).ok_or_else(|| UploadError::MalformedPart {
                id: id.to_string(),
                raw: number.chars().take(32).collect(),
                last,
            })?;
            if n > last {
                return Err(UploadError::PartOutOfRange {
                    id: id.to_string(),
                    part: n,
                    last,
                });
            }
            (n, s.expected_size(n))
        };
        if let Some(h) = part_sha256
            && !valid_sha256(h)
        {
            return Err(UploadError::Invalid(format!(
                "x-nullspace-part-sha256 {h:?} is not 64 lowercase hex digits"
            )));
        }
        let dir = self.dir(id);
        let (staged, _) = spool::receive(&dir, id, n, expected, true, body).await?;
        let sha_hex = lower_hex(&staged.sha256);
        if let Some(h) = part_sha256
            && h != sha_hex
        {
            staged.discard();
            return Err(UploadError::PartChecksum {
                id: id.to_string(),
                part: n,
                expected: h.to_string(),
                actual: sha_hex,
            });
        }
        let mut map = self.lock();
        let s = match Self::get(&mut map, owner, id) {
            Ok(s) => s,
            Err(e) => {
                staged.discard();
                return Err(e);
            }
        };
        // The session may have finished while the body streamed.
        if let Err(e) = s.check_open() {
            staged.discard();
            return Err(e);
        }
        match s.parts[n as usize] {
            Some(p) if p.sha256 == staged.sha256 => staged.discard(),
            Some(p) => {
                staged.discard();
                return Err(UploadError::PartDiffers {
                    id: id.to_string(),
                    part: n,
                    kept: lower_hex(&p.sha256),
                    sent: sha_hex,
                });
            }
            None => {
                let sha256 = staged.sha256;
                staged.commit(&spool::part_path(&dir, n))?;
                s.parts[n as usize] = Some(Part {
                    size: expected,
                    sha256,
                });
            }
        }
        s.updated_at = SystemTime::now();
        s.status = if s.parts.iter().all(Option::is_some) {
            Status::Staged
        } else {
            Status::Uploading
        };
        Ok(s.info(&self.limits))
    }

    /// Starts completing: every part must be in, `whole_sha256` (if given)
    /// must agree with the one given at creation. The session is
    /// `completing` until [`Uploads::finish`].
    pub fn begin_complete(
        &self,
        owner: &Owner,
        id: &str,
        whole_sha256: Option<&str>,
    ) -> Result<Begin, UploadError> {
        let mut map = self.lock();
        self.expire_locked(&mut map, SystemTime::now());
        let s = Self::get(&mut map, owner, id)?;
        if s.status == Status::Completed {
            return Ok(Begin::Done(s.info(&self.limits)));
        }
        s.check_open()?;
        if let Some(h) = whole_sha256 {
            if !valid_sha256(h) {
                return Err(UploadError::Invalid(format!(
                    "whole_checksum_sha256 {h:?} is not 64 lowercase hex digits"
                )));
            }
            if let Some(k) = &s.req.whole_sha256
                && k != h
            {
                return Err(UploadError::WholeChecksum {
                    id: id.to_string(),
                    expected: k.clone(),
                    actual: h.to_string(),
                });
            }
        }
        let missing: Vec<u32> = (0..s.part_count())
            .filter(|&n| s.parts[n as usize].is_none())
            .collect();
        if let Some(&first) = missing.first() {
            return Err(UploadError::MissingParts {
                id: id.to_string(),
                count: missing.len() as u32,
                total: s.part_count(),
                first,
            });
        }
        s.status = Status::Completing;
        s.updated_at = SystemTime::now();
        let dir = self.dir(id);
        Ok(Begin::Publish(Job {
            owner: owner.clone(),
            id: id.to_string(),
            kind: s.req.kind,
            target: s.target.clone(),
            user: s.req.user.clone(),
            conflict: s.req.conflict,
            expected_sha256: whole_sha256
                .map(str::to_string)
                .or_else(|| s.req.whole_sha256.clone()),
            parts: s
                .parts
                .iter()
                .enumerate()
                .map(|(n, p)| (spool::part_path(&dir, n as u32), p.map_or(0, |p| p.size)))
                .collect(),
        }))
    }

    /// Records how publishing `job` ended. Success and failures that
    /// retrying cannot fix end the session and remove its spool; others
    /// leave it staged for another complete.
    pub fn finish(
        &self,
        job: &Job,
        result: &Result<Published, UploadError>,
    ) -> Result<Info, UploadError> {
        let mut map = self.lock();
        let s = Self::get(&mut map, &job.owner, &job.id)?;
        s.updated_at = SystemTime::now();
        let terminal = match result {
            Ok(p) => {
                s.status = Status::Completed;
                s.published = Some(*p);
                true
            }
            Err(e) if e.retryable() => {
                s.status = Status::Staged;
                false
            }
            Err(e) => {
                s.status = Status::Failed;
                s.failure = Some(e.to_string());
                true
            }
        };
        let info = s.info(&self.limits);
        if terminal {
            let _ = std::fs::remove_dir_all(self.dir(&job.id));
        }
        Ok(info)
    }

    /// [`Uploads::begin_complete`], publishing into `guest` on a blocking
    /// thread, [`Uploads::finish`].
    pub async fn complete<G: GuestFiles + Send + 'static>(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        whole_sha256: Option<&str>,
        guest: G,
    ) -> Result<Info, UploadError> {
        let job = match self.begin_complete(owner, id, whole_sha256)? {
            Begin::Done(info) => return Ok(info),
            Begin::Publish(job) => job,
        };
        let j = job.clone();
        let result = tokio::task::spawn_blocking(move || publish::publish(&j, &guest))
            .await
            .unwrap_or_else(|e| {
                Err(UploadError::Guest {
                    op: "publish",
                    path: job.target.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        let info = self.finish(&job, &result)?;
        result.map(|_| info)
    }

    /// Spools a single-request upload of a file (a signed URL's `PUT`) of
    /// at most `max_upload_bytes`; publish the job, then
    /// [`Uploads::drop_direct`].
    pub async fn spool_direct<S, B, E>(
        &self,
        owner: &Owner,
        target: &str,
        user: Option<String>,
        body: S,
    ) -> Result<Job, UploadError>
    where
        S: futures_util::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let target = normalize_target(target, user.as_deref())?;
        // The size is unknown until the body ends: at least the reserve
        // must be there (the spool stops at max_upload_bytes).
        let pending = {
            let map = self.lock();
            map.values()
                .filter(|s| !s.status.is_terminal())
                .map(Session::bytes_due)
                .sum()
        };
        self.check_disk(0, pending)?;
        let id = new_id("put");
        let (staged, size) = spool::receive(
            &self.root,
            &id,
            0,
            self.limits.max_upload_bytes,
            false,
            body,
        )
        .await?;
        Ok(Job {
            owner: owner.clone(),
            kind: Kind::File,
            target,
            user,
            conflict: Conflict::Merge,
            expected_sha256: None,
            parts: vec![(staged.keep(), size)],
            id,
        })
    }

    /// Removes what [`Uploads::spool_direct`] spooled.
    pub fn drop_direct(&self, job: &Job) {
        for (p, _) in &job.parts {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Aborts an open session (its spool goes).
    pub fn abort(&self, owner: &Owner, id: &str) -> Result<(), UploadError> {
        let mut map = self.lock();
        let s = Self::get(&mut map, owner, id)?;
        if s.status == Status::Completing {
            return Err(UploadError::Completing { id: id.to_string() });
        }
        if !s.status.is_terminal() {
            s.status = Status::Aborted;
            s.updated_at = SystemTime::now();
        }
        let _ = std::fs::remove_dir_all(self.dir(id));
        Ok(())
    }

    /// Expires what is due, drops old finished records; the sessions of a
    /// machine that went away with [`Uploads::forget_machine`].
    pub fn sweep(&self) {
        let mut map = self.lock();
        self.expire_locked(&mut map, SystemTime::now());
    }

    /// Ends every session of `owner`'s machine (destroyed).
    pub fn forget_machine(&self, owner: &Owner) {
        let mut map = self.lock();
        let ids: Vec<String> = map
            .values()
            .filter(|s| &s.req.owner == owner && s.status != Status::Completing)
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            map.remove(&id);
            let _ = std::fs::remove_dir_all(self.dir(&id));
        }
    }

    fn expire_locked(&self, map: &mut HashMap<String, Session>, now: SystemTime) {
        let mut gone = Vec::new();
        for s in map.values_mut() {
            if !s.status.is_terminal() && s.status != Status::Completing && now >= s.expires_at {
                s.status = Status::Expired;
                s.updated_at = now;
                let _ = std::fs::remove_dir_all(self.dir(&s.id));
            }
            if s.status.is_terminal() && now >= s.updated_at + self.limits.keep_finished {
                gone.push(s.id.clone());
            }
        }
        for id in gone {
            map.remove(&id);
        }
    }
}

/// `<prefix>_<32 hex digits>`.
fn new_id(prefix: &str) -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}_{}", lower_hex(&b))
}

/// A part number as the URL spells it: decimal, no sign, no leading zero.
fn parse_part(s: &str) -> Option<u32> {
    nullspace_model::upload::rules::parse_part(s)
}

#[cfg(test)]
mod tests;
