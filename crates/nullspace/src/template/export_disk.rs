//! `nullspace template export REF --format disk --output FILE`: the
//! server's bootable disk of a template (`GET /v1/templates/refs/{ref}/disk`),
//! written to a temporary sibling of FILE and renamed into place.

use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use reqwest::Method;

use super::{Api, enc};

/// `--disk-format`.
#[derive(Clone, Copy, Default, ValueEnum)]
pub enum DiskFormatArg {
    #[default]
    Qcow2,
    Raw,
}

pub fn export(template_ref: &str, output: &Path, format: DiskFormatArg) -> Result<()> {
    let api = Api::from_env()?;
    let format = match format {
        DiskFormatArg::Qcow2 => "qcow2",
        DiskFormatArg::Raw => "raw",
    };
    let mut resp = api.send(
        Method::GET,
        &format!(
            "/v1/templates/refs/{}/disk?format={format}",
            enc(template_ref)
        ),
        None,
        true,
    )?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".nullspace-disk-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    // Read before the body: afterwards it is what is left (0).
    let length = resp.content_length();
    let n = resp
        .copy_to(tmp.as_file_mut())
        .with_context(|| format!("downloading the disk of {template_ref}"))?;
    if let Some(expected) = length
        && expected != n
    {
        anyhow::bail!("the disk of {template_ref} ended after {n} of {expected} bytes");
    }
    tmp.as_file().sync_all().context("syncing the disk")?;
    tmp.persist(output)
        .with_context(|| format!("renaming the disk into {}", output.display()))?;
    println!("{} ({format}, {} MiB)", output.display(), n >> 20);
    Ok(())
}
