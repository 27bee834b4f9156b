//! The build context as a typed manifest: every entry's cleaned path, type,
//! mode and content identity, and [`ContextManifest::digest`], the one
//! digest of a context. Content is identified by its sha256 whether it
//! arrived inline (`content_base64`, validate/plan) or as an uploaded blob
//! (`blob_<sha256 hex>`, build), so a plan and the build of the same files
//! agree on the digest.

use base64::Engine as _;
use nullspace_digest::Digest;
use serde::Serialize;

use super::request::BuildContext;
use super::rules::{self, Mode};
use super::status::EntryType;

/// Where a file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    /// An uploaded blob; `sha256` when the id is the server's
    /// `blob_<sha256 hex>`.
    Blob {
        blob_id: String,
        sha256: Option<String>,
    },
    /// Bytes sent inline (validate/plan only; never persisted).
    Inline { sha256: String, size_bytes: u64 },
}

impl Content {
    /// What the digest covers: the sha256 when known, else the blob id.
    fn identity(&self) -> String {
        match self {
            Content::Blob {
                sha256: Some(h), ..
            }
            | Content::Inline { sha256: h, .. } => format!("sha256:{h}"),
            Content::Blob { blob_id, .. } => format!("blob:{blob_id}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContextEntry {
    /// Relative and cleaned ([`rules::context_path`]).
    pub path: String,
    pub entry_type: EntryType,
    pub mode: Mode,
    /// Files only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
}

/// The entries of a request's `build_context`, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContextManifest {
    pub entries: Vec<ContextEntry>,
    /// [`ContextManifest::compute_digest`] of the entries.
    pub digest: String,
}

/// One rule a context entry broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("build_context: {0}")]
    Path(rules::RuleError),
    #[error(
        "build_context: {path:?} entry_type {entry_type:?} is not file or dir (symlinks and special files are rejected)"
    )]
    EntryType { path: String, entry_type: String },
    #[error("build_context: {0:?} has neither blob_id nor content_base64 (run the blob preflight)")]
    NoContent(String),
    #[error("build_context: {path:?}: {message}")]
    Invalid { path: String, message: String },
}

impl ContextError {
    /// A missing upload is the SDK's `file_upload_error`; the rest are
    /// invalid requests.
    pub fn is_upload(&self) -> bool {
        matches!(self, ContextError::NoContent(_))
    }
}

impl ContextManifest {
    /// Reads and checks a request's context; every problem is returned.
    pub fn from_request(ctx: &BuildContext) -> Result<ContextManifest, Vec<ContextError>> {
        let mut entries = vec![];
        let mut errs = vec![];
        for f in &ctx.files {
            let path = match rules::context_path(&f.path) {
                Ok(p) => p,
                Err(e) => {
                    errs.push(ContextError::Path(e));
                    continue;
                }
            };
            let entry_type = match EntryType::parse(&f.entry_type) {
                Some(t) => t,
                None => {
                    errs.push(ContextError::EntryType {
                        path: f.path.clone(),
                        entry_type: f.entry_type.clone(),
                    });
                    continue;
                }
            };
            let mode = match f.mode.as_deref() {
                None => Mode::new(if entry_type == EntryType::Dir {
                    0o755
                } else {
                    0o644
                }),
                Some(m) => match Mode::parse(m) {
                    Ok(m) => m,
                    Err(e) => {
                        errs.push(ContextError::Invalid {
                            path: f.path.clone(),
                            message: format!("mode {e}"),
                        });
                        continue;
                    }
                },
            };
            let content = if entry_type == EntryType::Dir {
                None
            } else if let Some(id) = &f.blob_id {
                let sha256 = id
                    .strip_prefix("blob_")
                    .filter(|h| Digest::parse(&format!("sha256:{h}")).is_ok())
                    .map(str::to_string);
                Some(Content::Blob {
                    blob_id: id.clone(),
                    sha256,
                })
            } else if let Some(b64) = &f.content_base64 {
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(bytes) => Some(Content::Inline {
                        sha256: Digest::sha256_of(&bytes).hex().to_string(),
                        size_bytes: bytes.len() as u64,
                    }),
                    Err(e) => {
                        errs.push(ContextError::Invalid {
                            path: f.path.clone(),
                            message: format!("content_base64 is not base64: {e}"),
                        });
                        continue;
                    }
                }
            } else {
                errs.push(ContextError::NoContent(f.path.clone()));
                continue;
            };
            entries.push(ContextEntry {
                path,
                entry_type,
                mode,
                content,
            });
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let digest = ContextManifest::compute_digest(&entries);
        Ok(ContextManifest { entries, digest })
    }

    /// `sha256:` over the entries sorted by path: each `path`, type, mode
    /// and content identity. Order of the request does not matter (the SDK
    /// sends files in directory-walk order).
    pub fn compute_digest(entries: &[ContextEntry]) -> String {
        let mut lines: Vec<String> = entries
            .iter()
            .map(|e| {
                format!(
                    "{}\0{}\0{}\0{}",
                    e.path,
                    e.entry_type,
                    e.mode,
                    e.content
                        .as_ref()
                        .map(Content::identity)
                        .unwrap_or_default()
                )
            })
            .collect();
        lines.sort();
        Digest::sha256_of(lines.join("\n").as_bytes()).to_string()
    }

    /// Regular files (what the SDK calls `file_count`).
    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.entry_type == EntryType::File)
            .count()
    }

    /// `ctx_` and the first 12 hex digits of the digest.
    pub fn id(&self) -> String {
        let hex = self.digest.strip_prefix("sha256:").unwrap_or(&self.digest);
        format!("ctx_{}", &hex[..hex.len().min(12)])
    }

    /// Whether `path` (cleaned) is an entry or lies under a directory entry.
    pub fn covers(&self, path: &str) -> bool {
        self.entries.iter().any(|e| {
            e.path == path
                || (e.entry_type == EntryType::Dir
                    && path
                        .strip_prefix(e.path.as_str())
                        .is_some_and(|r| r.starts_with('/')))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::request::ContextFile;

    fn file(path: &str, blob: Option<&str>, inline: Option<&str>) -> ContextFile {
        ContextFile {
            path: path.into(),
            entry_type: "file".into(),
            mode: Some("0644".into()),
            blob_id: blob.map(str::to_string),
            content_base64: inline.map(str::to_string),
        }
    }

    #[test]
    fn inline_and_uploaded_bytes_have_one_digest() {
        // "hello\n": sha256 5891b5b5…
        let hex = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let dir = ContextFile {
            path: "src".into(),
            entry_type: "dir".into(),
            mode: Some("0755".into()),
            ..Default::default()
        };
        let inline = ContextManifest::from_request(&BuildContext {
            files: vec![dir.clone(), file("src/a.txt", None, Some("aGVsbG8K"))],
        })
        .unwrap();
        let uploaded = ContextManifest::from_request(&BuildContext {
            files: vec![file("./src/a.txt", Some(&format!("blob_{hex}")), None), dir],
        })
        .unwrap();
        assert_eq!(inline.digest, uploaded.digest);
        assert_eq!(inline.file_count(), 1);
        assert!(inline.id().starts_with("ctx_") && inline.id().len() == 16);
        assert!(inline.covers("src") && inline.covers("src/a.txt") && inline.covers("src/x/y"));
        assert!(!inline.covers("srcx") && !inline.covers("other"));
        // Different bytes, different digest.
        let other = ContextManifest::from_request(&BuildContext {
            files: vec![file("src/a.txt", None, Some("aGVsbG8h"))],
        })
        .unwrap();
        assert_ne!(other.digest, inline.digest);
    }

    #[test]
    fn bad_entries_are_named() {
        let errs = ContextManifest::from_request(&BuildContext {
            files: vec![
                file("../x", Some("b"), None),
                ContextFile {
                    path: "l".into(),
                    entry_type: "symlink".into(),
                    ..Default::default()
                },
                file("f", None, None),
                file("g", None, Some("!!")),
            ],
        })
        .unwrap_err();
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(msgs[0].contains("inside the context"), "{msgs:?}");
        assert!(msgs[1].contains("symlinks"), "{msgs:?}");
        assert!(msgs[2].contains("neither blob_id nor content_base64") && errs[2].is_upload());
        assert!(msgs[3].contains("not base64"), "{msgs:?}");
    }
}
