//! `nullspace template export`: the server's `image.oci.tar` for a
//! template, kept as an archive or written as a verified OCI layout, and
//! optionally pushed to a registry with `skopeo copy` (the real client:
//! credentials, TLS and the registry protocol are skopeo's).
//!
//! The download goes to a hidden sibling of the output and is verified
//! (every blob hashed against its descriptor by `nullspace_oci`'s
//! resolver) before it is renamed into place; a failure leaves nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use nullspace_oci::{Image, ResolveOptions, SourceRef};

use crate::progress::Bar;
use crate::template::{Api, enc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormatArg {
    /// An OCI image layout directory.
    Oci,
    /// One `image.oci.tar`.
    OciArchive,
    /// A bootable disk image (partition table, bootloader, kernel,
    /// initramfs, ext4 root): boot it with `qemu-system-x86_64 -m 512
    /// -drive file=FILE,if=virtio -nic user,model=virtio-net-pci`.
    Disk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    Gzip,
    Zstd,
}

#[derive(Args)]
pub struct ExportArgs {
    template_ref: String,
    #[arg(long, value_enum, default_value = "oci-archive")]
    format: ExportFormatArg,
    /// The archive file or layout directory to create (must not exist; an
    /// empty directory is accepted for `--format oci`).
    #[arg(long, short)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "gzip")]
    compression: CompressionArg,
    /// The disk image's format (`--format disk`).
    #[arg(long, value_enum, default_value = "qcow2")]
    disk_format: crate::template::export_disk::DiskFormatArg,
    /// Also push the image: docker://HOST[:PORT]/REPO[:TAG] (with skopeo).
    #[arg(long)]
    push: Option<String>,
    /// A registry (HOST[:PORT]) that may be reached over plain HTTP for
    /// --push. Loopback registries always may.
    #[arg(long = "insecure-registry")]
    insecure: Vec<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// What `--json` prints.
#[derive(serde::Serialize)]
struct ExportOut<'a> {
    template_ref: &'a str,
    output: &'a Path,
    format: &'static str,
    compression: &'static str,
    manifest_digest: String,
    pushed: Option<&'a str>,
}

/// containers-auth.json(5), as skopeo reads it.
#[derive(serde::Serialize)]
struct AuthFile {
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(serde::Serialize)]
struct AuthEntry {
    auth: String,
}

/// An export can take a while: the server writes the whole archive first.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3600);

pub fn export(a: ExportArgs) -> Result<()> {
    // The disk is another artifact of the same template: its own route.
    let layout = match a.format {
        ExportFormatArg::Disk => {
            if a.push.is_some() {
                bail!("--push sends an OCI image: it does not apply to --format disk");
            }
            return crate::template::export_disk::export(&a.template_ref, &a.output, a.disk_format);
        }
        ExportFormatArg::Oci => true,
        ExportFormatArg::OciArchive => false,
    };
    if let Some(p) = &a.push {
        push_target(p)?;
    }
    if layout {
        nullspace_oci::layout::check_output_dir(&a.output)?;
    } else if a.output.symlink_metadata().is_ok() {
        bail!("output {} exists", a.output.display());
    }
    let api = Api::from_env()?;
    let compression = match a.compression {
        CompressionArg::Gzip => "gzip",
        CompressionArg::Zstd => "zstd",
    };
    let path = format!(
        "/v1/templates/refs/{}/export?compression={compression}",
        enc(&a.template_ref)
    );
    let parent = match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".export.oci.tar.tmp-")
        .tempfile_in(&parent)
        .with_context(|| format!("a temporary file in {}", parent.display()))?;
    let mut resp = api.download(&path, EXPORT_TIMEOUT)?;
    let digest = resp
        .headers()
        .get("x-manifest-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    resp.copy_to(tmp.as_file_mut())
        .with_context(|| format!("downloading the export of {}", a.template_ref))?;
    tmp.as_file_mut().flush()?;
    // Verified before it is kept: every blob against its descriptor.
    let archive = tmp.path().to_path_buf();
    let image = Image::resolve(
        &SourceRef::parse(&format!("oci-archive:{}", archive.display()))?,
        &ResolveOptions::default(),
    )
    .context("the server's archive does not verify")?;
    if !digest.is_empty() && image.manifest_digest.to_string() != digest {
        bail!(
            "the archive's manifest is {}, the server announced {digest}",
            image.manifest_digest
        );
    }
    if let Some(target) = &a.push {
        push(&archive, target, &a.insecure)?;
    }
    if layout {
        nullspace_oci::layout::write_layout(&image, &a.output, &Bar::new())?;
    } else {
        tmp.as_file().sync_all()?;
        tmp.persist_noclobber(&a.output)
            .map_err(|e| e.error)
            .with_context(|| format!("writing {}", a.output.display()))?;
    }
    let summary = ExportOut {
        template_ref: &a.template_ref,
        output: &a.output,
        format: if layout { "oci" } else { "oci-archive" },
        compression,
        manifest_digest: image.manifest_digest.to_string(),
        pushed: a.push.as_deref(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} -> {} (manifest {}){}",
            a.template_ref,
            a.output.display(),
            image.manifest_digest,
            a.push
                .as_deref()
                .map(|p| format!(", pushed to {p}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// The registry host of a `docker://HOST/REPO[:TAG]` target.
fn push_target(target: &str) -> Result<&str> {
    let Some(rest) = target.strip_prefix("docker://") else {
        bail!("--push {target:?}: expected docker://HOST[:PORT]/REPO[:TAG]");
    };
    match rest.split_once('/') {
        Some((host, repo)) if !host.is_empty() && !repo.is_empty() => Ok(host),
        _ => bail!("--push {target:?}: expected docker://HOST[:PORT]/REPO[:TAG]"),
    }
}

fn loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .filter(|(h, p)| !h.ends_with(']') || p.chars().all(|c| c.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// `skopeo copy oci-archive:ARCHIVE docker://…`; credentials come from
/// NULLSPACE_REGISTRY_USERNAME/PASSWORD through a private auth file (never
/// on a command line), else from skopeo's own configuration.
fn push(archive: &Path, target: &str, insecure: &[String]) -> Result<()> {
    let host = push_target(target)?;
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet"]);
    if loopback(host) || insecure.iter().any(|i| i == host) {
        cmd.arg("--dest-tls-verify=false");
    }
    let _auth = match (
        std::env::var("NULLSPACE_REGISTRY_USERNAME").ok(),
        std::env::var("NULLSPACE_REGISTRY_PASSWORD").ok(),
    ) {
        (Some(u), Some(p)) => {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            let auth = AuthFile {
                auths: [(host.to_owned(), AuthEntry { auth: token })].into(),
            };
            // tempfile creates it 0600.
            let mut f = tempfile::NamedTempFile::new().context("an auth file for skopeo")?;
            f.write_all(serde_json::to_string(&auth)?.as_bytes())?;
            cmd.arg("--dest-authfile").arg(f.path());
            Some(f)
        }
        _ => None,
    };
    cmd.arg(format!("oci-archive:{}", archive.display()))
        .arg(target);
    let out = cmd
        .output()
        .context("running skopeo (install it: scripts/deps.sh)")?;
    if !out.status.success() {
        bail!(
            "push to {target} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_targets_and_loopback_hosts() {
        assert_eq!(
            push_target("docker://127.0.0.1:5000/a/b:t").unwrap(),
            "127.0.0.1:5000"
        );
        assert!(push_target("oci:x").is_err());
        assert!(push_target("docker://host").is_err());
        assert!(loopback("127.0.0.1:5000"));
        assert!(loopback("localhost"));
        assert!(loopback("[::1]:5000"));
        assert!(!loopback("registry.example:5000"));
    }
}
