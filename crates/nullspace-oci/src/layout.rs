//! Writing a verified OCI image layout (`nullspace image pull`).
//!
//! The layout is assembled in a sibling temporary directory and renamed into
//! place only when every blob has been verified, so a failed pull leaves
//! nothing behind. Docker schema2 manifests are rewritten as OCI manifests
//! over the same blobs, so OCI tools (umoci) accept the result.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::digest::Digest;
use crate::error::{ErrorKind, OciError};
use crate::manifest::{self, Descriptor};
use crate::resolve::Image;

/// Progress of long transfers. Implementations must be cheap: `advance` is
/// called for every chunk.
pub trait Progress: Sync {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self, _what: &str) {}
}

/// Progress that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A reader that reports every chunk to a [`Progress`].
pub struct Counting<'a, R> {
    pub inner: R,
    pub progress: &'a dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PullSummary {
    pub manifest_digest: Digest,
    pub manifest_rewritten: bool,
    pub blobs: usize,
    pub bytes: u64,
}

/// A directory that is removed on drop unless kept.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// Creates `.<name>.tmp-…` next to `target` (removed on drop unless
    /// persisted).
    pub fn beside(target: &Path) -> io::Result<TempDir> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(parent)
            .map(TempDir)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    /// Moves the directory to `target`, which must not exist or be an empty
    /// directory; on failure the temporary directory is still removed.
    pub fn persist(self, target: &Path) -> io::Result<()> {
        if target.is_dir() {
            fs::remove_dir(target)?;
        }
        fs::rename(self.0.path(), target)?;
        // Renamed away: nothing left for the guard to remove.
        let _ = self.0.keep();
        Ok(())
    }
}

/// Fails unless `out` is absent or an empty directory.
pub fn check_output_dir(out: &Path) -> io::Result<()> {
    match fs::read_dir(out) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("output {} exists and is not empty", out.display()),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("output {} exists and is not a directory", out.display()),
        )),
        Err(e) => Err(e),
    }
}

fn blob_file(root: &Path, d: &Digest) -> PathBuf {
    let (alg, hex) = d.path_components();
    root.join("blobs").join(alg).join(hex)
}

fn write_blob_bytes(root: &Path, d: &Digest, data: &[u8]) -> io::Result<()> {
    let p = blob_file(root, d);
    fs::create_dir_all(p.parent().expect("blob path has a parent"))?;
    fs::write(p, data)
}

/// Writes the image as an OCI layout at `out`.
pub fn write_layout(
    image: &Image,
    out: &Path,
    progress: &dyn Progress,
) -> Result<PullSummary, OciError> {
    let io_err = |e: io::Error| OciError::at(&image.name, format!("output {}", out.display()), e);
    check_output_dir(out).map_err(io_err)?;
    let tmp = TempDir::beside(out).map_err(io_err)?;
    let root = tmp.path();

    let total: u64 = image.manifest.layers.iter().map(|l| l.size).sum();
    progress.start("layers", total);
    let layers = &image.manifest.layers;
    let next = std::sync::atomic::AtomicUsize::new(0);
    // A few layers in flight at once: registries serve blobs in parallel
    // and decompression is not involved here.
    let workers = layers.len().clamp(1, 3);
    let results: Vec<Result<(), OciError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<(), OciError> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(desc) = layers.get(i) else {
                            return Ok(());
                        };
                        copy_blob(image, desc, root, progress, i)?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(OciError::new(
                        &image.name,
                        ErrorKind::Invalid("worker panicked".into()),
                    ))
                })
            })
            .collect()
    });
    for r in results {
        r?;
    }
    progress.finish("layers");

    write_blob_bytes(root, &image.manifest.config.digest, &image.config_bytes).map_err(io_err)?;
    let rewritten = image.manifest.effective_media_type() != manifest::OCI_MANIFEST;
    let (mdigest, mbytes) = if rewritten {
        let m = manifest::to_oci_manifest(&image.manifest);
        let bytes = serde_json::to_vec(&m).map_err(|e| io_err(io::Error::other(e)))?;
        (Digest::sha256_of(&bytes), bytes)
    } else {
        (image.manifest_digest.clone(), image.manifest_bytes.clone())
    };
    write_blob_bytes(root, &mdigest, &mbytes).map_err(io_err)?;
    let desc = Descriptor {
        media_type: manifest::OCI_MANIFEST.into(),
        digest: mdigest.clone(),
        size: mbytes.len() as u64,
        urls: None,
        annotations: Some(crate::local::ref_annotation(&image.tag())),
        platform: Some(image.platform.clone()),
    };
    let index = json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_INDEX,
        "manifests": [desc],
    });
    fs::write(
        root.join("index.json"),
        serde_json::to_vec(&index).map_err(|e| io_err(io::Error::other(e)))?,
    )
    .map_err(io_err)?;
    fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(io_err)?;
    tmp.persist(out).map_err(io_err)?;
    Ok(PullSummary {
        manifest_digest: mdigest,
        manifest_rewritten: rewritten,
        blobs: layers.len() + 2,
        bytes: total + image.config_bytes.len() as u64 + mbytes.len() as u64,
    })
}

fn copy_blob(
    image: &Image,
    desc: &Descriptor,
    root: &Path,
    progress: &dyn Progress,
    i: usize,
) -> Result<(), OciError> {
    let obj = || format!("layer {i} {}", desc.digest);
    let dest = blob_file(root, &desc.digest);
    let part = dest.with_extension("part");
    let res = (|| -> Result<(), OciError> {
        let r = image.open_blob(desc)?;
        fs::create_dir_all(dest.parent().expect("blob path has a parent"))
            .map_err(|e| OciError::at(&image.name, obj(), e))?;
        let mut f = io::BufWriter::with_capacity(
            1 << 20,
            fs::File::create(&part).map_err(|e| OciError::at(&image.name, obj(), e))?,
        );
        let mut r = Counting { inner: r, progress };
        io::copy(&mut r, &mut f).map_err(|e| OciError::reading(&image.name, obj(), e))?;
        f.flush().map_err(|e| OciError::at(&image.name, obj(), e))?;
        fs::rename(&part, &dest).map_err(|e| OciError::at(&image.name, obj(), e))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&part);
    }
    res
}
