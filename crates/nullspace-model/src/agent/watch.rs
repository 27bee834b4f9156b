//! Directory watches of the agent protocol (`watch`): inotify events of a
//! directory (and, when recursive, of every directory below it, including
//! ones created later), named as the SDK's `watch_dir` reports them.

use serde::{Deserialize, Serialize};

/// Events per `file_events` reply.
pub const WATCH_BATCH: usize = 256;
/// Event bytes (as [`WatchEvent::stream_bytes`] counts them) a watch
/// holds while the host has no credit; a repeat of a held event is
/// coalesced into it, and beyond this events are counted in `dropped`.
pub const WATCH_QUEUE: usize = 1 << 20;
/// Event bytes per `file_events` reply (so a line stays far below `MAX_LINE`).
pub const WATCH_BATCH_BYTES: usize = 256 << 10;
/// What a `file_events` reply is charged besides its events.
pub const BATCH_COST: usize = 32;
/// Directories one recursive watch follows; deeper trees are refused.
pub const MAX_WATCHED_DIRS: usize = 8192;

/// What to watch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchSpec {
    pub path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recursive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A change, named as fsnotify names them (what the SDK's users expect):
/// a file moved in is `create`, moved out (or renamed away) is `rename`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchKind {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

impl WatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchKind::Create => "create",
            WatchKind::Write => "write",
            WatchKind::Remove => "remove",
            WatchKind::Rename => "rename",
            WatchKind::Chmod => "chmod",
        }
    }
}

/// One change under the watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WatchEvent {
    pub kind: WatchKind,
    /// Relative to the watched directory (`sub/file.txt`).
    pub name: String,
    /// Absolute.
    pub path: String,
}

impl WatchEvent {
    /// What the event is charged against the stream window.
    pub fn stream_bytes(&self) -> usize {
        32 + self.name.len() + self.path.len()
    }
}
