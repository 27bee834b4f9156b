//! The host↔guest agent protocol (`nullspace-init`'s agent on the
//! virtio-serial port [`crate::guest::AGENT_PORT`], the host's
//! `nullspace_vm::agent::AgentClient`).
//!
//! # Framing
//! Newline-delimited JSON, one object per line in both directions, each at
//! most [`MAX_LINE`] bytes (newline included). Byte fields are base64
//! ([`b64`]), so a line never holds a raw newline. A receiver refuses a
//! longer line without buffering it: the host drops the connection, the
//! guest discards the line.
//!
//! # Requests and replies
//! Every [`Request`] has a host-chosen `id` and an `op` ([`Op`]). Every
//! [`Reply`] line carries the `id` of the request it answers and a `type`
//! ([`Event`]). Requests are served concurrently; replies of different
//! requests interleave. A request ends with exactly one *final* event
//! ([`Event::is_final`]); streaming requests send non-final events before it
//! (`started`, `stdout`/`stderr`, `entries`, `paths`, `matches`). [`Op::Ack`] and
//! [`Op::Cancel`] are answered by nothing but their effect on their target.
//!
//! | op | reply events (final last) |
//! |---|---|
//! | `hello {protocol}` | `hello {protocol, agent}` (also starts a new session, see below) |
//! | `ping` | `pong` |
//! | `info` | `info {protocol, start, uptime_ms, hostname}` |
//! | `exec {argv\|cmd, env, cwd, user, stdin, stdin_open, timeout_ms}` | `started {pid}`, `stdout`/`stderr {data}`*, `exit {code, signal, timed_out}` |
//! | `exec {…, background: true, ring_bytes}` | `spawned {pid}` |
//! | `attach {pid, replay}` | `started {pid}`, `stdout`/`stderr`*, `exit {…, dropped}` |
//! | `processes` | `processes {processes}` |
//! | `output {pid}` | `stdout`/`stderr`*, `output_end {running, exit, stdout_dropped, stderr_dropped}` |
//! | `kill {pid, signal, group}` | `ok` |
//! | `write_stdin {pid, data, eof}` | `written {bytes}` |
//! | `stat {path, user}` | `file {info}` |
//! | `list_dir {path, depth, user, max_entries}` | `entries {entries}`*, `list_end {truncated}` |
//! | `read_file {path, offset, length, user}` | `data {data, size, eof}` |
//! | `write_file {path, data, offset, truncate, mode, exact_mode, parents, user}` | `written {bytes}` |
//! | `make_dir {path, mode, parents, user}` | `made {created}` |
//! | `remove {path, recursive, user}` | `ok` |
//! | `rename {from, to, user}` | `file {info}` (of `to`) |
//! | `chmod {path, mode, user}` | `ok` |
//! | `search_names {path, pattern, max_depth, max_results, timeout_ms, user}` | `paths {paths}`*, `search_end {truncated, visited}` |
//! | `search_content {path, pattern, literal, max_matches, max_file_bytes, max_depth, timeout_ms, user}` | `matches {matches}`*, `search_end {truncated, visited}` |
//! | `replace {files, pattern, replacement, literal, dry_run, user}` | `replaced {replacements, files_modified, files_skipped, binary_files_skipped}` |
//! | `metrics {sample_ms}` | `metrics {cpu_percent, cpu_count, mem_used_bytes, mem_total_bytes, disk_used_bytes, disk_total_bytes, network_rx_bytes, network_tx_bytes}` |
//! | `start {cmd, env, user, workdir}` | `spawned {pid}` (null without `cmd`) |
//! | `probe {probe, timeout_ms}` | `probe {ready, detail}` |
//! | `set_time {unix_ns}` | `time {previous_unix_ns}` |
//! | `reseed {data}` | `ok` |
//! | `pty_start {argv\|cmd, env, cwd, user, cols, rows, ring_bytes}` | `pty {info}` |
//! | `pty_resize {pid, cols, rows}` | `pty {info}` |
//! | `pty_list` | `ptys {sessions}` |
//! | `watch {path, recursive, user}` | `watching {path}`, `file_events {events, dropped}`*, `watch_end {reason}` |
//! | `connect {port}` | `connected`, `received {data}`*, `closed` |
//! | `send {target, data, eof}` | `written {bytes}` |
//! | `mount {slot, mount_path, read_only, subpath, size_bytes}` | `volume {mounted, total_bytes, used_bytes, inodes_used}` |
//! | `unmount {slot, mount_path}` | `ok` (sync first; nothing mounted is not an error) |
//! | `volume_health {slot, mount_path}` | `volume {…}` |
//! | `resize {vcpus, memory_mib}` | `resized {vcpus, memory_mib}` |
//! | `ack {target, bytes}`, `cancel {target}` | none |
//!
//! Any request may instead end with `error {code, message}`; a line that is
//! JSON with an `id` but no known `op` gets `error {code: unknown_op}`.
//!
//! # Flow control
//! Streamed data (`stdout`, `stderr`, `entries`, `paths`, `matches`) is credit-based, as in SSH
//! channels: the guest keeps at most [`STREAM_WINDOW`] bytes of a request's
//! stream data unacknowledged and waits for the host's `ack {target,
//! bytes}` before sending more. So one slow consumer never stalls the other
//! requests on the connection, and the host's per-request buffer is bounded
//! (a guest that overruns the window fails that request). A foreground
//! process whose host stops reading blocks on its full pipe; a background
//! process never blocks (its output goes to a bounded ring buffer per stream;
//! an attached reader that falls behind loses chunks, counted in `dropped`).
//! A `watch` charges each event against the window too; while the host has
//! no credit the guest holds at most [`watch::WATCH_QUEUE`] bytes of events
//! (repeats coalesced) and counts the rest in the next batch's `dropped`.
//!
//! # Terminals
//! `pty_start` runs a process on a pseudo-terminal of its own (its session
//! leader, the terminal its controlling one, the window size set, `TERM`
//! [`pty::DEFAULT_TERM`] unless given) as the requested user with the
//! runtime defaults, and answers at once. Like a background process, the
//! session outlives the connection: its output goes to a ring buffer, read
//! with `attach {pid, replay}` (as `stdout`); `write_stdin {pid}` types
//! into it (`eof` sends the terminal's end-of-file character, ^D); `kill
//! {pid}` signals it; `pty_list` lists the sessions, exited ones included.
//!
//! # Tunnels
//! `connect` opens a TCP connection to a port on the guest's loopback
//! (127.0.0.1, then ::1): how the host reaches a server in a guest that
//! has no network device. What the guest side sends arrives as `received`
//! stream data (flow-controlled like `stdout`); the host writes with
//! `send {target}`, one at a time per connection (the `written` reply is
//! its credit). The guest closing its end ends the request with `closed`;
//! `cancel` closes the connection. A session change closes every tunnel.
//! The guest holds at most [`MAX_TUNNELS`] open at once (`busy` beyond).
//!
//! # Sessions
//! A connection is a session. The host opens it with `hello`; the guest then
//! ends what the previous session left (stream data is no longer sent, and
//! waits for its credit end) without killing processes. Request ids are
//! unique across sessions (the host seeds them from the clock), so a late
//! reply from an old session is never taken for a new one.
//!
//! # Limits
//! [`MAX_LINE`] per line; [`MAX_CHUNK`] raw bytes per data field the host
//! sends (file chunks, stdin) or asks for (`read_file` length);
//! [`OUTPUT_CHUNK`] per output event; [`LIST_BATCH`] entries per `entries`,
//! `paths` or `matches` event. The guest bounds its threads and processes
//! (see `nullspace-init`'s agent) and answers `error {code: busy}` beyond
//! them.
//!
//! Searches (`search_names`, `search_content`) stop at the first of their
//! result count, [`MAX_SEARCH_BYTES`] of result text, [`MAX_VISITED`]
//! entries walked and their time limit, and say which in `search_end`'s
//! `truncated`; they do not follow symlinks, and do not enter `/proc`,
//! `/sys` or `/dev` unless the search starts there. `search_content` and
//! `replace` skip binary files (a NUL byte) and read at most
//! `max_file_bytes` ([`DEFAULT_MAX_FILE_BYTES`], at most
//! [`MAX_FILE_BYTES`]) of a file; `replace` refuses a larger file before it
//! changes any. A path with a NUL byte is `bad_request`; one longer than
//! [`PATH_MAX`] bytes or with a name longer than [`NAME_MAX`] bytes is
//! `name_too_long`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod lines;
pub mod pty;
pub mod volume;
pub mod watch;
pub use pty::{PtyInfo, PtySpec};
pub use volume::{MountSpec, VolumeStatus};
pub use watch::{WatchEvent, WatchKind, WatchSpec};

/// Version of this protocol; `hello` exchanges it and the host refuses a
/// guest with another.
pub const PROTOCOL_VERSION: u32 = 2;
/// Longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 1 << 20;
/// Most raw bytes in one data field the host sends (a `write_file` chunk,
/// inline or written stdin) or asks for (`read_file` `length`).
pub const MAX_CHUNK: usize = 256 << 10;
/// Most raw bytes in one `stdout`/`stderr` event.
pub const OUTPUT_CHUNK: usize = 64 << 10;
/// Unacknowledged stream bytes the guest may have in flight per request.
pub const STREAM_WINDOW: usize = 512 << 10;
/// Tunnels (`connect`) open at once in one guest.
pub const MAX_TUNNELS: usize = 48;
/// Entries per `entries` event.
pub const LIST_BATCH: usize = 128;
/// Default and largest `max_entries` of `list_dir`.
pub const DEFAULT_MAX_ENTRIES: u32 = 10_000;
pub const MAX_ENTRIES: u32 = 100_000;
/// Deepest `list_dir` `depth`.
pub const MAX_DEPTH: u32 = 32;
/// Default and largest ring buffer per stream of a background process.
pub const DEFAULT_RING_BYTES: u64 = 1 << 20;
pub const MAX_RING_BYTES: u64 = 8 << 20;
/// Longest path (bytes) and file name the file ops accept (Linux's limits).
pub const PATH_MAX: usize = 4095;
pub const NAME_MAX: usize = 255;
/// Longest `pattern` of a search or `replace`.
pub const MAX_PATTERN: usize = 4096;
/// Default and largest `max_results` of `search_names`.
pub const DEFAULT_MAX_RESULTS: u32 = 10_000;
pub const MAX_RESULTS: u32 = 100_000;
/// Default and largest `max_matches` of `search_content`.
pub const DEFAULT_MAX_MATCHES: u32 = 1_000;
pub const MAX_MATCHES: u32 = 10_000;
/// A match's `content` is its line cut to this many bytes.
pub const MAX_MATCH_LINE: usize = 1024;
/// Result text (paths, lines) one search sends at most.
pub const MAX_SEARCH_BYTES: usize = 8 << 20;
/// Directory entries one search walks at most.
pub const MAX_VISITED: u64 = 1_000_000;
/// Default and largest time limit of a search.
pub const DEFAULT_SEARCH_TIMEOUT_MS: u64 = 30_000;
pub const MAX_SEARCH_TIMEOUT_MS: u64 = 300_000;
/// Default and largest size of a file `search_content` scans and `replace`
/// rewrites.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 << 20;
pub const MAX_FILE_BYTES: u64 = 32 << 20;
/// Most files in one `replace`, and its longest `replacement`.
pub const MAX_REPLACE_FILES: usize = 1_000;
pub const MAX_REPLACEMENT: usize = 64 << 10;
/// Longest and default CPU sample of `metrics`.
pub const DEFAULT_METRICS_SAMPLE_MS: u64 = 200;
pub const MAX_METRICS_SAMPLE_MS: u64 = 2_000;
/// `reseed` accepts this many bytes at most (and at least [`MIN_RESEED`]).
pub const MAX_RESEED: usize = 512;
pub const MIN_RESEED: usize = 32;

/// Serde helpers: `Vec<u8>` as a standard base64 string.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }

    /// `Option<Vec<u8>>`: absent or null is `None`.
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(b) => super::serialize(b, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
            s.map(|s| STANDARD.decode(s.as_bytes()))
                .transpose()
                .map_err(serde::de::Error::custom)
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u64) -> bool {
    *n == 0
}
fn yes() -> bool {
    true
}
fn sigkill() -> i32 {
    9
}
fn one() -> u32 {
    1
}

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// What a request asks for (`"op"` tag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Opens a session and exchanges protocol versions.
    Hello {
        protocol: u32,
    },
    Ping,
    /// The guest's state: the start command, uptime, hostname.
    Info,
    /// Runs a process (foreground: streams its output and exit; background:
    /// answers with its pid at once).
    Exec(ExecSpec),
    /// Streams a tracked process's further output (and, with `replay`, what
    /// its ring buffers still hold first), then its exit.
    Attach {
        pid: u32,
        #[serde(default, skip_serializing_if = "is_false")]
        replay: bool,
    },
    /// The processes the agent started (running, and recently exited
    /// background ones) and the start command.
    Processes,
    /// A background process's buffered output and exit status.
    Output {
        pid: u32,
    },
    /// Signals a tracked process (by default SIGKILL to its process group).
    Kill {
        pid: u32,
        #[serde(default = "sigkill")]
        signal: i32,
        #[serde(default = "yes")]
        group: bool,
    },
    /// Writes to the stdin of a process started with `stdin_open`; `eof`
    /// closes it after the data.
    WriteStdin {
        pid: u32,
        #[serde(with = "b64", default)]
        data: Vec<u8>,
        #[serde(default, skip_serializing_if = "is_false")]
        eof: bool,
    },
    /// Acknowledges `bytes` of `target`'s stream data (flow control). No reply.
    Ack {
        target: u64,
        bytes: u64,
    },
    /// Stops serving `target`: a foreground exec's process group is killed,
    /// an attach detaches (the process goes on). No reply of its own;
    /// `target` ends with `error {code: cancelled}`.
    Cancel {
        target: u64,
    },
    Stat {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Entries under `path` down to `depth` levels (1: its children),
    /// parents before children, symlinks not followed.
    ListDir {
        path: String,
        #[serde(default = "one")]
        depth: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_entries: Option<u32>,
    },
    /// At most `length` (≤ [`MAX_CHUNK`]) bytes from `offset`.
    ReadFile {
        path: String,
        #[serde(default)]
        offset: u64,
        length: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    WriteFile(WriteFileSpec),
    MakeDir {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        #[serde(default = "yes")]
        parents: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    Remove {
        path: String,
        #[serde(default, skip_serializing_if = "is_false")]
        recursive: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    Rename {
        from: String,
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    Chmod {
        path: String,
        mode: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Paths under `path` whose name matches a glob (see [`SearchNamesSpec`]).
    SearchNames(SearchNamesSpec),
    /// Lines of the files under `path` that match a pattern.
    SearchContent(SearchContentSpec),
    /// Replaces a pattern in a list of files, each rewritten atomically.
    Replace(ReplaceSpec),
    /// CPU, memory, disk and network figures of the guest.
    Metrics {
        /// How long the CPU is sampled ([`DEFAULT_METRICS_SAMPLE_MS`], at
        /// most [`MAX_METRICS_SAMPLE_MS`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sample_ms: Option<u64>,
    },
    /// Replaces the runtime defaults, then starts `cmd` as the supervised
    /// start command (what `info` reports).
    Start(StartSpec),
    /// One readiness check in the guest (the host owns the schedule).
    Probe {
        probe: ProbeSpec,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Sets `CLOCK_REALTIME` (the host sends its time after a restore).
    SetTime {
        unix_ns: u64,
    },
    /// Fresh entropy for the kernel pool, credited (`RNDADDENTROPY`), then a
    /// CRNG reseed: clones restored from one snapshot must not share RNG
    /// state. [`MIN_RESEED`]..=[`MAX_RESEED`] bytes.
    Reseed {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Starts a terminal session ([`pty`]).
    PtyStart(PtySpec),
    /// Sets a session's window size (the process gets SIGWINCH).
    PtyResize {
        pid: u32,
        cols: u16,
        rows: u16,
    },
    PtyList,
    /// Streams changes under a directory until cancelled ([`watch`]).
    Watch(WatchSpec),
    /// Opens a TCP connection to `port` on the guest's loopback (see
    /// "Tunnels"): `connected`, then `received`* until the guest side
    /// closes (`closed`) or the host cancels.
    Connect {
        port: u16,
    },
    /// Writes to the connection that request `target` opened; `eof` then
    /// shuts its write side. At most [`MAX_CHUNK`] bytes.
    Send {
        target: u64,
        #[serde(with = "b64", default)]
        data: Vec<u8>,
        #[serde(default, skip_serializing_if = "is_false")]
        eof: bool,
    },
    /// Mounts a volume's spare device ([`volume`]).
    Mount(MountSpec),
    /// Syncs and unmounts what `mount` put at `mount_path` (lazily when
    /// busy: the device then goes away under the guest's open files).
    Unmount {
        slot: u32,
        mount_path: String,
    },
    /// Is the volume mounted at `mount_path`, and its usage.
    VolumeHealth {
        slot: u32,
        mount_path: String,
    },
    /// Takes vCPUs and memory blocks on or offline toward `vcpus` and
    /// `memory_mib` (see [`crate::size`]): `resized`, what is online.
    Resize {
        vcpus: u32,
        memory_mib: u32,
    },
}

/// Every `op` name, for telling an unknown op from a malformed one.
pub const OPS: &[&str] = &[
    "hello",
    "ping",
    "info",
    "exec",
    "attach",
    "processes",
    "output",
    "kill",
    "write_stdin",
    "ack",
    "cancel",
    "stat",
    "list_dir",
    "read_file",
    "write_file",
    "make_dir",
    "remove",
    "rename",
    "chmod",
    "search_names",
    "search_content",
    "replace",
    "metrics",
    "start",
    "probe",
    "set_time",
    "reseed",
    "pty_start",
    "pty_resize",
    "pty_list",
    "watch",
    "connect",
    "send",
    "mount",
    "unmount",
    "volume_health",
    "resize",
];

impl Op {
    /// The `op` tag.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello { .. } => "hello",
            Op::Ping => "ping",
            Op::Info => "info",
            Op::Exec(_) => "exec",
            Op::Attach { .. } => "attach",
            Op::Processes => "processes",
            Op::Output { .. } => "output",
            Op::Kill { .. } => "kill",
            Op::WriteStdin { .. } => "write_stdin",
            Op::Ack { .. } => "ack",
            Op::Cancel { .. } => "cancel",
            Op::Stat { .. } => "stat",
            Op::ListDir { .. } => "list_dir",
            Op::ReadFile { .. } => "read_file",
            Op::WriteFile(_) => "write_file",
            Op::MakeDir { .. } => "make_dir",
            Op::Remove { .. } => "remove",
            Op::Rename { .. } => "rename",
            Op::Chmod { .. } => "chmod",
            Op::SearchNames(_) => "search_names",
            Op::SearchContent(_) => "search_content",
            Op::Replace(_) => "replace",
            Op::Metrics { .. } => "metrics",
            Op::Start(_) => "start",
            Op::Probe { .. } => "probe",
            Op::SetTime { .. } => "set_time",
            Op::Reseed { .. } => "reseed",
            Op::PtyStart(_) => "pty_start",
            Op::PtyResize { .. } => "pty_resize",
            Op::PtyList => "pty_list",
            Op::Watch(_) => "watch",
            Op::Connect { .. } => "connect",
            Op::Send { .. } => "send",
            Op::Mount(_) => "mount",
            Op::Unmount { .. } => "unmount",
            Op::VolumeHealth { .. } => "volume_health",
            Op::Resize { .. } => "resize",
        }
    }

    /// Ops that get no reply at all.
    pub fn is_notification(&self) -> bool {
        matches!(self, Op::Ack { .. } | Op::Cancel { .. })
    }
}

/// A process to run. `argv` runs directly; when it is empty, `cmd` runs
/// under `/bin/sh -c`. `env`, `cwd` and `user` override the runtime
/// defaults (the template's, as the `start` op last set them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Written to stdin, which is then closed (unless `stdin_open`). At
    /// most [`MAX_CHUNK`] bytes; more goes through `write_stdin`.
    #[serde(with = "b64::option", default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Vec<u8>>,
    /// Keep stdin open for `write_stdin` (else it is /dev/null, or closed
    /// after `stdin`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin_open: bool,
    /// The process group is killed after this long (`exit.timed_out`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Answer with the pid at once; keep the output in ring buffers.
    #[serde(default, skip_serializing_if = "is_false")]
    pub background: bool,
    /// Ring buffer size per stream of a background process
    /// ([`DEFAULT_RING_BYTES`], at most [`MAX_RING_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_bytes: Option<u64>,
}

impl ExecSpec {
    /// The command line as `processes` shows it.
    pub fn display(&self) -> String {
        if self.argv.is_empty() {
            self.cmd.clone().unwrap_or_default()
        } else {
            self.argv.join(" ")
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriteFileSpec {
    pub path: String,
    #[serde(with = "b64", default)]
    pub data: Vec<u8>,
    /// Where `data` goes; `None`: appended at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Truncate the file to empty first (a chunked write's first chunk).
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncate: bool,
    /// Mode of a created file (default 0644, reduced by the umask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// chmod to exactly `mode` (not reduced by the umask; also an existing file).
    #[serde(default, skip_serializing_if = "is_false")]
    pub exact_mode: bool,
    /// Create missing parent directories (as `user`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub parents: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `search_names`: entries (files, directories, anything) under `path`,
/// at most `max_depth` levels down (1: its children), whose name matches
/// `pattern`, a glob (`*`, `?`, `[a-z]`, `{a,b}`). A pattern with a `/` is
/// matched against the path relative to `path` instead, where `*` stays
/// within one name and `**` spans directories. Answered with absolute
/// paths, parents before children, names sorted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchNamesSpec {
    pub path: String,
    pub pattern: String,
    /// Default and largest: [`MAX_DEPTH`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    /// [`DEFAULT_MAX_RESULTS`], at most [`MAX_RESULTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_results: Option<u32>,
    /// [`DEFAULT_SEARCH_TIMEOUT_MS`], at most [`MAX_SEARCH_TIMEOUT_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `search_content`: the lines of the regular files under `path` (or of
/// the file `path`) that match `pattern`, a regular expression (Rust
/// `regex` syntax); a pattern that is not a valid expression, or any
/// pattern with `literal`, is matched as plain text. Files in walk order,
/// lines in file order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchContentSpec {
    pub path: String,
    pub pattern: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub literal: bool,
    /// [`DEFAULT_MAX_MATCHES`], at most [`MAX_MATCHES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_matches: Option<u32>,
    /// Larger files are skipped ([`DEFAULT_MAX_FILE_BYTES`], at most
    /// [`MAX_FILE_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `replace`: every match of `pattern` (as in [`SearchContentSpec`]) in
/// each of `files` becomes `replacement` (`$1`, `${name}` expand to groups
/// of an expression; taken literally for a literal pattern). Every file is
/// checked first (it exists, is a regular file of at most
/// [`DEFAULT_MAX_FILE_BYTES`], the user may read and write it), so a bad
/// one fails the request before any file changes. A changed file is
/// written to a temporary file beside it with its mode and owner, then
/// renamed over it; a file with several hard links, or one whose owner the
/// user cannot give the new file, is rewritten in place instead.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplaceSpec {
    pub files: Vec<String>,
    pub pattern: String,
    pub replacement: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub literal: bool,
    /// Count, change nothing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

/// One guest-side readiness check (`"kind"` tag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProbeSpec {
    Tcp {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    Http {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        #[serde(default = "root_path")]
        path: String,
    },
    Command {
        cmd: String,
    },
}

fn root_path() -> String {
    "/".into()
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// What a reply line says (`"type"` tag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Hello {
        protocol: u32,
        /// The agent's build (crate version).
        agent: String,
    },
    Pong,
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    Info(AgentInfo),
    /// The stream of a foreground `exec` or an `attach` began: the
    /// process's pid. Not final.
    Started {
        pid: u32,
    },
    /// A background `exec` or the `start` command runs (`start` without a
    /// command has no pid). Final.
    Spawned {
        pid: Option<u32>,
    },
    Stdout {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    Exit(ExitStatus),
    Processes {
        processes: Vec<ProcessInfo>,
    },
    OutputEnd(OutputEnd),
    File {
        info: FileInfo,
    },
    Entries {
        entries: Vec<FileInfo>,
    },
    ListEnd {
        truncated: bool,
    },
    /// Some of a `search_names` answer (absolute paths). Not final.
    Paths {
        paths: Vec<String>,
    },
    /// Some of a `search_content` answer. Not final.
    Matches {
        matches: Vec<ContentMatch>,
    },
    SearchEnd {
        /// The limit that ended the search early, if one did.
        truncated: Option<SearchLimit>,
        /// Directory entries walked.
        visited: u64,
    },
    Replaced(ReplaceResult),
    Metrics(GuestMetrics),
    Data {
        #[serde(with = "b64")]
        data: Vec<u8>,
        /// The file's size when read.
        size: u64,
        /// `offset + data.len() >= size`.
        eof: bool,
    },
    Written {
        bytes: u64,
    },
    Made {
        /// False when the directory already existed.
        created: bool,
    },
    Probe {
        ready: bool,
        detail: String,
    },
    Time {
        previous_unix_ns: u64,
    },
    /// What is online after a `resize`: vCPUs, and memory in whole
    /// blocks (blocks the kernel cannot empty stay online; the host's
    /// balloon takes up the difference).
    Resized {
        vcpus: u32,
        memory_mib: u32,
    },
    /// A terminal session (`pty_start`, `pty_resize`).
    Pty {
        info: PtyInfo,
    },
    Ptys {
        sessions: Vec<PtyInfo>,
    },
    /// The watch is set up: later changes are reported. Not final.
    Watching {
        path: String,
    },
    /// Changes, oldest first; `dropped`: changes lost before these (the
    /// host had no credit and the guest's queue was full, or the kernel's
    /// queue overflowed). Not final.
    FileEvents {
        events: Vec<WatchEvent>,
        #[serde(default, skip_serializing_if = "is_zero")]
        dropped: u64,
    },
    /// The watched directory is gone (removed, moved, unmounted). Final.
    WatchEnd {
        reason: String,
    },
    /// A `connect`'s connection is open.
    Connected,
    /// Bytes the guest side of a `connect` sent (stream data).
    Received {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The guest side of a `connect` closed its end. Final.
    Closed,
    /// A volume's state (`mount`, `volume_health`).
    Volume(VolumeStatus),
}

impl Event {
    /// The last event of a request.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Event::Started { .. }
                | Event::Stdout { .. }
                | Event::Stderr { .. }
                | Event::Entries { .. }
                | Event::Watching { .. }
                | Event::FileEvents { .. }
                | Event::Paths { .. }
                | Event::Matches { .. }
                | Event::Connected
                | Event::Received { .. }
        )
    }

    /// Raw bytes this event counts against the request's [`STREAM_WINDOW`].
    pub fn stream_bytes(&self) -> usize {
        match self {
            Event::Stdout { data } | Event::Stderr { data } | Event::Received { data } => {
                data.len()
            }
            // An entry is charged a fixed size plus its names.
            Event::Entries { entries } => entries
                .iter()
                .map(|e| 64 + e.path.len() + e.name.len())
                .sum(),
            // A batch is charged a fixed size too, so one that only counts
            // dropped events is flow-controlled like the rest.
            Event::FileEvents { events, .. } => {
                watch::BATCH_COST + events.iter().map(WatchEvent::stream_bytes).sum::<usize>()
            }
            Event::Paths { paths } => paths.iter().map(|p| 16 + p.len()).sum(),
            Event::Matches { matches } => matches
                .iter()
                .map(|m| 32 + m.file.len() + m.content.len())
                .sum(),
            _ => 0,
        }
    }

    /// Shorthand for an error event.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Event {
        Event::Error {
            code,
            message: message.into(),
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request (a field missing or out of range).
    BadRequest,
    UnknownOp,
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    /// A path over [`PATH_MAX`] bytes or a name over [`NAME_MAX`].
    NameTooLong,
    /// A file over the operation's size limit.
    FileTooLarge,
    /// The agent's thread or process limit is reached; retry later.
    Busy,
    Cancelled,
    /// The process could not be started (bad argv, cwd, user).
    SpawnFailed,
    /// Nothing listens on the port a `connect` named.
    ConnectionRefused,
    TimedOut,
    /// Another I/O error.
    Io,
    /// A newer guest's code this host does not know.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The code for an I/O error kind.
    pub fn of_io(kind: std::io::ErrorKind) -> ErrorCode {
        use std::io::ErrorKind as K;
        match kind {
            K::NotFound => ErrorCode::NotFound,
            K::PermissionDenied => ErrorCode::PermissionDenied,
            K::AlreadyExists => ErrorCode::AlreadyExists,
            K::NotADirectory => ErrorCode::NotADirectory,
            K::IsADirectory => ErrorCode::IsADirectory,
            K::DirectoryNotEmpty => ErrorCode::DirectoryNotEmpty,
            K::InvalidFilename => ErrorCode::NameTooLong,
            K::FileTooLarge => ErrorCode::FileTooLarge,
            K::InvalidInput => ErrorCode::BadRequest,
            K::ConnectionRefused => ErrorCode::ConnectionRefused,
            K::TimedOut => ErrorCode::TimedOut,
            _ => ErrorCode::Io,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Terminating signal, when it was killed.
    pub signal: Option<i32>,
    /// Killed by the agent after `timeout_ms`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub timed_out: bool,
    /// Output bytes an attached reader missed (it fell behind).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The end of an `output` reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEnd {
    pub running: bool,
    pub exit: Option<ExitStatus>,
    /// Bytes that left the ring buffers (the oldest output) before this read.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

/// A process the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    /// The command line (`cmd`, or `argv` joined by spaces), at most 4 KiB.
    pub command: String,
    pub running: bool,
    pub background: bool,
    /// The template's start command.
    #[serde(default, skip_serializing_if = "is_false")]
    pub start_command: bool,
    pub started_unix_ms: u64,
    pub exit: Option<ExitStatus>,
}

/// The start command's state, as `info` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInfo {
    /// A start command was configured at boot or sent with `start`.
    pub configured: bool,
    pub pid: Option<u32>,
    pub started_unix_ms: u64,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why it could not be started.
    pub spawn_error: Option<String>,
    /// The last 16 KiB of its output (lossy UTF-8).
    pub output: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub protocol: u32,
    pub start: StartInfo,
    pub uptime_ms: u64,
    pub hostname: String,
}

/// A file's metadata, in exactly the shape of the SDK's `FileInfo` (which
/// refuses extra keys): `type` is `file`, `dir`, `symlink` (a link whose
/// target is missing) or `other`; a symlink to a file or directory has its
/// target's type and size and `symlink_target` set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    /// Absolute path (as asked, normalised; symlinks not resolved).
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: FileKind,
    /// Octal permission bits, `"0644"`.
    pub mode: String,
    /// `ls -l` style, `"-rw-r--r--"`.
    pub permissions: String,
    /// User and group names (numeric when not in /etc/passwd, /etc/group).
    pub owner: String,
    pub group: String,
    /// RFC 3339, UTC, seconds: `"2026-01-02T03:04:05Z"`.
    pub modified_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// One matching line, in exactly the shape of the SDK's `SearchMatch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentMatch {
    /// Absolute path of the file.
    pub file: String,
    /// 1-based line number.
    pub line: u64,
    /// The line without its end, lossy UTF-8, cut to [`MAX_MATCH_LINE`] bytes.
    pub content: String,
}

/// Which bound ended a search early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchLimit {
    /// `max_results` or `max_matches`.
    Results,
    /// [`MAX_SEARCH_BYTES`] of result text.
    Bytes,
    /// [`MAX_VISITED`] entries.
    Entries,
    /// The time limit.
    Time,
    /// A newer guest's limit.
    #[serde(other)]
    Other,
}

/// What a `replace` did, in exactly the shape of the SDK's `ReplaceResult`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaceResult {
    /// Matches replaced (or, for a dry run, that would be).
    pub replacements: u64,
    /// Files rewritten (or that would be).
    pub files_modified: u64,
    /// Files without a match.
    pub files_skipped: u64,
    /// Files with a NUL byte, left alone.
    pub binary_files_skipped: u64,
}

/// The guest's figures for the SDK's `MachineMetrics` (the host adds the
/// timestamp).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestMetrics {
    /// Busy share of all online CPUs over the sample, 0..=100.
    pub cpu_percent: f64,
    /// Online CPUs.
    pub cpu_count: u32,
    /// `MemTotal - MemAvailable`.
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// Of the root filesystem.
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    /// Bytes received and sent by all interfaces but loopback since boot.
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A request line that could not be taken as a [`Request`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("request is not a JSON object with a numeric id: {0}")]
    NoId(String),
    #[error("unknown op {op:?}")]
    UnknownOp { id: u64, op: String },
    #[error("bad {op} request: {message}")]
    Bad {
        id: u64,
        op: String,
        message: String,
    },
}

impl RequestError {
    /// The id to answer, when the line had one.
    pub fn id(&self) -> Option<u64> {
        match self {
            RequestError::NoId(_) => None,
            RequestError::UnknownOp { id, .. } | RequestError::Bad { id, .. } => Some(*id),
        }
    }

    /// The error reply for it, when it can be answered.
    pub fn reply(&self) -> Option<Reply> {
        let code = match self {
            RequestError::NoId(_) => return None,
            RequestError::UnknownOp { .. } => ErrorCode::UnknownOp,
            RequestError::Bad { .. } => ErrorCode::BadRequest,
        };
        Some(Reply {
            id: self.id()?,
            event: Event::error(code, self.to_string()),
        })
    }
}

/// Parses one request line (without or with its newline), telling a line
/// without an id from an unknown op from malformed fields.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    match serde_json::from_slice::<Request>(line) {
        Ok(r) => Ok(r),
        Err(e) => {
            #[derive(Deserialize)]
            struct Head {
                id: u64,
                #[serde(default)]
                op: Option<String>,
            }
            let head: Head =
                serde_json::from_slice(line).map_err(|_| RequestError::NoId(e.to_string()))?;
            let op = head.op.unwrap_or_default();
            if OPS.contains(&op.as_str()) {
                Err(RequestError::Bad {
                    id: head.id,
                    op,
                    message: e.to_string(),
                })
            } else {
                Err(RequestError::UnknownOp { id: head.id, op })
            }
        }
    }
}

/// One line (newline included) for a message.
pub fn to_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these types cannot fail: no maps with non-string keys,
    // no custom serialisers that error.
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip_req(op: Op) -> serde_json::Value {
        let r = Request { id: 7, op };
        let line = to_line(&r);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        let back = parse_request(&line).unwrap();
        assert_eq!(back, r);
        assert!(OPS.contains(&r.op.name()), "{} listed in OPS", r.op.name());
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["op"], r.op.name());
        v
    }

    fn round_trip_reply(event: Event) -> serde_json::Value {
        let r = Reply { id: 9, event };
        let line = to_line(&r);
        let back: Reply = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, r);
        serde_json::from_slice(&line).unwrap()
    }

    #[test]
    fn every_op_round_trips() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "1".to_string());
        let ops = vec![
            Op::Hello {
                protocol: PROTOCOL_VERSION,
            },
            Op::Ping,
            Op::Info,
            Op::Exec(ExecSpec {
                argv: vec!["ls".into(), "-l".into()],
                env: env.clone(),
                stdin: Some(b"in\n\0\xff".to_vec()),
                timeout_ms: Some(5),
                ..Default::default()
            }),
            Op::Exec(ExecSpec {
                cmd: Some("sleep 1".into()),
                background: true,
                ring_bytes: Some(4096),
                stdin_open: true,
                ..Default::default()
            }),
            Op::Attach {
                pid: 3,
                replay: true,
            },
            Op::Processes,
            Op::Output { pid: 3 },
            Op::Kill {
                pid: 3,
                signal: 15,
                group: false,
            },
            Op::WriteStdin {
                pid: 3,
                data: vec![0, 1, 2],
                eof: true,
            },
            Op::Ack {
                target: 1,
                bytes: 10,
            },
            Op::Cancel { target: 1 },
            Op::Stat {
                path: "/x".into(),
                user: Some("app".into()),
            },
            Op::ListDir {
                path: "/".into(),
                depth: 2,
                user: None,
                max_entries: Some(5),
            },
            Op::ReadFile {
                path: "/x".into(),
                offset: 10,
                length: 20,
                user: None,
            },
            Op::WriteFile(WriteFileSpec {
                path: "/x".into(),
                data: b"hi".to_vec(),
                offset: Some(0),
                truncate: true,
                mode: Some(0o600),
                exact_mode: true,
                parents: true,
                user: Some("app".into()),
            }),
            Op::MakeDir {
                path: "/d".into(),
                mode: Some(0o700),
                parents: false,
                user: None,
            },
            Op::Remove {
                path: "/d".into(),
                recursive: true,
                user: None,
            },
            Op::Rename {
                from: "/a".into(),
                to: "/b".into(),
                user: None,
            },
            Op::Chmod {
                path: "/a".into(),
                mode: 0o755,
                user: None,
            },
            Op::SearchNames(SearchNamesSpec {
                path: "/srv".into(),
                pattern: "*.py".into(),
                max_depth: Some(3),
                max_results: Some(10),
                timeout_ms: Some(1000),
                user: Some("app".into()),
            }),
            Op::SearchContent(SearchContentSpec {
                path: "/srv".into(),
                pattern: "fn (\\w+)".into(),
                literal: true,
                max_matches: Some(5),
                max_file_bytes: Some(1 << 20),
                ..Default::default()
            }),
            Op::Replace(ReplaceSpec {
                files: vec!["/a".into(), "b".into()],
                pattern: "x".into(),
                replacement: "$1".into(),
                literal: false,
                dry_run: true,
                user: None,
            }),
            Op::Metrics {
                sample_ms: Some(100),
            },
            Op::Start(StartSpec {
                cmd: Some("httpd".into()),
                env,
                user: Some("app".into()),
                workdir: Some("/srv".into()),
            }),
            Op::Probe {
                probe: ProbeSpec::Http {
                    port: 80,
                    host: None,
                    path: "/health".into(),
                },
                timeout_ms: Some(1000),
            },
            Op::SetTime { unix_ns: u64::MAX },
            Op::Reseed { data: vec![7; 64] },
            Op::PtyStart(PtySpec {
                cmd: Some("top".into()),
                cols: 80,
                rows: 24,
                ring_bytes: Some(4096),
                ..Default::default()
            }),
            Op::PtyResize {
                pid: 3,
                cols: 100,
                rows: 40,
            },
            Op::PtyList,
            Op::Watch(WatchSpec {
                path: "/srv".into(),
                recursive: true,
                user: Some("app".into()),
            }),
            Op::Connect { port: 8080 },
            Op::Send {
                target: 9,
                data: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
                eof: true,
            },
            Op::Mount(MountSpec {
                slot: 1,
                mount_path: "/data".into(),
                read_only: true,
                subpath: Some("team/a".into()),
                size_bytes: 64 << 20,
            }),
            Op::Unmount {
                slot: 1,
                mount_path: "/data".into(),
            },
            Op::VolumeHealth {
                slot: 1,
                mount_path: "/data".into(),
            },
            Op::Resize {
                vcpus: 2,
                memory_mib: 1024,
            },
        ];
        let names: std::collections::BTreeSet<&str> = ops.iter().map(Op::name).collect();
        assert_eq!(names.len(), OPS.len(), "every op covered");
        for op in ops {
            round_trip_req(op);
        }
    }

    #[test]
    fn wire_shapes() {
        // Byte fields are base64; defaults fill what the host leaves out.
        let v = round_trip_req(Op::WriteStdin {
            pid: 1,
            data: b"\n".to_vec(),
            eof: false,
        });
        assert_eq!(
            v,
            json!({"id": 7, "op": "write_stdin", "pid": 1, "data": "Cg=="})
        );
        let r = parse_request(br#"{"id":1,"op":"kill","pid":5}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Kill {
                pid: 5,
                signal: 9,
                group: true
            }
        );
        let r = parse_request(br#"{"id":1,"op":"list_dir","path":"/"}"#).unwrap();
        assert!(matches!(r.op, Op::ListDir { depth: 1, .. }));
        let r =
            parse_request(br#"{"id":1,"op":"probe","probe":{"kind":"http","port":8}}"#).unwrap();
        assert!(
            matches!(r.op, Op::Probe { probe: ProbeSpec::Http { ref path, .. }, .. } if path == "/")
        );

        let v = round_trip_reply(Event::Stdout {
            data: b"hi\n".to_vec(),
        });
        assert_eq!(v, json!({"id": 9, "type": "stdout", "data": "aGkK"}));
        let v = round_trip_reply(Event::Exit(ExitStatus {
            code: Some(3),
            ..Default::default()
        }));
        assert_eq!(
            v,
            json!({"id": 9, "type": "exit", "code": 3, "signal": null})
        );
        assert_eq!(round_trip_reply(Event::Ok), json!({"id": 9, "type": "ok"}));
        let v = round_trip_reply(Event::Volume(VolumeStatus {
            mounted: true,
            total_bytes: 8,
            used_bytes: 2,
            inodes_used: 11,
        }));
        assert_eq!(
            v,
            json!({"id": 9, "type": "volume", "mounted": true, "total_bytes": 8, "used_bytes": 2, "inodes_used": 11})
        );
        let v = round_trip_reply(Event::error(ErrorCode::NotFound, "/x: gone"));
        assert_eq!(v["code"], "not_found");
        // An error code from a newer guest still parses.
        let r: Reply =
            serde_json::from_str(r#"{"id":1,"type":"error","code":"quota","message":"m"}"#)
                .unwrap();
        assert_eq!(r.event, Event::error(ErrorCode::Other, "m"));
    }

    #[test]
    fn file_info_has_exactly_the_sdk_keys() {
        let info = FileInfo {
            name: "a".into(),
            path: "/a".into(),
            is_dir: false,
            size: 1,
            kind: FileKind::File,
            mode: "0644".into(),
            permissions: "-rw-r--r--".into(),
            owner: "root".into(),
            group: "root".into(),
            modified_time: "2026-01-02T03:04:05Z".into(),
            symlink_target: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let sdk = [
            "name",
            "path",
            "is_dir",
            "size",
            "type",
            "mode",
            "permissions",
            "owner",
            "group",
            "modified_time",
            "symlink_target",
        ];
        assert!(keys.iter().all(|k| sdk.contains(k)), "{keys:?}");
        assert_eq!(v["type"], "file");
        let v = round_trip_reply(Event::Entries {
            entries: vec![info.clone(), info],
        });
        assert_eq!(v["entries"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn search_and_metrics_shapes() {
        // Defaults fill what the host leaves out.
        let r = parse_request(br#"{"id":1,"op":"search_names","path":"/","pattern":"*"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::SearchNames(SearchNamesSpec {
                path: "/".into(),
                pattern: "*".into(),
                ..Default::default()
            })
        );
        let r = parse_request(br#"{"id":1,"op":"metrics"}"#).unwrap();
        assert_eq!(r.op, Op::Metrics { sample_ms: None });
        // A match and a replace result are exactly the SDK's keys.
        let v = round_trip_reply(Event::Matches {
            matches: vec![ContentMatch {
                file: "/a".into(),
                line: 3,
                content: "x".into(),
            }],
        });
        assert_eq!(
            v,
            json!({"id": 9, "type": "matches", "matches": [{"file": "/a", "line": 3, "content": "x"}]})
        );
        let v = serde_json::to_value(ReplaceResult {
            replacements: 2,
            files_modified: 1,
            files_skipped: 1,
            binary_files_skipped: 0,
        })
        .unwrap();
        assert_eq!(
            v,
            json!({"replacements": 2, "files_modified": 1, "files_skipped": 1, "binary_files_skipped": 0})
        );
        let v = round_trip_reply(Event::SearchEnd {
            truncated: Some(SearchLimit::Time),
            visited: 4,
        });
        assert_eq!(v["truncated"], "time");
        let r: Reply =
            serde_json::from_str(r#"{"id":1,"type":"search_end","truncated":"quota","visited":0}"#)
                .unwrap();
        assert_eq!(
            r.event,
            Event::SearchEnd {
                truncated: Some(SearchLimit::Other),
                visited: 0
            }
        );
        round_trip_reply(Event::Metrics(GuestMetrics {
            cpu_percent: 12.5,
            cpu_count: 2,
            ..Default::default()
        }));
        round_trip_reply(Event::Paths {
            paths: vec!["/a".into()],
        });
        assert!(!Event::Paths { paths: vec![] }.is_final());
        assert!(!Event::Matches { matches: vec![] }.is_final());
        assert_eq!(
            Event::Paths {
                paths: vec!["/ab".into()]
            }
            .stream_bytes(),
            19
        );
        let v = round_trip_reply(Event::error(ErrorCode::NameTooLong, "m"));
        assert_eq!(v["code"], "name_too_long");
    }

    #[test]
    fn unknown_and_bad_requests() {
        let e = parse_request(br#"{"id":4,"op":"fly","to":"moon"}"#).unwrap_err();
        assert_eq!(
            e,
            RequestError::UnknownOp {
                id: 4,
                op: "fly".into()
            }
        );
        let r = e.reply().unwrap();
        assert_eq!(r.id, 4);
        assert!(matches!(
            r.event,
            Event::Error {
                code: ErrorCode::UnknownOp,
                ..
            }
        ));
        let e = parse_request(br#"{"id":5,"op":"stat"}"#).unwrap_err();
        assert!(matches!(e, RequestError::Bad { id: 5, .. }), "{e:?}");
        assert!(e.to_string().contains("path"), "{e}");
        let e = parse_request(br#"{"id":6,"op":"reseed","data":"***"}"#).unwrap_err();
        assert!(matches!(e, RequestError::Bad { id: 6, .. }), "{e:?}");
        let e = parse_request(b"garbage").unwrap_err();
        assert!(e.reply().is_none());
        let e = parse_request(br#"{"op":"ping"}"#).unwrap_err();
        assert!(matches!(e, RequestError::NoId(_)));
    }

    #[test]
    fn pty_and_watch_wire_shapes() {
        let r = parse_request(br#"{"id":1,"op":"pty_start"}"#).unwrap();
        assert_eq!(r.op, Op::PtyStart(PtySpec::default()));
        let Op::PtyStart(spec) = r.op else {
            unreachable!()
        };
        assert_eq!((spec.cols, spec.rows), (120, 30));
        assert!(pty::check_size(80, 24).is_ok());
        assert!(pty::check_size(0, 24).unwrap_err().contains("cols"));
        assert!(pty::check_size(80, 5000).unwrap_err().contains("rows"));
        let info = PtyInfo {
            session: "pty_00ff".into(),
            pid: 42,
            cols: 80,
            rows: 24,
            command: "/bin/sh -i".into(),
            running: true,
            started_unix_ms: 1,
            exit: None,
        };
        let v = round_trip_reply(Event::Pty { info: info.clone() });
        assert_eq!(v["type"], "pty");
        assert_eq!(v["info"]["session"], "pty_00ff");
        round_trip_reply(Event::Ptys {
            sessions: vec![info],
        });
        let r = parse_request(br#"{"id":1,"op":"watch","path":"/srv"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Watch(WatchSpec {
                path: "/srv".into(),
                recursive: false,
                user: None
            })
        );
        let ev = Event::FileEvents {
            events: vec![WatchEvent {
                kind: WatchKind::Create,
                name: "a/b".into(),
                path: "/srv/a/b".into(),
            }],
            dropped: 0,
        };
        let v = round_trip_reply(ev.clone());
        assert_eq!(
            v,
            json!({"id": 9, "type": "file_events", "events": [{"kind": "create", "name": "a/b", "path": "/srv/a/b"}]})
        );
        assert!(!ev.is_final());
        assert_eq!(ev.stream_bytes(), watch::BATCH_COST + 32 + 3 + 8);
        assert!(!Event::Watching { path: "/".into() }.is_final());
        assert!(
            Event::WatchEnd {
                reason: "gone".into()
            }
            .is_final()
        );
        for k in [
            WatchKind::Create,
            WatchKind::Write,
            WatchKind::Remove,
            WatchKind::Rename,
            WatchKind::Chmod,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }

    #[test]
    fn finality_and_stream_accounting() {
        assert!(!Event::Started { pid: 1 }.is_final());
        assert!(Event::Spawned { pid: Some(1) }.is_final());
        assert!(!Event::Stdout { data: vec![] }.is_final());
        assert!(Event::Exit(ExitStatus::default()).is_final());
        assert!(Event::ListEnd { truncated: false }.is_final());
        assert_eq!(Event::Stderr { data: vec![0; 10] }.stream_bytes(), 10);
        assert_eq!(Event::Ok.stream_bytes(), 0);
        // The largest data field fits a line with room to spare.
        let big = to_line(&Request {
            id: u64::MAX,
            op: Op::WriteFile(WriteFileSpec {
                path: "/".repeat(4096),
                data: vec![0xff; MAX_CHUNK],
                ..Default::default()
            }),
        });
        assert!(big.len() < MAX_LINE, "{}", big.len());
    }
}
