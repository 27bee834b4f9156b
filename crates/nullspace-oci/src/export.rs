//! Writing a new image as an OCI layout or `image.oci.tar` (template
//! export): config, manifest, `index.json`, `oci-layout`, deterministic
//! bytes.
//!
//! Blobs are written into a temporary directory beside the output; before
//! anything is published every blob under `blobs/` is hashed again and
//! compared with its name (and with the size its descriptor states), then
//! the directory is renamed into place, or tarred into a temporary file
//! renamed into place. Any failure leaves nothing at the output.
//!
//! Determinism: JSON is written from structs (fixed field order) and
//! `BTreeMap`s; the config has no `created` time and no history times;
//! the archive lists `oci-layout`, `index.json`, then the blobs in byte
//! order, with mode 0644/0755, owner 0:0 and mtime 0.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::digest::Digest;
use crate::layout::TempDir;
use crate::manifest::{OCI_INDEX, OCI_MANIFEST};

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// Why an export could not be written; one line naming the object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error("export {object}: {source}")]
    Io {
        object: String,
        #[source]
        source: io::Error,
    },
    #[error("export: blob {name} hashes to {actual}: refusing to publish the layout")]
    BlobMismatch { name: String, actual: String },
    #[error("export: blob {name} is {actual} bytes, its descriptor says {expected}")]
    BlobSize {
        name: String,
        actual: u64,
        expected: u64,
    },
    #[error("export: output {0} exists")]
    Exists(String),
}

fn io_at(object: impl Into<String>) -> impl FnOnce(io::Error) -> ExportError {
    let object = object.into();
    move |source| ExportError::Io { object, source }
}

/// Docker's healthcheck (kept by OCI tools in the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    pub test: Vec<String>,
    /// Nanoseconds.
    pub interval: u64,
    pub timeout: u64,
    pub start_period: u64,
    pub retries: u32,
}

/// The runtime defaults the image's config carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, BTreeMap<(), ()>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
}

/// A layer blob already written (by [`NewLayout::blob_file`]'s caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
}

#[derive(Serialize)]
struct ConfigDoc<'a> {
    architecture: &'a str,
    os: &'a str,
    config: &'a RuntimeConfig,
    rootfs: RootfsDoc,
    history: Vec<HistoryDoc<'a>>,
}

#[derive(Serialize)]
struct RootfsDoc {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<Digest>,
}

#[derive(Serialize)]
struct HistoryDoc<'a> {
    created_by: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescDoc {
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    schema_version: u32,
    media_type: &'static str,
    config: DescDoc,
    layers: Vec<DescDoc>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexDoc {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<DescDoc>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layers: Vec<Digest>,
    /// Bytes of all blobs.
    pub bytes: u64,
}

/// A layout being assembled in a temporary directory beside its target.
pub struct NewLayout {
    tmp: TempDir,
    /// Every blob written, with the size its descriptor states.
    blobs: BTreeMap<String, u64>,
}

impl NewLayout {
    /// Starts a layout for `target` (a directory, or the archive's file):
    /// the work happens in a hidden sibling.
    pub fn beside(target: &Path) -> Result<NewLayout, ExportError> {
        let tmp = TempDir::beside(target).map_err(io_at(target.display().to_string()))?;
        fs::create_dir_all(tmp.path().join("blobs/sha256")).map_err(io_at("blobs directory"))?;
        Ok(NewLayout {
            tmp,
            blobs: BTreeMap::new(),
        })
    }

    /// A new file for a blob whose digest is not known yet; publish it
    /// with [`NewLayout::add_blob_file`].
    pub fn blob_file(&self) -> Result<(File, PathBuf), ExportError> {
        let (f, p) = tempfile::Builder::new()
            .prefix(".blob-")
            .tempfile_in(self.tmp.path())
            .map_err(io_at("blob file"))?
            .keep()
            .map_err(|e| ExportError::Io {
                object: "blob file".into(),
                source: e.error,
            })?;
        Ok((f, p))
    }

    /// Moves a file from [`NewLayout::blob_file`] to its digest's name.
    pub fn add_blob_file(
        &mut self,
        file: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<(), ExportError> {
        let dest = self.blob_path(digest);
        fs::rename(file, &dest).map_err(io_at(format!("blob {digest}")))?;
        self.blobs.insert(digest.to_string(), size);
        Ok(())
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        let (alg, hex) = d.path_components();
        self.tmp.path().join("blobs").join(alg).join(hex)
    }

    fn add_blob_bytes(&mut self, bytes: &[u8]) -> Result<Digest, ExportError> {
        let d = Digest::sha256_of(bytes);
        fs::write(self.blob_path(&d), bytes).map_err(io_at(format!("blob {d}")))?;
        self.blobs.insert(d.to_string(), bytes.len() as u64);
        Ok(d)
    }

    /// Writes config, manifest, `index.json` and `oci-layout`, then hashes
    /// every blob again against its name.
    pub fn finish(
        mut self,
        runtime: &RuntimeConfig,
        layers: &[LayerDesc],
        ref_name: Option<&str>,
    ) -> Result<FinishedLayout, ExportError> {
        let config = ConfigDoc {
            architecture: "amd64",
            os: "linux",
            config: runtime,
            rootfs: RootfsDoc {
                kind: "layers",
                diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
            },
            history: vec![HistoryDoc {
                created_by: "nullspace template export",
            }],
        };
        let config_bytes = json(&config)?;
        let config_digest = self.add_blob_bytes(&config_bytes)?;
        let manifest = ManifestDoc {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            config: DescDoc {
                media_type: OCI_CONFIG.into(),
                digest: config_digest.clone(),
                size: config_bytes.len() as u64,
                annotations: None,
            },
            layers: layers
                .iter()
                .map(|l| DescDoc {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size,
                    annotations: None,
                })
                .collect(),
        };
        let manifest_bytes = json(&manifest)?;
        let manifest_digest = self.add_blob_bytes(&manifest_bytes)?;
        let index = IndexDoc {
            schema_version: 2,
            media_type: OCI_INDEX,
            manifests: vec![DescDoc {
                media_type: OCI_MANIFEST.into(),
                digest: manifest_digest.clone(),
                size: manifest_bytes.len() as u64,
                annotations: ref_name.map(|r| {
                    BTreeMap::from([("org.opencontainers.image.ref.name".into(), r.into())])
                }),
            }],
        };
        fs::write(self.tmp.path().join("index.json"), json(&index)?)
            .map_err(io_at("index.json"))?;
        fs::write(
            self.tmp.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(io_at("oci-layout"))?;
        self.verify_blobs()?;
        Ok(FinishedLayout {
            bytes: self.blobs.values().sum(),
            tmp: self.tmp,
            summary_digests: (
                manifest_digest,
                config_digest,
                layers.iter().map(|l| l.digest.clone()).collect(),
            ),
        })
    }

    /// Every file under `blobs/` must be a blob this layout wrote, hash to
    /// its name and have its descriptor's size.
    fn verify_blobs(&self) -> Result<(), ExportError> {
        let dir = self.tmp.path().join("blobs/sha256");
        let mut found = 0usize;
        for ent in fs::read_dir(&dir).map_err(io_at("blobs directory"))? {
            let ent = ent.map_err(io_at("blobs directory"))?;
            let name = format!("sha256:{}", ent.file_name().to_string_lossy());
            let Some(&expected) = self.blobs.get(&name) else {
                return Err(ExportError::BlobMismatch {
                    name,
                    actual: "an unknown blob".into(),
                });
            };
            let mut f = File::open(ent.path()).map_err(io_at(format!("blob {name}")))?;
            let mut h = crate::digest::Hasher::new(crate::digest::Algorithm::Sha256);
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(io_at(format!("blob {name}")))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                size += n as u64;
            }
            let actual = h.finish();
            if actual.to_string() != name {
                return Err(ExportError::BlobMismatch {
                    name,
                    actual: actual.to_string(),
                });
            }
            if size != expected {
                return Err(ExportError::BlobSize {
                    name,
                    actual: size,
                    expected,
                });
            }
            found += 1;
        }
        if found != self.blobs.len() {
            return Err(ExportError::BlobMismatch {
                name: "blobs/sha256".into(),
                actual: format!("{found} files for {} blobs", self.blobs.len()),
            });
        }
        Ok(())
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, ExportError> {
    serde_json::to_vec(v).map_err(|e| ExportError::Io {
        object: "JSON".into(),
        source: io::Error::other(e),
    })
}

/// A complete, verified layout not yet published.
pub struct FinishedLayout {
    tmp: TempDir,
    bytes: u64,
    summary_digests: (Digest, Digest, Vec<Digest>),
}

impl FinishedLayout {
    pub fn summary(&self) -> ExportSummary {
        ExportSummary {
            manifest_digest: self.summary_digests.0.clone(),
            config_digest: self.summary_digests.1.clone(),
            layers: self.summary_digests.2.clone(),
            bytes: self.bytes,
        }
    }

    /// The layout directory (before it is published).
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Renames the layout to `out` (absent or an empty directory).
    pub fn persist_dir(self, out: &Path) -> Result<ExportSummary, ExportError> {
        crate::layout::check_output_dir(out).map_err(io_at(out.display().to_string()))?;
        let s = self.summary();
        self.tmp
            .persist(out)
            .map_err(io_at(out.display().to_string()))?;
        Ok(s)
    }

    /// Writes the layout as one tar (`image.oci.tar`) at `out` (which must
    /// not exist), through a temporary sibling file.
    pub fn persist_archive(self, out: &Path) -> Result<ExportSummary, ExportError> {
        if out.symlink_metadata().is_ok() {
            return Err(ExportError::Exists(out.display().to_string()));
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".image.oci.tar.tmp-")
            .tempfile_in(&parent)
            .map_err(io_at(out.display().to_string()))?;
        write_archive(self.tmp.path(), tmp.as_file())?;
        tmp.as_file()
            .sync_all()
            .map_err(io_at(out.display().to_string()))?;
        tmp.persist_noclobber(out).map_err(|e| ExportError::Io {
            object: out.display().to_string(),
            source: e.error,
        })?;
        Ok(self.summary())
    }

    /// Streams the layout as one tar into `w`.
    pub fn write_archive_to(&self, w: impl Write) -> Result<(), ExportError> {
        write_archive(self.tmp.path(), w)
    }
}

/// The layout at `root` as a deterministic tar.
fn write_archive(root: &Path, w: impl Write) -> Result<(), ExportError> {
    let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, w));
    let dir = |tar: &mut tar::Builder<_>, name: &str| -> Result<(), ExportError> {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        h.set_path(name).map_err(io_at(name.to_owned()))?;
        h.set_cksum();
        tar.append(&h, io::empty()).map_err(io_at(name.to_owned()))
    };
    let file = |tar: &mut tar::Builder<_>, name: &str| -> Result<(), ExportError> {
        let p = root.join(name);
        let f = File::open(&p).map_err(io_at(name.to_owned()))?;
        let len = f.metadata().map_err(io_at(name.to_owned()))?.len();
        let mut h = header(tar::EntryType::Regular, 0o644, len);
        h.set_path(name).map_err(io_at(name.to_owned()))?;
        h.set_cksum();
        tar.append(&h, f).map_err(io_at(name.to_owned()))
    };
    file(&mut tar, "oci-layout")?;
    file(&mut tar, "index.json")?;
    dir(&mut tar, "blobs/")?;
    dir(&mut tar, "blobs/sha256/")?;
    let mut names: Vec<String> = fs::read_dir(root.join("blobs/sha256"))
        .map_err(io_at("blobs"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(io_at("blobs"))?;
    names.sort();
    for n in names {
        file(&mut tar, &format!("blobs/sha256/{n}"))?;
    }
    let mut w = tar.into_inner().map_err(io_at("archive"))?;
    w.flush().map_err(io_at("archive"))?;
    Ok(())
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}
