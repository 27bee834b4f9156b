//! The SDK 1.0's terminal and directory-watch wire: the frames of
//! `GET …/ws?channel=pty` and of `file_watch` on `GET …/ws` without a
//! channel, and the bodies of `…/pty[/{sid}[/resize]]`. One JSON text
//! message per frame; `id` echoes the client's request id.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

fn cols() -> u16 {
    crate::agent::pty::DEFAULT_COLS
}
fn rows() -> u16 {
    crate::agent::pty::DEFAULT_ROWS
}

/// What the client sends on the pty channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyRequest {
    PtyStart {
        #[serde(default)]
        id: Value,
        #[serde(default = "cols")]
        cols: u16,
        #[serde(default = "rows")]
        rows: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        envs: Option<BTreeMap<String, String>>,
        /// nullspace's own (the SDK sends neither): the guest user the
        /// terminal runs as (default: the template's) ...
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// ... and a shell line run instead of the login shell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cmd: Option<String>,
    },
    /// Exactly one of `session_id` and (legacy) `pid`.
    PtyConnect {
        #[serde(default)]
        id: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// Exactly one of `data_base64` (bytes) and (legacy) `data` (text).
    PtyInput {
        #[serde(default)]
        id: Value,
        session_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    PtyResize {
        #[serde(default)]
        id: Value,
        session_id: String,
        cols: u16,
        rows: u16,
    },
    PtyKill {
        #[serde(default)]
        id: Value,
        session_id: String,
    },
}

/// What the server sends on the pty channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyEvent {
    PtyStarted {
        id: Value,
        session_id: String,
        pid: u32,
        cols: u16,
        rows: u16,
    },
    /// `data` is a lossy UTF-8 rendering for old clients; `data_base64`
    /// holds the bytes.
    PtyOutput {
        id: Value,
        session_id: String,
        data: String,
        data_base64: String,
    },
    /// The shell's convention for a killed process: 128 + signal.
    PtyExited {
        id: Value,
        session_id: String,
        exit_code: i32,
    },
    Error {
        id: Value,
        message: String,
        code: String,
    },
}

/// `GET …/pty`, `GET …/pty/{sid}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PtySessionInfo {
    pub session_id: String,
    pub pid: u32,
    pub cols: u16,
    pub rows: u16,
    /// The SDK reads it; nullspace sessions have no separate exec id.
    pub exec_id: String,
}

/// `POST …/pty/{sid}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResizeBody {
    pub cols: u16,
    pub rows: u16,
}

/// `file_watch` on `…/ws` (no channel): the watch lasts until the socket
/// closes or `timeout_secs` passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "file_watch")]
pub struct FileWatchRequest {
    #[serde(default)]
    pub id: Value,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
}

/// What the server sends for a watch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchFrame {
    FileWatchStarted {
        id: Value,
    },
    /// `event`: `create`, `write`, `remove`, `rename` or `chmod`; `name`
    /// relative to the watched directory, `path` absolute.
    FileEvent {
        id: Value,
        event: String,
        name: String,
        path: String,
    },
    Error {
        id: Value,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The frames exactly as SDK 1.0.3's pty.py and _filesystem_core.py
    /// write and read them.
    #[test]
    fn sdk_frames() {
        let r: PtyRequest =
            serde_json::from_value(json!({"type": "pty_start", "id": "pty_1a2b3c4d", "cols": 80, "rows": 24, "cwd": "/srv", "envs": {"A": "1"}}))
                .unwrap();
        assert!(
            matches!(r, PtyRequest::PtyStart { cols: 80, rows: 24, ref cwd, .. } if cwd.as_deref() == Some("/srv"))
        );
        let r: PtyRequest =
            serde_json::from_value(json!({"type": "pty_start", "id": "x"})).unwrap();
        assert!(matches!(
            r,
            PtyRequest::PtyStart {
                cols: 120,
                rows: 30,
                user: None,
                cmd: None,
                ..
            }
        ));
        // The CLI's extension: absent fields stay off the wire.
        let start = PtyRequest::PtyStart {
            id: json!("x"),
            cols: 80,
            rows: 24,
            cwd: None,
            envs: None,
            user: Some("root".into()),
            cmd: Some("top".into()),
        };
        let v = serde_json::to_value(&start).unwrap();
        assert_eq!(
            v,
            json!({"type": "pty_start", "id": "x", "cols": 80, "rows": 24, "user": "root", "cmd": "top"})
        );
        assert_eq!(serde_json::from_value::<PtyRequest>(v).unwrap(), start);
        let r: PtyRequest =
            serde_json::from_value(json!({"type": "pty_connect", "id": "x", "pid": 7})).unwrap();
        assert_eq!(
            r,
            PtyRequest::PtyConnect {
                id: json!("x"),
                session_id: None,
                pid: Some(7)
            }
        );
        let r: PtyRequest = serde_json::from_value(
            json!({"type": "pty_input", "id": "x", "session_id": "s", "data_base64": "aGkK"}),
        )
        .unwrap();
        assert!(matches!(
            r,
            PtyRequest::PtyInput {
                data_base64: Some(_),
                data: None,
                ..
            }
        ));
        let r: PtyRequest = serde_json::from_value(
            json!({"type": "pty_resize", "id": "x", "session_id": "s", "cols": 100, "rows": 40}),
        )
        .unwrap();
        assert!(matches!(
            r,
            PtyRequest::PtyResize {
                cols: 100,
                rows: 40,
                ..
            }
        ));
        assert!(
            serde_json::from_value::<PtyRequest>(
                json!({"type": "pty_resize", "session_id": "s", "cols": 70000, "rows": 1})
            )
            .is_err()
        );

        let v = serde_json::to_value(PtyEvent::PtyExited {
            id: json!("x"),
            session_id: "s".into(),
            exit_code: 3,
        })
        .unwrap();
        assert_eq!(
            v,
            json!({"type": "pty_exited", "id": "x", "session_id": "s", "exit_code": 3})
        );
        let v = serde_json::to_value(PtyEvent::PtyOutput {
            id: json!("x"),
            session_id: "s".into(),
            data: "hi\n".into(),
            data_base64: "aGkK".into(),
        })
        .unwrap();
        assert_eq!(v["type"], "pty_output");

        let w: FileWatchRequest = serde_json::from_value(json!({"type": "file_watch", "id": "watch_1", "path": "/srv", "user": null, "recursive": true, "timeout_secs": null})).unwrap();
        assert!(w.recursive && w.user.is_none() && w.path == "/srv");
        let v = serde_json::to_value(WatchFrame::FileEvent {
            id: json!("watch_1"),
            event: "create".into(),
            name: "a".into(),
            path: "/srv/a".into(),
        })
        .unwrap();
        assert_eq!(
            v,
            json!({"type": "file_event", "id": "watch_1", "event": "create", "name": "a", "path": "/srv/a"})
        );
        let v = serde_json::to_value(WatchFrame::FileWatchStarted { id: json!("w") }).unwrap();
        assert_eq!(v, json!({"type": "file_watch_started", "id": "w"}));
    }
}
