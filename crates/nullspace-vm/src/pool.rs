//! A bounded pool of prepared machines ([`machine::Prepared`]: QEMU
//! started with a snapshot's device configuration, memory mapping and a
//! disk overlay of its own, device state loaded, paused, agent socket
//! connected), so that creating a machine is `cont` plus the guest's first
//! answer instead of a QEMU start and a state load.
//!
//! Refills run one at a time, only once creates have been quiet for a
//! moment (`quiet`), and their QEMUs run niced (`nice`) until taken: the
//! pool's work yields the CPU to the machines' (two cores here).
//!
//! Under TCG an entry is also warmed up before it waits (`warm_up`:
//! resumed for about 0.3 s to answer the agent and run `/bin/sh -c true`,
//! then paused again): a fresh QEMU translates each guest code path the
//! first time it runs, which made the guest's first answer and first
//! command cost about 200 ms each. Such an entry's guest is that moment
//! past the snapshot (its start process ran on; its clock is set and its
//! RNG reseeded at the warm-up and again at the take); without the
//! warm-up (or under KVM) it is exactly at the snapshot.
//!
//! Entries are kept per [`PoolKey`]: everything that shapes the QEMU
//! command line or the guest (the snapshot, by directory and manifest
//! hash; vCPUs, memory, network, accelerator, memory mode) plus the
//! caller's label (the template). A take hands out only an entry of the
//! exact key asked for. A key exists once a take asked for it; one
//! background thread then keeps `size` entries ready for it, one at a
//! time (a QEMU start is CPU-heavy, and creates come first), most recently
//! used key first. At most `max_keys` keys are kept (the least recently
//! used goes, its entries ended), and a key nobody took from for
//! `idle` is dropped too.
//!
//! Every entry is an owned process: its pid is in its machine directory
//! (`<dir>/<id>/qemu.pid`) and, through the caller's [`Recorder`], in the
//! caller's own records (the server's run directory: a server that finds
//! its owner dead ends it); QEMU leads a process group of its own. It
//! does not get `PR_SET_PDEATHSIG`: a taken entry becomes a machine,
//! which must outlive the process (and the signal fires when the spawning
//! thread ends, not the process). Entries are ended when their key goes
//! ([`Pool::remove`]: a template deleted, a snapshot collected), when they
//! are found dead, and by [`Pool::shutdown`] (the server stops).

use crate::machine::{self, MachineSpec, Prepared, Restored};
use crate::snapshot::Snapshot;
use crate::{Accel, MemoryMode, VmError};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What a pool entry must match to be handed out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The caller's grouping (the server: the template id), so entries can
    /// be dropped by it.
    pub label: String,
    /// The snapshot's directory (canonical) and manifest hash.
    pub snapshot_dir: PathBuf,
    pub manifest_sha256: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub network: bool,
    pub accel: Accel,
    pub memory_mode: MemoryMode,
}

impl PoolKey {
    pub fn of(label: &str, snap: &Snapshot) -> PoolKey {
        let vm = &snap.meta.vm;
        PoolKey {
            label: label.to_string(),
            snapshot_dir: snap.dir.clone(),
            manifest_sha256: snap.manifest_sha256.clone(),
            vcpus: vm.vcpus,
            memory_mb: vm.memory_mb,
            network: vm.network,
            accel: vm.accel,
            memory_mode: vm.memory_mode,
        }
    }
}

/// Records a pool entry's QEMU in the caller's books while it is pooled;
/// the returned guard is dropped when the entry is taken or ended.
pub type Recorder = dyn Fn(u32) -> Option<Box<dyn Send>> + Send + Sync;

#[derive(Clone)]
pub struct PoolConfig {
    /// Entries kept ready per key (0: no pool).
    pub size: usize,
    /// Keys kept at most.
    pub max_keys: usize,
    /// A key not taken from for this long is dropped.
    pub idle: Duration,
    /// Entries' machine directories go here (`<dir>/<id>`).
    pub dir: PathBuf,
    /// Makes an entry's id (its machine id once taken).
    pub new_id: Arc<dyn Fn() -> String + Send + Sync>,
    /// From QEMU start to paused and loaded.
    pub timeout: Duration,
    /// Under TCG, run each entry for a moment before it waits
    /// ([`Prepared::warm_up`]): its guest is then that moment past the
    /// snapshot, and a create saves the translation of the guest's first
    /// answer and first command (about 2 x 200 ms here).
    pub warm_up: bool,
    /// Entries' QEMUs run at this niceness until taken (their start and
    /// warm-up yield the CPU to running machines; a take sets them back
    /// to 0, which needs `CAP_SYS_NICE`: use 0 without it).
    pub nice: i32,
    /// Refills wait until no take happened for this long (a create's
    /// first commands run without a refill beside them).
    pub quiet: Duration,
    pub recorder: Option<Arc<Recorder>>,
    /// Entries get a network namespace each ([`MachineSpec::net`]).
    pub net: Option<crate::net::HostNet>,
}

/// A prepared machine taken from the pool.
pub struct Entry {
    /// The machine id the entry was prepared for (its directory's name).
    pub id: String,
    pub key: PoolKey,
    prepared: Prepared,
    _record: Option<Box<dyn Send>>,
    /// When it became ready.
    pub ready_since: Instant,
}

impl Entry {
    /// The machine directory (`<dir>/<id>`).
    pub fn dir(&self) -> &Path {
        self.prepared.dir()
    }

    pub fn pid(&self) -> u32 {
        self.prepared.handle().pid
    }

    /// Starts the guest (see [`Prepared::start`]); on failure QEMU is
    /// killed and the directory removed.
    pub fn start(self, limit: Duration, cancel: &CancellationToken) -> Result<Restored, VmError> {
        let Entry {
            prepared, _record, ..
        } = self;
        let r = prepared.start(limit, cancel);
        // A machine now (or gone): no longer the pool's to record.
        drop(_record);
        r
    }

    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }
}

/// Per-key figures ([`Pool::stats`]).
#[derive(Debug, Clone, Default)]
pub struct KeyStats {
    pub ready: usize,
    pub hits: u64,
    pub misses: u64,
    pub prepared: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

struct Slot {
    snapshot: Snapshot,
    ready: VecDeque<Entry>,
    used: Instant,
    stats: KeyStats,
    /// Consecutive failures, and when to try again.
    failing: u32,
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    slots: HashMap<PoolKey, Slot>,
    /// The key and id of the entry being prepared right now.
    preparing: Option<(PoolKey, String)>,
    /// The last take (refills wait for `quiet` after it).
    last_take: Option<Instant>,
    stopped: bool,
}

struct Inner {
    cfg: PoolConfig,
    state: Mutex<State>,
    wake: Condvar,
    cancel: CancellationToken,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See the module docs.
pub struct Pool {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Pool {
    /// A pool filled by a background thread of its own (none when
    /// `cfg.size` is 0).
    pub fn new(cfg: PoolConfig) -> Pool {
        let enabled = cfg.size > 0;
        let inner = Arc::new(Inner {
            cfg,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            cancel: CancellationToken::new(),
        });
        let thread = enabled
            .then(|| {
                let i = inner.clone();
                std::thread::Builder::new()
                    .name("ns-vm-pool".into())
                    .spawn(move || refill(&i))
                    .ok()
            })
            .flatten();
        Pool {
            inner,
            thread: Mutex::new(thread),
        }
    }

    pub fn size(&self) -> usize {
        self.inner.cfg.size
    }

    /// A ready entry of exactly `PoolKey::of(label, snapshot)` (whose QEMU
    /// still runs), or `None` (a miss). Either way the key is marked as
    /// wanted, and the pool refills it in the background.
    pub fn take(&self, label: &str, snapshot: &Snapshot) -> Option<Entry> {
        if self.inner.cfg.size == 0 {
            return None;
        }
        let key = &PoolKey::of(label, snapshot);
        let mut dead = vec![];
        let mut evicted = vec![];
        let got = {
            let mut st = self.inner.lock();
            if st.stopped {
                return None;
            }
            let slot = st.slots.entry(key.clone()).or_insert_with(|| Slot {
                snapshot: snapshot.clone(),
                ready: VecDeque::new(),
                used: Instant::now(),
                stats: KeyStats::default(),
                failing: 0,
                retry_at: None,
            });
            slot.used = Instant::now();
            st.last_take = Some(Instant::now());
            let slot = st.slots.get_mut(key).expect("just inserted");
            let mut got = None;
            while let Some(e) = slot.ready.pop_front() {
                if e.prepared.alive() {
                    got = Some(e);
                    break;
                }
                dead.push(e);
            }
            if got.is_some() {
                slot.stats.hits += 1;
            } else {
                slot.stats.misses += 1;
            }
            evicted.extend(evict(&mut st, self.inner.cfg.max_keys, self.inner.cfg.idle));
            got
        };
        self.inner.wake.notify_all();
        // Ended outside the lock (a kill waits for the process).
        drop(dead);
        drop(evicted);
        got
    }

    /// Ends every entry (and forgets every key) that `drop_it` picks;
    /// returns how many entries were ended. An entry being prepared for
    /// such a key is ended when it is done.
    pub fn remove(&self, drop_it: impl Fn(&PoolKey) -> bool) -> usize {
        let gone: Vec<Entry> = {
            let mut st = self.inner.lock();
            let keys: Vec<PoolKey> = st.slots.keys().filter(|k| drop_it(k)).cloned().collect();
            keys.iter()
                .filter_map(|k| st.slots.remove(k))
                .flat_map(|s| s.ready)
                .collect()
        };
        let n = gone.len();
        drop(gone);
        n
    }

    /// The ids (machine directory names) of the entries it holds or is
    /// preparing.
    pub fn ids(&self) -> Vec<String> {
        let st = self.inner.lock();
        st.slots
            .values()
            .flat_map(|s| s.ready.iter().map(|e| e.id.clone()))
            .chain(st.preparing.as_ref().map(|p| p.1.clone()))
            .collect()
    }

    /// Figures of every key.
    pub fn stats(&self) -> Vec<(PoolKey, KeyStats)> {
        let st = self.inner.lock();
        st.slots
            .iter()
            .map(|(k, s)| {
                let mut x = s.stats.clone();
                x.ready = s.ready.len();
                (k.clone(), x)
            })
            .collect()
    }

    /// Waits until every wanted key has `size` entries (or `limit` passed);
    /// whether it got there.
    pub fn wait_full(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            {
                let st = self.inner.lock();
                let full = st.preparing.is_none()
                    && st
                        .slots
                        .values()
                        .all(|s| s.ready.len() >= self.inner.cfg.size || s.retry_at.is_some());
                if full {
                    return true;
                }
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops refilling and ends every entry (also one being prepared);
    /// returns when they are gone.
    pub fn shutdown(&self) {
        self.inner.lock().stopped = true;
        self.inner.cancel.cancel();
        self.inner.wake.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        let all: Vec<Entry> = {
            let mut st = self.inner.lock();
            st.slots.drain().flat_map(|(_, s)| s.ready).collect()
        };
        drop(all);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Keys beyond `max_keys` (least recently used first) and keys idle for
/// `idle`: removed; their entries returned to be ended.
fn evict(st: &mut State, max_keys: usize, idle: Duration) -> Vec<Entry> {
    let mut out = vec![];
    let stale: Vec<PoolKey> = st
        .slots
        .iter()
        .filter(|(_, s)| s.used.elapsed() > idle)
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        out.extend(st.slots.remove(&k).map(|s| s.ready).unwrap_or_default());
    }
    while st.slots.len() > max_keys.max(1) {
        let Some(k) = st
            .slots
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        out.extend(st.slots.remove(&k).map(|s| s.ready).unwrap_or_default());
    }
    out
}

/// The refill thread: one entry at a time, for the most recently used key
/// that lacks entries.
fn refill(inner: &Inner) {
    let cfg = &inner.cfg;
    loop {
        let (key, snap, id) = {
            let mut st = inner.lock();
            loop {
                if st.stopped {
                    return;
                }
                let stale = evict(&mut st, cfg.max_keys, cfg.idle);
                if !stale.is_empty() {
                    // Ended outside the lock (a kill waits for the process).
                    drop(st);
                    drop(stale);
                    st = inner.lock();
                    continue;
                }
                let calm = st.last_take.map_or(Duration::MAX, |t| t.elapsed());
                if calm < cfg.quiet {
                    st = inner
                        .wake
                        .wait_timeout(st, cfg.quiet - calm)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    continue;
                }
                let now = Instant::now();
                let next = st
                    .slots
                    .iter()
                    .filter(|(_, s)| {
                        s.ready.len() < cfg.size && s.retry_at.is_none_or(|t| t <= now)
                    })
                    .max_by_key(|(_, s)| s.used)
                    .map(|(k, s)| (k.clone(), s.snapshot.clone()));
                if let Some((k, snap)) = next {
                    let id = (cfg.new_id)();
                    st.preparing = Some((k.clone(), id.clone()));
                    break (k, snap, id);
                }
                st = inner
                    .wake
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let spec = MachineSpec {
            dir: cfg.dir.join(&id),
            timeout: cfg.timeout,
            nice: cfg.nice,
            net: cfg.net.clone(),
        };
        let r = machine::prepare(&snap, &spec, &inner.cancel).and_then(|mut p| {
            if cfg.warm_up && key.accel == Accel::Tcg {
                p.warm_up(cfg.timeout, &inner.cancel)?;
            }
            Ok(p)
        });
        let mut st = inner.lock();
        st.preparing = None;
        let stopped = st.stopped;
        let slot = st.slots.get_mut(&key).filter(|_| !stopped);
        let extra = match (r, slot) {
            (Ok(p), Some(slot)) => {
                let record = cfg.recorder.as_ref().and_then(|f| f(p.handle().pid));
                slot.ready.push_back(Entry {
                    id,
                    key: key.clone(),
                    prepared: p,
                    _record: record,
                    ready_since: Instant::now(),
                });
                slot.stats.prepared += 1;
                slot.failing = 0;
                slot.retry_at = None;
                None
            }
            // The key went (or the pool stopped) meanwhile: not kept.
            (Ok(p), None) => Some(p),
            (Err(e), slot) => {
                if let Some(slot) = slot {
                    slot.failing += 1;
                    slot.stats.failures += 1;
                    slot.stats.last_error = Some(e.to_string());
                    // 2 s, 4 s, 8 s … up to a minute.
                    let backoff =
                        Duration::from_secs(1 << slot.failing.min(6)).min(Duration::from_secs(60));
                    slot.retry_at = Some(Instant::now() + backoff);
                }
                None
            }
        };
        drop(st);
        drop(extra);
    }
}
