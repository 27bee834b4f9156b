//! Manifests and indexes: parsing, classification, and the checks that keep a
//! document from being read as something it is not.
//!
//! Documents are parsed with our own serde types (not `oci-spec`'s) because
//! the checks need the raw shape: a document carrying both `manifests` and
//! `config`/`layers`, or whose `mediaType` disagrees with its content, is
//! rejected (the shape of CVE-2021-41190), and every digest is validated as
//! it is deserialized.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Manifest media types accepted in a registry `Accept` header.
pub const ACCEPTED_MANIFEST_TYPES: &[&str] =
    &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Layer media types that hold a filesystem changeset nullspace can apply.
pub const LAYER_TYPES: &[&str] = &[
    OCI_LAYER_TAR,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Upper bounds for documents read into memory.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = self.variant.as_deref().filter(|v| !v.is_empty()) {
            write!(f, "/{v}")?;
        }
        if let Some(v) = self.os_version.as_deref().filter(|v| !v.is_empty()) {
            write!(f, " (os.version {v})")?;
        }
        if let Some(feats) = self.os_features.as_ref().filter(|v| !v.is_empty()) {
            write!(f, " (os.features {})", feats.join(","))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

// Parsed once per image; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

/// Why a manifest or index was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("is not a JSON object")]
    NotObject,
    #[error(
        "has both `manifests` and `config`/`layers`: ambiguous index/manifest document is rejected"
    )]
    Ambiguous,
    #[error("has neither `manifests` nor `config`+`layers`")]
    Neither,
    #[error("mediaType {declared:?} disagrees with its content, which is an {content}")]
    MediaTypeMismatch {
        declared: String,
        content: &'static str,
    },
    #[error(
        "is a Docker schema 1 manifest, which is not supported (re-push the image with a current client)"
    )]
    Schema1,
    #[error("has unsupported mediaType {0:?}")]
    UnsupportedMediaType(String),
    #[error("has schemaVersion {0}, expected 2")]
    SchemaVersion(u64),
    #[error("is malformed: {0}")]
    Malformed(String),
}

fn kind_of_media_type(mt: &str) -> Option<&'static str> {
    match mt {
        OCI_INDEX | DOCKER_LIST => Some("index"),
        OCI_MANIFEST | DOCKER_MANIFEST => Some("manifest"),
        _ => None,
    }
}

/// Parses a manifest or index. `declared` is the media type the referrer
/// claimed (an index entry's or a transport's), if any; it must agree with
/// the content just like the document's own `mediaType` field.
pub fn parse_document(bytes: &[u8], declared: Option<&str>) -> Result<Document, DocumentError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DocumentError::Json(e.to_string()))?;
    let obj = value.as_object().ok_or(DocumentError::NotObject)?;
    let has_index = obj.contains_key("manifests");
    let has_manifest = obj.contains_key("config") || obj.contains_key("layers");
    let content = match (has_index, has_manifest) {
        (true, true) => return Err(DocumentError::Ambiguous),
        (false, false) => {
            if obj.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
                return Err(DocumentError::Schema1);
            }
            return Err(DocumentError::Neither);
        }
        (true, false) => "index",
        (false, true) => "manifest",
    };
    let field = obj.get("mediaType").and_then(|v| v.as_str());
    for mt in [field, declared].into_iter().flatten() {
        match mt {
            DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => return Err(DocumentError::Schema1),
            _ => {}
        }
        match kind_of_media_type(mt) {
            Some(k) if k == content => {}
            Some(_) => {
                return Err(DocumentError::MediaTypeMismatch {
                    declared: mt.to_string(),
                    content: if content == "index" {
                        "index"
                    } else {
                        "image manifest"
                    },
                });
            }
            None => return Err(DocumentError::UnsupportedMediaType(mt.to_string())),
        }
    }
    match obj.get("schemaVersion").and_then(|v| v.as_u64()) {
        Some(2) => {}
        Some(v) => return Err(DocumentError::SchemaVersion(v)),
        None => return Err(DocumentError::Malformed("missing schemaVersion".into())),
    }
    let doc = if content == "index" {
        Document::Index(
            serde_json::from_value(value).map_err(|e| DocumentError::Malformed(e.to_string()))?,
        )
    } else {
        Document::Manifest(
            serde_json::from_value(value).map_err(|e| DocumentError::Malformed(e.to_string()))?,
        )
    };
    Ok(doc)
}

impl Manifest {
    /// The effective media type: the field, else inferred from the config's
    /// media type (Docker manifests always carry the field; OCI ones may not).
    pub fn effective_media_type(&self) -> &str {
        match self.media_type.as_deref() {
            Some(mt) => mt,
            None if self.config.media_type == DOCKER_CONFIG => DOCKER_MANIFEST,
            None => OCI_MANIFEST,
        }
    }
}

/// Rewrites a Docker schema2 manifest as an OCI manifest over the same blobs
/// (what `skopeo copy --format oci` does), so OCI tools accept the layout.
/// Blob bytes are untouched; only media type names change.
pub fn to_oci_manifest(m: &Manifest) -> Manifest {
    let mut out = m.clone();
    out.media_type = Some(OCI_MANIFEST.to_string());
    if out.config.media_type == DOCKER_CONFIG {
        out.config.media_type = OCI_CONFIG.to_string();
    }
    for l in &mut out.layers {
        l.media_type = match l.media_type.as_str() {
            DOCKER_LAYER_GZIP => OCI_LAYER_GZIP.to_string(),
            "application/vnd.docker.image.rootfs.diff.tar" => OCI_LAYER_TAR.to_string(),
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".to_string()
            }
            other => other.to_string(),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn manifest_json(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2{extra},"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":0}},"layers":[]}}"#
        )
    }

    #[test]
    fn classifies_manifest_and_index() {
        assert!(matches!(
            parse_document(manifest_json("").as_bytes(), None),
            Ok(Document::Manifest(_))
        ));
        let idx = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(matches!(
            parse_document(idx.as_bytes(), None),
            Ok(Document::Index(_))
        ));
    }

    #[test]
    fn rejects_index_manifest_confusion() {
        // Both shapes in one document.
        let both = format!(
            r#"{{"schemaVersion":2,"manifests":[],"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":0}},"layers":[]}}"#
        );
        assert_eq!(
            parse_document(both.as_bytes(), None),
            Err(DocumentError::Ambiguous)
        );
        // mediaType field says index, content is a manifest.
        let lying = manifest_json(&format!(r#","mediaType":"{OCI_INDEX}""#));
        assert!(matches!(
            parse_document(lying.as_bytes(), None),
            Err(DocumentError::MediaTypeMismatch { .. })
        ));
        // The referring descriptor says manifest, content is an index.
        let idx = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse_document(idx.as_bytes(), Some(OCI_MANIFEST)),
            Err(DocumentError::MediaTypeMismatch { .. })
        ));
        assert!(matches!(
            parse_document(manifest_json("").as_bytes(), Some("text/plain")),
            Err(DocumentError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn rejects_schema1_and_bad_versions_and_bad_digests() {
        let s1 = r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert_eq!(
            parse_document(s1.as_bytes(), None),
            Err(DocumentError::Schema1)
        );
        let v3 = manifest_json("").replace("\"schemaVersion\":2", "\"schemaVersion\":3");
        assert_eq!(
            parse_document(v3.as_bytes(), None),
            Err(DocumentError::SchemaVersion(3))
        );
        let bad = manifest_json("").replace(D, "sha256:../../etc/passwd");
        let err = parse_document(bad.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }

    #[test]
    fn docker_manifest_converts_to_oci() {
        let m = Manifest {
            schema_version: 2,
            media_type: Some(DOCKER_MANIFEST.into()),
            config: Descriptor {
                media_type: DOCKER_CONFIG.into(),
                digest: Digest::parse(D).unwrap(),
                size: 0,
                urls: None,
                annotations: None,
                platform: None,
            },
            layers: vec![],
            annotations: None,
        };
        let o = to_oci_manifest(&m);
        assert_eq!(o.media_type.as_deref(), Some(OCI_MANIFEST));
        assert_eq!(o.config.media_type, OCI_CONFIG);
    }
}
