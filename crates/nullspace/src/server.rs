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
    /// Give machines QEMU's user-mode network instead of a network
    /// namespace each (then no egress policies; namespaces need root,
    /// `ip` and `nft`, and are used by default where those are there).
    #[arg(long, env = "NULLSPACE_NO_MACHINE_NAMESPACES")]
    no_machine_namespaces: bool,
    /// The DNS server machines' queries go to [default: the host's first
    /// non-loopback nameserver in /etc/resolv.conf].
    #[arg(long, env = "NULLSPACE_MACHINE_DNS")]
    machine_dns: Option<std::net::Ipv4Addr>,
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
    /// VMs kept started and paused, ready to become machines, per template
    /// snapshot and shape at least (refilled in the background; 0: none but
    /// warm pools'). They count against --max-machines and the memory bound,
    /// and give way to creates when the host is full.
    #[arg(long, env = "NULLSPACE_MACHINE_POOL_SIZE", default_value_t = 2)]
    machine_pool_size: usize,
    /// What a template's recent demand (its creates in the last 10 s) may
    /// grow its stock of prepared VMs to.
    #[arg(long, env = "NULLSPACE_MACHINE_POOL_MAX", default_value_t = 8)]
    machine_pool_max: usize,
    /// How build VMs keep guest memory: `mapped` (a RAM file machines map
    /// copy-on-write) or `streamed` (the earlier design: all RAM in the
    /// snapshot's migration stream, read by every restore; for comparisons).
    #[arg(long, env = "NULLSPACE_BUILD_VM_MEMORY", default_value = "mapped", value_parser = ["mapped", "streamed"])]
    build_vm_memory: String,
    /// Address of the SSH endpoint machines are reached through with
    /// certificates from `POST …/ssh-access` (`off`: none; port 0: any free port).
    #[arg(long, env = "NULLSPACE_SSH_LISTEN", default_value = "127.0.0.1:2222")]
    ssh_listen: String,
    /// The host name SSH access answers give clients (default: the host
    /// the client reached the API at).
    #[arg(long, env = "NULLSPACE_SSH_PUBLIC_HOST")]
    ssh_public_host: Option<String>,
    #[command(flatten)]
    lifecycle: LifecycleArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Many nodes: one Postgres store and one artifact registry shared by
/// every node (see the README, "Many nodes").
#[derive(Args)]
pub struct ClusterArgs {
    /// Join the nodes sharing --database-url: the URL the other nodes reach
    /// this server's API at (e.g. http://10.0.0.2:8080). Needs Postgres and
    /// --artifact-registry.
    #[arg(long, env = "NULLSPACE_NODE_URL")]
    node_url: Option<String>,
    /// The registry (HOST[:PORT]/REPO) templates are published to and
    /// pulled from; credentials come from the Docker config, as for pulls.
    #[arg(long, env = "NULLSPACE_ARTIFACT_REGISTRY")]
    artifact_registry: Option<String>,
    /// Milliseconds a node's lease runs without a renewal (renewed every
    /// fifth of it); a node whose lease ran out --node-grace-ms ago is
    /// declared dead and its running machines end.
    #[arg(long, env = "NULLSPACE_NODE_LEASE_MS", default_value_t = 10_000)]
    node_lease_ms: u64,
    #[arg(long, env = "NULLSPACE_NODE_GRACE_MS", default_value_t = 20_000)]
    node_grace_ms: u64,
}

/// Leases, shutdown and the periodic collector.
#[derive(Args)]
pub struct LifecycleArgs {
    /// Seconds a build stays owned by this server without a lease renewal
    /// (renewed every sixth of it); after that another server recovers it.
    #[arg(long, env = "NULLSPACE_BUILD_LEASE_SECS", default_value_t = 30)]
    build_lease_secs: u64,
    /// At SIGTERM/SIGINT, seconds running builds may go on before they are
    /// stopped and handed back (re-queued, or interrupted when they carry
    /// request-time credentials).
    #[arg(long, env = "NULLSPACE_SHUTDOWN_GRACE_SECS", default_value_t = 0)]
    shutdown_grace_secs: u64,
    /// Seconds between garbage collections (0: never; `nullspace gc` runs one).
    #[arg(long, env = "NULLSPACE_GC_INTERVAL_SECS", default_value_t = 3600)]
    gc_interval_secs: u64,
    /// Bytes of one native step's output (or one Dockerfile engine run's)
    /// kept in the build log; the rest is counted, and one entry says how
    /// much was left out.
    #[arg(long, env = "NULLSPACE_STEP_LOG_LIMIT_BYTES", default_value_t = 4 << 20)]
    step_log_limit_bytes: u64,
    #[command(flatten)]
    gc: GcPolicyArgs,
    /// Preview host names are `{port}-{machine id}.{this}` (names under
    /// `localhost` resolve to loopback in browsers and curl); empty: ports
    /// are addressed by path only (`/preview/{id}/{port}/`).
    #[arg(long, env = "NULLSPACE_PREVIEW_DOMAIN", default_value = "localhost")]
    preview_domain: String,
    /// Seconds the preview proxy waits for a machine's server to begin
    /// answering before it answers 504.
    #[arg(
        long,
        env = "NULLSPACE_PREVIEW_RESPONSE_TIMEOUT_SECS",
        default_value_t = 60
    )]
    preview_response_timeout_secs: u64,
    /// HTTP connections open at once (WebSockets included); more wait in
    /// the listen backlog until one closes.
    #[arg(long, env = "NULLSPACE_MAX_CONNECTIONS", default_value_t = 512)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers; an idle
    /// keep-alive connection is closed after as long.
    #[arg(long, env = "NULLSPACE_HEADER_READ_TIMEOUT_SECS", default_value_t = 30)]
    header_read_timeout_secs: u64,
    /// Seconds a write to a client (a response, a WebSocket frame) may
    /// make no progress before the connection is ended.
    #[arg(long, env = "NULLSPACE_WRITE_STALL_TIMEOUT_SECS", default_value_t = 60)]
    write_stall_timeout_secs: u64,
}

#[derive(Args)]
pub struct GcPolicyArgs {
    /// Days build logs are kept after the build ended.
    #[arg(long, env = "NULLSPACE_LOG_RETENTION_DAYS", default_value_t = 30)]
    log_retention_days: u64,
}

impl GcPolicyArgs {
    fn policy(&self) -> nullspace_server::gc::Policy {
        use std::time::Duration;
        nullspace_server::gc::Policy {
            log_retention: Duration::from_secs(self.log_retention_days * 24 * 3600),
        }
    }
}

#[derive(Args)]
pub struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// List what would be removed, with sizes; remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    policy: GcPolicyArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
        // Colour codes only on a terminal (not in log files).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    config.machine_namespaces = !a.no_machine_namespaces;
    config.machine_dns = a.machine_dns;
    config.machine_limits.max_machines = a.max_machines;
    config.machine_limits.pool_size = a.machine_pool_size;
    config.machine_limits.pool_max = a.machine_pool_max;
    config.build_vm_memory = match a.build_vm_memory.as_str() {
        "streamed" => nullspace_server::MemoryMode::Streamed,
        _ => nullspace_server::MemoryMode::Mapped,
    };
    config.base_template = !a.no_base_template;
    if let Some(m) = a.max_machine_memory_mb {
        config.machine_limits.max_memory_mb = m;
    }
    let mut config = config.with_lease(std::time::Duration::from_secs(
        a.lifecycle.build_lease_secs.max(1),
    ));
    config.shutdown_grace = std::time::Duration::from_secs(a.lifecycle.shutdown_grace_secs);
    config.gc_interval = (a.lifecycle.gc_interval_secs > 0)
        .then(|| std::time::Duration::from_secs(a.lifecycle.gc_interval_secs));
    config.gc = a.lifecycle.gc.policy();
    config.step_log_limit = a.lifecycle.step_log_limit_bytes;
    config.ssh_listen = (a.ssh_listen != "off").then(|| a.ssh_listen.clone());
    config.ssh_public_host = a.ssh_public_host;
    config.preview_domain = Some(
        a.lifecycle
            .preview_domain
            .trim()
            .trim_matches('.')
            .to_string(),
    )
    .filter(|d| !d.is_empty());
    config.preview_response_timeout =
        std::time::Duration::from_secs(a.lifecycle.preview_response_timeout_secs.max(1));
    config.http.max_connections = a.lifecycle.max_connections.max(1);
    config.http.header_read_timeout =
        std::time::Duration::from_secs(a.lifecycle.header_read_timeout_secs.max(1));
    config.http.write_stall_timeout =
        std::time::Duration::from_secs(a.lifecycle.write_stall_timeout_secs.max(1));
    config.node_url = a.cluster.node_url;
    config.artifact_registry = a.cluster.artifact_registry;
    config.node_lease = std::time::Duration::from_millis(a.cluster.node_lease_ms.max(500));
    config.node_grace = std::time::Duration::from_millis(a.cluster.node_grace_ms);
    runtime()?.block_on(async move {
        let state = nullspace_server::open(config)
            .await
            .context("opening the data directory")?;
        let listener = nullspace_server::edge::serve::bind(&a.listen)
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
                let state = nullspace_server::open_store(config)
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

pub fn gc(a: GcArgs) -> Result<()> {
    let config = a.store.config();
    let policy = a.policy.policy();
    runtime()?.block_on(async move {
        let state = nullspace_server::open_store(config)
            .await
            .context("opening the data directory")?;
        let r = nullspace_server::gc::collect(&state, &policy, a.dry_run)
            .await
            .map_err(|e| anyhow::anyhow!("garbage collection: {}", e.message))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            let verb = if r.dry_run { "would remove" } else { "removed" };
            for i in &r.items {
                println!("{verb} {} {} ({} bytes)", i.kind, i.what, i.bytes);
            }
            println!("{verb} {} items, {} bytes", r.items.len(), r.bytes);
            for e in &r.errors {
                eprintln!("error: {e}");
            }
        }
        anyhow::ensure!(
            r.errors.is_empty(),
            "{} items could not be removed",
            r.errors.len()
        );
        Ok(())
    })
}
