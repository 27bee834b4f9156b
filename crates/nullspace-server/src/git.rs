//! Git in a machine's guest: each SDK git call (`…/git/*`) becomes git
//! argv run through the guest client, and git's machine-readable output
//! becomes the SDK's result.
//!
//! - Nothing from the request is ever part of a shell line: values are
//!   argv elements, after `--` where git would read them as options.
//! - Credentials travel in the command's environment only. HTTPS ones are
//!   answered by a credential helper whose text is constant (it prints the
//!   environment's values); an SSH key is written by a constant
//!   `GIT_SSH_COMMAND` to a private temporary file for the one connection.
//!   They are never in argv, a URL, a log line or `.git/config`.
//! - git runs with `-C <path>` from `/`, so a spawn that fails with
//!   "No such file or directory" can only mean git is missing.

use std::collections::BTreeMap;
use std::time::Duration;

use nullspace_model::machine::git::{
    GitAddBody, GitAuth, GitBranchAction, GitBranchBody, GitBranchList, GitChangedFile,
    GitCheckoutBody, GitCloneBody, GitCommitBody, GitCommitInfo, GitLogQuery, GitStatusReply,
    GitSyncBody,
};

use crate::guest::{Command, Finished, Guest, GuestError};

/// Time allowed to a local operation (status, commit, …).
const LOCAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed to a transfer (clone, pull, push).
const NETWORK_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Output kept from a step whose output is parsed (status, log, branches).
const PARSED_OUTPUT_MAX: usize = 8 << 20;
/// Output kept from other steps (a summary or an error message).
const MESSAGE_OUTPUT_MAX: usize = 64 << 10;
/// Most bytes of argv and environment of one step (the agent's request
/// line is 1 MiB, and JSON escaping can double some bytes).
const REQUEST_MAX: usize = 400 << 10;
/// Longest path, ref, remote or URL accepted.
const VALUE_MAX: usize = 4096;
/// Most commits one log call returns, and the default.
pub const LOG_MAX: u32 = 1000;
pub const LOG_DEFAULT: u32 = 50;

/// Environment names that carry credentials to the helpers below.
const ENV_USERNAME: &str = "NULLSPACE_GIT_USERNAME";
const ENV_PASSWORD: &str = "NULLSPACE_GIT_PASSWORD";
const ENV_SSH_KEY: &str = "NULLSPACE_GIT_SSH_KEY";
const ENV_SSH_PASSPHRASE: &str = "NULLSPACE_GIT_SSH_PASSPHRASE";

/// Answers git's `get` with the environment's user and password; every
/// other helper configured in the guest is reset first (`credential.helper=`)
/// so that nothing stores them.
const HTTPS_HELPER: &str = "credential.helper=!f() { test \"$1\" = get || return 0; printf 'username=%s\\npassword=%s\\n' \"$NULLSPACE_GIT_USERNAME\" \"$NULLSPACE_GIT_PASSWORD\"; }; f";

/// git runs this (with the ssh arguments after it) instead of `ssh`: the
/// key goes to a fresh 0600 file (`mktemp`) that is removed when ssh
/// ends; a passphrase is answered by a temporary askpass script that
/// prints the environment's value (the script holds no secret).
const SSH_COMMAND: &str = concat!(
    "f() { k=$(mktemp) || return 1; printf '%s\\n' \"$NULLSPACE_GIT_SSH_KEY\" > \"$k\"; ",
    "a=$(mktemp) || { rm -f \"$k\"; return 1; }; ",
    "printf '#!/bin/sh\\nprintf \"%%s\\\\n\" \"$NULLSPACE_GIT_SSH_PASSPHRASE\"\\n' > \"$a\"; chmod 700 \"$a\"; ",
    "if [ -n \"$NULLSPACE_GIT_SSH_PASSPHRASE\" ]; then export SSH_ASKPASS=\"$a\" SSH_ASKPASS_REQUIRE=force; fi; ",
    "ssh -i \"$k\" -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new \"$@\"; ",
    "r=$?; rm -f \"$k\" \"$a\"; return $r; }; f"
);

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git is not installed in the template of machine {machine}")]
    NotInstalled { machine: String },
    #[error("git {op}: {what} {reason}")]
    Invalid {
        op: &'static str,
        what: &'static str,
        reason: String,
    },
    #[error("git {op}: {path} in machine {machine} is not a git repository")]
    NotARepository {
        op: &'static str,
        machine: String,
        path: String,
    },
    #[error("git {op} in {path} on machine {machine} failed (exit {code}): {stderr}")]
    Failed {
        op: &'static str,
        machine: String,
        path: String,
        code: i32,
        stderr: String,
    },
    #[error("git {op} in {path} on machine {machine} printed more than {limit} bytes")]
    TooMuchOutput {
        op: &'static str,
        machine: String,
        path: String,
        limit: usize,
    },
    #[error("git {op} printed output that cannot be read: {detail}")]
    Unreadable { op: &'static str, detail: String },
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// One git process: its argv (starting with `git`) and environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Step {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Output kept per stream.
    pub cap: usize,
}

/// The environment holds credentials: never print it.
impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What one SDK call runs: steps in order, each only if the one before
/// succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub op: &'static str,
    /// The repository (or clone target) the call is about.
    pub path: String,
    pub steps: Vec<Step>,
}

// ---- request checks -----------------------------------------------------

fn invalid(op: &'static str, what: &'static str, reason: impl Into<String>) -> GitError {
    GitError::Invalid {
        op,
        what,
        reason: reason.into(),
    }
}

/// `s` shown in a message: quoted, at most 200 characters.
fn shown(s: &str) -> String {
    let mut t: String = s.chars().take(200).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

fn plain(op: &'static str, what: &'static str, s: &str) -> Result<(), GitError> {
    if s.is_empty() {
        return Err(invalid(op, what, "must not be empty"));
    }
    if s.len() > VALUE_MAX {
        return Err(invalid(
            op,
            what,
            format!("is longer than {VALUE_MAX} bytes"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(
            op,
            what,
            format!("{} contains a control character", shown(s)),
        ));
    }
    Ok(())
}

fn repo_path(op: &'static str, p: &str) -> Result<(), GitError> {
    plain(op, "path", p)?;
    if !p.starts_with('/') {
        return Err(invalid(op, "path", format!("{} is not absolute", shown(p))));
    }
    Ok(())
}

/// A branch or ref: git's own rules apply later; these keep it from being
/// read as an option or spanning arguments.
fn ref_name(op: &'static str, what: &'static str, r: &str) -> Result<(), GitError> {
    plain(op, what, r)?;
    if r.starts_with('-') {
        return Err(invalid(op, what, format!("{} starts with '-'", shown(r))));
    }
    if r.chars().any(char::is_whitespace) {
        return Err(invalid(
            op,
            what,
            format!("{} contains white space", shown(r)),
        ));
    }
    Ok(())
}

/// A remote URL: no credentials in it (they would be stored in
/// `.git/config` and shown in errors); `auth` carries them.
fn remote_url(op: &'static str, url: &str) -> Result<(), GitError> {
    plain(op, "url", url)?;
    if url.starts_with('-') {
        return Err(invalid(
            op,
            "url",
            format!("{} starts with '-'", shown(url)),
        ));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            let web = matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https");
            if web || userinfo.contains(':') {
                return Err(invalid(
                    op,
                    "url",
                    "must not hold credentials: pass them as auth",
                ));
            }
        }
    }
    Ok(())
}

fn file_list(op: &'static str, files: &[String]) -> Result<(), GitError> {
    for f in files {
        if f.is_empty() || f.contains('\0') || f.len() > VALUE_MAX {
            return Err(invalid(
                op,
                "files",
                format!("entry {} is empty, too long or holds NUL", shown(f)),
            ));
        }
    }
    Ok(())
}

fn secret(op: &'static str, what: &'static str, s: &str) -> Result<(), GitError> {
    // The credential protocol is line-based: a newline would inject keys.
    if s.is_empty() || s.contains(['\n', '\r', '\0']) || s.len() > 64 << 10 {
        return Err(invalid(
            op,
            what,
            "must be non-empty, under 64 KiB, without newlines or NUL",
        ));
    }
    Ok(())
}

// ---- plans --------------------------------------------------------------

/// `git -C path <args…>`, or `git <args…>` without a path.
fn git(path: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut v = vec!["git".to_string()];
    if let Some(p) = path {
        v.push("-C".into());
        v.push(p.into());
    }
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

fn step(argv: Vec<String>, timeout: Duration, cap: usize) -> Step {
    let mut env = BTreeMap::new();
    // Never wait for a prompt nobody can answer.
    env.insert("GIT_TERMINAL_PROMPT".into(), "0".into());
    Step {
        argv,
        env,
        timeout,
        cap,
    }
}

/// `argv` (`git …`) with credentials for one transfer: `-c` options go
/// right after `git`; the values go to the environment.
fn with_auth(op: &'static str, mut s: Step, auth: Option<&GitAuth>) -> Result<Step, GitError> {
    match auth {
        None => {}
        Some(GitAuth::Https { username, password }) => {
            secret(op, "auth.username", username)?;
            secret(op, "auth.password", password)?;
            let opts = ["-c", "credential.helper=", "-c", HTTPS_HELPER];
            s.argv.splice(1..1, opts.iter().map(|o| o.to_string()));
            s.env.insert(ENV_USERNAME.into(), username.clone());
            s.env.insert(ENV_PASSWORD.into(), password.clone());
        }
        Some(GitAuth::Ssh {
            private_key,
            passphrase,
        }) => {
            if private_key.is_empty() || private_key.contains('\0') || private_key.len() > 64 << 10
            {
                return Err(invalid(
                    op,
                    "auth.private_key",
                    "must be non-empty, under 64 KiB, without NUL",
                ));
            }
            s.env.insert("GIT_SSH_COMMAND".into(), SSH_COMMAND.into());
            s.env.insert("GIT_SSH_VARIANT".into(), "ssh".into());
            s.env.insert(ENV_SSH_KEY.into(), private_key.clone());
            if let Some(p) = passphrase {
                secret(op, "auth.passphrase", p)?;
                s.env.insert(ENV_SSH_PASSPHRASE.into(), p.clone());
            }
        }
    }
    Ok(s)
}

fn bounded(op: &'static str, plan: Plan) -> Result<Plan, GitError> {
    for s in &plan.steps {
        let n: usize = s.argv.iter().map(|a| a.len() + 3).sum::<usize>()
            + s.env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 6)
                .sum::<usize>();
        if n > REQUEST_MAX {
            return Err(invalid(
                op,
                "request",
                format!("is {n} bytes of arguments; at most {REQUEST_MAX}"),
            ));
        }
    }
    Ok(plan)
}

pub fn plan_clone(b: &GitCloneBody) -> Result<Plan, GitError> {
    const OP: &str = "clone";
    remote_url(OP, &b.url)?;
    repo_path(OP, &b.path)?;
    let mut args: Vec<String> = vec!["clone".into()];
    if let Some(br) = &b.branch {
        ref_name(OP, "branch", br)?;
        args.push(format!("--branch={br}"));
    }
    if let Some(d) = b.depth {
        if d == 0 {
            return Err(invalid(OP, "depth", "must be at least 1"));
        }
        args.push(format!("--depth={d}"));
    }
    args.extend(["--".into(), b.url.clone(), b.path.clone()]);
    let argv = git(None, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let s = with_auth(
        OP,
        step(argv, NETWORK_TIMEOUT, MESSAGE_OUTPUT_MAX),
        b.auth.as_ref(),
    )?;
    bounded(
        OP,
        Plan {
            op: OP,
            path: b.path.clone(),
            steps: vec![s],
        },
    )
}

pub fn plan_status(path: &str) -> Result<Plan, GitError> {
    const OP: &str = "status";
    repo_path(OP, path)?;
    let argv = git(
        Some(path),
        &[
            "status",
            "--porcelain=v2",
            "--branch",
            "-z",
            "--untracked-files=all",
        ],
    );
    Ok(Plan {
        op: OP,
        path: path.into(),
        steps: vec![step(argv, LOCAL_TIMEOUT, PARSED_OUTPUT_MAX)],
    })
}

/// Each commit: hash, author name, email, ISO date and message, NUL
/// separated (git allows no NUL in any of them); `-z` ends each commit
/// with NUL too.
const LOG_FORMAT: &str = "--format=%H%x00%an%x00%ae%x00%aI%x00%B";

pub fn plan_log(q: &GitLogQuery) -> Result<Plan, GitError> {
    const OP: &str = "log";
    repo_path(OP, &q.path)?;
    let n = q.limit.unwrap_or(LOG_DEFAULT).clamp(1, LOG_MAX);
    let argv = git(
        Some(&q.path),
        &["log", "-z", LOG_FORMAT, &format!("--max-count={n}")],
    );
    Ok(Plan {
        op: OP,
        path: q.path.clone(),
        steps: vec![step(argv, LOCAL_TIMEOUT, PARSED_OUTPUT_MAX)],
    })
}

/// Two steps: the local branches with the current one marked, then the
/// current branch's name (also when it has no commit yet).
pub fn plan_branches(path: &str) -> Result<Plan, GitError> {
    const OP: &str = "branch";
    repo_path(OP, path)?;
    let list = git(
        Some(path),
        &[
            "for-each-ref",
            "--format=%(HEAD) %(refname:short)",
            "refs/heads/",
        ],
    );
    let current = git(Some(path), &["branch", "--show-current"]);
    Ok(Plan {
        op: OP,
        path: path.into(),
        steps: vec![
            step(list, LOCAL_TIMEOUT, PARSED_OUTPUT_MAX),
            step(current, LOCAL_TIMEOUT, MESSAGE_OUTPUT_MAX),
        ],
    })
}

pub fn plan_branch(b: &GitBranchBody) -> Result<Plan, GitError> {
    const OP: &str = "branch";
    repo_path(OP, &b.path)?;
    ref_name(OP, "name", &b.name)?;
    let argv = match b.action {
        GitBranchAction::Create => git(Some(&b.path), &["branch", &b.name]),
        GitBranchAction::Delete => {
            let flag = if b.force { "-D" } else { "-d" };
            git(Some(&b.path), &["branch", flag, &b.name])
        }
    };
    Ok(Plan {
        op: OP,
        path: b.path.clone(),
        steps: vec![step(argv, LOCAL_TIMEOUT, MESSAGE_OUTPUT_MAX)],
    })
}

pub fn plan_checkout(b: &GitCheckoutBody) -> Result<Plan, GitError> {
    const OP: &str = "checkout";
    repo_path(OP, &b.path)?;
    ref_name(OP, "ref", &b.reference)?;
    // `--` after the ref: a file of the same name never makes it a path.
    let argv = if b.create {
        git(Some(&b.path), &["checkout", "-b", &b.reference, "--"])
    } else {
        git(Some(&b.path), &["checkout", &b.reference, "--"])
    };
    Ok(Plan {
        op: OP,
        path: b.path.clone(),
        steps: vec![step(argv, LOCAL_TIMEOUT, MESSAGE_OUTPUT_MAX)],
    })
}

fn add_argv(path: &str, files: &[String]) -> Vec<String> {
    if files.is_empty() {
        return git(Some(path), &["add", "--all"]);
    }
    let mut v = git(Some(path), &["add", "--"]);
    v.extend(files.iter().cloned());
    v
}

pub fn plan_add(b: &GitAddBody) -> Result<Plan, GitError> {
    const OP: &str = "add";
    repo_path(OP, &b.path)?;
    file_list(OP, &b.files)?;
    bounded(
        OP,
        Plan {
            op: OP,
            path: b.path.clone(),
            steps: vec![step(
                add_argv(&b.path, &b.files),
                LOCAL_TIMEOUT,
                MESSAGE_OUTPUT_MAX,
            )],
        },
    )
}

/// Stage (everything with `add_all`, or the given files), commit, then
/// read the new commit's hash.
pub fn plan_commit(b: &GitCommitBody) -> Result<Plan, GitError> {
    const OP: &str = "commit";
    repo_path(OP, &b.path)?;
    if b.message.contains('\0') || b.message.len() > 1 << 18 {
        return Err(invalid(OP, "message", "must be under 256 KiB, without NUL"));
    }
    let mut steps = vec![];
    let files = b.files.as_deref().unwrap_or_default();
    file_list(OP, files)?;
    if !files.is_empty() {
        steps.push(step(
            add_argv(&b.path, files),
            LOCAL_TIMEOUT,
            MESSAGE_OUTPUT_MAX,
        ));
    } else if b.add_all {
        steps.push(step(
            add_argv(&b.path, &[]),
            LOCAL_TIMEOUT,
            MESSAGE_OUTPUT_MAX,
        ));
    }
    let mut commit = git(Some(&b.path), &["commit", "--no-verify"]);
    commit.push(format!("--message={}", b.message));
    if !files.is_empty() {
        commit.push("--".into());
        commit.extend(files.iter().cloned());
    }
    let mut c = step(commit, LOCAL_TIMEOUT, MESSAGE_OUTPUT_MAX);
    match (&b.author_name, &b.author_email) {
        (Some(name), Some(email)) => {
            // The environment, not `--author`: no parsing of `<`/`>`, and
            // the committer is the same person.
            for (what, v) in [("author_name", name), ("author_email", email)] {
                if v.is_empty() || v.contains(['\n', '\r', '\0', '<', '>']) || v.len() > 1024 {
                    return Err(invalid(
                        OP,
                        what,
                        "must be non-empty, under 1 KiB, without newlines, NUL, '<' or '>'",
                    ));
                }
            }
            for k in ["GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"] {
                c.env.insert(k.into(), name.clone());
            }
            for k in ["GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"] {
                c.env.insert(k.into(), email.clone());
            }
        }
        (None, None) => {}
        _ => {
            return Err(invalid(
                OP,
                "author_name and author_email",
                "must be given together",
            ));
        }
    }
    steps.push(c);
    steps.push(step(
        git(Some(&b.path), &["rev-parse", "--verify", "HEAD"]),
        LOCAL_TIMEOUT,
        MESSAGE_OUTPUT_MAX,
    ));
    bounded(
        OP,
        Plan {
            op: OP,
            path: b.path.clone(),
            steps,
        },
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Pull,
    Push,
}

pub fn plan_sync(dir: Direction, b: &GitSyncBody) -> Result<Plan, GitError> {
    let op = match dir {
        Direction::Pull => "pull",
        Direction::Push => "push",
    };
    repo_path(op, &b.path)?;
    ref_name(op, "remote", &b.remote)?;
    let mut args = vec![op.to_string()];
    if dir == Direction::Push && b.set_upstream {
        args.push("--set-upstream".into());
    }
    args.push(b.remote.clone());
    if let Some(br) = &b.branch {
        ref_name(op, "branch", br)?;
        args.push(br.clone());
    }
    let argv = git(
        Some(&b.path),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let s = with_auth(
        op,
        step(argv, NETWORK_TIMEOUT, MESSAGE_OUTPUT_MAX),
        b.auth.as_ref(),
    )?;
    bounded(
        op,
        Plan {
            op,
            path: b.path.clone(),
            steps: vec![s],
        },
    )
}

// ---- running ------------------------------------------------------------

/// Whether the agent's spawn failure says the program was not found.
fn missing_program(e: &GuestError) -> bool {
    matches!(e, GuestError::Failed(m) | GuestError::NotFound(m)
        if m.contains("git: No such file or directory") || m.contains("git: not found"))
}

/// Runs the plan's steps in order as the template's user; the results of
/// all of them, or the first failure.
pub async fn run(guest: &Guest, machine: &str, plan: &Plan) -> Result<Vec<Finished>, GitError> {
    let mut out = Vec::with_capacity(plan.steps.len());
    for s in &plan.steps {
        let cmd = Command {
            argv: s.argv.clone(),
            env: s.env.clone(),
            cwd: Some("/".into()),
            timeout: Some(s.timeout),
            ..Default::default()
        };
        let f = match guest.run(cmd, s.cap, None).await {
            Ok(f) => f,
            Err(e) if missing_program(&e) => {
                return Err(GitError::NotInstalled {
                    machine: machine.into(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if f.exit_code() != 0 {
            return Err(failure(plan, machine, &f));
        }
        if f.stdout_dropped > 0 {
            return Err(GitError::TooMuchOutput {
                op: plan.op,
                machine: machine.into(),
                path: plan.path.clone(),
                limit: s.cap,
            });
        }
        out.push(f);
    }
    Ok(out)
}

fn failure(plan: &Plan, machine: &str, f: &Finished) -> GitError {
    let stderr = String::from_utf8_lossy(&f.stderr);
    if stderr.contains("not a git repository") {
        return GitError::NotARepository {
            op: plan.op,
            machine: machine.into(),
            path: plan.path.clone(),
        };
    }
    // One line: git's last non-empty line says what went wrong.
    let line = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or(if f.timed_out { "timed out" } else { "" });
    GitError::Failed {
        op: plan.op,
        machine: machine.into(),
        path: plan.path.clone(),
        code: f.exit_code(),
        stderr: line.chars().take(1000).collect(),
    }
}

/// A log of a repository without commits: git fails, the answer is empty.
pub fn is_empty_history(e: &GitError) -> bool {
    matches!(e, GitError::Failed { stderr, .. } if stderr.contains("does not have any commits yet"))
}

// ---- parsing ------------------------------------------------------------

fn unreadable(op: &'static str, detail: impl Into<String>) -> GitError {
    GitError::Unreadable {
        op,
        detail: detail.into(),
    }
}

fn text(op: &'static str, b: &[u8]) -> Result<String, GitError> {
    String::from_utf8(b.to_vec()).map_err(|_| unreadable(op, "not UTF-8"))
}

fn changed(path: &[u8], xy: &str, original: Option<&[u8]>) -> Result<GitChangedFile, GitError> {
    let mut c = xy.chars();
    let (x, y) = (c.next().unwrap_or('.'), c.next().unwrap_or('.'));
    Ok(GitChangedFile {
        path: text("status", path)?,
        status: xy.into(),
        staged: x != '.' && x != '?',
        unstaged: y != '.',
        original_path: original.map(|o| text("status", o)).transpose()?,
    })
}

/// `git status --porcelain=v2 --branch -z` (records end with NUL; a
/// rename's record is followed by its source path).
pub fn parse_status(out: &[u8]) -> Result<GitStatusReply, GitError> {
    const OP: &str = "status";
    let mut head: Option<String> = None;
    let mut ab: Option<(u64, u64)> = None;
    let mut files = vec![];
    let mut recs = out.split(|b| *b == 0).filter(|r| !r.is_empty());
    while let Some(r) = recs.next() {
        let fields = |n: usize| -> Result<Vec<&[u8]>, GitError> {
            let v: Vec<&[u8]> = r.splitn(n, |b| *b == b' ').collect();
            if v.len() == n {
                Ok(v)
            } else {
                Err(unreadable(
                    OP,
                    format!("short record {}", shown(&String::from_utf8_lossy(r))),
                ))
            }
        };
        match r[0] {
            b'#' => {
                let f = fields(3)?;
                match f[1] {
                    b"branch.head" => head = Some(text(OP, f[2])?),
                    b"branch.ab" => {
                        let s = text(OP, f[2])?;
                        let (a, b) = s
                            .split_once(' ')
                            .and_then(|(a, b)| {
                                Some((
                                    a.strip_prefix('+')?.parse().ok()?,
                                    b.strip_prefix('-')?.parse().ok()?,
                                ))
                            })
                            .ok_or_else(|| unreadable(OP, format!("branch.ab {s:?}")))?;
                        ab = Some((a, b));
                    }
                    _ => {}
                }
            }
            // Ordinary: 1 XY sub mH mI mW hH hI path
            b'1' => {
                let f = fields(9)?;
                files.push(changed(f[8], &text(OP, f[1])?, None)?);
            }
            // Renamed or copied: 2 XY sub mH mI mW hH hI Xscore path, then
            // NUL and the source path.
            b'2' => {
                let f = fields(10)?;
                let orig = recs
                    .next()
                    .ok_or_else(|| unreadable(OP, "rename without its source path"))?;
                files.push(changed(f[9], &text(OP, f[1])?, Some(orig))?);
            }
            // Unmerged: u XY sub m1 m2 m3 mW h1 h2 h3 path
            b'u' => {
                let f = fields(11)?;
                files.push(changed(f[10], &text(OP, f[1])?, None)?);
            }
            b'?' => {
                let f = fields(2)?;
                files.push(changed(f[1], "??", None)?);
            }
            b'!' => {}
            other => {
                return Err(unreadable(
                    OP,
                    format!("record kind {:?}", char::from(other)),
                ));
            }
        }
    }
    let head = head.ok_or_else(|| unreadable(OP, "no branch.head line"))?;
    let detached = head == "(detached)";
    Ok(GitStatusReply {
        detached,
        clean: files.is_empty(),
        changed: files,
        branch: (!detached).then_some(head),
        ahead: ab.map(|(a, _)| a),
        behind: ab.map(|(_, b)| b),
    })
}

/// `git log -z` with [`LOG_FORMAT`]. Messages lose their final newline.
pub fn parse_log(out: &[u8]) -> Result<Vec<GitCommitInfo>, GitError> {
    const OP: &str = "log";
    let s = text(OP, out)?;
    let fields: Vec<&str> = s.split('\0').collect();
    let mut commits = vec![];
    // Five fields a commit; the output ends with NUL (one empty field).
    let mut chunks = fields.chunks_exact(5);
    for c in &mut chunks {
        let sha = c[0].trim_start_matches('\n');
        if sha.len() < 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unreadable(OP, format!("commit hash {}", shown(sha))));
        }
        commits.push(GitCommitInfo {
            sha: sha.into(),
            author_name: c[1].into(),
            author_email: c[2].into(),
            date: c[3].into(),
            message: c[4].trim_end_matches('\n').into(),
        });
    }
    if chunks.remainder().iter().any(|f| !f.trim().is_empty()) {
        return Err(unreadable(OP, "a commit with missing fields"));
    }
    Ok(commits)
}

/// `for-each-ref --format='%(HEAD) %(refname:short)'` (`*` marks HEAD's
/// branch) and `branch --show-current` (empty when detached).
pub fn parse_branches(list: &[u8], current: &[u8]) -> Result<GitBranchList, GitError> {
    const OP: &str = "branch";
    let list = text(OP, list)?;
    let mut branches = vec![];
    for l in list.lines().filter(|l| !l.is_empty()) {
        let name = l
            .strip_prefix("* ")
            .or_else(|| l.strip_prefix("  "))
            .ok_or_else(|| unreadable(OP, format!("line {}", shown(l))))?;
        branches.push(name.to_string());
    }
    let current = text(OP, current)?.trim().to_string();
    Ok(GitBranchList {
        branches,
        current: (!current.is_empty()).then_some(current),
    })
}

/// `rev-parse --verify HEAD`.
pub fn parse_sha(out: &[u8]) -> Result<String, GitError> {
    let s = text("commit", out)?.trim().to_string();
    if s.len() < 40 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unreadable("commit", format!("commit hash {}", shown(&s))));
    }
    Ok(s)
}

/// What git printed about a transfer (it writes progress to stderr),
/// trimmed, at most 4 KiB.
pub fn summary(f: &Finished) -> String {
    let mut s = String::from_utf8_lossy(&f.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&f.stderr);
    let err = err.trim();
    if !err.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(err);
    }
    if s.len() > 4096 {
        let mut end = 4096;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(p: &Plan, i: usize) -> Vec<&str> {
        p.steps[i].argv.iter().map(String::as_str).collect()
    }

    fn https(u: &str, p: &str) -> Option<GitAuth> {
        Some(GitAuth::Https {
            username: u.into(),
            password: p.into(),
        })
    }

    #[test]
    fn clone_puts_values_after_the_separator() {
        let p = plan_clone(&GitCloneBody {
            url: "https://example.invalid/r.git".into(),
            path: "/workspace/r".into(),
            branch: Some("dev".into()),
            depth: Some(1),
            auth: None,
        })
        .unwrap();
        assert_eq!(
            argv(&p, 0),
            [
                "git",
                "clone",
                "--branch=dev",
                "--depth=1",
                "--",
                "https://example.invalid/r.git",
                "/workspace/r"
            ]
        );
        assert_eq!(p.steps[0].env.get("GIT_TERMINAL_PROMPT").unwrap(), "0");
        assert_eq!(p.steps[0].timeout, NETWORK_TIMEOUT);
    }

    /// The password is only in the environment: not in argv, not in the
    /// helper's text, not in the plan's Debug output.
    #[test]
    fn https_credentials_stay_out_of_argv() {
        let p = plan_clone(&GitCloneBody {
            url: "https://example.invalid/r.git".into(),
            path: "/w".into(),
            branch: None,
            depth: None,
            auth: https("alice", "s3cret-token"),
        })
        .unwrap();
        let s = &p.steps[0];
        assert!(
            s.argv
                .iter()
                .all(|a| !a.contains("s3cret") && !a.contains("alice"))
        );
        assert_eq!(
            argv(&p, 0)[..5],
            ["git", "-c", "credential.helper=", "-c", HTTPS_HELPER]
        );
        assert_eq!(s.env[ENV_USERNAME], "alice");
        assert_eq!(s.env[ENV_PASSWORD], "s3cret-token");
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("alice"),
            "{shown}"
        );
    }

    #[test]
    fn ssh_keys_go_through_the_environment() {
        let p = plan_sync(
            Direction::Push,
            &GitSyncBody {
                path: "/w".into(),
                remote: "origin".into(),
                branch: Some("main".into()),
                set_upstream: true,
                auth: Some(GitAuth::Ssh {
                    private_key: "KEY-MATERIAL".into(),
                    passphrase: Some("pp".into()),
                }),
            },
        )
        .unwrap();
        assert_eq!(
            argv(&p, 0),
            [
                "git",
                "-C",
                "/w",
                "push",
                "--set-upstream",
                "origin",
                "main"
            ]
        );
        let env = &p.steps[0].env;
        assert_eq!(env["GIT_SSH_COMMAND"], SSH_COMMAND);
        assert_eq!(env[ENV_SSH_KEY], "KEY-MATERIAL");
        assert_eq!(env[ENV_SSH_PASSPHRASE], "pp");
        assert!(!SSH_COMMAND.contains("KEY-MATERIAL"));
    }

    #[test]
    fn hostile_values_are_refused() {
        let base = GitCloneBody {
            url: "https://example.invalid/r.git".into(),
            path: "/w".into(),
            branch: None,
            depth: None,
            auth: None,
        };
        let cases: Vec<(GitCloneBody, &str)> = vec![
            (
                GitCloneBody {
                    url: "https://u:p@example.invalid/r.git".into(),
                    ..base.clone()
                },
                "must not hold credentials",
            ),
            (
                GitCloneBody {
                    url: "https://token@example.invalid/r.git".into(),
                    ..base.clone()
                },
                "must not hold credentials",
            ),
            (
                GitCloneBody {
                    url: "--upload-pack=touch /x".into(),
                    ..base.clone()
                },
                "starts with '-'",
            ),
            (
                GitCloneBody {
                    path: "relative".into(),
                    ..base.clone()
                },
                "is not absolute",
            ),
            (
                GitCloneBody {
                    path: "/w\0x".into(),
                    ..base.clone()
                },
                "control character",
            ),
            (
                GitCloneBody {
                    branch: Some("--exec=x".into()),
                    ..base.clone()
                },
                "starts with '-'",
            ),
            (
                GitCloneBody {
                    depth: Some(0),
                    ..base.clone()
                },
                "at least 1",
            ),
            (
                GitCloneBody {
                    auth: https("u", "p\nprotocol=http"),
                    ..base.clone()
                },
                "without newlines",
            ),
        ];
        for (b, want) in cases {
            let e = plan_clone(&b).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        // ssh user names are not secrets.
        assert!(
            plan_clone(&GitCloneBody {
                url: "ssh://git@example.invalid/r.git".into(),
                ..base.clone()
            })
            .is_ok()
        );
        let e = plan_checkout(&GitCheckoutBody {
            path: "/w".into(),
            reference: "-f".into(),
            create: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("starts with '-'"));
        let e = plan_add(&GitAddBody {
            path: "/w".into(),
            files: vec!["x".repeat(300); 2000],
        })
        .unwrap_err();
        assert!(e.to_string().contains("bytes of arguments"), "{e}");
    }

    #[test]
    fn commit_stages_then_commits_then_reads_the_hash() {
        let p = plan_commit(&GitCommitBody {
            path: "/w".into(),
            message: "-m looks like an option".into(),
            add_all: false,
            files: Some(vec!["-a.txt".into()]),
            author_name: Some("A U".into()),
            author_email: Some("a@example.invalid".into()),
        })
        .unwrap();
        assert_eq!(argv(&p, 0), ["git", "-C", "/w", "add", "--", "-a.txt"]);
        assert_eq!(
            argv(&p, 1),
            [
                "git",
                "-C",
                "/w",
                "commit",
                "--no-verify",
                "--message=-m looks like an option",
                "--",
                "-a.txt"
            ]
        );
        assert_eq!(p.steps[1].env["GIT_AUTHOR_NAME"], "A U");
        assert_eq!(p.steps[1].env["GIT_COMMITTER_EMAIL"], "a@example.invalid");
        assert_eq!(
            argv(&p, 2),
            ["git", "-C", "/w", "rev-parse", "--verify", "HEAD"]
        );
        let all = plan_commit(&GitCommitBody {
            path: "/w".into(),
            message: "m".into(),
            add_all: true,
            files: None,
            author_name: None,
            author_email: None,
        })
        .unwrap();
        assert_eq!(argv(&all, 0), ["git", "-C", "/w", "add", "--all"]);
        assert_eq!(all.steps.len(), 3);
        let e = plan_commit(&GitCommitBody {
            author_name: Some("x".into()),
            ..GitCommitBody {
                path: "/w".into(),
                message: "m".into(),
                add_all: true,
                files: None,
                author_name: None,
                author_email: None,
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("given together"));
    }

    #[test]
    fn branch_checkout_log_status_argv() {
        let b = plan_branch(&GitBranchBody {
            path: "/w".into(),
            name: "feature".into(),
            action: GitBranchAction::Delete,
            force: true,
        })
        .unwrap();
        assert_eq!(argv(&b, 0), ["git", "-C", "/w", "branch", "-D", "feature"]);
        let c = plan_checkout(&GitCheckoutBody {
            path: "/w".into(),
            reference: "dev".into(),
            create: true,
        })
        .unwrap();
        assert_eq!(
            argv(&c, 0),
            ["git", "-C", "/w", "checkout", "-b", "dev", "--"]
        );
        let l = plan_log(&GitLogQuery {
            path: "/w".into(),
            limit: Some(1_000_000),
        })
        .unwrap();
        assert_eq!(argv(&l, 0)[6], "--max-count=1000");
        let s = plan_status("/w").unwrap();
        assert_eq!(
            argv(&s, 0),
            [
                "git",
                "-C",
                "/w",
                "status",
                "--porcelain=v2",
                "--branch",
                "-z",
                "--untracked-files=all"
            ]
        );
        let p = plan_sync(
            Direction::Pull,
            &GitSyncBody {
                path: "/w".into(),
                remote: "origin".into(),
                branch: None,
                set_upstream: true,
                auth: None,
            },
        )
        .unwrap();
        assert_eq!(argv(&p, 0), ["git", "-C", "/w", "pull", "origin"]);
    }

    #[test]
    fn status_parses_every_record_kind() {
        let out = b"# branch.oid 1234567890123456789012345678901234567890\0\
# branch.head main\0\
# branch.upstream origin/main\0\
# branch.ab +2 -1\0\
1 .M N... 100644 100644 100644 aaaa bbbb dir/with space.txt\0\
1 A. N... 000000 100644 100644 0000 cccc added.txt\0\
2 R. N... 100644 100644 100644 dddd dddd R100 new name.txt\0old name.txt\0\
u UU N... 100644 100644 100644 100644 e f g conflict.txt\0\
? untracked file\0";
        let s = parse_status(out).unwrap();
        assert_eq!(s.branch.as_deref(), Some("main"));
        assert!(!s.detached && !s.clean);
        assert_eq!((s.ahead, s.behind), (Some(2), Some(1)));
        let got: Vec<(&str, &str, bool, bool, Option<&str>)> = s
            .changed
            .iter()
            .map(|c| {
                (
                    c.path.as_str(),
                    c.status.as_str(),
                    c.staged,
                    c.unstaged,
                    c.original_path.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("dir/with space.txt", ".M", false, true, None),
                ("added.txt", "A.", true, false, None),
                ("new name.txt", "R.", true, false, Some("old name.txt")),
                ("conflict.txt", "UU", true, true, None),
                ("untracked file", "??", false, true, None),
            ]
        );
        let clean = parse_status(b"# branch.oid (initial)\0# branch.head (detached)\0").unwrap();
        assert!(clean.clean && clean.detached);
        assert_eq!((clean.branch, clean.ahead), (None, None));
    }

    #[test]
    fn status_refuses_garbage_without_panicking() {
        for bad in [
            &b""[..],
            b"# branch.head main\0x what\0",
            b"# branch.head main\x002 R. N... 1 2 3 4 5 R100 only\0",
            b"# branch.head main\x001 .M\0",
            b"# branch.ab +x -y\0",
            b"\xff\xfe\0",
        ] {
            assert!(parse_status(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_parses_commits_with_multiline_messages() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let out = format!(
            "{a}\0Ann\0ann@example.invalid\x002026-12-06T20:00:00+00:00\0subject\n\nbody line\n\0\
             {b}\0Bob\0bob@example.invalid\x002026-12-05T10:00:00+01:00\0first\n\0"
        );
        let c = parse_log(out.as_bytes()).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].sha, a);
        assert_eq!(c[0].message, "subject\n\nbody line");
        assert_eq!(c[1].author_email, "bob@example.invalid");
        assert_eq!(c[1].date, "2026-12-05T10:00:00+01:00");
        assert!(parse_log(b"").unwrap().is_empty());
        assert!(parse_log(b"nothex\0a\0b\0c\0d\0").is_err());
        assert!(parse_log(format!("{a}\0only two\0").as_bytes()).is_err());
    }

    #[test]
    fn branches_and_hashes_parse() {
        let b = parse_branches(b"  dev\n* main\n", b"main\n").unwrap();
        assert_eq!(b.branches, ["dev", "main"]);
        assert_eq!(b.current.as_deref(), Some("main"));
        let d = parse_branches(b"  main\n", b"\n").unwrap();
        assert_eq!(d.current, None);
        assert!(parse_branches(b"main\n", b"").is_err());
        assert_eq!(
            parse_sha(format!("{}\n", "c".repeat(40)).as_bytes()).unwrap(),
            "c".repeat(40)
        );
        assert!(parse_sha(b"HEAD\n").is_err());
    }

    #[test]
    fn failures_name_the_machine_and_the_missing_git() {
        let e = GuestError::Failed(
            "exec: git: No such file or directory (os error 2) (cwd /, user root)".into(),
        );
        assert!(missing_program(&e));
        assert!(!missing_program(&GuestError::Failed("exec: busy".into())));
        let msg = GitError::NotInstalled {
            machine: "mch_1".into(),
        }
        .to_string();
        assert_eq!(msg, "git is not installed in the template of machine mch_1");
        let plan = plan_status("/w").unwrap();
        let f = Finished {
            code: Some(128),
            stderr: b"warning: x\nfatal: not a git repository (or any parent): .git\n".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            failure(&plan, "mch_1", &f).to_string(),
            "git status: /w in machine mch_1 is not a git repository"
        );
        let f = Finished {
            code: Some(1),
            stderr: b"error: one\nfatal: pathspec 'x' did not match\n\n".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            failure(&plan, "mch_1", &f).to_string(),
            "git status in /w on machine mch_1 failed (exit 1): fatal: pathspec 'x' did not match"
        );
    }

    /// Runs a plan's steps with the host's git (standing in for the
    /// guest's), as the guest would: argv, environment, from `/`.
    fn run_here(plan: &Plan, extra_env: &[(&str, &str)]) -> Vec<Finished> {
        plan.steps
            .iter()
            .map(|s| {
                let o = std::process::Command::new(&s.argv[0])
                    .args(&s.argv[1..])
                    .envs(&s.env)
                    .envs(extra_env.iter().copied())
                    .current_dir("/")
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{:?}: {}",
                    s.argv,
                    String::from_utf8_lossy(&o.stderr)
                );
                Finished {
                    code: o.status.code(),
                    stdout: o.stdout,
                    stderr: o.stderr,
                    ..Default::default()
                }
            })
            .collect()
    }

    /// Every plan against a real repository, its output through the
    /// parsers: clone, commit, status of each kind of change, log,
    /// branches, checkout, delete.
    #[test]
    fn plans_drive_real_git() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let home_s = home.to_str().unwrap();
        // No identity and no config from the host: only what plans give.
        let env = [
            ("HOME", home_s),
            ("GIT_CONFIG_NOSYSTEM", "1"),
            ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ];
        let origin = dir.path().join("origin");
        let o = std::process::Command::new("git")
            .args(["init", "-q", "-b", "main"])
            .arg(&origin)
            .status()
            .unwrap();
        assert!(o.success());
        std::fs::write(origin.join("a.txt"), "one\n").unwrap();
        let author = |path: &str, message: &str, files: Option<Vec<String>>| GitCommitBody {
            path: path.into(),
            message: message.into(),
            add_all: files.is_none(),
            files,
            author_name: Some("Ann Example".into()),
            author_email: Some("ann@example.invalid".into()),
        };
        let o = origin.to_str().unwrap();
        let first = run_here(
            &plan_commit(&author(o, "first\n\nbody", None)).unwrap(),
            &env,
        );
        let sha1 = parse_sha(&first[2].stdout).unwrap();

        let work = dir.path().join("work");
        let w = work.to_str().unwrap();
        run_here(
            &plan_clone(&GitCloneBody {
                url: o.into(),
                path: w.into(),
                branch: Some("main".into()),
                depth: None,
                auth: None,
            })
            .unwrap(),
            &env,
        );
        assert_eq!(
            std::fs::read_to_string(work.join("a.txt")).unwrap(),
            "one\n"
        );

        let status = |env: &[(&str, &str)]| {
            let out = run_here(&plan_status(w).unwrap(), env);
            parse_status(&out[0].stdout).unwrap()
        };
        let s = status(&env);
        assert!(s.clean && !s.detached);
        assert_eq!(s.branch.as_deref(), Some("main"));
        assert_eq!((s.ahead, s.behind), (Some(0), Some(0)));

        // A change of each kind.
        std::fs::write(work.join("a.txt"), "two\n").unwrap();
        std::fs::write(work.join("with space.txt"), "new\n").unwrap();
        std::fs::write(work.join("b.txt"), "b\n").unwrap();
        run_here(
            &plan_add(&GitAddBody {
                path: w.into(),
                files: vec!["b.txt".into()],
            })
            .unwrap(),
            &env,
        );
        let s = status(&env);
        let mut got: Vec<(String, String, bool, bool)> = s
            .changed
            .iter()
            .map(|c| (c.path.clone(), c.status.clone(), c.staged, c.unstaged))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("a.txt".into(), ".M".into(), false, true),
                ("b.txt".into(), "A.".into(), true, false),
                ("with space.txt".into(), "??".into(), false, true),
            ]
        );

        // Commit only one file; the rest stays changed.
        let c = run_here(
            &plan_commit(&author(w, "-add b", Some(vec!["b.txt".into()]))).unwrap(),
            &env,
        );
        let sha2 = parse_sha(&c[2].stdout).unwrap();
        let s = status(&env);
        assert_eq!(s.ahead, Some(1));
        assert_eq!(s.changed.len(), 2);
        // A rename, staged.
        run_here(&plan_commit(&author(w, "all", None)).unwrap(), &env);
        std::process::Command::new("git")
            .args(["-C", w, "mv", "b.txt", "c.txt"])
            .status()
            .unwrap();
        let s = status(&env);
        assert_eq!(s.changed.len(), 1);
        assert_eq!(s.changed[0].path, "c.txt");
        assert_eq!(s.changed[0].original_path.as_deref(), Some("b.txt"));
        assert_eq!(s.changed[0].status, "R.");

        let log = run_here(
            &plan_log(&GitLogQuery {
                path: w.into(),
                limit: Some(2),
            })
            .unwrap(),
            &env,
        );
        let commits = parse_log(&log[0].stdout).unwrap();
        assert_eq!(commits.len(), 2);
        assert_eq!(commits[0].message, "all");
        assert_eq!(commits[1].sha, sha2);
        assert_eq!(commits[1].message, "-add b");
        assert_eq!(commits[1].author_name, "Ann Example");
        let all = run_here(
            &plan_log(&GitLogQuery {
                path: w.into(),
                limit: None,
            })
            .unwrap(),
            &env,
        );
        let all = parse_log(&all[0].stdout).unwrap();
        assert_eq!(all.last().unwrap().sha, sha1);
        assert_eq!(all.last().unwrap().message, "first\n\nbody");

        // Branches: create, check out (new and existing), list, delete.
        run_here(
            &plan_branch(&GitBranchBody {
                path: w.into(),
                name: "feature".into(),
                action: GitBranchAction::Create,
                force: false,
            })
            .unwrap(),
            &env,
        );
        run_here(
            &plan_checkout(&GitCheckoutBody {
                path: w.into(),
                reference: "topic".into(),
                create: true,
            })
            .unwrap(),
            &env,
        );
        let b = run_here(&plan_branches(w).unwrap(), &env);
        let b = parse_branches(&b[0].stdout, &b[1].stdout).unwrap();
        assert_eq!(b.branches, ["feature", "main", "topic"]);
        assert_eq!(b.current.as_deref(), Some("topic"));
        run_here(
            &plan_checkout(&GitCheckoutBody {
                path: w.into(),
                reference: "main".into(),
                create: false,
            })
            .unwrap(),
            &env,
        );
        run_here(
            &plan_branch(&GitBranchBody {
                path: w.into(),
                name: "topic".into(),
                action: GitBranchAction::Delete,
                force: true,
            })
            .unwrap(),
            &env,
        );
        let b = run_here(&plan_branches(w).unwrap(), &env);
        let b = parse_branches(&b[0].stdout, &b[1].stdout).unwrap();
        assert_eq!(b.branches, ["feature", "main"]);
        assert_eq!(b.current.as_deref(), Some("main"));

        // A detached HEAD.
        std::process::Command::new("git")
            .args(["-C", w, "checkout", "-q", "--detach"])
            .status()
            .unwrap();
        let s = status(&env);
        assert!(s.detached);
        assert_eq!(s.branch, None);
        let b = run_here(&plan_branches(w).unwrap(), &env);
        assert_eq!(
            parse_branches(&b[0].stdout, &b[1].stdout).unwrap().current,
            None
        );

        // Push back to the origin (a bare copy accepts pushes).
        let bare = dir.path().join("bare.git");
        std::process::Command::new("git")
            .args(["clone", "-q", "--bare", o])
            .arg(&bare)
            .status()
            .unwrap();
        std::process::Command::new("git")
            .args(["-C", w, "remote", "add", "bare"])
            .arg(&bare)
            .status()
            .unwrap();
        let p = run_here(
            &plan_sync(
                Direction::Push,
                &GitSyncBody {
                    path: w.into(),
                    remote: "bare".into(),
                    branch: Some("feature".into()),
                    set_upstream: false,
                    auth: None,
                },
            )
            .unwrap(),
            &env,
        );
        assert!(summary(&p[0]).contains("feature"), "{}", summary(&p[0]));
    }

    /// The helper git runs answers `get` with the environment's values and
    /// nothing else; the credentials appear in no argv.
    #[test]
    fn https_helper_answers_from_the_environment() {
        let s = with_auth(
            "pull",
            step(git(None, &["credential", "fill"]), LOCAL_TIMEOUT, 1 << 10),
            https("al ice", "p%s 'quoted' $HOME").as_ref(),
        )
        .unwrap();
        let mut child = std::process::Command::new(&s.argv[0])
            .args(&s.argv[1..])
            .envs(&s.env)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"protocol=https\nhost=example.invalid\n\n")
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8(o.stdout).unwrap();
        assert!(out.contains("username=al ice\n"), "{out}");
        assert!(out.contains("password=p%s 'quoted' $HOME\n"), "{out}");
    }

    /// The ssh wrapper hands ssh the key in a private file and a working
    /// askpass, and removes both afterwards (a stand-in `ssh` records what
    /// it got).
    #[test]
    fn ssh_wrapper_delivers_the_key_and_cleans_up() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let tmp = dir.path().join("tmp");
        let seen = dir.path().join("seen");
        for d in [&bin, &tmp, &seen] {
            std::fs::create_dir(d).unwrap();
        }
        let fake = bin.join("ssh");
        std::fs::write(
            &fake,
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do\n  if [ \"$1\" = -i ]; then cat \"$2\" > \"$SEEN/key\"; stat -c %a \"$2\" > \"$SEEN/mode\"; fi\n  echo \"$1\" >> \"$SEEN/args\"; shift\ndone\n\"$SSH_ASKPASS\" > \"$SEEN/pass\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = with_auth(
            "push",
            step(vec![], LOCAL_TIMEOUT, 1 << 10),
            Some(&GitAuth::Ssh {
                private_key: "-----BEGIN KEY-----\nabc $x 'y'\n-----END KEY-----".into(),
                passphrase: Some("pass phrase".into()),
            }),
        )
        .unwrap();
        // git runs GIT_SSH_COMMAND this way: under sh, arguments after it.
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{} \"$@\"", s.env["GIT_SSH_COMMAND"]))
            .args(["ssh", "git@example.invalid", "git-upload-pack 'r.git'"])
            .envs(&s.env)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.to_str().unwrap()))
            .env("TMPDIR", &tmp)
            .env("SEEN", &seen)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let read = |n: &str| std::fs::read_to_string(seen.join(n)).unwrap();
        assert_eq!(
            read("key"),
            "-----BEGIN KEY-----\nabc $x 'y'\n-----END KEY-----\n"
        );
        assert_eq!(read("mode").trim(), "600");
        assert_eq!(read("pass"), "pass phrase\n");
        assert!(read("args").contains("git@example.invalid\ngit-upload-pack 'r.git'\n"));
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "temporary files removed"
        );
    }
}
