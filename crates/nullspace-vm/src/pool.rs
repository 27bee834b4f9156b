//! A bounded pool of prepared machines ([`machine::Prepared`]: QEMU
//! started with a snapshot's device configuration, memory mapping and a
//! disk overlay of its own, device state loaded, paused, agent socket
//! connected), so that creating a machine is `cont` plus the guest's first
//! answer instead of a QEMU start and a state load.
//!
//! Refills run one at a time and their QEMUs run niced (`nice`) until
//! taken: the pool's work yields the CPU to the machines' (two cores
//! here). A key with no entry left refills at once, while creates go on;
//! a key that still has one waits until creates have been quiet for a
//! moment (`quiet`), so a create's first commands rarely share the CPU
//! with a QEMU start.
//!
//! How many entries a key keeps (its target) follows demand: the takes of
//! the last `demand_window`, between `size` (the floor) and `max_size`
//! (the ceiling); a burst of creates thus grows the key's stock, and a
//! quiet key shrinks back to the floor as its entries are taken. Callers
//! may also pin a key ([`Pool::pin`]: a warm pool with its own floor and
//! ceiling), which keeps it from eviction while pinned.
//!
//! Entries hold capacity: before a refill starts, `admit` must grant it
//! (the server's machine and memory bounds); an entry keeps that grant
//! until it is taken (the create then holds it: [`Entry::take_admission`])
//! or ended. A create that finds the host full asks the pool to give way
//! ([`Pool::shed_one`]).
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
//! exact key asked for. A key exists once a take asked for it (or a pin
//! named it); one background thread then keeps its target of entries
//! ready, one at a time (a QEMU start is CPU-heavy, and creates come
//! first), empty keys first, then the most recently used. At most `max_keys` keys are kept (the least recently
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
use std::any::Any;
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

/// Grants an entry of this key the capacity it needs (`None`: the host is
/// full, no refill now); the grant is released when dropped.
pub type Admit = dyn Fn(&PoolKey) -> Option<Box<dyn Any + Send>> + Send + Sync;

#[derive(Clone)]
pub struct PoolConfig {
    /// Entries kept ready per wanted key at least (0: no pool).
    pub size: usize,
    /// Entries a key's demand may grow it to.
    pub max_size: usize,
    /// Takes within this window are a key's demand.
    pub demand_window: Duration,
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
    /// A key that still has an entry refills only once no take happened
    /// for this long (a create's first commands run without a refill
    /// beside them); an empty key refills at once.
    pub quiet: Duration,
    pub recorder: Option<Arc<Recorder>>,
    /// Capacity for each entry (none: entries are not counted).
    pub admit: Option<Arc<Admit>>,
    /// A take that finds no entry waits for the one being prepared for
    /// its key when that is expected within this (its key's mean
    /// preparation time so far, less what has passed): sooner than a
    /// restore of its own, which would also share the CPU with it.
    pub wait_for_refill: Duration,
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
    admission: Option<Box<dyn Any + Send>>,
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
            prepared,
            _record,
            admission,
            ..
        } = self;
        // Whoever took the entry holds capacity of its own by now.
        drop(admission);
        let r = prepared.start(limit, cancel);
        // A machine now (or gone): no longer the pool's to record.
        drop(_record);
        r
    }

    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    /// The capacity granted to this entry (`PoolConfig::admit`), for the
    /// machine it becomes to hold from now on.
    pub fn take_admission(&mut self) -> Option<Box<dyn Any + Send>> {
        self.admission.take()
    }
}

/// Per-key figures ([`Pool::stats`]).
#[derive(Debug, Clone, Default)]
pub struct KeyStats {
    pub ready: usize,
    /// Entries being prepared now (0 or 1).
    pub warming: usize,
    /// What the key keeps ready now (demand or pins, within bounds).
    pub target: usize,
    pub hits: u64,
    pub misses: u64,
    pub prepared: u64,
    pub failures: u64,
    /// Entries ended to give way to creates on a full host.
    pub shed: u64,
    /// Sum of the refills' times (QEMU start to ready), ms.
    pub refill_ms_sum: u64,
    pub last_error: Option<String>,
}

/// Entries a key keeps: its recent takes between the pool's `floor` and
/// `ceiling`, and at least what its pins ask for (at most what they
/// allow).
fn target<'a>(
    takes: usize,
    pins: impl Iterator<Item = &'a Pin>,
    floor: usize,
    ceiling: usize,
) -> usize {
    let demand = takes.clamp(floor, ceiling.max(floor));
    let (mut min, mut max, mut pinned) = (0, 0, false);
    for p in pins {
        (min, max, pinned) = (min + p.min, max + p.max, true);
    }
    if pinned {
        demand.max(min).min(max.max(min))
    } else {
        demand
    }
}

/// A caller's hold on a key: a floor and ceiling of its own.
#[derive(Debug, Clone, Copy)]
struct Pin {
    min: usize,
    max: usize,
}

struct Slot {
    snapshot: Snapshot,
    ready: VecDeque<Entry>,
    used: Instant,
    /// Recent takes (within `demand_window`).
    takes: VecDeque<Instant>,
    pins: HashMap<String, Pin>,
    stats: KeyStats,
    /// Consecutive failures, and when to try again.
    failing: u32,
    retry_at: Option<Instant>,
}

impl Slot {
    fn new(snapshot: &Snapshot) -> Slot {
        Slot {
            snapshot: snapshot.clone(),
            ready: VecDeque::new(),
            used: Instant::now(),
            takes: VecDeque::new(),
            pins: HashMap::new(),
            stats: KeyStats::default(),
            failing: 0,
            retry_at: None,
        }
    }

    /// Entries to keep now ([`target`] of the takes within
    /// `demand_window` and the pins).
    fn target(&mut self, cfg: &PoolConfig) -> usize {
        while self
            .takes
            .front()
            .is_some_and(|t| t.elapsed() > cfg.demand_window)
        {
            self.takes.pop_front();
        }
        target(self.takes.len(), self.pins.values(), cfg.size, cfg.max_size)
    }
}

#[derive(Default)]
struct State {
    slots: HashMap<PoolKey, Slot>,
    /// The key and id of the entry being prepared right now.
    preparing: Option<(PoolKey, String)>,
    /// When that preparation began.
    preparing_since: Option<Instant>,
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
    /// A pool filled by a background thread of its own. With `size` and
    /// `max_size` 0 only pinned keys get entries.
    pub fn new(cfg: PoolConfig) -> Pool {
        let enabled = true;
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
        self.take_within(label, snapshot, Duration::ZERO)
    }

    /// [`Pool::take`], waiting up to `wait` for an entry of the key to
    /// become ready when none is (one hit or miss is counted either way).
    pub fn take_within(&self, label: &str, snapshot: &Snapshot, wait: Duration) -> Option<Entry> {
        let key = &PoolKey::of(label, snapshot);
        let mut end = Instant::now() + wait;
        let mut dead = vec![];
        let mut evicted = vec![];
        let mut st = self.inner.lock();
        let mut counted = false;
        let got = loop {
            if st.stopped {
                return None;
            }
            let now = Instant::now();
            let prep_since = st
                .preparing_since
                .filter(|_| st.preparing.as_ref().is_some_and(|p| &p.0 == key));
            let slot = st
                .slots
                .entry(key.clone())
                .or_insert_with(|| Slot::new(snapshot));
            slot.used = now;
            if !counted {
                slot.takes.push_back(now);
            }
            let mut got = None;
            while let Some(e) = slot.ready.pop_front() {
                if e.prepared.alive() {
                    got = Some(e);
                    break;
                }
                dead.push(e);
            }
            if got.is_none() && !counted {
                // An entry about to be ready is worth waiting for.
                let soon = prep_since.and_then(|since| {
                    let mean = slot.stats.refill_ms_sum.checked_div(slot.stats.prepared)?;
                    Duration::from_millis(mean).checked_sub(since.elapsed())
                });
                if let Some(left) = soon.filter(|l| *l <= self.inner.cfg.wait_for_refill) {
                    end = end.max(now + left + Duration::from_millis(50));
                }
            }
            if got.is_some() || now >= end {
                if got.is_some() {
                    slot.stats.hits += 1;
                } else {
                    slot.stats.misses += 1;
                }
                st.last_take = Some(now);
                break got;
            }
            counted = true;
            // Wake the refill thread for this key, then wait for its entry.
            self.inner.wake.notify_all();
            st = self
                .inner
                .wake
                .wait_timeout(st, (end - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        evicted.extend(evict(&mut st, self.inner.cfg.max_keys, self.inner.cfg.idle));
        drop(st);
        self.inner.wake.notify_all();
        // Ended outside the lock (a kill waits for the process).
        drop(dead);
        drop(evicted);
        got
    }

    /// Keeps between `min` and `max` entries of `PoolKey::of(label,
    /// snapshot)` ready under the caller's `pin` name (a warm pool),
    /// whatever the demand; a pinned key is never evicted. Pinning again
    /// under the same name replaces the bounds (and the key, if it moved).
    pub fn pin(&self, pin: &str, label: &str, snapshot: &Snapshot, min: usize, max: usize) {
        let key = PoolKey::of(label, snapshot);
        let gone = self.unpin_keep(pin, Some(&key));
        {
            let mut st = self.inner.lock();
            let slot = st.slots.entry(key).or_insert_with(|| Slot::new(snapshot));
            slot.pins.insert(pin.to_string(), Pin { min, max });
            slot.used = Instant::now();
        }
        drop(gone);
        self.inner.wake.notify_all();
    }

    /// Drops the pin `pin`; the key's entries beyond its new target are
    /// ended (a drained or deleted warm pool gives its machines back).
    pub fn unpin(&self, pin: &str) {
        let gone = self.unpin_keep(pin, None);
        drop(gone);
        self.inner.wake.notify_all();
    }

    /// Removes `pin` from every key but `keep`; returns the entries now
    /// beyond their key's target, to be ended outside the lock.
    fn unpin_keep(&self, pin: &str, keep: Option<&PoolKey>) -> Vec<Entry> {
        let mut st = self.inner.lock();
        let cfg = &self.inner.cfg;
        let mut out = vec![];
        for (k, slot) in st.slots.iter_mut() {
            if Some(k) == keep || slot.pins.remove(pin).is_none() {
                continue;
            }
            let target = slot.target(cfg);
            while slot.ready.len() > target {
                out.extend(slot.ready.pop_back());
            }
        }
        out
    }

    /// The figures of one key (none if nobody asked for it yet).
    pub fn key_stats(&self, label: &str, snapshot: &Snapshot) -> Option<KeyStats> {
        let key = PoolKey::of(label, snapshot);
        let mut st = self.inner.lock();
        let warming = usize::from(st.preparing.as_ref().is_some_and(|p| p.0 == key));
        let slot = st.slots.get_mut(&key)?;
        let mut x = slot.stats.clone();
        x.ready = slot.ready.len();
        x.warming = warming;
        x.target = slot.target(&self.inner.cfg);
        Some(x)
    }

    /// Ends one ready entry so that a create gets its capacity (the host
    /// is full): from the key with the most entries beyond its floor, the
    /// one ready longest. Whether there was one.
    pub fn shed_one(&self) -> bool {
        let gone = {
            let mut st = self.inner.lock();
            let cfg = &self.inner.cfg;
            let pick = st
                .slots
                .iter_mut()
                .filter(|(_, s)| !s.ready.is_empty())
                .map(|(k, s)| {
                    let floor = s.pins.values().map(|p| p.min).sum::<usize>().max(cfg.size);
                    (s.ready.len() as isize - floor as isize, k.clone())
                })
                .max_by_key(|(over, _)| *over)
                .map(|(_, k)| k);
            pick.and_then(|k| {
                let slot = st.slots.get_mut(&k)?;
                slot.stats.shed += 1;
                slot.ready.pop_front()
            })
        };
        let shed = gone.is_some();
        drop(gone);
        shed
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
        let mut st = self.inner.lock();
        let preparing = st.preparing.as_ref().map(|p| p.0.clone());
        let cfg = &self.inner.cfg;
        st.slots
            .iter_mut()
            .map(|(k, s)| {
                let mut x = s.stats.clone();
                x.ready = s.ready.len();
                x.warming = usize::from(preparing.as_ref() == Some(k));
                x.target = s.target(cfg);
                (k.clone(), x)
            })
            .collect()
    }

    /// Waits until every wanted key has its target of entries (or `limit`
    /// passed);
    /// whether it got there.
    pub fn wait_full(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            {
                let mut st = self.inner.lock();
                let cfg = &self.inner.cfg;
                let full = st.preparing.is_none()
                    && st
                        .slots
                        .values_mut()
                        .all(|s| s.ready.len() >= s.target(cfg) || s.retry_at.is_some());
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
        .filter(|(_, s)| s.pins.is_empty() && s.used.elapsed() > idle)
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        out.extend(st.slots.remove(&k).map(|s| s.ready).unwrap_or_default());
    }
    while st.slots.len() > max_keys.max(1) {
        let Some(k) = st
            .slots
            .iter()
            .filter(|(_, s)| s.pins.is_empty())
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
        let (key, snap, id, admission) = {
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
                let now = Instant::now();
                // Keys short of their target: empty ones first, then the
                // most recently used.
                let next = st
                    .slots
                    .iter_mut()
                    .filter(|(_, s)| s.retry_at.is_none_or(|t| t <= now))
                    .filter_map(|(k, s)| {
                        let target = s.target(cfg);
                        (s.ready.len() < target).then_some((s.ready.is_empty(), s.used, k))
                    })
                    .max_by_key(|(empty, used, _)| (*empty, *used))
                    .map(|(empty, _, k)| (empty, k.clone()));
                let calm = st.last_take.map_or(Duration::MAX, |t| t.elapsed());
                match next {
                    Some((false, _)) if calm < cfg.quiet => {
                        st = inner
                            .wake
                            .wait_timeout(st, cfg.quiet - calm)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    Some((_, k)) => {
                        // Capacity first: a full host gets no new entry
                        // (checked again in a moment).
                        let admission = match &cfg.admit {
                            Some(admit) => match admit(&k) {
                                Some(a) => Some(a),
                                None => {
                                    st = inner
                                        .wake
                                        .wait_timeout(st, Duration::from_millis(500))
                                        .unwrap_or_else(|p| p.into_inner())
                                        .0;
                                    continue;
                                }
                            },
                            None => None,
                        };
                        let snap = st.slots[&k].snapshot.clone();
                        let id = (cfg.new_id)();
                        st.preparing = Some((k.clone(), id.clone()));
                        st.preparing_since = Some(Instant::now());
                        break (k, snap, id, admission);
                    }
                    None => {
                        st = inner
                            .wake
                            .wait_timeout(st, Duration::from_secs(1))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        };
        let began = Instant::now();
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
        st.preparing_since = None;
        let stopped = st.stopped;
        // Kept only if the key still wants it (a pin dropped meanwhile
        // lowers the target).
        let wanted = st
            .slots
            .get_mut(&key)
            .is_some_and(|s| r.is_err() || s.ready.len() < s.target(cfg));
        let slot = st.slots.get_mut(&key).filter(|_| !stopped && wanted);
        let extra = match (r, slot) {
            (Ok(p), Some(slot)) => {
                let record = cfg.recorder.as_ref().and_then(|f| f(p.handle().pid));
                slot.ready.push_back(Entry {
                    id,
                    key: key.clone(),
                    prepared: p,
                    _record: record,
                    admission,
                    ready_since: Instant::now(),
                });
                slot.stats.prepared += 1;
                slot.stats.refill_ms_sum += began.elapsed().as_millis() as u64;
                slot.failing = 0;
                slot.retry_at = None;
                None
            }
            // The key went or wants no more (or the pool stopped): not kept.
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
        // A waiting take may want this entry.
        inner.wake.notify_all();
        drop(extra);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_follows_demand_within_bounds_and_pins() {
        let none: [Pin; 0] = [];
        // Demand between the floor and the ceiling.
        assert_eq!(target(0, none.iter(), 2, 8), 2);
        assert_eq!(target(5, none.iter(), 2, 8), 5);
        assert_eq!(target(30, none.iter(), 2, 8), 8);
        // No floor and no ceiling: nothing, whatever the demand.
        assert_eq!(target(30, none.iter(), 0, 0), 0);
        // Pins add their floors and bound the demand by their ceilings.
        let pins = [Pin { min: 3, max: 4 }, Pin { min: 1, max: 2 }];
        assert_eq!(target(0, pins.iter(), 0, 0), 4);
        assert_eq!(target(5, pins.iter(), 2, 8), 5);
        assert_eq!(target(30, pins.iter(), 2, 8), 6);
        // A pin whose ceiling is below its floor keeps its floor.
        let odd = [Pin { min: 3, max: 1 }];
        assert_eq!(target(0, odd.iter(), 0, 0), 3);
    }
}
