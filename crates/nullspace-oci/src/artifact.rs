//! A set of files as an OCI 1.1 artifact in a registry.
//!
//! This module knows nothing of templates or VMs: the caller passes the
//! files (plain names in one directory, with their sizes and sha256s), an
//! artifact type and a JSON payload.
//!
//! The format:
//! - a manifest `application/vnd.oci.image.manifest.v1+json` with
//!   `artifactType` and the caller's annotations;
//! - a config ([`CONFIG_MEDIA_TYPE`]) holding `{"format":1,"files":[…],
//!   "payload":…}`; each file lists its chunks (`offset`, `length`, the
//!   manifest `layer` holding it) and the offsets of its all-zero chunks;
//! - one layer per chunk that is not all zeros ([`CHUNK_MEDIA_TYPE`]: one
//!   zstd stream, level 3), annotated with `dev.nullspace.file`,
//!   `dev.nullspace.offset`, `dev.nullspace.length` and
//!   `dev.nullspace.uncompressed.digest`.
//!
//! Files are cut in chunks of [`CHUNK_SIZE`]. Whether a chunk is zero is
//! decided by its content, never by allocation, so a sparse and a dense
//! copy of a file give the same artifact; holes are not read
//! ([`nullspace_digest::sparse`]). The same files and payload give the
//! same manifest digest: no timestamps, sorted maps.
//!
//! A pull trusts nothing it fetches: the manifest (by digest when named by
//! digest), the config and every chunk are verified, the config is checked
//! for hostile names and sizes and for chunks that do not tile their file,
//! a chunk may not decompress to more than its length, and the files are
//! assembled in `INTO.partial` and renamed into place only when every
//! file's sha256 matches.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use crate::auth::{self, Credentials};
use crate::digest::{Algorithm, Digest, Hasher};
use nullspace_digest::sparse;

/// The chunk size of a pushed file.
pub const CHUNK_SIZE: u64 = 64 << 20;
/// The largest chunk a pull accepts (the memory one chunk may take).
pub const MAX_CHUNK_SIZE: u64 = 256 << 20;
/// The most files an artifact may hold.
pub const MAX_FILES: usize = 64;
/// The largest file an artifact may hold.
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// The largest config or manifest a pull accepts.
pub const MAX_DOCUMENT_SIZE: u64 = 16 << 20;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.nullspace.artifact.config.v1+json";
pub const CHUNK_MEDIA_TYPE: &str = "application/vnd.nullspace.chunk.v1+zstd";
pub const ANNOTATION_FILE: &str = "dev.nullspace.file";
pub const ANNOTATION_OFFSET: &str = "dev.nullspace.offset";
pub const ANNOTATION_LENGTH: &str = "dev.nullspace.length";
pub const ANNOTATION_UNCOMPRESSED: &str = "dev.nullspace.uncompressed.digest";

const FORMAT: u32 = 1;
const ZSTD_LEVEL: i32 = 3;
/// Chunks read and compressed ahead of the upload (bounded memory).
const PUSH_QUEUE: usize = 2;
/// Chunks fetched ahead of the one being written.
const PULL_AHEAD: usize = 2;

/// A file of the artifact: a plain name, its size and the sha256
/// (lowercase hex) of its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy)]
pub struct PushSpec<'a> {
    /// Files are `dir/name`.
    pub dir: &'a Path,
    /// The caller's own checksums; push verifies them while reading.
    pub files: &'a [FileSpec],
    /// E.g. `application/vnd.nullspace.template.v1`.
    pub artifact_type: &'a str,
    /// The caller's document, stored in the config.
    pub payload: &'a serde_json::Value,
    /// Manifest annotations.
    pub annotations: &'a BTreeMap<String, String>,
}

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Else the Docker client config's, else anonymous.
    pub credentials: Option<Credentials>,
    /// Registries (host[:port]) reached over plain HTTP besides loopback.
    pub insecure_registries: Vec<String>,
    /// Bound on a TCP connect.
    pub connect_timeout: Duration,
    /// Bound on each wait for bytes from the registry.
    pub read_timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: None,
            insecure_registries: vec![],
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pushed {
    /// `host/repo@sha256:…`.
    pub reference: String,
    /// The manifest's digest.
    pub digest: Digest,
    /// Compressed bytes of the chunk layers.
    pub stored_bytes: u64,
    /// Stored chunks (layers).
    pub chunks: usize,
    /// Chunks not stored because all their bytes are zero.
    pub zero_chunks: usize,
    /// Blobs (chunks and config) this push uploaded: the registry lacked them.
    pub uploaded_blobs: usize,
    /// Bytes this push uploaded.
    pub uploaded_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Pulled {
    /// The manifest's digest.
    pub digest: Digest,
    pub payload: serde_json::Value,
    pub files: Vec<FileSpec>,
    /// Bytes fetched (manifest, config, chunks).
    pub fetched_bytes: u64,
}

/// Why a push, pull or inspect failed; each message is one line naming
/// the artifact, the object and the rule.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Connect refused or timed out, or the registry stopped answering: a
    /// caller may retry later (a server answers 503).
    #[error("artifact {reference}: registry {registry} is unreachable: {detail}")]
    Unreachable {
        reference: String,
        registry: String,
        detail: String,
    },
    #[error("artifact {reference}: authentication failed: {detail}")]
    Auth { reference: String, detail: String },
    #[error("artifact {reference}: not found: {detail}")]
    NotFound { reference: String, detail: String },
    #[error("artifact {reference}: registry error: {detail}")]
    Registry { reference: String, detail: String },
    /// The reference or the push spec is not usable.
    #[error("artifact {reference}: {detail}")]
    Usage { reference: String, detail: String },
    /// A document or chunk broke a rule of the format or did not verify.
    #[error("artifact {reference}: {object}: {rule}")]
    Invalid {
        reference: String,
        object: String,
        rule: String,
    },
    /// A local file.
    #[error("artifact {reference}: {path}: {source}")]
    Io {
        reference: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("artifact {reference}: {path} already exists; pull into a new directory")]
    Exists { reference: String, path: PathBuf },
    #[error("artifact {reference}: cancelled")]
    Cancelled { reference: String },
}

impl ArtifactError {
    fn invalid(r: &str, object: impl Into<String>, rule: impl Into<String>) -> ArtifactError {
        ArtifactError::Invalid {
            reference: r.to_string(),
            object: object.into(),
            rule: one_line(rule.into()),
        }
    }
    fn io(r: &str, path: &Path) -> impl FnOnce(io::Error) -> ArtifactError {
        let (r, path) = (r.to_string(), path.to_path_buf());
        move |source| ArtifactError::Io {
            reference: r,
            path,
            source,
        }
    }
}

fn one_line(s: String) -> String {
    s.replace(['\n', '\r'], " ")
}

// ---------------------------------------------------------------- format

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkEntry {
    offset: u64,
    length: u64,
    layer: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    size: u64,
    sha256: String,
    chunk_size: u64,
    chunks: Vec<ChunkEntry>,
    zero_chunks: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    format: u32,
    files: Vec<FileEntry>,
    payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Desc {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: String,
    #[serde(default)]
    artifact_type: String,
    config: Desc,
    layers: Vec<Desc>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// `v` with every object's keys in sorted order, whatever map type
/// serde_json was built with.
fn canonical(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            Value::Object(
                sorted
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// A plain file name: no separator, not `.` or `..`, no NUL, not empty,
/// at most 255 bytes.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("file name {name:?} is not a plain file name"));
    }
    if name.contains('/') || name.contains('\0') || name.contains('\\') {
        return Err(format!(
            "file name {name:?} is not a plain file name (no '/', '\\' or NUL)"
        ));
    }
    if name.len() > 255 {
        return Err(format!("file name {name:?} is longer than 255 bytes"));
    }
    Ok(())
}

fn check_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn annotation<'a>(d: &'a Desc, key: &str) -> Option<&'a str> {
    d.annotations.get(key).map(String::as_str)
}

/// Checks a pulled config against its manifest: the rules a hostile
/// registry could break. `Err((object, rule))`.
fn validate(config: &Config, manifest: &Manifest) -> Result<(), (String, String)> {
    let cfg = || "config".to_string();
    if config.format != FORMAT {
        return Err((
            cfg(),
            format!("format {} is not supported (only {FORMAT})", config.format),
        ));
    }
    if config.files.len() > MAX_FILES {
        return Err((
            cfg(),
            format!(
                "{} files is more than the {MAX_FILES} allowed",
                config.files.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    let mut used = vec![false; manifest.layers.len()];
    for f in &config.files {
        check_name(&f.name).map_err(|e| (cfg(), e))?;
        let obj = || format!("file {}", f.name);
        if !names.insert(f.name.as_str()) {
            return Err((obj(), "is listed twice".into()));
        }
        if f.size > MAX_FILE_SIZE {
            return Err((
                obj(),
                format!("size {} is over the limit of {MAX_FILE_SIZE}", f.size),
            ));
        }
        if !check_sha256_hex(&f.sha256) {
            return Err((obj(), "sha256 is not 64 lowercase hex characters".into()));
        }
        if f.chunk_size == 0 || f.chunk_size > MAX_CHUNK_SIZE {
            return Err((
                obj(),
                format!(
                    "chunk size {} is not within 1..={MAX_CHUNK_SIZE}",
                    f.chunk_size
                ),
            ));
        }
        // The chunks and zero chunks must tile the file exactly: chunk i
        // at i * chunk_size, of min(chunk_size, size - offset) bytes.
        let count = f.size.div_ceil(f.chunk_size);
        let listed = (f.chunks.len() + f.zero_chunks.len()) as u64;
        if listed != count {
            return Err((
                obj(),
                format!(
                    "{listed} chunks listed, {count} needed to tile {} bytes in chunks of {}",
                    f.size, f.chunk_size
                ),
            ));
        }
        let mut offsets: Vec<u64> = f
            .chunks
            .iter()
            .map(|c| c.offset)
            .chain(f.zero_chunks.iter().copied())
            .collect();
        offsets.sort_unstable();
        for (i, off) in offsets.into_iter().enumerate() {
            let want = i as u64 * f.chunk_size;
            if off != want {
                let rule = if off < want {
                    format!("chunks overlap at offset {off}")
                } else {
                    format!("no chunk covers offset {want}")
                };
                return Err((obj(), rule));
            }
        }
        for c in &f.chunks {
            let (off, i) = (c.offset, c.offset / f.chunk_size);
            let len = f.chunk_size.min(f.size - off);
            let cobj = || format!("chunk {i} of {}", f.name);
            if c.length != len {
                return Err((
                    cobj(),
                    format!("length {} is not {len} (offset {off})", c.length),
                ));
            }
            let Some(d) = manifest.layers.get(c.layer) else {
                return Err((
                    cobj(),
                    format!(
                        "layer {} is not in the manifest ({} layers)",
                        c.layer,
                        manifest.layers.len()
                    ),
                ));
            };
            if std::mem::replace(&mut used[c.layer], true) {
                return Err((cobj(), format!("layer {} is used twice", c.layer)));
            }
            if d.media_type != CHUNK_MEDIA_TYPE {
                return Err((
                    cobj(),
                    format!("media type {:?} is not {CHUNK_MEDIA_TYPE}", d.media_type),
                ));
            }
            let off_s = off.to_string();
            let len_s = len.to_string();
            if annotation(d, ANNOTATION_FILE) != Some(f.name.as_str())
                || annotation(d, ANNOTATION_OFFSET) != Some(off_s.as_str())
                || annotation(d, ANNOTATION_LENGTH) != Some(len_s.as_str())
            {
                return Err((
                    cobj(),
                    format!("layer {} annotations do not name this chunk", c.layer),
                ));
            }
            match annotation(d, ANNOTATION_UNCOMPRESSED).map(Digest::parse) {
                Some(Ok(u)) if u.algorithm() == Algorithm::Sha256 => {}
                _ => {
                    return Err((
                        cobj(),
                        format!("layer {} has no valid {ANNOTATION_UNCOMPRESSED}", c.layer),
                    ));
                }
            }
            if Digest::parse(&d.digest).is_err() {
                return Err((cobj(), format!("layer digest {:?} is malformed", d.digest)));
            }
            // A zstd stream of `len` bytes is never much larger.
            if d.size > len + len / 64 + (1 << 17) {
                return Err((
                    cobj(),
                    format!("compressed size {} is too large for {len} bytes", d.size),
                ));
            }
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err((
            format!("layer {i}"),
            "is not a chunk of any file in the config".into(),
        ));
    }
    Ok(())
}

// -------------------------------------------------------------- registry

/// A reference as the registry client takes it.
fn parse_reference(s: &str) -> Result<Reference, ArtifactError> {
    s.parse::<Reference>().map_err(|e| ArtifactError::Usage {
        reference: s.to_string(),
        detail: one_line(format!(
            "not a reference host[:port]/repo[:tag|@digest]: {e}"
        )),
    })
}

struct Session {
    client: Client,
    reference: Reference,
    /// As the caller named it, for messages.
    name: String,
    /// Always `Some` until drop (see `Drop`).
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Dropped perhaps inside someone else's async runtime (the server),
        // where a blocking shutdown would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Is `e` (or anything it wraps) a failure to reach the registry?
fn is_unreachable(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // A body that broke off mid-transfer counts: the registry died or
        // stopped answering.
        if let Some(r) = err.downcast_ref::<reqwest::Error>()
            && (r.is_connect() || r.is_timeout() || r.is_body())
        {
            return true;
        }
        // `io::Error::source` skips the error it wraps: look at it.
        if let Some(inner) = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref())
            && is_unreachable(inner)
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Session {
    fn new(
        name: &str,
        reference: Reference,
        opts: &RegistryOptions,
    ) -> Result<Session, ArtifactError> {
        let registry = reference.resolve_registry().to_string();
        let plain_http =
            auth::is_loopback(&registry) || opts.insecure_registries.contains(&registry);
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::HttpsExcept(vec![registry.clone()])
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(opts.connect_timeout),
            read_timeout: Some(opts.read_timeout),
            use_monolithic_push: true,
            ..Default::default()
        };
        let creds = opts
            .credentials
            .clone()
            .or_else(|| auth::from_docker_config(reference.registry()));
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| ArtifactError::Registry {
                reference: name.to_string(),
                detail: format!("starting the client runtime: {e}"),
            })?;
        let client = Client::new(config);
        rt.block_on(client.store_auth_if_needed(&registry, &auth));
        Ok(Session {
            client,
            reference,
            name: name.to_string(),
            rt: Some(rt),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    fn registry(&self) -> String {
        self.reference.resolve_registry().to_string()
    }

    /// The client's error as ours, by variant and status (never by text).
    fn map_err(&self, what: &str, e: oci_client::errors::OciDistributionError) -> ArtifactError {
        use oci_client::errors::OciDistributionError as E;
        use oci_client::errors::OciErrorCode as C;
        let reference = self.name.clone();
        let detail = one_line(format!("{what}: {e}"));
        // The client's request error is not its `source()`: look inside.
        let unreachable = match &e {
            E::RequestError(r) => r.is_connect() || r.is_timeout() || is_unreachable(r),
            other => is_unreachable(other),
        };
        if unreachable {
            return ArtifactError::Unreachable {
                reference,
                registry: self.registry(),
                detail,
            };
        }
        let auth = ArtifactError::Auth {
            reference: reference.clone(),
            detail: detail.clone(),
        };
        let not_found = ArtifactError::NotFound {
            reference: reference.clone(),
            detail: detail.clone(),
        };
        match &e {
            E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => auth,
            E::ServerError {
                code: 401 | 403, ..
            } => auth,
            E::ImageManifestNotFoundError(_) | E::ServerError { code: 404, .. } => not_found,
            E::RegistryError { envelope, .. } => {
                let codes: Vec<&C> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, C::Unauthorized | C::Denied))
                {
                    auth
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        C::ManifestUnknown | C::NameUnknown | C::NotFound | C::BlobUnknown
                    )
                }) {
                    not_found
                } else {
                    ArtifactError::Registry { reference, detail }
                }
            }
            E::RequestError(r) => match r.status().map(|s| s.as_u16()) {
                Some(401 | 403) => auth,
                Some(404) => not_found,
                Some(502..=504) => ArtifactError::Unreachable {
                    reference,
                    registry: self.registry(),
                    detail,
                },
                _ => ArtifactError::Registry { reference, detail },
            },
            E::ServerError {
                code: 502..=504, ..
            } => ArtifactError::Unreachable {
                reference,
                registry: self.registry(),
                detail,
            },
            _ => ArtifactError::Registry { reference, detail },
        }
    }

    fn blob_exists(&self, digest: &str) -> Result<bool, ArtifactError> {
        self.rt()
            .block_on(self.client.blob_exists(&self.reference, digest))
            .map_err(|e| self.map_err(&format!("HEAD blob {digest}"), e))
    }

    /// Uploads `data` unless the registry has it; whether it uploaded.
    fn put_blob(&self, data: bytes::Bytes, digest: &str) -> Result<bool, ArtifactError> {
        if self.blob_exists(digest)? {
            return Ok(false);
        }
        self.rt()
            .block_on(self.client.push_blob(&self.reference, data, digest))
            .map_err(|e| self.map_err(&format!("uploading blob {digest}"), e))?;
        Ok(true)
    }

    /// The manifest's bytes, verified against the reference's digest if
    /// it has one.
    fn get_manifest(&self) -> Result<(Vec<u8>, Digest), ArtifactError> {
        let (bytes, _) = self
            .rt()
            .block_on(self.client.pull_manifest_raw(
                &self.reference,
                &RegistryAuth::Anonymous,
                &[MANIFEST_MEDIA_TYPE],
            ))
            .map_err(|e| self.map_err("GET manifest", e))?;
        if bytes.len() as u64 > MAX_DOCUMENT_SIZE {
            return Err(ArtifactError::invalid(
                &self.name,
                "manifest",
                format!(
                    "{} bytes is over the limit of {MAX_DOCUMENT_SIZE}",
                    bytes.len()
                ),
            ));
        }
        let digest = Digest::sha256_of(&bytes);
        if let Some(want) = self.reference.digest()
            && want != digest.to_string()
        {
            return Err(ArtifactError::invalid(
                &self.name,
                "manifest",
                format!("digest {digest} does not match the reference's {want}"),
            ));
        }
        Ok((bytes.to_vec(), digest))
    }

    /// A blob of at most `size` bytes, verified against `digest`. `object`
    /// names it in errors.
    fn get_blob(&self, digest: &str, size: u64, object: &str) -> Result<Vec<u8>, ArtifactError> {
        let want = Digest::parse(digest)
            .map_err(|e| ArtifactError::invalid(&self.name, object, e.to_string()))?;
        let out: Result<Vec<u8>, ArtifactError> = self.rt().block_on(async {
            let stream = self
                .client
                .pull_blob_stream(&self.reference, digest)
                .await
                .map_err(|e| self.map_err(&format!("GET {object}"), e))?;
            let mut stream = stream.stream;
            let mut buf = Vec::with_capacity(size.min(MAX_CHUNK_SIZE) as usize);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(b) => {
                        if (buf.len() + b.len()) as u64 > size {
                            return Err(ArtifactError::invalid(
                                &self.name,
                                object,
                                format!(
                                    "blob {digest} is larger than its descriptor's {size} bytes"
                                ),
                            ));
                        }
                        buf.extend_from_slice(&b);
                    }
                    Err(e) => {
                        if e.get_ref()
                            .is_some_and(|i| i.is::<oci_client::errors::DigestError>())
                        {
                            // oci-client verifies too; report our rule below.
                            break;
                        }
                        if is_unreachable(&e) {
                            return Err(ArtifactError::Unreachable {
                                reference: self.name.clone(),
                                registry: self.registry(),
                                detail: one_line(format!("reading {object}: {e}")),
                            });
                        }
                        return Err(ArtifactError::Registry {
                            reference: self.name.clone(),
                            detail: one_line(format!("reading {object}: {e}")),
                        });
                    }
                }
            }
            Ok(buf)
        });
        let buf = out?;
        let got = Digest::sha256_of(&buf);
        if got != want || buf.len() as u64 != size {
            return Err(ArtifactError::invalid(
                &self.name,
                object,
                format!(
                    "digest {got} ({} bytes) does not match {want} ({size} bytes)",
                    buf.len()
                ),
            ));
        }
        Ok(buf)
    }
}

// ------------------------------------------------------------------ push

/// One compressed chunk on its way to the registry.
struct Upload {
    digest: String,
    data: bytes::Bytes,
}

/// Cuts files in chunks, compresses the ones that are not all zeros and
/// hands them to the uploader.
struct Chunker<'a> {
    dest: &'a str,
    chunk_size: u64,
    buf: Vec<u8>,
    layers: &'a mut Vec<Desc>,
    stored_bytes: &'a mut u64,
    zero_chunks: &'a mut usize,
    tx: std::sync::mpsc::SyncSender<Upload>,
}

impl Chunker<'_> {
    /// The config entry of `dir/f`, its content checked against `f`;
    /// `None` if the uploader stopped.
    fn file(&mut self, dir: &Path, f: &FileSpec) -> Result<Option<FileEntry>, ArtifactError> {
        let dest = self.dest;
        let path = dir.join(&f.name);
        let io = || ArtifactError::io(dest, &path);
        let file = File::open(&path).map_err(io())?;
        let len = file.metadata().map_err(io())?.len();
        if len != f.size {
            return Err(ArtifactError::invalid(
                dest,
                format!("file {}", f.name),
                format!("size {len} is not the {} given", f.size),
            ));
        }
        let extents = sparse::data_extents(&file, len).map_err(io())?;
        let mut whole = Hasher::new(Algorithm::Sha256);
        let mut entry = FileEntry {
            name: f.name.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
            chunk_size: self.chunk_size,
            chunks: vec![],
            zero_chunks: vec![],
        };
        let mut off = 0;
        while off < len {
            let n = self.chunk_size.min(len - off) as usize;
            let buf = &mut self.buf;
            buf.resize(n, 0);
            sparse::read_at_sparse(&file, &extents, off, buf).map_err(io())?;
            whole.update(buf);
            off += n as u64;
            if buf.iter().all(|&b| b == 0) {
                entry.zero_chunks.push(off - n as u64);
                *self.zero_chunks += 1;
                continue;
            }
            let z = zstd::bulk::compress(buf, ZSTD_LEVEL).map_err(io())?;
            let digest = Digest::sha256_of(&z).to_string();
            let start = off - n as u64;
            let annotations = BTreeMap::from([
                (ANNOTATION_FILE.to_string(), f.name.clone()),
                (ANNOTATION_OFFSET.to_string(), start.to_string()),
                (ANNOTATION_LENGTH.to_string(), n.to_string()),
                (
                    ANNOTATION_UNCOMPRESSED.to_string(),
                    Digest::sha256_of(buf).to_string(),
                ),
            ]);
            entry.chunks.push(ChunkEntry {
                offset: start,
                length: n as u64,
                layer: self.layers.len(),
            });
            *self.stored_bytes += z.len() as u64;
            self.layers.push(Desc {
                media_type: CHUNK_MEDIA_TYPE.to_string(),
                digest: digest.clone(),
                size: z.len() as u64,
                annotations,
            });
            let data = bytes::Bytes::from(z);
            if self.tx.send(Upload { digest, data }).is_err() {
                return Ok(None);
            }
        }
        let got = whole.finish();
        if got.hex() != f.sha256 {
            return Err(ArtifactError::invalid(
                dest,
                format!("file {}", f.name),
                format!("sha256 {} does not match the {} given", got.hex(), f.sha256),
            ));
        }
        Ok(Some(entry))
    }
}

/// Pushes the files of `spec` to `dest` (`host[:port]/repo:tag`; the tag
/// is required, the registry's garbage collection deletes untagged
/// manifests). Blobs the registry already has are not uploaded.
pub fn push(dest: &str, spec: &PushSpec, opts: &RegistryOptions) -> Result<Pushed, ArtifactError> {
    push_with_chunk_size(dest, spec, opts, CHUNK_SIZE)
}

/// [`push`] with another chunk size (tests use small ones).
#[doc(hidden)]
pub fn push_with_chunk_size(
    dest: &str,
    spec: &PushSpec,
    opts: &RegistryOptions,
    chunk_size: u64,
) -> Result<Pushed, ArtifactError> {
    let usage = |detail: String| ArtifactError::Usage {
        reference: dest.to_string(),
        detail,
    };
    let last = dest.rsplit('/').next().unwrap_or_default();
    if dest.contains('@') || !last.contains(':') || !dest.contains('/') {
        return Err(usage(
            "a push destination is host[:port]/repo:tag (a tag is required, a digest is not allowed)".into(),
        ));
    }
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
        return Err(usage(format!(
            "chunk size {chunk_size} is not within 1..={MAX_CHUNK_SIZE}"
        )));
    }
    if spec.files.len() > MAX_FILES {
        return Err(usage(format!(
            "{} files is more than the {MAX_FILES} allowed",
            spec.files.len()
        )));
    }
    let mut names = HashSet::new();
    for f in spec.files {
        check_name(&f.name).map_err(usage)?;
        if !names.insert(&f.name) {
            return Err(usage(format!("file {} is listed twice", f.name)));
        }
        if f.size > MAX_FILE_SIZE {
            return Err(usage(format!(
                "file {}: size {} is over the limit of {MAX_FILE_SIZE}",
                f.name, f.size
            )));
        }
        if !check_sha256_hex(&f.sha256) {
            return Err(usage(format!(
                "file {}: sha256 is not 64 lowercase hex characters",
                f.name
            )));
        }
    }
    let reference = parse_reference(dest)?;
    let session = Session::new(dest, reference, opts)?;

    let mut files = Vec::new();
    let mut layers = Vec::new();
    let mut uploaded_blobs = 0usize;
    let mut uploaded_bytes = 0u64;
    let mut zero_chunks = 0usize;
    let mut stored_bytes = 0u64;
    // Reading and compressing here, uploading on another thread, at most
    // PUSH_QUEUE chunks between them.
    std::thread::scope(|scope| -> Result<(), ArtifactError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Upload>(PUSH_QUEUE);
        let session = &session;
        let uploader = scope.spawn(move || -> Result<(usize, u64), ArtifactError> {
            let mut seen = HashSet::new();
            let (mut n, mut bytes) = (0, 0);
            for u in rx {
                if !seen.insert(u.digest.clone()) {
                    continue;
                }
                let len = u.data.len() as u64;
                if session.put_blob(u.data, &u.digest)? {
                    n += 1;
                    bytes += len;
                }
            }
            Ok((n, bytes))
        });
        let mut chunker = Chunker {
            dest,
            chunk_size,
            buf: Vec::new(),
            layers: &mut layers,
            stored_bytes: &mut stored_bytes,
            zero_chunks: &mut zero_chunks,
            tx,
        };
        let produced = (|| -> Result<(), ArtifactError> {
            for f in spec.files {
                match chunker.file(spec.dir, f)? {
                    Some(entry) => files.push(entry),
                    // The uploader stopped; its error is reported.
                    None => break,
                }
            }
            Ok(())
        })();
        drop(chunker);
        let up = uploader.join().expect("uploader thread");
        produced?;
        let (n, bytes) = up?;
        uploaded_blobs = n;
        uploaded_bytes = bytes;
        Ok(())
    })?;

    let config = Config {
        format: FORMAT,
        files,
        payload: canonical(spec.payload),
    };
    let config_bytes = serde_json::to_vec(&config).expect("a config serialises");
    let config_digest = Digest::sha256_of(&config_bytes).to_string();
    let config_len = config_bytes.len() as u64;
    if session.put_blob(bytes::Bytes::from(config_bytes), &config_digest)? {
        uploaded_blobs += 1;
        uploaded_bytes += config_len;
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.to_string(),
        artifact_type: spec.artifact_type.to_string(),
        config: Desc {
            media_type: CONFIG_MEDIA_TYPE.to_string(),
            digest: config_digest,
            size: config_len,
            annotations: BTreeMap::new(),
        },
        layers,
        annotations: spec.annotations.clone(),
    };
    let chunks = manifest.layers.len();
    let body = serde_json::to_vec(&manifest).expect("a manifest serialises");
    let digest = Digest::sha256_of(&body);
    session
        .rt()
        .block_on(session.client.push_manifest_raw(
            &session.reference,
            body,
            MANIFEST_MEDIA_TYPE.parse().expect("a valid header value"),
        ))
        .map_err(|e| session.map_err("PUT manifest", e))?;
    Ok(Pushed {
        reference: format!(
            "{}/{}@{digest}",
            session.reference.registry(),
            session.reference.repository()
        ),
        digest,
        stored_bytes,
        chunks,
        zero_chunks,
        uploaded_blobs,
        uploaded_bytes,
    })
}

// ------------------------------------------------------------------ pull

/// Fetches and checks the manifest and config of `src`.
fn fetch_documents(
    session: &Session,
    expect_type: Option<&str>,
) -> Result<(Digest, Manifest, Config, u64), ArtifactError> {
    let name = &session.name;
    let (bytes, digest) = session.get_manifest()?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| ArtifactError::invalid(name, format!("manifest {digest}"), e.to_string()))?;
    let mobj = || format!("manifest {digest}");
    if manifest.schema_version != 2 || manifest.media_type != MANIFEST_MEDIA_TYPE {
        return Err(ArtifactError::invalid(
            name,
            mobj(),
            format!(
                "is not an image manifest v1 (mediaType {:?})",
                manifest.media_type
            ),
        ));
    }
    if let Some(t) = expect_type
        && manifest.artifact_type != t
    {
        return Err(ArtifactError::invalid(
            name,
            mobj(),
            format!(
                "artifactType {:?} is not the expected {t:?}",
                manifest.artifact_type
            ),
        ));
    }
    if manifest.config.media_type != CONFIG_MEDIA_TYPE {
        return Err(ArtifactError::invalid(
            name,
            mobj(),
            format!(
                "config media type {:?} is not {CONFIG_MEDIA_TYPE}",
                manifest.config.media_type
            ),
        ));
    }
    if manifest.config.size > MAX_DOCUMENT_SIZE {
        return Err(ArtifactError::invalid(
            name,
            "config",
            format!(
                "{} bytes is over the limit of {MAX_DOCUMENT_SIZE}",
                manifest.config.size
            ),
        ));
    }
    let cbytes = session.get_blob(&manifest.config.digest, manifest.config.size, "config")?;
    let config: Config = serde_json::from_slice(&cbytes)
        .map_err(|e| ArtifactError::invalid(name, "config", e.to_string()))?;
    validate(&config, &manifest).map_err(|(o, r)| ArtifactError::invalid(name, o, r))?;
    let fetched = (bytes.len() + cbytes.len()) as u64;
    Ok((digest, manifest, config, fetched))
}

/// The manifest digest and payload of `src`, reading only the manifest
/// and the config.
pub fn inspect(
    src: &str,
    opts: &RegistryOptions,
) -> Result<(Digest, serde_json::Value), ArtifactError> {
    let session = Session::new(src, parse_reference(src)?, opts)?;
    let (digest, _, config, _) = fetch_documents(&session, None)?;
    Ok((digest, config.payload))
}

/// Pulls `src` (`host/repo:tag` or `host/repo@sha256:…`) into the new
/// directory `into`, verifying everything; `cancel` is polled between
/// chunks. Files are assembled in `INTO.partial` (a stale one is removed
/// first), which is renamed to `into` once complete, and removed on any
/// failure.
pub fn pull(
    src: &str,
    into: &Path,
    opts: &RegistryOptions,
    expect_type: &str,
    cancel: &dyn Fn() -> bool,
) -> Result<Pulled, ArtifactError> {
    if into.symlink_metadata().is_ok() {
        return Err(ArtifactError::Exists {
            reference: src.to_string(),
            path: into.to_path_buf(),
        });
    }
    let mut staging = into.as_os_str().to_owned();
    staging.push(".partial");
    let staging = PathBuf::from(staging);
    if staging.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&staging).map_err(ArtifactError::io(src, &staging))?;
    }
    let session = Session::new(src, parse_reference(src)?, opts)?;
    std::fs::create_dir(&staging).map_err(ArtifactError::io(src, &staging))?;
    let out = pull_into(&session, &staging, into, expect_type, cancel);
    if out.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    out
}

fn pull_into(
    session: &Session,
    staging: &Path,
    into: &Path,
    expect_type: &str,
    cancel: &dyn Fn() -> bool,
) -> Result<Pulled, ArtifactError> {
    let name = session.name.as_str();
    let (digest, manifest, config, mut fetched_bytes) =
        fetch_documents(session, Some(expect_type))?;
    // Chunks are fetched (and their compressed digest verified) on
    // another thread, at most PULL_AHEAD ahead of the one being written.
    let layers = &manifest.layers;
    let jobs: Vec<(String, &Desc)> = config
        .files
        .iter()
        .flat_map(|f| {
            f.chunks.iter().map(move |c| {
                let obj = format!("chunk {} of {}", c.offset / f.chunk_size, f.name);
                (obj, &layers[c.layer])
            })
        })
        .collect();
    std::thread::scope(|scope| -> Result<(), ArtifactError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(PULL_AHEAD);
        scope.spawn(move || {
            for (obj, d) in jobs {
                let r = session.get_blob(&d.digest, d.size, &obj);
                let failed = r.is_err();
                // The receiver is gone when the pull failed or was cancelled.
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let out = assemble(session, staging, &config, &manifest, cancel, &rx);
        drop(rx);
        fetched_bytes += out?;
        Ok(())
    })?;
    fsync_dir(staging).map_err(ArtifactError::io(name, staging))?;
    if into.symlink_metadata().is_ok() {
        return Err(ArtifactError::Exists {
            reference: name.to_string(),
            path: into.to_path_buf(),
        });
    }
    std::fs::rename(staging, into).map_err(ArtifactError::io(name, into))?;
    if let Some(parent) = into.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        fsync_dir(parent).map_err(ArtifactError::io(name, parent))?;
    }
    Ok(Pulled {
        digest,
        payload: config.payload,
        files: config
            .files
            .iter()
            .map(|f| FileSpec {
                name: f.name.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
            })
            .collect(),
        fetched_bytes,
    })
}

/// Writes the files of `config` in `staging` from the chunks received on
/// `rx` (in config order), and checks each file's sha256; the bytes
/// fetched.
fn assemble(
    session: &Session,
    staging: &Path,
    config: &Config,
    manifest: &Manifest,
    cancel: &dyn Fn() -> bool,
    rx: &std::sync::mpsc::Receiver<Result<Vec<u8>, ArtifactError>>,
) -> Result<u64, ArtifactError> {
    let name = session.name.as_str();
    let cancelled = || ArtifactError::Cancelled {
        reference: name.to_string(),
    };
    let mut fetched = 0;
    for f in &config.files {
        let path = staging.join(&f.name);
        let io = || ArtifactError::io(name, &path);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io())?;
        for c in &f.chunks {
            if cancel() {
                return Err(cancelled());
            }
            let obj = format!("chunk {} of {}", c.offset / f.chunk_size, f.name);
            let d = &manifest.layers[c.layer];
            let z = rx.recv().map_err(|_| ArtifactError::Registry {
                reference: name.to_string(),
                detail: format!("{obj}: the fetching thread stopped"),
            })??;
            fetched += z.len() as u64;
            let data = decompress_bounded(&z, c.length)
                .map_err(|rule| ArtifactError::invalid(name, &obj, rule))?;
            drop(z);
            let want = annotation(d, ANNOTATION_UNCOMPRESSED).unwrap_or_default();
            let got = Digest::sha256_of(&data);
            if got.to_string() != want {
                return Err(ArtifactError::invalid(
                    name,
                    &obj,
                    format!("uncompressed digest {got} does not match {want}"),
                ));
            }
            write_sparse(&file, c.offset, &data).map_err(io())?;
        }
        if cancel() {
            return Err(cancelled());
        }
        file.set_len(f.size).map_err(io())?;
        file.sync_all().map_err(io())?;
        drop(file);
        let got = sparse::sha256_file(&path).map_err(io())?;
        if got != f.sha256 {
            return Err(ArtifactError::invalid(
                name,
                format!("file {}", f.name),
                format!("sha256 {got} does not match the config's {}", f.sha256),
            ));
        }
    }
    Ok(fetched)
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Decompresses one zstd chunk that must give exactly `length` bytes:
/// more is refused as soon as it shows (a zstd bomb must not fill memory
/// or disk).
fn decompress_bounded(z: &[u8], length: u64) -> Result<Vec<u8>, String> {
    let mut dec = zstd::stream::read::Decoder::with_buffer(z)
        .map_err(|e| format!("zstd: {e}"))?
        .single_frame()
        .take(length + 1);
    let mut out = Vec::with_capacity(length as usize);
    dec.read_to_end(&mut out)
        .map_err(|e| one_line(format!("zstd: {e}")))?;
    if out.len() as u64 != length {
        return Err(format!(
            "decompresses to {}{} bytes, not its length {length}",
            if out.len() as u64 > length {
                "more than "
            } else {
                ""
            },
            out.len().min(length as usize)
        ));
    }
    Ok(out)
}

/// Writes `data` at `off`, skipping 4 KiB blocks of zeros so they stay
/// holes in a file that was extended with `set_len`.
fn write_sparse(f: &File, off: u64, data: &[u8]) -> io::Result<()> {
    const BLOCK: usize = 4096;
    let mut i = 0;
    while i < data.len() {
        // Skip zero blocks.
        let end = (i + BLOCK).min(data.len());
        if data[i..end].iter().all(|&b| b == 0) {
            i = end;
            continue;
        }
        // A run of non-zero blocks.
        let start = i;
        let mut j = end;
        while j < data.len() {
            let e = (j + BLOCK).min(data.len());
            if data[j..e].iter().all(|&b| b == 0) {
                break;
            }
            j = e;
        }
        f.write_all_at(&data[start..j], off + start as u64)?;
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of 3 chunks of 16 bytes (the last 4 bytes) with chunk 1 zero.
    fn good() -> (Config, Manifest) {
        let layer = |off: u64, len: u64| Desc {
            media_type: CHUNK_MEDIA_TYPE.into(),
            digest: Digest::sha256_of(&off.to_be_bytes()).to_string(),
            size: 10,
            annotations: BTreeMap::from([
                (ANNOTATION_FILE.into(), "f".into()),
                (ANNOTATION_OFFSET.into(), off.to_string()),
                (ANNOTATION_LENGTH.into(), len.to_string()),
                (
                    ANNOTATION_UNCOMPRESSED.into(),
                    Digest::sha256_of(b"x").to_string(),
                ),
            ]),
        };
        let config = Config {
            format: 1,
            files: vec![FileEntry {
                name: "f".into(),
                size: 36,
                sha256: "a".repeat(64),
                chunk_size: 16,
                chunks: vec![
                    ChunkEntry {
                        offset: 0,
                        length: 16,
                        layer: 0,
                    },
                    ChunkEntry {
                        offset: 32,
                        length: 4,
                        layer: 1,
                    },
                ],
                zero_chunks: vec![16],
            }],
            payload: serde_json::json!({}),
        };
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.into(),
            artifact_type: "t".into(),
            config: Desc {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: Digest::sha256_of(b"c").to_string(),
                size: 1,
                annotations: BTreeMap::new(),
            },
            layers: vec![layer(0, 16), layer(32, 4)],
            annotations: BTreeMap::new(),
        };
        (config, manifest)
    }

    fn refused(f: impl Fn(&mut Config, &mut Manifest)) -> String {
        let (mut c, mut m) = good();
        f(&mut c, &mut m);
        let (o, r) = validate(&c, &m).expect_err("refused");
        format!("{o}: {r}")
    }

    #[test]
    fn a_good_config_passes() {
        let (c, m) = good();
        validate(&c, &m).unwrap();
    }

    #[test]
    fn hostile_configs_are_refused_with_the_rule() {
        type Mutation = Box<dyn Fn(&mut Config, &mut Manifest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "not a plain file name",
                Box::new(|c, _| c.files[0].name = "a/b".into()),
            ),
            (
                "not a plain file name",
                Box::new(|c, _| c.files[0].name = "..".into()),
            ),
            (
                "not a plain file name",
                Box::new(|c, _| c.files[0].name = String::new()),
            ),
            (
                "not a plain file name",
                Box::new(|c, _| c.files[0].name = "a\0".into()),
            ),
            (
                "listed twice",
                Box::new(|c, _| {
                    let f = c.files[0].clone();
                    c.files.push(f);
                }),
            ),
            (
                "more than the 64",
                Box::new(|c, _| {
                    for i in 0..64 {
                        let mut f = c.files[0].clone();
                        f.name = format!("g{i}");
                        c.files.push(f);
                    }
                }),
            ),
            (
                "over the limit",
                Box::new(|c, _| c.files[0].size = (1 << 40) + 1),
            ),
            (
                "sha256 is not",
                Box::new(|c, _| c.files[0].sha256 = "A".repeat(64)),
            ),
            ("chunk size 0", Box::new(|c, _| c.files[0].chunk_size = 0)),
            (
                "chunk size",
                Box::new(|c, _| c.files[0].chunk_size = MAX_CHUNK_SIZE + 1),
            ),
            (
                "chunks overlap at offset 0",
                Box::new(|c, _| c.files[0].zero_chunks = vec![0]),
            ),
            (
                "chunks overlap",
                Box::new(|c, _| c.files[0].chunks[1].offset = 16),
            ),
            (
                "no chunk covers offset 16",
                Box::new(|c, _| c.files[0].zero_chunks = vec![48]),
            ),
            (
                "chunks listed",
                Box::new(|c, _| c.files[0].zero_chunks.clear()),
            ),
            ("chunks listed", Box::new(|c, _| c.files[0].size = 100)),
            (
                "length 5 is not 4",
                Box::new(|c, _| c.files[0].chunks[1].length = 5),
            ),
            (
                "layer 7 is not in the manifest",
                Box::new(|c, _| c.files[0].chunks[1].layer = 7),
            ),
            (
                "layer 0 is used twice",
                Box::new(|c, _| c.files[0].chunks[1].layer = 0),
            ),
            (
                "annotations do not name",
                Box::new(|_, m| {
                    m.layers[1]
                        .annotations
                        .insert(ANNOTATION_FILE.into(), "g".into());
                }),
            ),
            (
                "annotations do not name",
                Box::new(|_, m| {
                    m.layers[0]
                        .annotations
                        .insert(ANNOTATION_OFFSET.into(), "016".into());
                }),
            ),
            (
                "no valid",
                Box::new(|_, m| {
                    m.layers[0].annotations.remove(ANNOTATION_UNCOMPRESSED);
                }),
            ),
            (
                "media type",
                Box::new(|_, m| m.layers[0].media_type = "x".into()),
            ),
            ("too large", Box::new(|_, m| m.layers[0].size = 1 << 20)),
            (
                "malformed",
                Box::new(|_, m| m.layers[0].digest = "sha256:zz".into()),
            ),
            (
                "layer 2: is not a chunk",
                Box::new(|_, m| {
                    let l = m.layers[0].clone();
                    m.layers.push(l);
                }),
            ),
            ("format 2", Box::new(|c, _| c.format = 2)),
        ];
        for (want, f) in cases {
            let msg = refused(f);
            assert!(msg.contains(want), "want {want:?}, got {msg:?}");
            assert!(!msg.contains('\n'));
        }
    }

    #[test]
    fn config_fields_are_strict() {
        let (c, _) = good();
        let mut v = serde_json::to_value(&c).unwrap();
        v["files"][0]["extra"] = 1.into();
        assert!(serde_json::from_value::<Config>(v).is_err());
    }

    #[test]
    fn decompression_is_bounded() {
        let data = vec![7u8; 1 << 20];
        let z = zstd::bulk::compress(&data, ZSTD_LEVEL).unwrap();
        assert!(z.len() < 1000, "compresses well");
        assert_eq!(decompress_bounded(&z, 1 << 20).unwrap(), data);
        // A bomb: far more than its length.
        let e = decompress_bounded(&z, 4096).unwrap_err();
        assert!(e.contains("more than 4096"), "{e}");
        let e = decompress_bounded(&z, (1 << 20) + 1).unwrap_err();
        assert!(e.contains("not its length"), "{e}");
        assert!(decompress_bounded(b"not zstd", 10).is_err());
    }

    #[test]
    fn payload_keys_are_sorted() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":0}}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&canonical(&v)).unwrap(),
            r#"{"a":{"c":0,"d":[{"y":2,"z":1}]},"b":1}"#
        );
    }

    #[test]
    fn sparse_writes_skip_zero_blocks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let f = File::create(&p).unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[5000] = 1;
        data[(1 << 20) - 1] = 2;
        write_sparse(&f, 4096, &data).unwrap();
        f.set_len((1 << 20) + 8192).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(&got[4096..4096 + (1 << 20)], &data[..]);
        use std::os::unix::fs::MetadataExt;
        assert!(f.metadata().unwrap().blocks() * 512 <= 64 << 10);
    }
}
