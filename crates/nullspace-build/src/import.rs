//! Image → template directory: fetch and decode every layer (from the layer
//! cache when possible, in parallel otherwise), flatten them into one ext4
//! image, and describe the result in `template.json`.
//!
//! Nothing partial survives a failure: the directory is assembled next to
//! the destination and renamed into place at the end.

use std::io;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nullspace_oci::layout::{Counting, Progress, TempDir, check_output_dir};
use nullspace_oci::manifest::Descriptor;
use nullspace_oci::report::ImageReport;
use nullspace_oci::{Digest, Image, OciError};
use nullspace_rootfs::{
    LayerCache, LayerIndex, Limits, RootfsOptions, SpooledLayer, build_rootfs, decode_layer,
    index_tar_file,
};
use tokio_util::sync::CancellationToken;

use crate::template::{CacheReport, ROOTFS_FILE, RootfsReport, TEMPLATE_FILE, TemplateMeta};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("image {image}: {source}")]
    Rootfs {
        image: String,
        #[source]
        source: nullspace_rootfs::Error,
    },
    #[error(
        "image {image}: layer {index} {digest}: diff_id mismatch: the config promises {expected}, the layer decompresses to {actual}"
    )]
    DiffId {
        image: String,
        index: usize,
        digest: Digest,
        expected: String,
        actual: String,
    },
    #[error("image {image}: import cancelled")]
    Cancelled { image: String },
    #[error("image {image}: output {path}: {source}")]
    Output {
        image: String,
        path: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Minimum rootfs size in MiB (`--disk-mb`).
    pub disk_mb: Option<u64>,
    /// The layer cache directory; `None` imports cold, spooling layers into
    /// a temporary directory that is removed afterwards.
    pub cache_dir: Option<PathBuf>,
    /// Upper bound of the layer cache, enforced after each import.
    pub cache_max_bytes: u64,
    pub limits: Limits,
    /// Layers fetched and decoded at once.
    pub parallelism: usize,
    /// Cancelled: blob reads fail and no rootfs is written.
    pub cancel: Option<CancellationToken>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            disk_mb: None,
            cache_dir: None,
            cache_max_bytes: 20 << 30,
            limits: Limits::default(),
            parallelism: 2,
            cancel: None,
        }
    }
}

/// The default cache location: `$NULLSPACE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/nullspace`, else `~/.cache/nullspace`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("NULLSPACE_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("nullspace"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nullspace"))
}

/// Where decoded layers are spooled for this import.
enum Spool {
    Cache(LayerCache),
    /// A cold import: layers live in a temporary cache removed (by the
    /// guard's drop) when the import ends.
    Scratch {
        cache: LayerCache,
        _guard: TempDir,
    },
}

impl Spool {
    fn cache(&self) -> &LayerCache {
        match self {
            Spool::Cache(c) | Spool::Scratch { cache: c, .. } => c,
        }
    }
}

pub fn import(
    image: &Image,
    out: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<TemplateMeta, ImportError> {
    let out_err = |source: io::Error| ImportError::Output {
        image: image.name.clone(),
        path: out.display().to_string(),
        source,
    };
    let rootfs_err = |source| ImportError::Rootfs {
        image: image.name.clone(),
        source,
    };
    check_output_dir(out).map_err(out_err)?;
    let tmp = TempDir::beside(out).map_err(out_err)?;

    let spool = match &opts.cache_dir {
        Some(dir) => Spool::Cache(LayerCache::open(dir, opts.cache_max_bytes).map_err(rootfs_err)?),
        None => {
            let scratch = TempDir::beside(out).map_err(out_err)?;
            let cache = LayerCache::open(scratch.path(), u64::MAX).map_err(rootfs_err)?;
            Spool::Scratch {
                cache,
                _guard: scratch,
            }
        }
    };
    let cache = spool.cache();

    let layers = &image.manifest.layers;
    // Look the cache up first, so progress counts only what is fetched.
    let mut hits = Vec::with_capacity(layers.len());
    for l in layers {
        hits.push(cache.get(&l.digest.to_string()).map_err(rootfs_err)?);
    }
    let to_fetch: u64 = layers
        .iter()
        .zip(&hits)
        .filter(|(_, h)| h.is_none())
        .map(|(l, _)| l.size)
        .sum();
    progress.start("layers", to_fetch);

    let next = AtomicUsize::new(0);
    let workers = opts.parallelism.clamp(1, layers.len().max(1));
    let mut spooled: Vec<Option<Result<SpooledLayer, ImportError>>> =
        (0..layers.len()).map(|_| None).collect();
    // Inserted layers stay leased (safe from any eviction) until the rootfs
    // is written; hits are leased by `hits`.
    let mut leases = Vec::new();
    let results: Vec<Vec<(usize, Result<Spooled, ImportError>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(desc) = layers.get(i) else { break };
                        let r = spool_layer(image, cache, i, desc, hits[i].clone(), opts, progress);
                        let failed = r.is_err();
                        done.push((i, r));
                        if failed {
                            // Stop handing out work; the first error wins.
                            next.store(layers.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("import worker panicked"))
            .collect()
    });
    for (i, r) in results.into_iter().flatten() {
        spooled[i] = Some(r.map(|(layer, lease)| {
            leases.extend(lease);
            layer
        }));
    }
    progress.finish("layers");
    // Layers are skipped only after another failed: report the failure.
    if let Some(pos) = spooled.iter().position(|r| matches!(r, Some(Err(_)))) {
        if let Some(Some(Err(e))) = spooled.into_iter().nth(pos) {
            return Err(e);
        }
        unreachable!("position found an error");
    }
    let ready: Vec<SpooledLayer> = spooled.into_iter().flatten().flatten().collect();
    assert_eq!(
        ready.len(),
        layers.len(),
        "every layer is spooled when none failed"
    );

    if is_cancelled(opts) {
        return Err(ImportError::Cancelled {
            image: image.name.clone(),
        });
    }
    let rootfs_path = tmp.path().join(ROOTFS_FILE);
    let ropts = RootfsOptions {
        min_size_bytes: opts.disk_mb.map(|mb| mb << 20),
        uuid_seed: image.manifest_digest.bytes32(),
        limits: opts.limits.clone(),
        label: Some("nullspace-root".into()),
        ..Default::default()
    };
    let summary = build_rootfs(&ready, &ropts, &rootfs_path).map_err(rootfs_err)?;
    drop(leases);

    let reused = hits.iter().filter(|h| h.is_some()).count();
    let meta = TemplateMeta {
        image: ImageReport::of(image),
        runtime: image.runtime_defaults(),
        oci: image.oci_metadata(),
        rootfs: RootfsReport {
            file: ROOTFS_FILE.into(),
            size_bytes: summary.size_bytes,
            inodes: summary.inodes_used,
            inodes_total: summary.inodes_total,
            files: summary.files,
            dirs: summary.dirs,
            symlinks: summary.symlinks,
            hardlinks: summary.hardlinks,
            data_bytes: summary.data_bytes,
        },
        cache: CacheReport {
            enabled: matches!(spool, Spool::Cache(_)),
            layers_reused: reused,
            layers_fetched: layers.len() - reused,
            bytes_fetched: to_fetch,
            reused: layers
                .iter()
                .zip(&hits)
                .filter(|(_, h)| h.is_some())
                .map(|(l, _)| l.digest.clone())
                .collect(),
        },
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| out_err(io::Error::other(e)))?;
    std::fs::write(tmp.path().join(TEMPLATE_FILE), json).map_err(out_err)?;
    tmp.persist(out).map_err(out_err)?;

    if let Spool::Cache(c) = &spool {
        let keep: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        // Bounding the cache is housekeeping: the template is already done.
        let _ = c.evict(&keep);
    }
    Ok(meta)
}

/// A spooled layer and, for a fresh insert, its cache lease.
type Spooled = (SpooledLayer, Option<nullspace_rootfs::CachedLayer>);

fn spool_layer(
    image: &Image,
    cache: &LayerCache,
    i: usize,
    desc: &Descriptor,
    hit: Option<nullspace_rootfs::CachedLayer>,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<Spooled, ImportError> {
    let limits = &opts.limits;
    let name = desc.digest.to_string();
    let rootfs_err = |source| ImportError::Rootfs {
        image: image.name.clone(),
        source,
    };
    let expected = image.diff_id(i).map(|d| d.to_string()).unwrap_or_default();
    let check = |index: &LayerIndex| {
        if index.diff_id != expected {
            return Err(ImportError::DiffId {
                image: image.name.clone(),
                index: i,
                digest: desc.digest.clone(),
                expected: expected.clone(),
                actual: index.diff_id.clone(),
            });
        }
        Ok(())
    };
    if let Some(hit) = hit
        && hit.diff_id == expected
    {
        let index =
            index_tar_file(&name, &hit.tar_path, &hit.diff_id, limits).map_err(rootfs_err)?;
        return Ok((
            SpooledLayer {
                name,
                tar_path: hit.tar_path.clone(),
                index,
            },
            None,
        ));
    }
    let mut insert = cache.begin_insert(&name).map_err(rootfs_err)?;
    let blob = image.open_blob(desc)?;
    let mut reader = Counting {
        inner: CancelReader {
            inner: blob,
            flag: opts.cancel.clone(),
        },
        progress,
    };
    let index = decode_layer(
        &name,
        &mut reader,
        &desc.media_type,
        &mut insert.file,
        limits,
    )
    .map_err(|e| verify_or(image, i, desc, e))?;
    // The decompressor may stop at the end of the compressed stream; read
    // to EOF so the blob's digest and size are checked before it is used.
    io::copy(&mut reader, &mut io::sink()).map_err(|e| blob_error(image, i, desc, e))?;
    check(&index)?;
    let entry = insert.commit(&index, cache).map_err(rootfs_err)?;
    Ok((
        SpooledLayer {
            name,
            tar_path: entry.tar_path.clone(),
            index,
        },
        Some(entry),
    ))
}

fn is_cancelled(opts: &ImportOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(CancellationToken::is_cancelled)
}

/// Fails reads once the build is cancelled, so a cancelled import stops
/// within one chunk of every layer in flight.
struct CancelReader<R> {
    inner: R,
    flag: Option<CancellationToken>,
}

impl<R: Read> Read for CancelReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self
            .flag
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
        {
            // Not ErrorKind::Interrupted: io::copy would retry that forever.
            return Err(io::Error::other("import cancelled"));
        }
        self.inner.read(buf)
    }
}

fn blob_error(image: &Image, i: usize, desc: &Descriptor, e: io::Error) -> ImportError {
    OciError::reading(&image.name, format!("layer {i} {}", desc.digest), e).into()
}

/// A decode error caused by the blob failing verification is reported as
/// that rule, not as whatever the decompressor made of the bad bytes.
fn verify_or(
    image: &Image,
    i: usize,
    desc: &Descriptor,
    e: nullspace_rootfs::Error,
) -> ImportError {
    if let Some(io) = find_io(&e)
        && let Some(v) = nullspace_oci::error::verify_error_of(io)
    {
        return OciError::at(&image.name, format!("layer {i} {}", desc.digest), v.clone()).into();
    }
    ImportError::Rootfs {
        image: image.name.clone(),
        source: e,
    }
}

fn find_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = c.source();
    }
    None
}
