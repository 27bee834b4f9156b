//! `search_names` and `search_content`: bounded walks of a directory tree
//! as a user, streaming what they find.
//!
//! A walk goes depth first in directory order, parents before children,
//! without following symlinks, and holds one open directory per level (so
//! its memory does not grow with a directory's size). It does not enter
//! `/proc`, `/sys` or `/dev` unless it starts inside one. It stops at the
//! first bound it reaches (result count, result bytes, entries walked,
//! time) and reports which. Directories and files the user may not read
//! are passed over; only the starting path's errors fail the request.

use crate::agent::{Failure, Outcome, Resp};
use crate::files::{AsUser, absolute, display};
use crate::pattern::{NameGlob, TextPattern};
use crate::procs::State;
use nullspace_model::agent::{
    ContentMatch, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_MATCHES, DEFAULT_MAX_RESULTS,
    DEFAULT_SEARCH_TIMEOUT_MS, ErrorCode, Event, LIST_BATCH, MAX_DEPTH, MAX_FILE_BYTES,
    MAX_MATCH_LINE, MAX_MATCHES, MAX_RESULTS, MAX_SEARCH_BYTES, MAX_SEARCH_TIMEOUT_MS, MAX_VISITED,
    SearchContentSpec, SearchLimit, SearchNamesSpec,
};
use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Raw bytes of results per streamed event. JSON escaping can make a byte
/// six, so this keeps an event far below the line limit.
const BATCH_BYTES: usize = 96 << 10;
/// Lines scanned between two looks at the clock.
const LINES_PER_CLOCK: usize = 4096;

/// Pseudo filesystems a walk does not enter from outside.
const PSEUDO: [&str; 3] = ["/proc", "/sys", "/dev"];

/// One entry a walk visits.
struct Entry<'a> {
    path: &'a Path,
    /// Relative to the walk's root.
    rel: &'a Path,
    kind: std::fs::FileType,
}

/// The bounds of one walk and what it has used of them.
struct Walk {
    max_depth: u32,
    deadline: Instant,
    visited: u64,
    /// Pseudo filesystems not to enter.
    skip: Vec<&'static Path>,
}

impl Walk {
    fn new(root: &Path, max_depth: Option<u32>, timeout_ms: Option<u64>) -> Result<Walk, Failure> {
        let max_depth = max_depth.unwrap_or(MAX_DEPTH);
        if max_depth == 0 || max_depth > MAX_DEPTH {
            return Err(Failure::bad(format!(
                "max_depth must be 1..={MAX_DEPTH}, not {max_depth}"
            )));
        }
        let ms = timeout_ms
            .unwrap_or(DEFAULT_SEARCH_TIMEOUT_MS)
            .clamp(1, MAX_SEARCH_TIMEOUT_MS);
        Ok(Walk {
            max_depth,
            deadline: Instant::now() + Duration::from_millis(ms),
            visited: 0,
            skip: PSEUDO
                .iter()
                .map(Path::new)
                .filter(|p| !root.starts_with(p))
                .collect(),
        })
    }

    /// Calls `visit` for every entry under the root (not the root itself)
    /// until it breaks or a bound is reached; the bound, if one ended the
    /// walk. `top` is the root's listing, opened by the caller so that its
    /// errors fail the request.
    fn run(
        &mut self,
        top: std::fs::ReadDir,
        visit: &mut dyn FnMut(&mut Walk, Entry<'_>) -> ControlFlow<SearchLimit>,
    ) -> Option<SearchLimit> {
        // (open directory, its path relative to root, depth of its entries)
        let mut stack: Vec<(std::fs::ReadDir, PathBuf, u32)> = vec![(top, PathBuf::new(), 1)];
        while let Some((dir, rel_dir, depth)) = stack.last_mut() {
            let depth = *depth;
            let Some(next) = dir.next() else {
                stack.pop();
                continue;
            };
            if Instant::now() >= self.deadline {
                return Some(SearchLimit::Time);
            }
            self.visited += 1;
            if self.visited > MAX_VISITED {
                return Some(SearchLimit::Entries);
            }
            let Ok(e) = next else { continue };
            let Ok(kind) = e.file_type() else { continue };
            let path = e.path();
            let rel = rel_dir.join(e.file_name());
            if let ControlFlow::Break(limit) = visit(
                self,
                Entry {
                    path: &path,
                    rel: &rel,
                    kind,
                },
            ) {
                return Some(limit);
            }
            let enter =
                kind.is_dir() && depth < self.max_depth && !self.skip.iter().any(|s| path == *s);
            if enter && let Ok(rd) = std::fs::read_dir(&path) {
                stack.push((rd, rel, depth + 1));
            }
        }
        None
    }

    fn timed_out(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

/// Results gathered into events of at most [`LIST_BATCH`] items and
/// [`BATCH_BYTES`], sent with flow control; the totals checked against
/// the request's bounds.
struct Batcher<'r, T> {
    resp: &'r Resp,
    items: Vec<T>,
    batch_bytes: usize,
    count: u64,
    max_count: u64,
    bytes: usize,
    wrap: fn(Vec<T>) -> Event,
}

impl<'r, T> Batcher<'r, T> {
    fn new(resp: &'r Resp, max_count: u64, wrap: fn(Vec<T>) -> Event) -> Self {
        Batcher {
            resp,
            items: Vec::new(),
            batch_bytes: 0,
            count: 0,
            max_count,
            bytes: 0,
            wrap,
        }
    }

    /// Adds a result of `size` bytes; breaks at a bound (the result that
    /// reaches the count is kept, one that would pass the bytes is not).
    fn push(&mut self, item: T, size: usize) -> ControlFlow<SearchLimit> {
        if self.bytes + size > MAX_SEARCH_BYTES {
            return ControlFlow::Break(SearchLimit::Bytes);
        }
        self.items.push(item);
        self.count += 1;
        self.bytes += size;
        self.batch_bytes += size;
        if (self.items.len() >= LIST_BATCH || self.batch_bytes >= BATCH_BYTES) && !self.flush() {
            // The host is gone: the final event will not be read either.
            return ControlFlow::Break(SearchLimit::Results);
        }
        if self.count >= self.max_count {
            return ControlFlow::Break(SearchLimit::Results);
        }
        ControlFlow::Continue(())
    }

    fn flush(&mut self) -> bool {
        self.batch_bytes = 0;
        if self.items.is_empty() {
            return true;
        }
        let items = std::mem::take(&mut self.items);
        self.resp.send_stream((self.wrap)(items))
    }

    /// Sends the rest; the final event.
    fn finish(mut self, truncated: Option<SearchLimit>, visited: u64) -> Outcome {
        if !self.flush() {
            return Err(Failure::new(ErrorCode::Cancelled, "host gone"));
        }
        Ok(Event::SearchEnd { truncated, visited })
    }
}

/// The starting directory, opened as the user (its errors fail the request).
fn open_root(root: &Path) -> Result<std::fs::ReadDir, Failure> {
    let name = display(root);
    let md = std::fs::metadata(root).map_err(|e| Failure::io(&name, e))?;
    if !md.is_dir() {
        return Err(Failure::new(
            ErrorCode::NotADirectory,
            format!("{name}: not a directory"),
        ));
    }
    std::fs::read_dir(root).map_err(|e| Failure::io(&name, e))
}

fn pattern_failure(e: crate::pattern::PatternError) -> Failure {
    Failure::bad(e.to_string())
}

pub fn search_names(state: &State, resp: &Resp, spec: &SearchNamesSpec) -> Outcome {
    let root = absolute(state, &spec.path)?;
    let glob = NameGlob::new(&spec.pattern).map_err(pattern_failure)?;
    let max = u64::from(
        spec.max_results
            .unwrap_or(DEFAULT_MAX_RESULTS)
            .clamp(1, MAX_RESULTS),
    );
    let mut walk = Walk::new(&root, spec.max_depth, spec.timeout_ms)?;
    let _as = AsUser::switch(state, spec.user.as_deref())?;
    let top = open_root(&root)?;
    let mut out = Batcher::new(resp, max, |paths| Event::Paths { paths });
    let truncated = walk.run(top, &mut |_, e| {
        if !glob.matches(e.rel) {
            return ControlFlow::Continue(());
        }
        let p = display(e.path);
        let size = p.len();
        out.push(p, size)
    });
    out.finish(truncated, walk.visited)
}

pub fn search_content(state: &State, resp: &Resp, spec: &SearchContentSpec) -> Outcome {
    let root = absolute(state, &spec.path)?;
    let pattern = TextPattern::new(&spec.pattern, spec.literal).map_err(pattern_failure)?;
    let max = u64::from(
        spec.max_matches
            .unwrap_or(DEFAULT_MAX_MATCHES)
            .clamp(1, MAX_MATCHES),
    );
    let max_file = spec
        .max_file_bytes
        .unwrap_or(DEFAULT_MAX_FILE_BYTES)
        .clamp(1, MAX_FILE_BYTES);
    let mut walk = Walk::new(&root, spec.max_depth, spec.timeout_ms)?;
    let _as = AsUser::switch(state, spec.user.as_deref())?;
    let mut out = Batcher::new(resp, max, |matches| Event::Matches { matches });
    let mut scan = Scanner {
        pattern: &pattern,
        max_file,
        buf: Vec::new(),
    };
    let name = display(&root);
    let md = std::fs::metadata(&root).map_err(|e| Failure::io(&name, e))?;
    if md.is_file() {
        // One file, asked for by name: its errors are the answer.
        let scanned = scan
            .file(&root, &walk, &mut out)
            .map_err(|e| Failure::io(&name, e))?;
        let truncated = match scanned {
            Scanned::Done(limit) => limit,
            Scanned::TooLarge => {
                return Err(Failure::new(
                    ErrorCode::FileTooLarge,
                    format!("{name}: larger than {max_file} bytes, not searched"),
                ));
            }
            Scanned::Binary => None,
        };
        return out.finish(truncated, 1);
    }
    let top = open_root(&root)?;
    let truncated = walk.run(top, &mut |walk, e| {
        if !e.kind.is_file() {
            return ControlFlow::Continue(());
        }
        match scan.file(e.path, walk, &mut out) {
            Ok(Scanned::Done(Some(limit))) => ControlFlow::Break(limit),
            // Unreadable, too large or binary: passed over.
            _ => ControlFlow::Continue(()),
        }
    });
    out.finish(truncated, walk.visited)
}

/// What scanning one file came to.
enum Scanned {
    /// Searched; the bound that stopped the search, if one did.
    Done(Option<SearchLimit>),
    TooLarge,
    Binary,
}

/// Scans files for a pattern with one reused buffer.
struct Scanner<'p> {
    pattern: &'p TextPattern,
    max_file: u64,
    buf: Vec<u8>,
}

impl Scanner<'_> {
    fn file(
        &mut self,
        path: &Path,
        walk: &Walk,
        out: &mut Batcher<'_, ContentMatch>,
    ) -> std::io::Result<Scanned> {
        let f = std::fs::File::open(path)?;
        if f.metadata()?.len() > self.max_file {
            return Ok(Scanned::TooLarge);
        }
        self.buf.clear();
        // One byte more than the limit tells a file that grew meanwhile.
        f.take(self.max_file + 1).read_to_end(&mut self.buf)?;
        if self.buf.len() as u64 > self.max_file {
            return Ok(Scanned::TooLarge);
        }
        if self.buf.contains(&0) {
            return Ok(Scanned::Binary);
        }
        if !self.pattern.may_match_lines_of(&self.buf) {
            return Ok(Scanned::Done(None));
        }
        let file = display(path);
        let text = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            if i % LINES_PER_CLOCK == LINES_PER_CLOCK - 1 && walk.timed_out() {
                return Ok(Scanned::Done(Some(SearchLimit::Time)));
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !self.pattern.is_match(line) {
                continue;
            }
            let content = line_text(line);
            let size = file.len() + content.len();
            let m = ContentMatch {
                file: file.clone(),
                line: i as u64 + 1,
                content,
            };
            if let ControlFlow::Break(limit) = out.push(m, size) {
                return Ok(Scanned::Done(Some(limit)));
            }
        }
        Ok(Scanned::Done(None))
    }
}

/// A line as a match shows it: lossy UTF-8, at most [`MAX_MATCH_LINE`] bytes.
fn line_text(line: &[u8]) -> String {
    let cut = &line[..line.len().min(MAX_MATCH_LINE + 4)];
    let s = String::from_utf8_lossy(cut);
    crate::agent::clip(&s, MAX_MATCH_LINE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_bounds_are_checked() {
        assert!(Walk::new(Path::new("/"), Some(0), None).is_err());
        assert!(Walk::new(Path::new("/"), Some(MAX_DEPTH + 1), None).is_err());
        let w = Walk::new(Path::new("/"), None, None).unwrap();
        assert_eq!(w.max_depth, MAX_DEPTH);
        assert_eq!(w.skip.len(), 3);
        let w = Walk::new(Path::new("/proc/self"), Some(2), Some(1)).unwrap();
        assert!(
            !w.skip.contains(&Path::new("/proc")),
            "a walk that starts in /proc stays there"
        );
    }

    #[test]
    fn walk_visits_parents_first_and_respects_depth() {
        let dir = std::env::temp_dir().join(format!("ns-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
        std::fs::write(dir.join("a/b/c/deep.txt"), "x").unwrap();
        std::fs::write(dir.join("top.txt"), "x").unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("a/loop")).unwrap();
        let mut seen = vec![];
        let mut w = Walk::new(&dir, Some(3), None).unwrap();
        let top = std::fs::read_dir(&dir).unwrap();
        let end = w.run(top, &mut |_, e| {
            seen.push(e.rel.to_string_lossy().to_string());
            ControlFlow::Continue(())
        });
        assert_eq!(end, None);
        seen.sort();
        assert_eq!(
            seen,
            ["a", "a/b", "a/b/c", "a/loop", "top.txt"],
            "depth 3, link not followed"
        );
        // A visitor's break ends the walk with its reason.
        let mut w = Walk::new(&dir, None, None).unwrap();
        let top = std::fs::read_dir(&dir).unwrap();
        let end = w.run(top, &mut |_, _| ControlFlow::Break(SearchLimit::Results));
        assert_eq!((end, w.visited), (Some(SearchLimit::Results), 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn match_lines_are_bounded_text() {
        assert_eq!(line_text(b"plain"), "plain");
        let long = vec![b'a'; MAX_MATCH_LINE * 4];
        assert_eq!(line_text(&long).len(), MAX_MATCH_LINE);
        let t = line_text(b"\xff ok");
        assert!(t.ends_with(" ok") && t.starts_with('\u{fffd}'));
        // A multi-byte character at the cut is not split.
        let mut s = vec![b'a'; MAX_MATCH_LINE - 1];
        s.extend_from_slice("é".as_bytes());
        assert_eq!(line_text(&s).len(), MAX_MATCH_LINE - 1);
    }
}
