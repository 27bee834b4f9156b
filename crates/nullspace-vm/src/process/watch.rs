//! Cancellation of a VM call: a watcher thread SIGKILLs the call's QEMUs
//! through pidfds when its token fires, so blocking socket reads end and
//! the call unwinds.

use super::signal::PidFd;
use crate::VmError;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Shared {
    pidfds: Mutex<Vec<PidFd>>,
    done: AtomicBool,
    fired: AtomicBool,
}

/// Watches a cancellation token for the length of one operation (a build,
/// a restore): when it fires, every QEMU registered with [`Watch::register`]
/// gets SIGKILL at once (checked every 20 ms), which also ends any blocking
/// read on its agent or QMP socket. The operation itself then unwinds,
/// reaps its children and removes its directories.
pub(crate) struct Watch {
    token: CancellationToken,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    pub(crate) fn new(token: &CancellationToken) -> Watch {
        let shared = Arc::new(Shared {
            pidfds: Mutex::new(vec![]),
            done: AtomicBool::new(false),
            fired: AtomicBool::new(false),
        });
        let (s, t) = (shared.clone(), token.clone());
        let thread = std::thread::Builder::new()
            .name("ns-vm-cancel".into())
            .spawn(move || {
                while !s.done.load(Ordering::SeqCst) {
                    if t.is_cancelled() {
                        for p in s.pidfds.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                            if p.kill() {
                                s.fired.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    std::thread::park_timeout(Duration::from_millis(20));
                }
            })
            .ok();
        Watch {
            token: token.clone(),
            shared,
            thread,
        }
    }

    /// Kills `child` when the token fires (at once if it already has).
    pub(crate) fn register(&self, child: &Child) {
        if let Some(p) = PidFd::open(child.id()) {
            if self.token.is_cancelled() && p.kill() {
                self.shared.fired.store(true, Ordering::SeqCst);
            }
            self.shared
                .pidfds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(p);
        }
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// `Err(Cancelled)` once the token fired.
    pub(crate) fn check(&self) -> Result<(), VmError> {
        if self.token.is_cancelled() {
            Err(VmError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Stops watching; whether it killed a live process.
    pub(crate) fn finish(mut self) -> bool {
        self.stop();
        self.shared.fired.load(Ordering::SeqCst)
    }

    fn stop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sleeps `d` in steps of at most 50 ms; `Err(Cancelled)` when `token` fires.
pub fn sleep_cancellable(token: &CancellationToken, d: Duration) -> Result<(), VmError> {
    let end = Instant::now() + d;
    loop {
        if token.is_cancelled() {
            return Err(VmError::Cancelled);
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The result of an operation run under a [`Watch`]: any error after the
/// token fired is [`VmError::Cancelled`] (the kill caused it); a success is
/// kept unless the watch killed a live process (then the value, e.g. a VM
/// whose QEMU it killed, is dropped and the result is `Cancelled`).
pub(crate) fn settle<T>(r: Result<T, VmError>, watch: Watch) -> Result<T, VmError> {
    let token = watch.token.clone();
    let fired = watch.finish();
    match r {
        Err(_) if token.is_cancelled() => Err(VmError::Cancelled),
        Ok(_) if fired => Err(VmError::Cancelled),
        r => r,
    }
}
