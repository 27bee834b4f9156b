//! Dockerfile analysis for validate/plan and for choosing an engine.
//!
//! Parsing is done by the `dockerfile-parser` crate (0.9, a pest grammar of
//! Dockerfile syntax). It does not know heredocs, so this module finds them
//! first (`RUN`/`COPY`/`ADD` lines with `<<[-]WORD`), blanks their bodies
//! (keeping the line count, so every line number stays right) and reports
//! them: BuildKit's Dockerfile frontend runs them, buildah 1.28 does not.
//!
//! What is reported:
//! - stages: index, alias, the `FROM` line, the raw image text, the text after
//!   `ARG`-before-`FROM` substitution (global `ARG` defaults overridden by the
//!   build args), and whether the parent is an external image, an earlier
//!   stage or `scratch`;
//! - variable `FROM`s (any `$` in the image text): they build, but
//!   `base_image_auth` is rejected for them (spec §1.2);
//! - images imported by alias outside `FROM` (`COPY --from=IMAGE`,
//!   `RUN --mount=…,from=IMAGE` naming no earlier stage): also rejected for
//!   `base_image_auth`;
//! - the distinct registry hosts of external `FROM`s;
//! - metadata instructions (`EXPOSE`, `VOLUME`, `HEALTHCHECK`, `LABEL`) and
//!   ignored ones (`ONBUILD`, `STOPSIGNAL`, `SHELL`, `MAINTAINER`) with line
//!   numbered warnings;
//! - secret ids used by `RUN --mount=type=secret,id=…`.

use std::collections::{BTreeMap, BTreeSet};

use dockerfile_parser::{Dockerfile, ImageRef, Instruction};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DockerfileError {
    #[error("Dockerfile does not parse: {0}")]
    Parse(String),
    #[error("Dockerfile has no FROM instruction")]
    NoFrom,
    #[error("Dockerfile line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("target stage {0:?} is not a stage of the Dockerfile")]
    NoTarget(String),
    #[error(
        "Dockerfile line {line}: heredocs (`<<{word}`) are not supported by {engine}; use the buildkit engine or a RUN/COPY without a heredoc"
    )]
    HeredocUnsupported {
        line: usize,
        word: String,
        engine: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Parent {
    /// An external image: the reference after substitution, and its
    /// registry host (`docker.io` for Docker Hub short names).
    Image {
        reference: String,
        registry: String,
    },
    /// An earlier stage, by index.
    Stage {
        index: usize,
    },
    Scratch,
    /// The image text has variables that the build args and global ARG
    /// defaults do not resolve.
    Unresolved,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageInfo {
    pub index: usize,
    pub name: Option<String>,
    pub line: usize,
    /// The image text as written.
    pub from: String,
    /// After ARG substitution (None when a variable is unset).
    pub resolved: Option<String>,
    /// The text has variables (`$`).
    pub variable: bool,
    pub parent: Parent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    pub line: usize,
    pub instruction: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    pub line: usize,
    pub word: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportedImage {
    pub line: usize,
    /// The `--from=` value.
    pub reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Analysis {
    pub stages: Vec<StageInfo>,
    /// Global `ARG`s (before the first `FROM`) and their defaults.
    pub global_args: BTreeMap<String, Option<String>>,
    /// Instructions kept as image metadata only.
    pub metadata: Vec<Note>,
    /// Instructions nullspace ignores (warnings).
    pub warnings: Vec<Note>,
    pub heredocs: Vec<Heredoc>,
    /// Images pulled by `COPY --from=`/`RUN --mount=from=` rather than FROM.
    pub imported_images: Vec<ImportedImage>,
    /// Ids used by `RUN --mount=type=secret,id=…` (default id: the target
    /// file name, as BuildKit does).
    pub secret_ids: BTreeSet<String>,
}

/// Why `base_image_auth` cannot be applied to a Dockerfile (spec §1.2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthRejection {
    #[error("base_image_auth: FROM on line {line} uses a variable ({from})")]
    VariableFrom { line: usize, from: String },
    #[error(
        "base_image_auth: line {line} imports image {reference:?} outside FROM (COPY --from / RUN --mount from)"
    )]
    ImportedStage { line: usize, reference: String },
    #[error("base_image_auth: the Dockerfile pulls from several registries ({})", hosts.join(", "))]
    SeveralRegistries { hosts: Vec<String> },
    #[error("base_image_auth: the Dockerfile has no external FROM image")]
    NoExternalImage,
}

impl Analysis {
    /// Stages whose parent is an external image.
    pub fn external_images(&self) -> impl Iterator<Item = (&StageInfo, &str, &str)> {
        self.stages.iter().filter_map(|s| match &s.parent {
            Parent::Image {
                reference,
                registry,
            } => Some((s, reference.as_str(), registry.as_str())),
            _ => None,
        })
    }

    /// Distinct registry hosts of external FROM images.
    pub fn registry_hosts(&self) -> BTreeSet<String> {
        self.external_images()
            .map(|(_, _, r)| r.to_string())
            .collect()
    }

    /// The registry host `base_image_auth` applies to: exactly one external
    /// FROM host among images that are not templates (`is_template` says
    /// which references name nullspace templates).
    pub fn base_image_auth_host(
        &self,
        is_template: &dyn Fn(&str) -> bool,
    ) -> Result<String, AuthRejection> {
        if let Some(s) = self.stages.iter().find(|s| s.variable) {
            return Err(AuthRejection::VariableFrom {
                line: s.line,
                from: s.from.clone(),
            });
        }
        if let Some(i) = self.imported_images.first() {
            return Err(AuthRejection::ImportedStage {
                line: i.line,
                reference: i.reference.clone(),
            });
        }
        let hosts: BTreeSet<&str> = self
            .external_images()
            .filter(|(_, r, _)| !is_template(r))
            .map(|(_, _, h)| h)
            .collect();
        match hosts.len() {
            0 => Err(AuthRejection::NoExternalImage),
            1 => Ok(hosts.into_iter().next().unwrap().to_string()),
            _ => Err(AuthRejection::SeveralRegistries {
                hosts: hosts.into_iter().map(String::from).collect(),
            }),
        }
    }

    /// Checks that `target` names a stage (by alias or index).
    pub fn check_target(&self, target: &str) -> Result<(), DockerfileError> {
        let t = target.to_ascii_lowercase();
        if self
            .stages
            .iter()
            .any(|s| s.name.as_deref() == Some(t.as_str()) || s.index.to_string() == t)
        {
            Ok(())
        } else {
            Err(DockerfileError::NoTarget(target.into()))
        }
    }

    /// Rejects what an engine cannot run: buildah 1.28 has no heredocs.
    pub fn check_engine(&self, engine: &str) -> Result<(), DockerfileError> {
        if engine == "buildah"
            && let Some(h) = self.heredocs.first()
        {
            return Err(DockerfileError::HeredocUnsupported {
                line: h.line,
                word: h.word.clone(),
                engine: "buildah 1.28".into(),
            });
        }
        Ok(())
    }
}

/// The registry host of an image reference (`docker.io` for Hub names).
pub fn registry_host(reference: &str) -> String {
    match ImageRef::parse(reference).registry {
        Some(r) if r == "index.docker.io" || r == "registry-1.docker.io" => "docker.io".into(),
        Some(r) => r.to_ascii_lowercase(),
        None => "docker.io".into(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds heredocs and returns the text with their bodies blanked.
fn strip_heredocs(text: &str) -> (String, Vec<Heredoc>) {
    let marker = regex::Regex::new(r#"<<(-?)(["']?)([A-Za-z_][A-Za-z0-9_]*)(["']?)"#).unwrap();
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut found = vec![];
    let mut continued = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        out.push(line.to_string());
        let first = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let is_instr = !continued && matches!(first.as_str(), "RUN" | "COPY" | "ADD");
        continued = line.trim_end().ends_with('\\');
        i += 1;
        if !is_instr {
            continue;
        }
        let before = found.len();
        for caps in marker.captures_iter(line) {
            if caps[2] != caps[4] {
                continue;
            }
            let strip_tabs = &caps[1] == "-";
            let word = caps[3].to_string();
            found.push(Heredoc {
                line: i,
                word: word.clone(),
            });
            while i < lines.len() {
                let body = lines[i];
                let b = if strip_tabs {
                    body.trim_start_matches('\t')
                } else {
                    body
                };
                out.push(String::new());
                i += 1;
                if b.trim_end_matches('\r') == word {
                    break;
                }
            }
        }
        if found.len() > before {
            continued = false;
        }
    }
    (out.join("\n"), found)
}

/// `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}` substitution. None when
/// a variable is unset (without a default).
fn substitute(s: &str, vars: &BTreeMap<String, String>) -> Option<String> {
    let re = regex::Regex::new(
        r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\})",
    )
    .unwrap();
    let mut out = String::new();
    let mut last = 0;
    for caps in re.captures_iter(s) {
        let m = caps.get(0).unwrap();
        out.push_str(&s[last..m.start()]);
        last = m.end();
        let name = caps.get(1).or_else(|| caps.get(2)).unwrap().as_str();
        let value = vars.get(name).filter(|v| !v.is_empty());
        match (caps.get(3).map(|m| m.as_str()), value) {
            (Some("-"), None) => out.push_str(&caps[4]),
            (Some("+"), Some(_)) => out.push_str(&caps[4]),
            (Some("+"), None) => {}
            (_, Some(v)) => out.push_str(v),
            (None, None) => return None,
            _ => {}
        }
    }
    out.push_str(&s[last..]);
    Some(out)
}

/// `key=value` pairs of every `--mount=` flag on a RUN line.
fn mounts(run_text: &str) -> Vec<BTreeMap<String, String>> {
    run_text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--mount="))
        .map(|m| {
            m.split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_ascii_lowercase(), v.to_string())
                })
                .collect()
        })
        .collect()
}

pub fn analyze(
    text: &str,
    build_args: &BTreeMap<String, String>,
) -> Result<Analysis, DockerfileError> {
    let (stripped, heredocs) = strip_heredocs(text);
    // The parser's unescaping rejects `\$` (an escaped dollar, valid in
    // Dockerfiles and produced by the step renderer); it only matters for
    // substitution, so the parser sees a plain `$`. Lines are unchanged.
    let stripped = stripped.replace("\\$", "$");
    let df = Dockerfile::parse(&stripped).map_err(|e| {
        let msg = e.to_string();
        DockerfileError::Parse(msg.lines().take(6).collect::<Vec<_>>().join(" "))
    })?;
    let mut a = Analysis {
        stages: vec![],
        global_args: BTreeMap::new(),
        metadata: vec![],
        warnings: vec![],
        heredocs,
        imported_images: vec![],
        secret_ids: BTreeSet::new(),
    };
    let mut vars = BTreeMap::new();
    for arg in &df.global_args {
        let name = arg.name.content.clone();
        let default = arg.value.as_ref().map(|v| v.content.clone());
        let value = build_args.get(&name).cloned().or(default.clone());
        if let Some(v) = value {
            vars.insert(name.clone(), v);
        }
        a.global_args.insert(name, default);
    }
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let stage_ref = |names: &BTreeMap<String, usize>, count: usize, r: &str| -> bool {
        let l = r.to_ascii_lowercase();
        names.contains_key(&l) || l.parse::<usize>().is_ok_and(|i| i < count)
    };
    for ins in &df.instructions {
        let span = ins.span();
        let line = line_of(&stripped, span.start);
        let itext = &stripped[span.start..span.end.min(stripped.len())];
        match ins {
            Instruction::From(from) => {
                let raw = from.image.content.clone();
                let variable = raw.contains('$');
                let resolved = substitute(&raw, &vars);
                let index = a.stages.len();
                let parent = match &resolved {
                    None => Parent::Unresolved,
                    Some(r) if r.eq_ignore_ascii_case("scratch") => Parent::Scratch,
                    Some(r) => match names.get(&r.to_ascii_lowercase()) {
                        Some(i) => Parent::Stage { index: *i },
                        None if r.is_empty() || r.contains(char::is_whitespace) => {
                            return Err(DockerfileError::Line {
                                line,
                                message: format!("FROM {raw:?} resolves to {r:?}"),
                            });
                        }
                        None => Parent::Image {
                            reference: r.clone(),
                            registry: registry_host(r),
                        },
                    },
                };
                let name = from.alias.as_ref().map(|a| a.content.to_ascii_lowercase());
                if let Some(n) = &name {
                    names.insert(n.clone(), index);
                }
                a.stages.push(StageInfo {
                    index,
                    name,
                    line,
                    from: raw,
                    resolved,
                    variable,
                    parent,
                });
            }
            Instruction::Copy(copy) => {
                for f in &copy.flags {
                    if f.name.content.eq_ignore_ascii_case("from")
                        && !stage_ref(&names, a.stages.len(), &f.value.content)
                    {
                        a.imported_images.push(ImportedImage {
                            line,
                            reference: f.value.content.clone(),
                        });
                    }
                }
            }
            Instruction::Run(_) => {
                for m in mounts(itext) {
                    let ty = m.get("type").map(String::as_str).unwrap_or("bind");
                    if let Some(from) = m.get("from")
                        && !stage_ref(&names, a.stages.len(), from)
                    {
                        a.imported_images.push(ImportedImage {
                            line,
                            reference: from.clone(),
                        });
                    }
                    if ty == "secret" {
                        let id = m.get("id").cloned().or_else(|| {
                            m.get("target")
                                .or_else(|| m.get("dst"))
                                .or_else(|| m.get("destination"))
                                .and_then(|t| t.rsplit('/').next().map(String::from))
                        });
                        if let Some(id) = id {
                            a.secret_ids.insert(id);
                        }
                    }
                }
            }
            Instruction::Label(_) => a.metadata.push(Note {
                line,
                instruction: "LABEL".into(),
                message: "kept in the image config only".into(),
            }),
            Instruction::Misc(m) => {
                let name = m.instruction.content.to_ascii_uppercase();
                let (meta, message) = match name.as_str() {
                    "EXPOSE" => (
                        true,
                        "recorded as image metadata; sandboxes expose ports by their own settings",
                    ),
                    "VOLUME" => (
                        true,
                        "recorded as image metadata; no volume is created in sandboxes",
                    ),
                    "HEALTHCHECK" => (
                        true,
                        "recorded as image metadata; use a readiness check (ready_cmd) for templates",
                    ),
                    "ONBUILD" => (
                        false,
                        "ignored: ONBUILD triggers are not run by later builds",
                    ),
                    "STOPSIGNAL" => (false, "ignored: sandboxes are not stopped by a signal"),
                    "SHELL" => (
                        false,
                        "applies to this build's RUN lines only; ignored at runtime",
                    ),
                    "MAINTAINER" => (false, "ignored (deprecated; use LABEL)"),
                    "ADD" | "WORKDIR" | "USER" => continue,
                    other => {
                        return Err(DockerfileError::Line {
                            line,
                            message: format!("unknown instruction {other}"),
                        });
                    }
                };
                let note = Note {
                    line,
                    instruction: name,
                    message: message.into(),
                };
                if meta {
                    a.metadata.push(note);
                } else {
                    a.warnings.push(note);
                }
            }
            _ => {}
        }
    }
    if a.stages.is_empty() {
        return Err(DockerfileError::NoFrom);
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn an(t: &str) -> Analysis {
        analyze(t, &BTreeMap::new()).unwrap()
    }

    #[test]
    fn multi_stage_and_hosts() {
        let a = an(
            "FROM golang:1.22 AS build\nRUN go build\nFROM ghcr.io/o/base:1 AS rt\nCOPY --from=build /out /app\nFROM build\n",
        );
        assert_eq!(a.stages.len(), 3);
        assert_eq!(
            a.stages[0].parent,
            Parent::Image {
                reference: "golang:1.22".into(),
                registry: "docker.io".into()
            }
        );
        assert_eq!(a.stages[1].line, 3);
        assert_eq!(a.stages[2].parent, Parent::Stage { index: 0 });
        assert!(a.imported_images.is_empty());
        assert_eq!(
            a.registry_hosts().into_iter().collect::<Vec<_>>(),
            ["docker.io", "ghcr.io"]
        );
        assert_eq!(
            a.base_image_auth_host(&|_| false),
            Err(AuthRejection::SeveralRegistries {
                hosts: vec!["docker.io".into(), "ghcr.io".into()]
            })
        );
        // The Hub image is a template: one host remains.
        assert_eq!(
            a.base_image_auth_host(&|r| r.starts_with("golang"))
                .unwrap(),
            "ghcr.io"
        );
        a.check_target("rt").unwrap();
        a.check_target("1").unwrap();
        assert_eq!(
            a.check_target("nope"),
            Err(DockerfileError::NoTarget("nope".into()))
        );
    }

    #[test]
    fn arg_before_from() {
        let t = "ARG REG=127.0.0.1:5000\nARG TAG\nFROM $REG/base:${TAG:-1}\nRUN true\n";
        let a = an(t);
        assert_eq!(
            a.stages[0].resolved.as_deref(),
            Some("127.0.0.1:5000/base:1")
        );
        assert!(a.stages[0].variable);
        assert_eq!(
            a.global_args.get("TAG"),
            Some(&None),
            "declared without default"
        );
        assert_eq!(
            a.base_image_auth_host(&|_| false),
            Err(AuthRejection::VariableFrom {
                line: 3,
                from: "$REG/base:${TAG:-1}".into()
            })
        );
        let args = BTreeMap::from([("TAG".to_string(), "7".to_string())]);
        let a = analyze(t, &args).unwrap();
        assert_eq!(
            a.stages[0].resolved.as_deref(),
            Some("127.0.0.1:5000/base:7")
        );
        assert_eq!(
            a.registry_hosts().into_iter().collect::<Vec<_>>(),
            ["127.0.0.1:5000"]
        );
        let a = an("FROM base:$NOPE\n");
        assert_eq!(a.stages[0].parent, Parent::Unresolved);
    }

    #[test]
    fn single_host_auth_and_imports() {
        let a = an("FROM registry.example.com/a/b:1\nRUN true\n");
        assert_eq!(
            a.base_image_auth_host(&|_| false).unwrap(),
            "registry.example.com"
        );
        let a = an("FROM registry.example.com/a/b:1\nCOPY --from=other.io/x:1 /a /a\n");
        assert_eq!(
            a.base_image_auth_host(&|_| false),
            Err(AuthRejection::ImportedStage {
                line: 2,
                reference: "other.io/x:1".into()
            })
        );
        let a = an("FROM scratch\nCOPY a /a\n");
        assert_eq!(
            a.base_image_auth_host(&|_| false),
            Err(AuthRejection::NoExternalImage)
        );
        let a = an(
            "FROM alpine AS s\nFROM alpine\nRUN --mount=type=bind,from=s,target=/x true\nRUN --mount=type=cache,from=busybox:1,target=/c true\n",
        );
        assert_eq!(
            a.imported_images,
            vec![ImportedImage {
                line: 4,
                reference: "busybox:1".into()
            }]
        );
    }

    #[test]
    fn metadata_warnings_secrets() {
        let t = "FROM alpine\nEXPOSE 80\nVOLUME /data\nHEALTHCHECK CMD true\nONBUILD RUN x\nSTOPSIGNAL SIGTERM\nSHELL [\"/bin/bash\", \"-c\"]\nLABEL a=b\nRUN --mount=type=secret,id=tok cat /run/secrets/tok\nRUN --mount=type=secret,target=/run/secrets/npmrc true\n";
        let a = an(t);
        let m: Vec<(usize, &str)> = a
            .metadata
            .iter()
            .map(|n| (n.line, n.instruction.as_str()))
            .collect();
        assert_eq!(
            m,
            [
                (2, "EXPOSE"),
                (3, "VOLUME"),
                (4, "HEALTHCHECK"),
                (8, "LABEL")
            ]
        );
        let w: Vec<(usize, &str)> = a
            .warnings
            .iter()
            .map(|n| (n.line, n.instruction.as_str()))
            .collect();
        assert_eq!(w, [(5, "ONBUILD"), (6, "STOPSIGNAL"), (7, "SHELL")]);
        assert_eq!(
            a.secret_ids.into_iter().collect::<Vec<_>>(),
            ["npmrc", "tok"]
        );
    }

    #[test]
    fn heredocs_found_and_blanked() {
        let t = "FROM alpine\nRUN <<EOF\necho hi\nFROM nope\nEOF\nCOPY <<-'X' /a\n\tcontent\n\tX\nRUN echo done \\\n  <<notaheredoc\nUSER app\n";
        let a = an(t);
        assert_eq!(a.stages.len(), 1, "heredoc bodies are not instructions");
        assert_eq!(
            a.heredocs,
            vec![
                Heredoc {
                    line: 2,
                    word: "EOF".into()
                },
                Heredoc {
                    line: 6,
                    word: "X".into()
                }
            ]
        );
        a.check_engine("buildkit").unwrap();
        let e = a.check_engine("buildah").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("not supported by buildah"), "{e}");
    }

    #[test]
    fn errors() {
        assert_eq!(
            analyze("RUN true\n", &BTreeMap::new()),
            Err(DockerfileError::NoFrom)
        );
        assert_eq!(
            analyze("FROM alpine\nFOO bar baz\n", &BTreeMap::new()),
            Err(DockerfileError::Line {
                line: 2,
                message: "unknown instruction FOO".into()
            })
        );
        assert!(matches!(
            analyze("FROM alpine\nCOPY\n", &BTreeMap::new()),
            Err(DockerfileError::Parse(_))
        ));
    }
}
