//! The lifecycle and git answers, as the model writes them, go through the
//! published SDK 1.0.3's own parsers (its venv: `NULLSPACE_SDK1_PYTHON`, or
//! `target/sdk1-venv` made by scripts/deps.sh): the hand-written ones the
//! client calls and the generated models, which reject missing keys and
//! bad enum values.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nullspace_model::machine::git::{
    GitBranchList, GitChangedFile, GitCommitInfo, GitCommitReply, GitLogReply, GitOk,
    GitStatusReply, GitSyncReply,
};
use nullspace_model::machine::lifecycle::{
    LifecycleActorKind, LifecycleAudience, LifecycleEventInfo, LifecycleEventList,
    LifecycleOperation, LifecycleServerFrame, LifecycleStatus, LifecycleSubscription,
    ReconnectMode, event_id,
};
use serde_json::{Map, Value, json};

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("NULLSPACE_SDK1_PYTHON") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/sdk1-venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run scripts/deps.sh (it installs nullspace-sdk==1.0.3)",
        p.display()
    );
    p
}

/// Runs `script` with the JSON `input` on stdin; its stdout.
fn run(script: &str, input: &Value) -> String {
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "SDK parser refused it:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn event(seq: i64, op: LifecycleOperation, status: LifecycleStatus) -> LifecycleEventInfo {
    let failed = status == LifecycleStatus::Failed;
    LifecycleEventInfo {
        id: event_id(seq),
        occurred_at: "2026-12-06T20:00:00.123Z".into(),
        audience: LifecycleAudience::Customer,
        operation: op,
        status,
        actor_kind: LifecycleActorKind::System,
        metadata: Map::new(),
        machine_id: Some("mch_1".into()),
        snapshot_id: None,
        source_machine_id: None,
        target_machine_id: None,
        user_id: None,
        reason: failed.then(|| "the VM did not start".into()),
        error_code: failed.then(|| "machine_error".into()),
        error_message: failed.then(|| "boot: timed out".into()),
    }
}

#[test]
fn lifecycle_answers_parse_in_the_sdk() {
    let list = LifecycleEventList {
        events: LifecycleOperation::ALL
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let st = if i % 2 == 0 {
                    LifecycleStatus::Succeeded
                } else {
                    LifecycleStatus::Failed
                };
                event(i as i64 + 1, *op, st)
            })
            .collect(),
        offset: 0,
        limit: 50,
        has_more: true,
    };
    let frames = vec![
        LifecycleServerFrame::Subscribed {
            subscription: LifecycleSubscription {
                machine_id: Some("mch_1".into()),
                ..Default::default()
            },
            reconnect_mode: ReconnectMode::LiveOnly,
        },
        LifecycleServerFrame::Subscribed {
            subscription: LifecycleSubscription::default(),
            reconnect_mode: ReconnectMode::Replay,
        },
        LifecycleServerFrame::Event {
            event: Box::new(event(
                9,
                LifecycleOperation::Fork,
                LifecycleStatus::Succeeded,
            )),
        },
        LifecycleServerFrame::Error {
            message: "stream ended".into(),
        },
    ];
    let input = json!({"list": list, "frames": frames});
    let out = run(
        r#"
import json, sys
from nullspace.types import LifecycleEventListResponse
from nullspace.lifecycle import (_parse_lifecycle_list_response, _handle_stream_handshake,
    _parse_lifecycle_stream_event, _decode_ws_message)
from nullspace.errors import MachineError
from nullspace._generated_api.nullspace_openapi_client.models import (
    LifecycleEventListResponse as G, LifecycleStreamEventMessage as GE,
    LifecycleStreamErrorMessage as GR, LifecycleStreamSubscribedMessage as GS)
d = json.load(sys.stdin)
r = _parse_lifecycle_list_response(d["list"])
G.from_dict(d["list"])
print(len(r.events), r.offset, r.limit, r.has_more)
for e in r.events:
    print(e.id, e.operation.value, e.status.value, e.actor_kind.value, e.occurred_at.isoformat(), e.reason, e.error_code)
f = d["frames"]
for s in f[:2]:
    _handle_stream_handshake(_decode_ws_message(json.dumps(s)))
GS.from_dict(f[0])
ev = _parse_lifecycle_stream_event(f[2]["event"])
GE.from_dict(f[2])
print("event", ev.operation.value, ev.machine_id)
GR.from_dict(f[3])
try:
    _handle_stream_handshake(f[3])
except MachineError as e:
    print("error", e.code, str(e))
"#,
        &input,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("{} 0 50 True", LifecycleOperation::ALL.len())
    );
    assert_eq!(
        lines[1],
        "00000000-0000-4000-8000-000000000001 create succeeded system 2026-12-06T20:00:00.123000+00:00 None None"
    );
    assert_eq!(
        lines[2],
        "00000000-0000-4000-8000-000000000002 destroy failed system 2026-12-06T20:00:00.123000+00:00 the VM did not start machine_error"
    );
    assert!(out.contains("event fork mch_1\n"), "{out}");
    assert!(out.contains("error websocket_error stream ended"), "{out}");
}

#[test]
fn git_answers_parse_in_the_sdk() {
    let status = GitStatusReply {
        detached: false,
        clean: false,
        changed: vec![
            GitChangedFile {
                path: "new.txt".into(),
                status: "R.".into(),
                staged: true,
                unstaged: false,
                original_path: Some("old.txt".into()),
            },
            GitChangedFile {
                path: "u.txt".into(),
                status: "??".into(),
                staged: false,
                unstaged: true,
                original_path: None,
            },
        ],
        branch: Some("main".into()),
        ahead: Some(1),
        behind: Some(0),
    };
    let log = GitLogReply {
        commits: vec![GitCommitInfo {
            sha: "a".repeat(40),
            author_name: "Ann".into(),
            author_email: "ann@example.invalid".into(),
            date: "2026-12-06T20:00:00+00:00".into(),
            message: "subject\n\nbody".into(),
        }],
    };
    let input = json!({
        "status": status,
        "log": log,
        "branches": GitBranchList { branches: vec!["dev".into(), "main".into()], current: Some("main".into()) },
        "commit": GitCommitReply { sha: "b".repeat(40) },
        "sync": GitSyncReply { summary: "Already up to date.".into() },
        "ok": GitOk { ok: true },
    });
    let out = run(
        r#"
import json, sys
from nullspace.git import _status_from_payload, _commits_from_payload
from nullspace._generated_api.nullspace_openapi_client.models import (
    GitStatus, GitLogResponse200, GitBranchList, GitCommitResponse, GitSyncResponse, GitOkResponse)
d = json.load(sys.stdin)
s = _status_from_payload(d["status"])
GitStatus.from_dict(d["status"])
print(s.branch, s.clean, s.changed_files, s.ahead, s.behind, s.changed[0].original_path)
c = _commits_from_payload(d["log"])
GitLogResponse200.from_dict(d["log"])
print(c[0].sha[:4], c[0].author_name, repr(c[0].message))
b = GitBranchList.from_dict(d["branches"])
print(b.current, b.branches)
GitCommitResponse.from_dict(d["commit"]); GitSyncResponse.from_dict(d["sync"]); GitOkResponse.from_dict(d["ok"])
print("ok")
"#,
        &input,
    );
    assert_eq!(
        out,
        "main False ['new.txt', 'u.txt'] 1 0 old.txt\naaaa Ann 'subject\\n\\nbody'\nmain ['dev', 'main']\nok\n"
    );
}
