//! Names, tags and template references (spec §3.4), shared by the server
//! (resolution), the build plan (template bases) and the CLI.
//!
//! - name: one segment, lowercase `[a-z0-9]` with inner `._-`, ≤ 64 bytes;
//! - tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, not starting with `tb_`
//!   (that qualifier names an exact build);
//! - ref: `tmpl_…` | `name[:tag|:tb_…]` | `ns/name[:tag|:tb_…]`, where `ns`
//!   is a slug (`[a-z0-9]+(-[a-z0-9]+)*`).

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Qualifier {
    None,
    Tag(String),
    Build(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateRef {
    Id {
        id: String,
        qualifier: Qualifier,
    },
    Named {
        namespace: Option<String>,
        name: String,
        qualifier: Qualifier,
    },
}

pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
        && !name.starts_with("tmpl_");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is invalid: one segment of lowercase letters, digits and inner '.', '_' or '-', at most 64 characters, not starting with tmpl_"
        ))
    }
}

pub fn check_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
        && !tag.starts_with("tb_");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} is invalid: letters, digits, '_', '.', '-' (first a letter, digit or '_'), at most 128, not starting with tb_"
        ))
    }
}

pub fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.split('-').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

fn qualifier(q: Option<&str>) -> Result<Qualifier, String> {
    match q {
        None => Ok(Qualifier::None),
        Some(q) if q.starts_with("tb_") => {
            if q.len() > 3 && q[3..].bytes().all(|b| b.is_ascii_alphanumeric()) {
                Ok(Qualifier::Build(q.to_string()))
            } else {
                Err(format!("build qualifier {q:?} is malformed"))
            }
        }
        Some(q) => check_tag(q).map(|_| Qualifier::Tag(q.to_string())),
    }
}

impl TemplateRef {
    pub fn parse(r: &str) -> Result<TemplateRef, String> {
        let (path, q) = match r.rsplit_once(':') {
            Some((p, q)) => (p, Some(q)),
            None => (r, None),
        };
        let qualifier = qualifier(q)?;
        if let Some(id) = path.strip_prefix("tmpl_") {
            if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Ok(TemplateRef::Id {
                    id: path.to_string(),
                    qualifier,
                });
            }
            return Err(format!("template id {path:?} is malformed"));
        }
        let (namespace, name) = match path.split_once('/') {
            Some((ns, name)) => {
                if !is_slug(ns) {
                    return Err(format!("namespace {ns:?} in ref {r:?} is not a slug"));
                }
                (Some(ns.to_string()), name)
            }
            None => (None, path),
        };
        check_name("name", name)?;
        Ok(TemplateRef::Named {
            namespace,
            name: name.to_string(),
            qualifier,
        })
    }

    pub fn qualifier(&self) -> &Qualifier {
        match self {
            TemplateRef::Id { qualifier, .. } | TemplateRef::Named { qualifier, .. } => qualifier,
        }
    }
}

/// A UUID in its 8-4-4-4-12 hex form (namespace ids the SDK accepts).
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The SDK's client-side `from_template` normalisation (contract §3.2):
/// bare names and `name:tag` mean the builtin `nullspace/` namespace, except
/// exact `tb_` builds; `ns/name[:tag]` needs a slug or UUID namespace, and
/// `nullspace/` names need a tag.
pub fn from_template(r: &str) -> Result<String, String> {
    let r = r.trim();
    let bad = |why: &str| format!("template ref {r:?}: {why}");
    if r.is_empty() {
        return Err(bad("empty reference"));
    }
    if r.starts_with("tmpl_") && !r.contains(['/', ':']) {
        return Ok(r.to_string());
    }
    if let Some((ns, rest)) = r.split_once('/') {
        let name = rest.split_once(':').map_or(rest, |(n, _)| n);
        if name.is_empty() || rest.contains('/') {
            return Err(bad("expected NAMESPACE/NAME[:TAG]"));
        }
        if ns == "nullspace" {
            return match rest.split_once(':') {
                Some((_, t)) if !t.is_empty() => Ok(r.to_string()),
                _ => Err(bad("builtin templates need a tag: nullspace/NAME:TAG")),
            };
        }
        if !is_slug(ns) && !is_uuid(ns) {
            return Err(bad("the namespace must be a lowercase slug or a UUID"));
        }
        return Ok(r.to_string());
    }
    match r.split_once(':') {
        Some((n, t)) if n.is_empty() || t.is_empty() => Err(bad("expected NAME:TAG")),
        Some((_, t)) if t.starts_with("tb_") => Ok(r.to_string()),
        Some((n, t)) => Ok(format!("nullspace/{n}:{t}")),
        None => Ok(format!("nullspace/{r}:latest")),
    }
}

/// Whether a `base_image` names a template rather than an OCI image: raw
/// ids, the builtin namespace, exact-build qualifiers, or the caller's own
/// namespace (when known), and it parses as a template ref.
pub fn names_template(base: &str, caller_namespace: Option<&str>) -> Option<TemplateRef> {
    let looks_template = base.starts_with("tmpl_")
        || base.starts_with("nullspace/")
        || base
            .rsplit_once(':')
            .is_some_and(|(_, q)| q.starts_with("tb_"))
        || caller_namespace.is_some_and(|ns| base.split_once('/').is_some_and(|(b, _)| b == ns));
    if looks_template {
        TemplateRef::parse(base).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_from_template_normalisation() {
        let n = |r: &str| from_template(r).unwrap();
        assert_eq!(n("base"), "nullspace/base:latest");
        assert_eq!(n("base:v2"), "nullspace/base:v2");
        assert_eq!(n("myname:tb_abc"), "myname:tb_abc");
        assert_eq!(n("tmpl_xyz"), "tmpl_xyz");
        assert_eq!(n("acme/tools:stable"), "acme/tools:stable");
        assert_eq!(n("nullspace/base:latest"), "nullspace/base:latest");
        for bad in ["a/b/c", "Acme/x", "nullspace/base", ":x", ""] {
            assert!(from_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn template_bases_are_told_from_images() {
        assert!(names_template("tmpl_abc", None).is_some());
        assert!(names_template("nullspace/base:latest", None).is_some());
        assert!(names_template("app:tb_abc1", None).is_some());
        assert!(names_template("team-a/app:v1", Some("team-a")).is_some());
        assert!(names_template("team-a/app:v1", Some("team-b")).is_none());
        assert!(names_template("127.0.0.1:5000/demo/app:1", Some("team-a")).is_none());
        assert!(names_template("ubuntu:22.04", None).is_none());
    }

    #[test]
    fn refs_parse() {
        assert_eq!(
            TemplateRef::parse("team-a/app:stable").unwrap(),
            TemplateRef::Named {
                namespace: Some("team-a".into()),
                name: "app".into(),
                qualifier: Qualifier::Tag("stable".into())
            }
        );
        assert_eq!(
            TemplateRef::parse("app:tb_abc123").unwrap().qualifier(),
            &Qualifier::Build("tb_abc123".into())
        );
        assert!(matches!(
            TemplateRef::parse("tmpl_abc").unwrap(),
            TemplateRef::Id { .. }
        ));
        for bad in [
            "", "App", "a/b/c", "Team/app", "app:", "app:-x", "tmpl_", "tmpl_a/b", "a:tb_", "../x",
        ] {
            assert!(TemplateRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_and_tags() {
        assert!(check_name("name", "my-template_1.0").is_ok());
        for bad in ["", "-a", "a-", "A", "a/b", "tmpl_x", &"a".repeat(65)] {
            assert!(check_name("name", bad).is_err(), "{bad:?}");
        }
        assert!(check_tag("v1.2_rc-1").is_ok() && check_tag("_x").is_ok());
        for bad in ["", ".x", "-x", "tb_1", "a b", &"a".repeat(129)] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }
}
