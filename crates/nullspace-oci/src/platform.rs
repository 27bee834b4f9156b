//! Choosing a manifest from an image index (spec §3.2): Linux only, the
//! microVM host's architecture unless the caller names another, exact
//! Firecracker-compatible variants first, then a variantless manifest;
//! manifests whose platform carries `os.version` or `os.features` are
//! rejected.

use crate::manifest::{Descriptor, Index, Platform};

/// What the caller wants: `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error("platform {0:?} is malformed: expected OS/ARCH[/VARIANT]")]
    Malformed(String),
    #[error("platform {0:?}: only linux images can become microVM templates")]
    NotLinux(String),
    #[error("no manifest for {wanted} (the index offers: {offered})")]
    NoMatch { wanted: String, offered: String },
    #[error("image platform {found} does not match {wanted}")]
    Mismatch { found: String, wanted: String },
    #[error(
        "image platform {0} is rejected: manifests with os.version or os.features are not supported"
    )]
    OsFeatures(String),
}

/// Go/OCI architecture names for what `uname -m` or Rust call the machine.
pub fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl PlatformSpec {
    pub fn host() -> PlatformSpec {
        PlatformSpec {
            os: "linux".into(),
            architecture: normalize_arch(std::env::consts::ARCH).to_string(),
            variant: None,
        }
    }

    pub fn parse(s: &str) -> Result<PlatformSpec, PlatformError> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(PlatformError::Malformed(s.to_string()));
        }
        if parts[0] != "linux" {
            return Err(PlatformError::NotLinux(s.to_string()));
        }
        Ok(PlatformSpec {
            os: "linux".into(),
            architecture: normalize_arch(parts[1]).to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// Variants accepted as exact matches, in order of preference.
    fn preferred_variants(&self) -> Vec<&str> {
        match (&self.variant, self.architecture.as_str()) {
            (Some(v), "arm64") if v == "v8" || v == "v8.0" => vec!["v8", "v8.0"],
            (Some(v), _) => vec![v.as_str()],
            (None, "amd64") => vec!["v1"],
            (None, "arm64") => vec!["v8", "v8.0"],
            (None, _) => vec![],
        }
    }

    /// Checks the platform of a single (non-index) image's config.
    pub fn check(&self, found: &Platform) -> Result<(), PlatformError> {
        if has_os_constraints(found) {
            return Err(PlatformError::OsFeatures(found.to_string()));
        }
        let variant = found.variant.as_deref().filter(|v| !v.is_empty());
        let variant_ok = match variant {
            None => true,
            Some(v) => self.preferred_variants().contains(&v),
        };
        if found.os != "linux"
            || normalize_arch(&found.architecture) != self.architecture
            || !variant_ok
        {
            return Err(PlatformError::Mismatch {
                found: found.to_string(),
                wanted: self.to_string(),
            });
        }
        Ok(())
    }

    /// Picks the manifest to use from an index.
    pub fn select<'a>(&self, index: &'a Index) -> Result<&'a Descriptor, PlatformError> {
        let candidates: Vec<(&Descriptor, &Platform)> = index
            .manifests
            .iter()
            .filter(|d| crate::manifest::ACCEPTED_MANIFEST_TYPES.contains(&d.media_type.as_str()))
            .filter_map(|d| d.platform.as_ref().map(|p| (d, p)))
            .filter(|(_, p)| {
                p.os == "linux" && normalize_arch(&p.architecture) == self.architecture
            })
            .filter(|(_, p)| !has_os_constraints(p))
            .collect();
        for want in self.preferred_variants() {
            if let Some((d, _)) = candidates
                .iter()
                .find(|(_, p)| p.variant.as_deref() == Some(want))
            {
                return Ok(d);
            }
        }
        if let Some((d, _)) = candidates
            .iter()
            .find(|(_, p)| p.variant.as_deref().is_none_or(str::is_empty))
        {
            return Ok(d);
        }
        let offered: Vec<String> = index
            .manifests
            .iter()
            .map(|d| match &d.platform {
                Some(p) => p.to_string(),
                None => format!("{} without platform", d.media_type),
            })
            .collect();
        Err(PlatformError::NoMatch {
            wanted: self.to_string(),
            offered: if offered.is_empty() {
                "nothing".into()
            } else {
                offered.join(", ")
            },
        })
    }
}

fn has_os_constraints(p: &Platform) -> bool {
    p.os_version.as_deref().is_some_and(|v| !v.is_empty())
        || p.os_features.as_ref().is_some_and(|f| !f.is_empty())
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::manifest::OCI_MANIFEST;

    fn entry(n: u8, platform: &str) -> Descriptor {
        let mut parts = platform.split('/');
        let os = parts.next().unwrap().to_string();
        let arch = parts.next().unwrap().to_string();
        let variant = parts.next().map(str::to_string);
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::sha256_of(&[n]),
            size: 1,
            urls: None,
            annotations: None,
            platform: Some(Platform {
                architecture: arch,
                os,
                os_version: None,
                os_features: None,
                variant,
            }),
        }
    }

    fn index(entries: Vec<Descriptor>) -> Index {
        Index {
            schema_version: 2,
            media_type: None,
            manifests: entries,
            annotations: None,
        }
    }

    fn amd64() -> PlatformSpec {
        PlatformSpec::parse("linux/amd64").unwrap()
    }

    #[test]
    fn prefers_exact_variant_over_variantless() {
        let idx = index(vec![
            entry(1, "linux/amd64"),
            entry(2, "linux/amd64/v3"),
            entry(3, "linux/amd64/v1"),
        ]);
        assert_eq!(
            amd64().select(&idx).unwrap().digest,
            Digest::sha256_of(&[3])
        );
        let arm = PlatformSpec::parse("linux/arm64").unwrap();
        let idx = index(vec![entry(1, "linux/arm64"), entry(2, "linux/arm64/v8.0")]);
        assert_eq!(arm.select(&idx).unwrap().digest, Digest::sha256_of(&[2]));
        let idx = index(vec![
            entry(1, "linux/arm64/v8.0"),
            entry(2, "linux/arm64/v8"),
        ]);
        assert_eq!(
            arm.select(&idx).unwrap().digest,
            Digest::sha256_of(&[2]),
            "v8 before v8.0"
        );
    }

    #[test]
    fn falls_back_to_variantless_and_never_to_other_variants() {
        let idx = index(vec![entry(1, "linux/amd64/v3"), entry(2, "linux/amd64")]);
        assert_eq!(
            amd64().select(&idx).unwrap().digest,
            Digest::sha256_of(&[2])
        );
        let idx = index(vec![entry(1, "linux/amd64/v3")]);
        assert!(amd64().select(&idx).is_err());
        let v3 = PlatformSpec::parse("linux/amd64/v3").unwrap();
        assert_eq!(v3.select(&idx).unwrap().digest, Digest::sha256_of(&[1]));
    }

    #[test]
    fn linux_and_arch_only() {
        let idx = index(vec![
            entry(1, "windows/amd64"),
            entry(2, "linux/arm64"),
            entry(3, "linux/amd64"),
        ]);
        assert_eq!(
            amd64().select(&idx).unwrap().digest,
            Digest::sha256_of(&[3])
        );
        assert!(matches!(
            PlatformSpec::parse("windows/amd64"),
            Err(PlatformError::NotLinux(_))
        ));
        assert!(PlatformSpec::parse("linux").is_err());
        assert_eq!(
            PlatformSpec::parse("linux/x86_64").unwrap().architecture,
            "amd64"
        );
    }

    #[test]
    fn rejects_os_features_and_os_version() {
        let mut feat = entry(1, "linux/amd64");
        feat.platform.as_mut().unwrap().os_features = Some(vec!["sse4".into()]);
        let mut ver = entry(2, "linux/amd64");
        ver.platform.as_mut().unwrap().os_version = Some("10.0".into());
        let idx = index(vec![feat.clone(), ver]);
        let err = amd64().select(&idx).unwrap_err().to_string();
        assert!(
            err.contains("os.features sse4") && err.contains("os.version 10.0"),
            "{err}"
        );
        // Empty features are not features.
        feat.platform.as_mut().unwrap().os_features = Some(vec![]);
        assert!(amd64().select(&index(vec![feat])).is_ok());
    }

    #[test]
    fn error_lists_what_the_index_offers() {
        let idx = index(vec![entry(1, "linux/arm64/v8"), entry(2, "linux/s390x")]);
        let err = amd64().select(&idx).unwrap_err().to_string();
        assert_eq!(
            err,
            "no manifest for linux/amd64 (the index offers: linux/arm64/v8, linux/s390x)"
        );
    }

    #[test]
    fn single_manifest_platform_check() {
        let p = entry(1, "linux/amd64").platform.unwrap();
        assert!(amd64().check(&p).is_ok());
        let p = entry(1, "linux/arm64").platform.unwrap();
        assert!(matches!(
            amd64().check(&p),
            Err(PlatformError::Mismatch { .. })
        ));
        let mut p = entry(1, "linux/amd64").platform.unwrap();
        p.os_features = Some(vec!["x".into()]);
        assert!(matches!(
            amd64().check(&p),
            Err(PlatformError::OsFeatures(_))
        ));
    }
}
