//! Dockerfile analysis for validate/plan and for choosing an engine.
//!
//! Parsing is done by the `parse-dockerfile` crate: every instruction typed,
//! with byte spans (so line numbers are exact), parser directives
//! (`# escape=`) and heredocs (`RUN <<EOF`, `COPY <<EOF`), which it parses
//! as part of their instruction. Heredocs are reported: BuildKit's
//! Dockerfile frontend runs them, buildah 1.28 does not. (It replaced
//! `dockerfile-parser` 0.9, a pest grammar that knew no heredocs, rejected
//! `\$` and gave no parser directives; this module had to blank heredoc
//! bodies by regex before parsing.)
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

use parse_dockerfile::{Instruction, Source};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DockerfileError {
    #[error("Dockerfile does not parse: line {line}: {message}")]
    Parse { line: usize, message: String },
    #[error("Dockerfile has no FROM instruction")]
    NoFrom,
    #[error("Dockerfile line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("target stage {0:?} is not a stage of the Dockerfile")]
    NoTarget(String),
    #[error(
        "Dockerfile line {line}: heredocs ({instruction} <<…) are not supported by {engine}; use the buildkit engine or a RUN/COPY without a heredoc"
    )]
    HeredocUnsupported {
        line: usize,
        instruction: String,
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
    /// The line of the instruction that has the heredoc.
    pub line: usize,
    /// `RUN`, `COPY` or `ADD`.
    pub instruction: String,
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
                instruction: h.instruction.clone(),
                engine: "buildah 1.28".into(),
            });
        }
        Ok(())
    }
}

/// The registry host of an image reference (`docker.io` for Hub names):
/// the first component when it looks like a host (has a `.` or `:`, or is
/// `localhost`), as Docker's reference grammar decides.
pub fn registry_host(reference: &str) -> String {
    let registry = reference
        .split_once('/')
        .map(|(first, _)| first)
        .filter(|f| f.contains(['.', ':']) || *f == "localhost");
    match registry {
        Some(r) if r == "index.docker.io" || r == "registry-1.docker.io" => "docker.io".into(),
        Some(r) => r.to_ascii_lowercase(),
        None => "docker.io".into(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}` substitution (the
/// parser keeps words as written; Docker expands only these forms in
/// `FROM`). None when a variable is unset (without a default).
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

/// `key=value` pairs of a `--mount=` flag value.
fn mount(value: &str) -> BTreeMap<String, String> {
    value
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect()
}

/// `NAME[=default]` words of an `ARG` (surrounding quotes dropped).
fn arg_words(text: &str) -> Vec<(String, Option<String>)> {
    text.split_whitespace()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (
                k.to_string(),
                Some(v.trim_matches(|c| c == '"' || c == '\'').to_string()),
            ),
            None => (w.to_string(), None),
        })
        .collect()
}

/// Docker accepts `ENTRYPOINT []` and `CMD []` (they reset what the base
/// image set); parse-dockerfile 0.1.9 rejects an empty exec form. The
/// analysis reads neither instruction, so such a line is parsed as `[""]`
/// (same line, so every position stays exact); the engine gets the text
/// as written.
fn accept_empty_exec_forms(text: &str) -> std::borrow::Cow<'_, str> {
    let re = regex::Regex::new(r"(?im)^([ \t]*(?:ENTRYPOINT|CMD)[ \t]*)\[[ \t]*\]([ \t]*)$")
        .expect("a valid pattern");
    re.replace_all(text, r#"${1}[""]${2}"#)
}

pub fn analyze(
    text: &str,
    build_args: &BTreeMap<String, String>,
) -> Result<Analysis, DockerfileError> {
    let text = &*accept_empty_exec_forms(text);
    let df = parse_dockerfile::parse(text).map_err(|e| {
        // The one error without a position is "no FROM" (line 0).
        if e.line() == 0 {
            DockerfileError::NoFrom
        } else {
            DockerfileError::Parse {
                line: e.line(),
                message: format!("{e:#}"),
            }
        }
    })?;
    let mut a = Analysis {
        stages: vec![],
        global_args: BTreeMap::new(),
        metadata: vec![],
        warnings: vec![],
        heredocs: vec![],
        imported_images: vec![],
        secret_ids: BTreeSet::new(),
    };
    let mut vars = BTreeMap::new();
    for arg in df.global_args() {
        for (name, default) in arg_words(&arg.arguments.value) {
            let value = build_args.get(&name).cloned().or(default.clone());
            if let Some(v) = value {
                vars.insert(name.clone(), v);
            }
            a.global_args.insert(name, default);
        }
    }
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let stage_ref = |names: &BTreeMap<String, usize>, count: usize, r: &str| -> bool {
        let l = r.to_ascii_lowercase();
        names.contains_key(&l) || l.parse::<usize>().is_ok_and(|i| i < count)
    };
    let line_at = |offset: usize| line_of(text, offset);
    for ins in &df.instructions {
        let note = |line: usize, instruction: &str, message: &str| Note {
            line,
            instruction: instruction.into(),
            message: message.into(),
        };
        match ins {
            Instruction::From(from) => {
                let line = line_at(from.from.span.start);
                let raw = from.image.value.to_string();
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
                let name = from.as_.as_ref().map(|(_, n)| n.value.to_ascii_lowercase());
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
                let line = line_at(copy.copy.span.start);
                for f in &copy.options {
                    if f.name.value.eq_ignore_ascii_case("from")
                        && let Some(v) = &f.value
                        && !stage_ref(&names, a.stages.len(), &v.value)
                    {
                        a.imported_images.push(ImportedImage {
                            line,
                            reference: v.value.to_string(),
                        });
                    }
                }
                if copy.src.iter().any(|s| matches!(s, Source::HereDoc(_))) {
                    a.heredocs.push(Heredoc {
                        line,
                        instruction: "COPY".into(),
                    });
                }
            }
            Instruction::Add(add) if add.src.iter().any(|s| matches!(s, Source::HereDoc(_))) => {
                a.heredocs.push(Heredoc {
                    line: line_at(add.add.span.start),
                    instruction: "ADD".into(),
                });
            }
            Instruction::Run(run) => {
                let line = line_at(run.run.span.start);
                if !run.here_docs.is_empty() {
                    a.heredocs.push(Heredoc {
                        line,
                        instruction: "RUN".into(),
                    });
                }
                for f in &run.options {
                    if !f.name.value.eq_ignore_ascii_case("mount") {
                        continue;
                    }
                    let m = mount(f.value.as_ref().map(|v| v.value.as_ref()).unwrap_or(""));
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
            Instruction::Label(l) => a.metadata.push(note(
                line_at(l.label.span.start),
                "LABEL",
                "kept in the image config only",
            )),
            Instruction::Expose(e) => a.metadata.push(note(
                line_at(e.expose.span.start),
                "EXPOSE",
                "recorded as image metadata; sandboxes expose ports by their own settings",
            )),
            Instruction::Volume(v) => a.metadata.push(note(
                line_at(v.volume.span.start),
                "VOLUME",
                "recorded as image metadata; no volume is created in sandboxes",
            )),
            Instruction::Healthcheck(h) => a.metadata.push(note(
                line_at(h.healthcheck.span.start),
                "HEALTHCHECK",
                "recorded as image metadata; use a readiness check (ready_cmd) for templates",
            )),
            Instruction::Onbuild(o) => a.warnings.push(note(
                line_at(o.onbuild.span.start),
                "ONBUILD",
                "ignored: ONBUILD triggers are not run by later builds",
            )),
            Instruction::Stopsignal(st) => a.warnings.push(note(
                line_at(st.stopsignal.span.start),
                "STOPSIGNAL",
                "ignored: sandboxes are not stopped by a signal",
            )),
            Instruction::Shell(sh) => a.warnings.push(note(
                line_at(sh.shell.span.start),
                "SHELL",
                "applies to this build's RUN lines only; ignored at runtime",
            )),
            Instruction::Maintainer(m) => a.warnings.push(note(
                line_at(m.maintainer.span.start),
                "MAINTAINER",
                "ignored (deprecated; use LABEL)",
            )),
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
    fn heredocs_are_part_of_their_instruction() {
        let t = "FROM alpine\nRUN <<EOF\necho hi\nFROM nope\nEOF\nCOPY <<-'X' /a\n\tcontent\n\tX\nRUN echo done\nUSER app\n";
        let a = an(t);
        assert_eq!(a.stages.len(), 1, "heredoc bodies are not instructions");
        assert_eq!(
            a.heredocs,
            vec![
                Heredoc {
                    line: 2,
                    instruction: "RUN".into()
                },
                Heredoc {
                    line: 6,
                    instruction: "COPY".into()
                }
            ]
        );
        a.check_engine("buildkit").unwrap();
        let e = a.check_engine("buildah").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("not supported by buildah"), "{e}");
    }

    #[test]
    fn empty_exec_forms_reset_and_parse() {
        let a = analyze(
            "FROM alpine\nENTRYPOINT []\ncmd [ ]\nEXPOSE 80\n",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(a.stages.len(), 1);
        // Positions after the rewritten lines are unchanged.
        assert!(a.metadata.iter().any(|m| m.line == 4), "{:?}", a.metadata);
        // A non-empty array and a shell form are left alone.
        assert!(
            analyze(
                "FROM alpine\nCMD [\"sh\"]\nENTRYPOINT sh\n",
                &BTreeMap::new()
            )
            .is_ok()
        );
        assert!(matches!(
            analyze("FROM alpine\nENTRYPOINT\n", &BTreeMap::new()),
            Err(DockerfileError::Parse { line: 2, .. })
        ));
    }

    #[test]
    fn errors() {
        assert_eq!(
            analyze("RUN true\n", &BTreeMap::new()),
            Err(DockerfileError::Parse {
                line: 1,
                message: "expected FROM".into()
            })
        );
        assert_eq!(
            analyze("# only a comment\n", &BTreeMap::new()),
            Err(DockerfileError::NoFrom)
        );
        assert_eq!(
            analyze("FROM alpine\nFOO bar baz\n", &BTreeMap::new()),
            Err(DockerfileError::Parse {
                line: 2,
                message: "unknown instruction 'FOO'".into()
            })
        );
        assert!(matches!(
            analyze("FROM alpine\nCOPY\n", &BTreeMap::new()),
            Err(DockerfileError::Parse { line: 2, .. })
        ));
        let e = analyze("FROM alpine\nRUN <<EOF\nno end\n", &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("here-document"), "{e}");
        // `\$` (the step renderer escapes `$`) and the escape directive parse.
        an("FROM alpine\nWORKDIR /srv/\\$app\n");
        let a = an("# escape=`\nFROM alpine\nRUN echo a `\n  b\nUSER app\n");
        assert_eq!(a.stages[0].line, 2);
        assert_eq!(registry_host("localhost:5000/a/b:1"), "localhost:5000");
        assert_eq!(registry_host("library/ubuntu"), "docker.io");
        assert_eq!(registry_host("ghcr.io/o/x"), "ghcr.io");
    }
}
