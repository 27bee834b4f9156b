//! `nullspace image …`

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use nullspace_oci::auth::Credentials;
use nullspace_oci::platform::PlatformSpec;
use nullspace_oci::report::InspectReport;
use nullspace_oci::{Image, ResolveOptions, SourceRef};

use crate::progress::Bar;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Show an image's manifest, platform, layers and runtime defaults.
    Inspect {
        /// docker://REF (or a bare REF), oci:PATH[:REF], oci-archive:PATH[:REF], docker-archive:PATH[:REF]
        source: String,
        #[command(flatten)]
        opts: SourceOpts,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a verified OCI image layout of an image.
    Pull {
        source: String,
        /// The layout directory to create (absent or empty).
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        opts: SourceOpts,
    },
    /// Flatten an image into an ext4 root filesystem: DIR/rootfs.ext4 + DIR/template.json.
    Import(ImportArgs),
}

#[derive(Args)]
pub struct ImportArgs {
    source: String,
    /// The template directory to create (absent or empty): rootfs.ext4 and template.json.
    #[arg(long, short)]
    output: PathBuf,
    #[command(flatten)]
    opts: SourceOpts,
    /// Minimum root filesystem size in MiB (default: content plus headroom).
    #[arg(long)]
    disk_mb: Option<u64>,
    /// Layer cache directory [default: $NULLSPACE_CACHE_DIR, else ~/.cache/nullspace].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Import cold: neither read nor fill the layer cache.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Upper bound of the layer cache in MiB, enforced after the import.
    #[arg(long, default_value_t = 20 * 1024)]
    cache_max_mb: u64,
    /// Print template.json to stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SourceOpts {
    /// OS/ARCH[/VARIANT] to choose from an image index (default: this host, linux).
    #[arg(long)]
    platform: Option<String>,
    /// Registry user name.
    #[arg(long, env = "NULLSPACE_REGISTRY_USERNAME")]
    username: Option<String>,
    /// Registry password (prefer --password-stdin or the environment).
    #[arg(long, env = "NULLSPACE_REGISTRY_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long)]
    password_stdin: bool,
    /// A registry (HOST[:PORT]) that may be reached over plain HTTP. Loopback
    /// registries always may.
    #[arg(long = "insecure-registry")]
    insecure: Vec<String>,
}

impl SourceOpts {
    pub fn resolve_options(&self) -> Result<ResolveOptions> {
        let platform = self
            .platform
            .as_deref()
            .map(PlatformSpec::parse)
            .transpose()
            .context("--platform")?;
        let mut password = self.password.clone();
        if self.password_stdin {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the password from stdin")?;
            password = Some(s.trim_end_matches(['\n', '\r']).to_string());
        }
        let credentials = match (&self.username, password) {
            (Some(u), Some(p)) => Some(Credentials {
                username: u.clone(),
                password: p,
            }),
            (None, None) => None,
            (Some(_), None) => bail!(
                "--username needs a password (--password-stdin or NULLSPACE_REGISTRY_PASSWORD)"
            ),
            (None, Some(_)) => bail!("a registry password needs --username"),
        };
        Ok(ResolveOptions {
            platform,
            credentials,
            insecure_registries: self.insecure.clone(),
        })
    }
}

pub fn resolve(source: &str, opts: &SourceOpts) -> Result<Image> {
    let src = SourceRef::parse(source)?;
    Ok(Image::resolve(&src, &opts.resolve_options()?)?)
}

pub fn run(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Inspect { source, opts, json } => {
            let image = resolve(&source, &opts)?;
            let report = InspectReport::of(&image);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_inspect(&report);
            }
            Ok(())
        }
        ImageCommand::Pull {
            source,
            output,
            opts,
        } => {
            let image = resolve(&source, &opts)?;
            let bar = Bar::new();
            let s = nullspace_oci::layout::write_layout(&image, &output, &bar)?;
            println!(
                "{} -> {} ({} blobs, {} bytes, manifest {}{})",
                image.name,
                output.display(),
                s.blobs,
                s.bytes,
                s.manifest_digest,
                if s.manifest_rewritten {
                    ", rewritten as OCI"
                } else {
                    ""
                }
            );
            Ok(())
        }
        ImageCommand::Import(a) => import(a),
    }
}

fn import(a: ImportArgs) -> Result<()> {
    use nullspace_build::import::{ImportOptions, default_cache_dir, import};
    let image = resolve(&a.source, &a.opts)?;
    let cache_dir = if a.no_cache {
        None
    } else {
        Some(a.cache_dir.or_else(default_cache_dir).context(
            "no cache directory: set --cache-dir, NULLSPACE_CACHE_DIR or HOME, or pass --no-cache",
        )?)
    };
    let opts = ImportOptions {
        disk_mb: a.disk_mb,
        cache_dir,
        cache_max_bytes: a.cache_max_mb << 20,
        ..Default::default()
    };
    let bar = Bar::new();
    let meta = import(&image, &a.output, &opts, &bar)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&meta)?);
    } else {
        let r = &meta.rootfs;
        println!(
            "{} -> {}/{} ({} MiB, {} files, {} dirs, {} symlinks, {} hard links; layers: {} fetched, {} from cache)",
            image.name,
            a.output.display(),
            r.file,
            r.size_bytes >> 20,
            r.files,
            r.dirs,
            r.symlinks,
            r.hardlinks,
            meta.cache.layers_fetched,
            meta.cache.layers_reused,
        );
    }
    Ok(())
}

fn print_inspect(r: &InspectReport) {
    let i = &r.image;
    println!("image     {}", i.reference);
    if let Some(d) = &i.index_digest {
        println!("index     {d}");
    }
    println!(
        "manifest  {} ({})",
        i.manifest_digest, i.manifest_media_type
    );
    let p = &i.platform;
    println!(
        "platform  {}/{}{}",
        p.os,
        p.architecture,
        p.variant
            .as_deref()
            .map(|v| format!("/{v}"))
            .unwrap_or_default()
    );
    println!("config    {}", i.config_digest);
    let total: u64 = i.layers.iter().map(|l| l.size).sum();
    println!("layers    {} ({total} bytes)", i.layers.len());
    for l in &i.layers {
        println!("  {} {:>12}  {}", l.digest, l.size, l.media_type);
    }
    let rt = &r.runtime;
    let show = |k: &str, v: &Option<String>| println!("{k:<10}{}", v.as_deref().unwrap_or("-"));
    show("user", &rt.user);
    show("workdir", &rt.workdir);
    show("start", &rt.start_cmd);
    show("ready", &rt.ready_cmd);
    for (k, v) in &rt.env {
        println!("env       {k}={v}");
    }
    for (k, v) in &r.oci.labels {
        println!("label     {k}={v}");
    }
    if !r.oci.exposed_ports.is_empty() {
        println!(
            "expose    {} (metadata only)",
            r.oci.exposed_ports.join(" ")
        );
    }
    if !r.oci.volumes.is_empty() {
        println!("volumes   {} (metadata only)", r.oci.volumes.join(" "));
    }
    if let Some(h) = &r.oci.healthcheck {
        match (&h.mapped_readiness, &h.reason) {
            (Some(m), _) => println!("health    {} -> readiness", m),
            (None, Some(reason)) => println!("health    {:?} not mapped: {reason}", h.test),
            _ => {}
        }
    }
}
