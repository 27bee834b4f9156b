//! Directory watches (`watch`): inotify on a directory and, when
//! recursive, on every directory below it (new ones are added as they
//! appear, and what they already hold is reported as created), streamed as
//! `file_events` until the host cancels or the directory goes away.
//!
//! The request thread runs as the requested user for the whole watch
//! (inotify checks read permission per directory; see `files.rs` for the
//! per-thread identity). Bounds: [`MAX_WATCHES`] at once; events wait for
//! the host's credit in a queue of at most `WATCH_QUEUE` bytes, where a
//! repeat of a held event is coalesced and an event beyond it is counted in
//! the next batch's `dropped` (as is a kernel queue overflow); at most
//! `MAX_WATCHED_DIRS` directories per watch.

use crate::agent::{Failure, Outcome, Resp};
use crate::files::{AsUser, absolute};
use crate::procs::State;
use nullspace_model::agent::watch::{
    BATCH_COST, MAX_WATCHED_DIRS, WATCH_BATCH, WATCH_BATCH_BYTES, WATCH_QUEUE,
};
use nullspace_model::agent::{ErrorCode, Event, WatchEvent, WatchKind, WatchSpec};
use rustix::fd::{AsFd, BorrowedFd};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Watches served at once (each holds a request thread and an inotify instance).
pub const MAX_WATCHES: usize = 16;
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Releases a watch slot when the watch ends.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn mask() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::MODIFY
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::ATTRIB
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
        | WatchFlags::EXCL_UNLINK
}

/// Everything a watch tracks besides its inotify descriptor.
struct Watcher {
    root: PathBuf,
    recursive: bool,
    /// Watched directories by watch descriptor.
    dirs: HashMap<i32, PathBuf>,
    root_wd: i32,
    queue: VecDeque<WatchEvent>,
    /// The queued events, for coalescing repeats.
    held: HashSet<WatchEvent>,
    queued_bytes: usize,
    dropped: u64,
    /// Directories moved away in this read, by cookie: their `moved_to`
    /// renames their watches; without one they left the tree.
    moving: Vec<(u32, PathBuf)>,
    ended: Option<String>,
}

impl Watcher {
    fn push(&mut self, kind: WatchKind, path: &Path) {
        let name = path
            .strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .to_string();
        let ev = WatchEvent {
            kind,
            name,
            path: path.to_string_lossy().to_string(),
        };
        if self.held.contains(&ev) {
            return;
        }
        let cost = ev.stream_bytes();
        if self.queued_bytes + cost > WATCH_QUEUE {
            self.dropped += 1;
            return;
        }
        self.queued_bytes += cost;
        self.held.insert(ev.clone());
        self.queue.push_back(ev);
    }

    /// Watches `top` and (recursively) the directories below it; `report`:
    /// what they hold is reported as created (they appeared after the
    /// watch began). Directories that vanish or cannot be read meanwhile
    /// are skipped; beyond the directory limit, `Err`.
    fn add_tree(&mut self, fd: BorrowedFd<'_>, top: &Path, report: bool) -> Result<(), String> {
        let mut stack = vec![top.to_path_buf()];
        while let Some(dir) = stack.pop() {
            if self.dirs.len() >= MAX_WATCHED_DIRS {
                return Err(format!(
                    "more than {MAX_WATCHED_DIRS} directories under {}",
                    self.root.display()
                ));
            }
            let Ok(wd) = inotify::add_watch(fd, &dir, mask() | WatchFlags::DONT_FOLLOW) else {
                continue;
            };
            self.dirs.insert(wd, dir.clone());
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if report {
                    self.push(WatchKind::Create, &p);
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                }
            }
        }
        Ok(())
    }

    fn add_new_dir(&mut self, fd: BorrowedFd<'_>, dir: &Path) {
        if let Err(e) = self.add_tree(fd, dir, true) {
            // Changes under the directories not watched are lost.
            self.dropped += 1;
            crate::log(&format!("watch: {e}"));
        }
    }

    /// Reads what inotify has (non-blocking) and queues it.
    fn read(&mut self, fd: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>]) -> Result<(), Failure> {
        let mut r = inotify::Reader::new(fd, buf);
        loop {
            let ev = match r.next() {
                Ok(ev) => ev,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => break,
                Err(e) => {
                    return Err(Failure::new(ErrorCode::Io, format!("reading inotify: {e}")));
                }
            };
            let (wd, m, cookie) = (ev.wd(), ev.events(), ev.cookie());
            let name = ev.file_name().map(|n| n.to_bytes().to_vec());
            self.one(fd, wd, m, cookie, name);
        }
        // Directories moved out of the tree: their watches would report
        // stale paths.
        for (_, gone) in std::mem::take(&mut self.moving) {
            let stale: Vec<i32> = self
                .dirs
                .iter()
                .filter(|(_, p)| p.starts_with(&gone))
                .map(|(wd, _)| *wd)
                .collect();
            for wd in stale {
                let _ = inotify::remove_watch(fd, wd);
                self.dirs.remove(&wd);
            }
        }
        Ok(())
    }

    fn one(
        &mut self,
        fd: BorrowedFd<'_>,
        wd: i32,
        m: ReadFlags,
        cookie: u32,
        name: Option<Vec<u8>>,
    ) {
        if m.contains(ReadFlags::QUEUE_OVERFLOW) {
            self.dropped += 1;
            return;
        }
        let Some(dir) = self.dirs.get(&wd).cloned() else {
            return;
        };
        if m.contains(ReadFlags::IGNORED) {
            self.dirs.remove(&wd);
            if wd == self.root_wd && self.ended.is_none() {
                self.ended = Some(format!("{} is gone", self.root.display()));
            }
            return;
        }
        if wd == self.root_wd && m.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF) {
            self.ended = Some(format!("{} was removed or moved", self.root.display()));
            return;
        }
        // Changes of a directory itself are its parent's events.
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return;
        };
        let path = dir.join(OsStr::from_bytes(&name));
        let is_dir = m.contains(ReadFlags::ISDIR);
        if m.contains(ReadFlags::CREATE) {
            self.push(WatchKind::Create, &path);
            if is_dir && self.recursive {
                self.add_new_dir(fd, &path);
            }
        }
        if m.contains(ReadFlags::MOVED_TO) {
            self.push(WatchKind::Create, &path);
            if is_dir && self.recursive {
                match self.moving.iter().position(|(c, _)| *c == cookie) {
                    Some(i) => {
                        let (_, old) = self.moving.remove(i);
                        for p in self.dirs.values_mut() {
                            if let Ok(rest) = p.strip_prefix(&old) {
                                *p = path.join(rest);
                            }
                        }
                    }
                    None => self.add_new_dir(fd, &path),
                }
            }
        }
        if m.contains(ReadFlags::MODIFY) {
            self.push(WatchKind::Write, &path);
        }
        if m.contains(ReadFlags::ATTRIB) {
            self.push(WatchKind::Chmod, &path);
        }
        if m.contains(ReadFlags::DELETE) {
            self.push(WatchKind::Remove, &path);
        }
        if m.contains(ReadFlags::MOVED_FROM) {
            self.push(WatchKind::Rename, &path);
            if is_dir && self.recursive {
                self.moving.push((cookie, path));
            }
        }
    }

    /// The next batch that fits `room` stream bytes (and a batch's
    /// limits), or `None` when there is nothing to send or no room.
    fn batch(&mut self, room: usize) -> Option<Event> {
        let limit = room.min(WATCH_BATCH_BYTES).checked_sub(BATCH_COST)?;
        let mut events = Vec::new();
        let mut bytes = 0;
        while let Some(ev) = self.queue.front() {
            let cost = ev.stream_bytes();
            if events.len() >= WATCH_BATCH || bytes + cost > limit {
                break;
            }
            bytes += cost;
            self.queued_bytes -= cost;
            let ev = self.queue.pop_front()?;
            self.held.remove(&ev);
            events.push(ev);
        }
        if events.is_empty() && self.dropped == 0 {
            return None;
        }
        Some(Event::FileEvents {
            events,
            dropped: std::mem::take(&mut self.dropped),
        })
    }
}

/// The `watch` op.
pub fn watch(state: &State, resp: &Resp, spec: WatchSpec) -> Outcome {
    if ACTIVE.fetch_add(1, Ordering::SeqCst) >= MAX_WATCHES {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
        return Err(Failure::new(
            ErrorCode::Busy,
            format!("{MAX_WATCHES} directory watches are running"),
        ));
    }
    let _slot = Slot;
    let root = absolute(state, &spec.path)?;
    let user = spec
        .user
        .clone()
        .filter(|u| !u.trim().is_empty())
        .or_else(|| state.defaults.lock().unwrap().user.clone())
        .unwrap_or_else(|| "root".into());
    let _as = AsUser::switch(state, spec.user.as_deref())?;
    let what = format!("watch {} as {user}", root.display());
    let md = std::fs::metadata(&root).map_err(|e| Failure::io(&what, e))?;
    if !md.is_dir() {
        return Err(Failure::new(
            ErrorCode::NotADirectory,
            format!("{what}: not a directory"),
        ));
    }
    let ino = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
        .map_err(|e| Failure::new(ErrorCode::Busy, format!("{what}: inotify_init: {e}")))?;
    let fd = ino.as_fd();
    let root_wd = inotify::add_watch(fd, &root, mask())
        .map_err(|e| Failure::io(&format!("{what}: inotify_add_watch"), e.into()))?;
    let mut w = Watcher {
        root: root.clone(),
        recursive: spec.recursive,
        dirs: HashMap::from([(root_wd, root.clone())]),
        root_wd,
        queue: VecDeque::new(),
        held: HashSet::new(),
        queued_bytes: 0,
        dropped: 0,
        moving: Vec::new(),
        ended: None,
    };
    if spec.recursive {
        let subdirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .map_err(|e| Failure::io(&what, e))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        for d in subdirs {
            w.add_tree(fd, &d, false)
                .map_err(|e| Failure::bad(format!("{what}: {e}; watch a smaller tree")))?;
        }
    }
    resp.send(Event::Watching {
        path: root.to_string_lossy().to_string(),
    });
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 << 10];
    let cancelled = || Failure::new(ErrorCode::Cancelled, "watch cancelled by the host");
    loop {
        if !resp.live() {
            return Err(cancelled());
        }
        while let Some(ev) = w.batch(resp.stream_room()) {
            if !resp.send_stream(ev) {
                return Err(cancelled());
            }
        }
        if let Some(reason) = w.ended.take() {
            // What was queued before the end still goes out (waiting for credit).
            while let Some(ev) = w.batch(WATCH_BATCH_BYTES) {
                if !resp.send_stream(ev) {
                    return Err(cancelled());
                }
            }
            return Ok(Event::WatchEnd { reason });
        }
        use rustix::event::{PollFd, PollFlags};
        let mut fds = [PollFd::new(&ino, PollFlags::IN)];
        // With events held for want of credit, look for credit sooner.
        let wait_ns = if w.queue.is_empty() { 200 } else { 20 } * 1_000_000;
        let t = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: wait_ns,
        };
        match rustix::event::poll(&mut fds, Some(&t)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => w.read(fd, &mut buf)?,
            Err(e) => return Err(Failure::new(ErrorCode::Io, format!("{what}: poll: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher() -> Watcher {
        Watcher {
            root: PathBuf::from("/w"),
            recursive: true,
            dirs: HashMap::new(),
            root_wd: 1,
            queue: VecDeque::new(),
            held: HashSet::new(),
            queued_bytes: 0,
            dropped: 0,
            moving: Vec::new(),
            ended: None,
        }
    }

    #[test]
    fn repeats_coalesce_and_the_queue_is_bounded() {
        let mut w = watcher();
        for _ in 0..1000 {
            w.push(WatchKind::Write, Path::new("/w/a"));
        }
        w.push(WatchKind::Create, Path::new("/w/d/b"));
        assert_eq!(w.queue.len(), 2, "a held repeat is coalesced");
        assert_eq!(w.queue[1].name, "d/b");
        let mut n = 2;
        while w.dropped == 0 {
            w.push(WatchKind::Create, Path::new(&format!("/w/f{n}")));
            n += 1;
        }
        assert!(w.queued_bytes <= WATCH_QUEUE);
        let held = w.queue.len();
        // A batch takes what fits the room, counts the dropped ones once.
        let Some(Event::FileEvents { events, dropped }) = w.batch(1000) else {
            panic!()
        };
        assert_eq!(dropped, 1);
        let cost: usize = events.iter().map(WatchEvent::stream_bytes).sum();
        assert!(cost + BATCH_COST <= 1000 && !events.is_empty());
        assert!(w.batch(BATCH_COST - 1).is_none(), "no room, no batch");
        let mut total = events.len();
        while let Some(Event::FileEvents { events, dropped }) = w.batch(usize::MAX) {
            assert_eq!(dropped, 0);
            assert!(events.len() <= WATCH_BATCH);
            total += events.len();
        }
        assert_eq!(total, held);
        assert_eq!((w.queued_bytes, w.held.len()), (0, 0));
        // Once sent, the same change is reported again.
        w.push(WatchKind::Write, Path::new("/w/a"));
        assert_eq!(w.queue.len(), 1);
    }
}
