//! `nullspace serve` and `nullspace keys`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct StoreArgs {
    /// Data directory: the SQLite database, artifacts and the layer cache.
    #[arg(long, env = "NULLSPACE_DATA_DIR", default_value = "nullspace-data")]
    data_dir: PathBuf,
    /// A Postgres URL (postgres://…) to share state between servers;
    /// default: SQLite in the data directory.
    #[arg(long, env = "NULLSPACE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl StoreArgs {
    fn config(&self) -> nullspace_server::Config {
        let mut c = nullspace_server::Config::new(self.data_dir.clone());
        c.database_url = self.database_url.clone();
        c
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Address to listen on.
    #[arg(long, env = "NULLSPACE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Builds run at once (0: accept and queue builds, run none).
    #[arg(long, env = "NULLSPACE_WORKERS", default_value_t = 2)]
    workers: usize,
    /// A registry (HOST[:PORT]) that may be reached over plain HTTP.
    #[arg(long = "insecure-registry")]
    insecure: Vec<String>,
    /// A BuildKit daemon address for `buildctl --addr` (e.g. unix:///run/buildkit/buildkitd.sock).
    #[arg(long, env = "NULLSPACE_BUILDKIT_ADDR")]
    buildkit_addr: Option<String>,
    /// Require the QEMU build VM (start command, readiness, snapshot, native
    /// steps): fail at start-up if it cannot run. Default: on whenever this
    /// machine can run it.
    #[arg(long, env = "NULLSPACE_BUILD_VM", conflicts_with = "no_build_vm")]
    build_vm: bool,
    /// Never boot build VMs: a template is its rootfs, and native steps fail.
    #[arg(long, env = "NULLSPACE_NO_BUILD_VM")]
    no_build_vm: bool,
    /// The static guest init for the build VM [default: $NULLSPACE_INIT_BIN,
    /// else <dir of nullspace>/guest/nullspace-init, DATA_DIR/guest/nullspace-init,
    /// /usr/local/lib/nullspace/nullspace-init, /usr/lib/nullspace/nullspace-init].
    #[arg(long)]
    init_bin: Option<PathBuf>,
    /// Let build VMs reach the network when a build asks for internet_access
    /// (QEMU user networking: this also reaches the host's loopback services).
    #[arg(long, env = "NULLSPACE_BUILD_VM_NETWORK")]
    build_vm_network: bool,
    /// Do not build the `nullspace/base` template at start-up (machines
    /// created without a template then fail until it exists).
    #[arg(long, env = "NULLSPACE_NO_BASE_TEMPLATE")]
    no_base_template: bool,
    /// Machines this server runs at once (restoring ones included).
    #[arg(long, env = "NULLSPACE_MAX_MACHINES", default_value_t = 64)]
    max_machines: usize,
    /// Guest memory (MiB) this server's machines may use in all
    /// [default: three quarters of the host's memory].
    #[arg(long, env = "NULLSPACE_MAX_MACHINE_MEMORY_MB")]
    max_machine_memory_mb: Option<u64>,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key; the key is printed once and stored hashed.
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// A label for the key.
        #[arg(long)]
        name: String,
        /// The caller namespace the key acts as (a slug).
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn serve(a: ServeArgs) -> Result<()> {
    // Build transitions and errors; request bodies (which may carry
    // credentials) are never logged.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NULLSPACE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = a.store.config();
    config.workers = a.workers;
    config.insecure_registries = a.insecure;
    config.buildkit_addr = a.buildkit_addr;
    config.build_vm = if a.no_build_vm {
        nullspace_server::BuildVm::Off
    } else if a.build_vm {
        nullspace_server::BuildVm::On
    } else {
        nullspace_server::BuildVm::Auto
    };
    config.init_bin = a.init_bin;
    config.build_vm_network = a.build_vm_network;
    config.machine_limits.max_machines = a.max_machines;
    config.base_template = !a.no_base_template;
    if let Some(m) = a.max_machine_memory_mb {
        config.machine_limits.max_memory_mb = m;
    }
    runtime()?.block_on(async move {
        let state = nullspace_server::open(config)
            .await
            .context("opening the data directory")?;
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        eprintln!("nullspace serving on http://{}", listener.local_addr()?);
        nullspace_server::serve(state, listener).await?;
        Ok(())
    })
}

pub fn keys(c: KeysCommand) -> Result<()> {
    match c {
        KeysCommand::Create {
            store,
            name,
            namespace,
        } => {
            anyhow::ensure!(
                nullspace_server::refs::is_slug(&namespace),
                "--namespace {namespace:?} must be a slug (lowercase letters and digits, '-' between)"
            );
            let config = store.config();
            runtime()?.block_on(async move {
                let state = nullspace_server::open(config)
                    .await
                    .context("opening the data directory")?;
                let (id, secret) = state.store.create_key(&name, &namespace).await?;
                eprintln!(
                    "created key {id} ({name}) for namespace {namespace}; it is shown only once:"
                );
                println!("{secret}");
                Ok(())
            })
        }
    }
}
