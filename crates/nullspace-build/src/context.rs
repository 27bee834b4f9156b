//! Build contexts: materialising an uploaded context (entries with paths,
//! types and modes) into a directory, and reading a local directory the way
//! Docker does (`.dockerignore`, no symlinks or special files).
//!
//! `.dockerignore` matching follows Docker's `moby/patternmatcher`. Each
//! pattern is a `globset` glob with literal separators (so `*` and `?`
//! never cross a `/`, as in Go's `filepath.Match`) and backslash escapes;
//! the file-level rules, which no glob crate has, are written here:
//! - one pattern per line, `#` comments and blank lines skipped, surrounding
//!   whitespace trimmed, the pattern cleaned like Go's `filepath.Clean`
//!   (`./a//b/` → `a/b`) and a leading `/` dropped (patterns are relative to
//!   the context root, never "anywhere" as in gitignore);
//! - `**` matches any number of components, `[…]` a class;
//! - a pattern matches a path or any of its parent directories;
//! - `!pattern` re-includes; the last matching line wins.
//!
//! Deviation: Docker always sends the Dockerfile and `.dockerignore` to the
//! builder even when ignored; [`scan_local`] leaves them out when they are
//! ignored, and the engine is given the Dockerfile path separately.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nullspace_model::build::rules;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("build context: {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("build context: {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(".dockerignore line {line}: {message}")]
    Pattern { line: usize, message: String },
}

fn invalid(path: &str, message: impl Into<String>) -> ContextError {
    ContextError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `file` or `dir`: the build model's entry type.
pub use nullspace_model::build::status::EntryType;

#[derive(Debug, Clone)]
pub enum EntrySource {
    /// Copied from this file (e.g. an uploaded blob in the artifact store).
    File(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct ContextEntry {
    /// Relative, `/`-separated, no `..`.
    pub path: String,
    pub entry_type: EntryType,
    /// Permission bits (`0o7777` is applied).
    pub mode: u32,
    /// Required for files.
    pub source: Option<EntrySource>,
}

/// Checks a context path and returns it normalised (`./` and duplicate
/// slashes removed): the model's one context-path rule.
pub fn clean_relative(path: &str) -> Result<PathBuf, ContextError> {
    rules::context_path(path)
        .map(PathBuf::from)
        .map_err(|e| invalid(path, e.to_string()))
}

/// Creates the entries under `dir` (which must exist). Parents are created
/// as 0755 directories; nothing is ever followed through a symlink: a path
/// whose parent is not a directory we created fails.
pub fn materialize(dir: &Path, entries: &[ContextEntry]) -> Result<(), ContextError> {
    for e in entries {
        let rel = clean_relative(&e.path)?;
        // Every existing component must be a real directory (never a link).
        let mut cur = dir.to_path_buf();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len() - 1] {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(invalid(&e.path, "a parent is not a directory")),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(io_err(&cur))?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                        .map_err(io_err(&cur))?;
                }
                Err(err) => return Err(io_err(&cur)(err)),
            }
        }
        let target = dir.join(&rel);
        let mode = e.mode & 0o7777;
        match e.entry_type {
            EntryType::Dir => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(invalid(&e.path, "exists and is not a directory")),
                    Err(_) => fs::create_dir(&target).map_err(io_err(&target))?,
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(io_err(&target))?;
            }
            EntryType::File => {
                if fs::symlink_metadata(&target).is_ok() {
                    return Err(invalid(&e.path, "listed twice"));
                }
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_err(&target))?;
                match &e.source {
                    Some(EntrySource::Bytes(b)) => {
                        io::Write::write_all(&mut f, b).map_err(io_err(&target))?
                    }
                    Some(EntrySource::File(src)) => {
                        let mut r = fs::File::open(src).map_err(io_err(src))?;
                        io::copy(&mut r, &mut f).map_err(io_err(&target))?;
                    }
                    None => return Err(invalid(&e.path, "a file entry needs content")),
                }
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err(&target))?;
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Rule {
    line: usize,
    exclusion: bool,
    glob: globset::GlobMatcher,
}

/// Parsed `.dockerignore` rules.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    rules: Vec<Rule>,
}

/// Go's `filepath.Clean` for relative `/` paths (without `..` resolution
/// above the root).
fn clean_pattern(p: &str) -> String {
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn compile(pattern: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| e.kind().to_string())
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Result<DockerIgnore, ContextError> {
        let mut rules = vec![];
        for (n, line) in text.lines().enumerate() {
            let mut p = line.trim();
            if p.is_empty() || p.starts_with('#') {
                continue;
            }
            let exclusion = p.starts_with('!');
            if exclusion {
                p = p[1..].trim();
            }
            let cleaned = clean_pattern(p.trim_start_matches('/'));
            if cleaned.is_empty() {
                continue;
            }
            let glob = compile(&cleaned).map_err(|message| ContextError::Pattern {
                line: n + 1,
                message,
            })?;
            rules.push(Rule {
                line: n + 1,
                exclusion,
                glob,
            });
        }
        Ok(DockerIgnore { rules })
    }

    /// Whether `path` (relative, `/`-separated) is excluded.
    pub fn is_ignored(&self, path: &str) -> bool {
        let mut ignored = false;
        for r in &self.rules {
            let mut hit = r.glob.is_match(path);
            if !hit {
                // Parent directories.
                let mut p = path;
                while let Some((parent, _)) = p.rsplit_once('/') {
                    if r.glob.is_match(parent) {
                        hit = true;
                        break;
                    }
                    p = parent;
                }
            }
            if hit {
                ignored = !r.exclusion;
            }
        }
        ignored
    }

    /// The line of the last rule that decided `path`, for explanations.
    pub fn deciding_line(&self, path: &str) -> Option<usize> {
        self.rules
            .iter()
            .rev()
            .find(|r| r.glob.is_match(path))
            .map(|r| r.line)
    }

    pub fn has_exclusions(&self) -> bool {
        self.rules.iter().any(|r| r.exclusion)
    }
}

/// A local context after `.dockerignore`: relative paths of the directories
/// and regular files to send, in walk order (parents first).
#[derive(Debug, Clone, Default)]
pub struct LocalContext {
    pub dirs: Vec<String>,
    pub files: Vec<String>,
    /// Paths left out by `.dockerignore`.
    pub ignored: usize,
}

/// Walks a local directory, applying its `.dockerignore`. Symlinks, sockets,
/// FIFOs and devices that are not ignored fail with the path named.
pub fn scan_local(root: &Path) -> Result<LocalContext, ContextError> {
    let ignore = match fs::read_to_string(root.join(".dockerignore")) {
        Ok(t) => DockerIgnore::parse(&t)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(io_err(&root.join(".dockerignore"))(e)),
    };
    let mut ctx = LocalContext::default();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(&dir))?;
        names.sort();
        let mut subdirs = vec![];
        for name in names {
            let name = name
                .to_str()
                .ok_or_else(|| invalid(&dir.display().to_string(), "a name is not UTF-8"))?
                .to_string();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let full = root.join(&path);
            let ft = fs::symlink_metadata(&full)
                .map_err(io_err(&full))?
                .file_type();
            let ignored = ignore.is_ignored(&path);
            if ft.is_dir() {
                // An ignored directory may still hold re-included paths.
                if ignored && !ignore.has_exclusions() {
                    ctx.ignored += 1;
                    continue;
                }
                if !ignored {
                    ctx.dirs.push(path.clone());
                }
                subdirs.push(path);
                continue;
            }
            if ignored {
                ctx.ignored += 1;
                continue;
            }
            if ft.is_file() {
                ctx.files.push(path);
            } else {
                let what = if ft.is_symlink() {
                    "symlinks are not supported in a build context"
                } else if ft.is_socket() || ft.is_fifo() {
                    "sockets and FIFOs are not supported in a build context"
                } else {
                    "device files are not supported in a build context"
                };
                return Err(invalid(&path, what));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    // Directories kept only for re-included children.
    for f in ctx.files.clone() {
        let mut p = f.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            if !ctx.dirs.iter().any(|d| d == parent) {
                ctx.dirs.push(parent.to_string());
            }
            p = parent;
        }
    }
    ctx.dirs.sort();
    Ok(ctx)
}

/// Copies a scanned local context into `dest` (an empty directory), keeping
/// permission bits.
pub fn copy_local(root: &Path, ctx: &LocalContext, dest: &Path) -> Result<(), ContextError> {
    for d in &ctx.dirs {
        let (s, t) = (root.join(d), dest.join(d));
        fs::create_dir_all(&t).map_err(io_err(&t))?;
        let mode = fs::metadata(&s).map_err(io_err(&s))?.permissions().mode();
        fs::set_permissions(&t, fs::Permissions::from_mode(mode & 0o7777)).map_err(io_err(&t))?;
    }
    for f in &ctx.files {
        let (s, t) = (root.join(f), dest.join(f));
        if let Some(p) = t.parent() {
            fs::create_dir_all(p).map_err(io_err(p))?;
        }
        fs::copy(&s, &t).map_err(io_err(&s))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_semantics() {
        let ig = DockerIgnore::parse(
            "# comment\n\n*.log\n/build/\nsecret.txt\n**/*.pem\ndocs/**\n!docs/keep.md\n./tmp//x\nf?o\n[ab].c\n",
        )
        .unwrap();
        assert!(ig.is_ignored("a.log"));
        assert!(!ig.is_ignored("sub/a.log"), "`*` stays in one component");
        assert!(ig.is_ignored("build"));
        assert!(ig.is_ignored("build/out/x.o"), "parents match");
        assert!(ig.is_ignored("secret.txt"));
        assert!(!ig.is_ignored("sub/secret.txt"), "anchored at the root");
        assert!(ig.is_ignored("key.pem") && ig.is_ignored("a/b/key.pem"));
        assert!(ig.is_ignored("docs/x/y.md"));
        assert!(!ig.is_ignored("docs/keep.md"), "last match wins");
        assert!(ig.is_ignored("tmp/x"));
        assert!(ig.is_ignored("foo") && !ig.is_ignored("fooo"));
        assert!(ig.is_ignored("a.c") && !ig.is_ignored("c.c"));
        assert_eq!(ig.deciding_line("docs/keep.md"), Some(8));

        // `**` in the middle spans zero or more components; classes negate
        // with `!`; `\\` escapes a metacharacter.
        let ig = DockerIgnore::parse("a/**/z\n[!x]y\nlit\\*\n").unwrap();
        assert!(ig.is_ignored("a/z") && ig.is_ignored("a/b/c/z"));
        assert!(!ig.is_ignored("b/a/z"));
        assert!(ig.is_ignored("ay") && !ig.is_ignored("xy"));
        assert!(ig.is_ignored("lit*") && !ig.is_ignored("litx"));
        let e = DockerIgnore::parse("ok\n[unterminated\n").unwrap_err();
        assert!(e.to_string().starts_with(".dockerignore line 2:"), "{e}");
    }

    #[test]
    fn materialize_safely() {
        let d = tempfile::tempdir().unwrap();
        let entries = vec![
            ContextEntry {
                path: "./app/bin/run.sh".into(),
                entry_type: EntryType::File,
                mode: 0o755,
                source: Some(EntrySource::Bytes(b"#!/bin/sh\n".to_vec())),
            },
            ContextEntry {
                path: "app/conf".into(),
                entry_type: EntryType::Dir,
                mode: 0o700,
                source: None,
            },
            ContextEntry {
                path: "app/conf/a.toml".into(),
                entry_type: EntryType::File,
                mode: 0o644,
                source: Some(EntrySource::Bytes(b"a=1\n".to_vec())),
            },
        ];
        materialize(d.path(), &entries).unwrap();
        let m = |p: &str| fs::metadata(d.path().join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(m("app/bin/run.sh"), 0o755);
        assert_eq!(m("app/conf"), 0o700);
        assert_eq!(m("app/conf/a.toml"), 0o644);
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "."] {
            let e = ContextEntry {
                path: bad.into(),
                entry_type: EntryType::File,
                mode: 0o644,
                source: Some(EntrySource::Bytes(vec![])),
            };
            assert!(materialize(d.path(), &[e]).is_err(), "{bad}");
        }
        // A symlink planted in the directory is never followed.
        std::os::unix::fs::symlink("/tmp", d.path().join("link")).unwrap();
        let e = ContextEntry {
            path: "link/x".into(),
            entry_type: EntryType::File,
            mode: 0o644,
            source: Some(EntrySource::Bytes(vec![])),
        };
        let err = materialize(d.path(), &[e]).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn scan_local_ignores_and_rejects() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("src/gen")).unwrap();
        fs::create_dir_all(r.join("node_modules/x")).unwrap();
        fs::write(r.join("Dockerfile"), "FROM x\n").unwrap();
        fs::write(
            r.join(".dockerignore"),
            "node_modules\nsrc/gen\n!src/gen/keep\n*.secret\n",
        )
        .unwrap();
        fs::write(r.join("src/main.rs"), "").unwrap();
        fs::write(r.join("src/gen/drop"), "").unwrap();
        fs::write(r.join("src/gen/keep"), "").unwrap();
        fs::write(r.join("node_modules/x/i.js"), "").unwrap();
        fs::write(r.join("a.secret"), "").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("node_modules/ignored-link")).unwrap();
        let ctx = scan_local(r).unwrap();
        assert_eq!(
            ctx.files,
            [".dockerignore", "Dockerfile", "src/main.rs", "src/gen/keep"]
        );
        assert_eq!(ctx.dirs, ["src", "src/gen"]);
        let out = tempfile::tempdir().unwrap();
        copy_local(r, &ctx, out.path()).unwrap();
        assert!(out.path().join("src/gen/keep").exists());
        assert!(!out.path().join("src/gen/drop").exists());

        std::os::unix::fs::symlink("main.rs", r.join("src/link")).unwrap();
        let err = scan_local(r).unwrap_err().to_string();
        assert_eq!(
            err,
            "build context: src/link: symlinks are not supported in a build context"
        );
    }
}
