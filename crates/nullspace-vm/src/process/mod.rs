//! The one owner of host processes that nullspace starts (QEMUs, build
//! engines) and of their records under a run directory:
//!
//! - [`spawn`]: how a child starts ([`Launch`]: a process group of its own,
//!   death with the spawning thread, child subreaper, niceness), and
//!   renicing a running one.
//! - [`procfs`]: what `/proc` says of a pid ([`ProcessRecord`]: start time
//!   and command line, so a reused pid is never taken for the process),
//!   liveness, and process trees.
//! - [`signal`]: signals that cannot hit a reused pid (pidfds, or a pid
//!   checked against its record), tree kills, reaping.
//! - [`records`]: one record format over the run directory: an owner
//!   directory locked (`flock`) by its owner for its life, holding one
//!   `<pid>.json` ([`ProcessRecord`]) per recorded child; [`reap_stale`]
//!   ends what dead owners left.
//! - [`watch`]: a cancellation token turned into SIGKILLs of a call's
//!   QEMUs.
//!
//! Linux only. System calls go through rustix; the one `unsafe` is
//! `CommandExt::pre_exec` (std cannot know what runs between fork and exec).

pub mod procfs;
pub mod records;
pub mod signal;
pub mod spawn;
pub mod watch;

pub use procfs::{ProcessRecord, alive, tree};
pub use records::{OWNER_PREFIX, OwnerLock, PidDir, PidFile, Reaped, VM_PREFIX, reap_stale};
pub use signal::{kill_tree, reap_child};
pub use spawn::{Launch, enter_netns, may_raise_priority, prepare};
pub use watch::sleep_cancellable;
pub(crate) use watch::{Watch, settle};

use std::path::PathBuf;

pub const QEMU: &str = "qemu-system-x86_64";

/// A failure to keep a run directory's records, naming the path or pid.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("run directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run directory {path} is locked by another process")]
    Locked { path: PathBuf },
    #[error("process {pid} ended before it could be recorded")]
    Gone { pid: u32 },
    #[error("pidfile {path}: {source}")]
    Pidfile {
        path: PathBuf,
        source: std::io::Error,
    },
}
