//! The git routes on the wire (`…/git/{clone,status,log,branch,checkout,
//! add,commit,pull,push}`), with exactly the keys 1.0.3 sends and parses
//! (`git.py`; generated `Git*` models). Credentials (`GitAuth`) never
//! appear in `Debug` output.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Per-operation credentials (`{"kind": "https" | "ssh", …}`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum GitAuth {
    /// A user and password, or a token as either (the provider's rule).
    Https { username: String, password: String },
    Ssh {
        private_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passphrase: Option<String>,
    },
}

impl fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitAuth::Https { .. } => f.write_str("GitAuth::Https(<redacted>)"),
            GitAuth::Ssh { .. } => f.write_str("GitAuth::Ssh(<redacted>)"),
        }
    }
}

/// `POST …/git/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCloneBody {
    pub url: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<GitAuth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCloneReply {
    pub path: String,
}

/// `GET …/git/status?path=` and `GET …/git/branch?path=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitPathQuery {
    pub path: String,
}

/// `GET …/git/log?path=&limit=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitLogQuery {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One entry of a status (git's porcelain v2 `XY`, `.` = unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitChangedFile {
    pub path: String,
    /// Two characters: index then worktree (`.M`, `A.`, `R.`, `??`, `UU`).
    pub status: String,
    pub staged: bool,
    pub unstaged: bool,
    /// The source of a rename or copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_path: Option<String>,
}

/// `GET …/git/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitStatusReply {
    pub detached: bool,
    pub clean: bool,
    pub changed: Vec<GitChangedFile>,
    /// Absent on a detached HEAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Only with an upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind: Option<u64>,
}

/// One commit of `GET …/git/log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCommitInfo {
    pub sha: String,
    pub author_name: String,
    pub author_email: String,
    /// The author date, ISO 8601 with its offset.
    pub date: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitLogReply {
    pub commits: Vec<GitCommitInfo>,
}

/// `GET …/git/branch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitBranchList {
    pub branches: Vec<String>,
    /// Absent on a detached HEAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum GitBranchAction {
    #[default]
    Create,
    Delete,
}

/// `POST …/git/branch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitBranchBody {
    pub path: String,
    pub name: String,
    #[serde(default)]
    pub action: GitBranchAction,
    /// Delete even when not merged.
    #[serde(default)]
    pub force: bool,
}

/// `POST …/git/checkout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCheckoutBody {
    pub path: String,
    #[serde(rename = "ref")]
    pub reference: String,
    /// Create the branch first.
    #[serde(default)]
    pub create: bool,
}

/// `POST …/git/add` (no files: everything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitAddBody {
    pub path: String,
    #[serde(default)]
    pub files: Vec<String>,
}

/// `POST …/git/commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCommitBody {
    pub path: String,
    pub message: String,
    /// Stage every change (new files too) first.
    #[serde(default)]
    pub add_all: bool,
    /// Commit only these paths (staged first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCommitReply {
    pub sha: String,
}

fn origin() -> String {
    "origin".into()
}

/// `POST …/git/pull` and `…/git/push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitSyncBody {
    pub path: String,
    #[serde(default = "origin")]
    pub remote: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Push only: record the upstream.
    #[serde(default)]
    pub set_upstream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<GitAuth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitSyncReply {
    /// What git printed about the transfer.
    pub summary: String,
}

/// The answer of branch, checkout and add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitOk {
    pub ok: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_parse_what_the_sdk_sends() {
        let c: GitCloneBody = serde_json::from_value(json!({
            "url": "https://example.invalid/r.git", "path": "/workspace",
            "branch": "main", "depth": 1,
            "auth": {"kind": "https", "username": "u", "password": "p"}
        }))
        .unwrap();
        assert_eq!(
            c.auth,
            Some(GitAuth::Https {
                username: "u".into(),
                password: "p".into()
            })
        );
        let b: GitBranchBody = serde_json::from_value(
            json!({"path": "/w", "action": "delete", "name": "x", "force": true}),
        )
        .unwrap();
        assert_eq!(b.action, GitBranchAction::Delete);
        let k: GitCheckoutBody =
            serde_json::from_value(json!({"path": "/w", "ref": "dev", "create": true})).unwrap();
        assert_eq!(k.reference, "dev");
        let s: GitSyncBody = serde_json::from_value(json!({"path": "/w"})).unwrap();
        assert_eq!(s.remote, "origin");
        let a: GitAuth =
            serde_json::from_value(json!({"kind": "ssh", "private_key": "K"})).unwrap();
        assert!(matches!(
            a,
            GitAuth::Ssh {
                passphrase: None,
                ..
            }
        ));
    }

    /// A body logged by mistake shows no secret.
    #[test]
    fn credentials_are_redacted_in_debug() {
        let b = GitSyncBody {
            path: "/w".into(),
            remote: "origin".into(),
            branch: None,
            set_upstream: false,
            auth: Some(GitAuth::Https {
                username: "someone".into(),
                password: "hunter2-secret".into(),
            }),
        };
        let shown = format!("{b:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("someone"),
            "{shown}"
        );
        let k = GitAuth::Ssh {
            private_key: "-----BEGIN KEY-----".into(),
            passphrase: Some("pp-secret".into()),
        };
        let shown = format!("{k:?}");
        assert!(
            !shown.contains("BEGIN") && !shown.contains("pp-secret"),
            "{shown}"
        );
    }

    #[test]
    fn replies_have_the_sdk_keys() {
        let st = GitStatusReply {
            detached: true,
            clean: false,
            changed: vec![GitChangedFile {
                path: "a".into(),
                status: "??".into(),
                staged: false,
                unstaged: true,
                original_path: None,
            }],
            branch: None,
            ahead: None,
            behind: None,
        };
        assert_eq!(
            serde_json::to_value(st).unwrap(),
            json!({"detached": true, "clean": false, "changed": [
                {"path": "a", "status": "??", "staged": false, "unstaged": true}]})
        );
        assert_eq!(
            serde_json::to_value(GitBranchList {
                branches: vec!["main".into()],
                current: Some("main".into())
            })
            .unwrap(),
            json!({"branches": ["main"], "current": "main"})
        );
    }
}
