//! A template's root filesystem and runtime defaults → an OCI image
//! (layout directory or `image.oci.tar`): the reverse of `import`.
//!
//! One layer, made from the final disk: the disk is what machines boot
//! (native build steps wrote into it), while the original layers are not
//! kept with a template and a diff against them would need both trees
//! anyway. A single layer is also what makes two builds of one template on
//! two machines export to the same digest.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nullspace_model::build::probe::{Probe, Readiness};
use nullspace_oci::digest::Digest;
use nullspace_oci::export::{
    ExportError, ExportSummary, Healthcheck, LayerDesc, NewLayout, RuntimeConfig,
};
use nullspace_rootfs::ext4_read::{Ext4Image, Ext4ReadError};
use nullspace_rootfs::layer_write::{LayerOptions, LayerWriteError, write_layer};

pub use nullspace_rootfs::layer_write::LayerCompression;

/// The two shapes of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// An OCI image layout directory.
    Oci,
    /// The layout as one tar (`image.oci.tar`).
    OciArchive,
}

/// The runtime defaults a template carries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateRuntime {
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// Run as `/bin/sh -c START` (the image's Entrypoint and Cmd).
    pub start_cmd: Option<String>,
    pub readiness: Option<Readiness>,
    pub labels: BTreeMap<String, String>,
}

/// What to export and where.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// The template's root disk (ext4).
    pub disk: PathBuf,
    pub runtime: TemplateRuntime,
    pub compression: LayerCompression,
    pub format: ExportFormat,
    /// The directory or archive to create (must not exist; an empty
    /// directory is accepted for [`ExportFormat::Oci`]).
    pub output: PathBuf,
    /// For a journal replay's copy of the disk.
    pub scratch: PathBuf,
    /// `org.opencontainers.image.ref.name` in `index.json`.
    pub ref_name: Option<String>,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateExportError {
    #[error(transparent)]
    Read(#[from] Ext4ReadError),
    #[error(transparent)]
    Layer(#[from] LayerWriteError),
    #[error(transparent)]
    Layout(#[from] ExportError),
}

/// The config's runtime section for `rt`.
pub fn runtime_config(rt: &TemplateRuntime) -> RuntimeConfig {
    let mut labels = rt.labels.clone();
    let healthcheck = rt.readiness.as_ref().and_then(|r| {
        let test = match &r.probe {
            Probe::Command { command } => vec!["CMD-SHELL".to_owned(), command.clone()],
            // TCP and HTTP probes need tools an image may lack; the
            // readiness stays readable as a label.
            _ => {
                labels.insert(
                    "dev.nullspace.readiness".into(),
                    serde_json::to_string(r).unwrap_or_default(),
                );
                return None;
            }
        };
        Some(Healthcheck {
            test,
            interval: r.interval.as_nanos() as u64,
            timeout: r.timeout.as_nanos() as u64,
            start_period: r.startup_grace.as_nanos() as u64,
            retries: 3,
        })
    });
    let (entrypoint, cmd) = match &rt.start_cmd {
        Some(c) => (
            Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]),
            Some(vec![c.clone()]),
        ),
        None => (None, None),
    };
    RuntimeConfig {
        user: rt.user.clone(),
        exposed_ports: BTreeMap::new(),
        env: rt.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        entrypoint,
        cmd,
        working_dir: rt.workdir.clone(),
        labels,
        healthcheck,
    }
}

/// Exports the disk as a one-layer image. A failure leaves nothing at
/// `spec.output`.
pub fn export_template(spec: &ExportSpec) -> Result<ExportSummary, TemplateExportError> {
    // Refused before the long part, not after it.
    let out = spec.output.display().to_string();
    match spec.format {
        ExportFormat::Oci => {
            nullspace_oci::layout::check_output_dir(&spec.output).map_err(|source| {
                ExportError::Io {
                    object: out,
                    source,
                }
            })?
        }
        ExportFormat::OciArchive if spec.output.symlink_metadata().is_ok() => {
            return Err(ExportError::Exists(out).into());
        }
        ExportFormat::OciArchive => {}
    }
    let image = Ext4Image::open(&spec.disk, &spec.scratch)?;
    let opts = LayerOptions {
        compression: spec.compression,
        ..LayerOptions::default()
    };
    let nodes = image.walk(&opts.limits)?;
    let mut layout = NewLayout::beside(&spec.output)?;
    let (file, path) = layout.blob_file()?;
    let blob = match write_layer(&image, &nodes, &opts, file) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
    };
    let digest = sha256(&blob.digest_hex);
    layout.add_blob_file(&path, &digest, blob.size)?;
    let layer = LayerDesc {
        digest,
        diff_id: sha256(&blob.diff_id_hex),
        size: blob.size,
        media_type: blob.media_type.to_owned(),
    };
    let finished = layout.finish(
        &runtime_config(&spec.runtime),
        &[layer],
        spec.ref_name.as_deref(),
    )?;
    Ok(match spec.format {
        ExportFormat::Oci => finished.persist_dir(&spec.output)?,
        ExportFormat::OciArchive => finished.persist_archive(&spec.output)?,
    })
}

fn sha256(hex: &str) -> Digest {
    Digest::parse(&format!("sha256:{hex}")).expect("sha256 hex from our own hasher")
}
