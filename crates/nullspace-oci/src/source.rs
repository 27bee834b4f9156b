//! Image sources, named with the transports skopeo users know:
//! `docker://REF` or a bare reference, `oci:PATH[:REF]`,
//! `oci-archive:PATH[:REF]` and `docker-archive:PATH[:REF]`.

use std::path::PathBuf;

use oci_client::Reference;

use crate::error::{ErrorKind, OciError};

#[derive(Debug, Clone)]
pub enum SourceRef {
    /// A registry reference, normalised like Docker does
    /// (`ubuntu:22.04` → `docker.io/library/ubuntu:22.04`).
    Registry(Reference),
    /// An OCI image layout directory.
    OciDir {
        path: PathBuf,
        reference: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive {
        path: PathBuf,
        reference: Option<String>,
    },
    /// `docker save` output (old `<id>/layer.tar` and newer blob formats).
    DockerArchive {
        path: PathBuf,
        reference: Option<String>,
    },
}

impl SourceRef {
    pub fn parse(s: &str) -> Result<SourceRef, OciError> {
        let bad = |msg: &str| OciError::new(s, ErrorKind::Invalid(msg.to_string()));
        let local = |rest: &str| -> Result<(PathBuf, Option<String>), OciError> {
            // As skopeo does: the path ends at the first ':'.
            let (path, r) = match rest.split_once(':') {
                Some((p, r)) => (p, Some(r.to_string()).filter(|r| !r.is_empty())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad("a path is required after the transport name"));
            }
            Ok((PathBuf::from(path), r))
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, reference) = local(rest)?;
            return Ok(SourceRef::OciDir { path, reference });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, reference) = local(rest)?;
            return Ok(SourceRef::OciArchive { path, reference });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, reference) = local(rest)?;
            return Ok(SourceRef::DockerArchive { path, reference });
        }
        let r = s.strip_prefix("docker://").unwrap_or(s);
        if r.starts_with("//") || r.is_empty() {
            return Err(bad("empty image reference"));
        }
        if let Some((t, _)) = r.split_once(':')
            && [
                "containers-storage",
                "dir",
                "docker-daemon",
                "ostree",
                "sif",
            ]
            .contains(&t)
        {
            return Err(bad(
                "transport is not supported (use docker://, oci:, oci-archive: or docker-archive:)",
            ));
        }
        let reference: Reference = r
            .parse()
            .map_err(|e| bad(&format!("invalid reference: {e}")))?;
        // Docker's grammar: repository paths are lowercase (a registry host
        // may not be). The parser we use is lenient here.
        if reference
            .repository()
            .chars()
            .any(|c| c.is_ascii_uppercase())
        {
            return Err(bad("invalid reference: repository names must be lowercase"));
        }
        Ok(SourceRef::Registry(reference))
    }

    /// The tag or local reference name, used to name the image in outputs.
    pub fn tag(&self) -> Option<String> {
        match self {
            SourceRef::Registry(r) => r.tag().map(str::to_string),
            SourceRef::OciDir { reference, .. }
            | SourceRef::OciArchive { reference, .. }
            | SourceRef::DockerArchive { reference, .. } => reference.clone(),
        }
    }
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let with = |f: &mut std::fmt::Formatter<'_>, t: &str, p: &PathBuf, r: &Option<String>| {
            write!(f, "{t}:{}", p.display())?;
            if let Some(r) = r {
                write!(f, ":{r}")?;
            }
            Ok(())
        };
        match self {
            SourceRef::Registry(r) => write!(f, "{}", r.whole()),
            SourceRef::OciDir { path, reference } => with(f, "oci", path, reference),
            SourceRef::OciArchive { path, reference } => with(f, "oci-archive", path, reference),
            SourceRef::DockerArchive { path, reference } => {
                with(f, "docker-archive", path, reference)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> String {
        match SourceRef::parse(s).unwrap() {
            SourceRef::Registry(r) => r.whole(),
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn normalises_docker_references() {
        assert_eq!(reg("ubuntu:22.04"), "docker.io/library/ubuntu:22.04");
        assert_eq!(reg("docker://ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(reg("team/app:1.0"), "docker.io/team/app:1.0");
        assert_eq!(
            reg("registry.example.com/team/app:1.0"),
            "registry.example.com/team/app:1.0"
        );
        assert_eq!(reg("127.0.0.1:5000/x/y:z"), "127.0.0.1:5000/x/y:z");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            reg(&format!("busybox@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        assert_eq!(
            reg(&format!("busybox:1.36@{d}")),
            format!("docker.io/library/busybox:1.36@{d}")
        );
        assert!(SourceRef::parse("UPPER/case").is_err());
        assert!(SourceRef::parse("busybox@sha256:abc").is_err());
        assert!(SourceRef::parse("").is_err());
        assert!(SourceRef::parse("dir:/tmp/x").is_err());
    }

    #[test]
    fn parses_local_transports() {
        match SourceRef::parse("oci:/tmp/layout:v1").unwrap() {
            SourceRef::OciDir { path, reference } => {
                assert_eq!(path, PathBuf::from("/tmp/layout"));
                assert_eq!(reference.as_deref(), Some("v1"));
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            SourceRef::parse("oci-archive:img.oci.tar").unwrap(),
            SourceRef::OciArchive {
                reference: None,
                ..
            }
        ));
        assert!(matches!(
            SourceRef::parse("docker-archive:x.tar:app:1").unwrap(),
            SourceRef::DockerArchive { reference: Some(r), .. } if r == "app:1"
        ));
        assert!(SourceRef::parse("oci:").is_err());
    }
}
