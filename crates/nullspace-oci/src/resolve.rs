//! From a source reference to a verified image: the manifest for the chosen
//! platform, its config, and verified access to its layers.
//!
//! Every document and blob is checked against its descriptor (digest and
//! size) here, whatever the source, so a backend only has to produce bytes.

use std::io::Read;
use std::sync::Arc;

use crate::auth::Credentials;
use crate::config::{ImageConfig, OciMetadata, RuntimeDefaults};
use crate::digest::{self, Digest, VerifyingReader};
use crate::error::{ErrorKind, OciError};
use crate::local::{DockerArchive, OciLayout};
use crate::manifest::{self, Descriptor, Document, Manifest, Platform};
use crate::platform::PlatformSpec;
use crate::registry::Registry;
use crate::source::SourceRef;

/// The top-level document of a source.
pub(crate) struct Root {
    pub bytes: Vec<u8>,
    /// The digest and size the reference pins, if it pins one.
    pub expected: Option<(Digest, u64)>,
    /// The media type the referrer claimed, if any.
    pub declared_type: Option<String>,
}

/// A place blobs come from. Backends return raw, unverified bytes.
pub(crate) trait Backend: Send + Sync {
    fn root(&self) -> Result<Root, ErrorKind>;
    fn fetch(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>, ErrorKind>;
}

#[derive(Debug, Clone, Default)]
pub struct ResolveOptions {
    /// `None`: the host's platform.
    pub platform: Option<PlatformSpec>,
    pub credentials: Option<Credentials>,
    /// Registries (host[:port]) that may be reached over plain HTTP.
    pub insecure_registries: Vec<String>,
}

/// A resolved, verified image.
pub struct Image {
    /// The image as the user named it (for messages and records).
    pub name: String,
    pub source: SourceRef,
    /// The index the manifest was chosen from, if there was one.
    pub index_digest: Option<Digest>,
    pub manifest_digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfig,
    pub platform: Platform,
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("manifest_digest", &self.manifest_digest)
            .finish_non_exhaustive()
    }
}

fn read_doc(
    backend: &dyn Backend,
    name: &str,
    what: &str,
    desc: &Descriptor,
    limit: u64,
) -> Result<Vec<u8>, OciError> {
    let obj = || format!("{what} {}", desc.digest);
    if desc.size > limit {
        return Err(OciError::at(
            name,
            obj(),
            ErrorKind::Invalid(format!(
                "descriptor size {} exceeds the {limit}-byte limit",
                desc.size
            )),
        ));
    }
    let r = backend
        .fetch(desc)
        .map_err(|e| OciError::at(name, obj(), e))?;
    let mut out = Vec::with_capacity(desc.size as usize);
    VerifyingReader::new(r, desc.digest.clone(), desc.size)
        .read_to_end(&mut out)
        .map_err(|e| OciError::reading(name, obj(), e))?;
    Ok(out)
}

impl Image {
    pub fn resolve(source: &SourceRef, opts: &ResolveOptions) -> Result<Image, OciError> {
        let name = source.to_string();
        let backend: Arc<dyn Backend> = match source {
            SourceRef::Registry(r) => Arc::new(
                Registry::new(
                    r.clone(),
                    opts.credentials.clone(),
                    &opts.insecure_registries,
                )
                .map_err(|e| OciError::new(&name, e))?,
            ),
            SourceRef::OciDir { path, reference } => Arc::new(
                OciLayout::dir(path, reference.clone()).map_err(|e| OciError::new(&name, e))?,
            ),
            SourceRef::OciArchive { path, reference } => Arc::new(
                OciLayout::archive(path, reference.clone()).map_err(|e| OciError::new(&name, e))?,
            ),
            SourceRef::DockerArchive { path, reference } => Arc::new(
                DockerArchive::open(path, reference.clone())
                    .map_err(|e| OciError::new(&name, e))?,
            ),
        };
        let want = opts.platform.clone().unwrap_or_else(PlatformSpec::host);
        Self::resolve_with(name, source.clone(), backend, &want)
    }

    fn resolve_with(
        name: String,
        source: SourceRef,
        backend: Arc<dyn Backend>,
        want: &PlatformSpec,
    ) -> Result<Image, OciError> {
        let root = backend.root().map_err(|e| OciError::new(&name, e))?;
        if root.bytes.len() as u64 > manifest::MAX_MANIFEST_BYTES {
            return Err(OciError::at(
                &name,
                "manifest",
                ErrorKind::Invalid("document exceeds the 4 MiB limit".into()),
            ));
        }
        let root_digest = match &root.expected {
            Some((d, size)) => {
                digest::verify_bytes(&root.bytes, d, *size)
                    .map_err(|e| OciError::at(&name, format!("manifest {d}"), e))?;
                d.clone()
            }
            None => Digest::sha256_of(&root.bytes),
        };
        let doc = manifest::parse_document(&root.bytes, root.declared_type.as_deref())
            .map_err(|e| OciError::at(&name, format!("document {root_digest}"), e))?;
        let (index_digest, manifest_digest, manifest_bytes, manifest, selected_platform) = match doc
        {
            Document::Manifest(m) => (None, root_digest, root.bytes, m, None),
            Document::Index(index) => {
                let desc = want
                    .select(&index)
                    .map_err(|e| OciError::at(&name, format!("index {root_digest}"), e))?;
                let bytes = read_doc(
                    &*backend,
                    &name,
                    "manifest",
                    desc,
                    manifest::MAX_MANIFEST_BYTES,
                )?;
                let m = match manifest::parse_document(&bytes, Some(&desc.media_type)) {
                    Ok(Document::Manifest(m)) => m,
                    Ok(Document::Index(_)) => {
                        return Err(OciError::at(
                            &name,
                            format!("manifest {}", desc.digest),
                            ErrorKind::Invalid("nested image indexes are not supported".into()),
                        ));
                    }
                    Err(e) => {
                        return Err(OciError::at(&name, format!("manifest {}", desc.digest), e));
                    }
                };
                (
                    Some(root_digest),
                    desc.digest.clone(),
                    bytes,
                    m,
                    desc.platform.clone(),
                )
            }
        };
        let mobj = format!("manifest {manifest_digest}");
        if ![manifest::OCI_CONFIG, manifest::DOCKER_CONFIG]
            .contains(&manifest.config.media_type.as_str())
        {
            return Err(OciError::at(
                &name,
                format!("config {}", manifest.config.digest),
                ErrorKind::Invalid(format!(
                    "media type {:?} is not a container image config",
                    manifest.config.media_type
                )),
            ));
        }
        for (i, l) in manifest.layers.iter().enumerate() {
            if !manifest::LAYER_TYPES.contains(&l.media_type.as_str()) {
                return Err(OciError::at(
                    &name,
                    format!("layer {i} {}", l.digest),
                    ErrorKind::Invalid(format!(
                        "media type {:?} is not a supported layer type",
                        l.media_type
                    )),
                ));
            }
        }
        let config_bytes = read_doc(
            &*backend,
            &name,
            "config",
            &manifest.config,
            manifest::MAX_CONFIG_BYTES,
        )?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
            OciError::at(
                &name,
                format!("config {}", manifest.config.digest),
                ErrorKind::Invalid(format!("not a valid image config: {e}")),
            )
        })?;
        let platform = Platform {
            architecture: config.architecture.clone(),
            os: config.os.clone(),
            os_version: config.os_version.clone(),
            os_features: config.os_features.clone(),
            variant: config
                .variant
                .clone()
                .or_else(|| selected_platform.and_then(|p| p.variant)),
        };
        want.check(&platform)
            .map_err(|e| OciError::at(&name, format!("config {}", manifest.config.digest), e))?;
        let diff_ids = config
            .rootfs
            .as_ref()
            .map(|r| r.diff_ids.len())
            .unwrap_or(0);
        if diff_ids != manifest.layers.len() {
            return Err(OciError::at(
                &name,
                mobj,
                ErrorKind::Invalid(format!(
                    "{} layers but the config lists {diff_ids} diff_ids",
                    manifest.layers.len()
                )),
            ));
        }
        for d in config.rootfs.iter().flat_map(|r| &r.diff_ids) {
            Digest::parse(d).map_err(|e| {
                OciError::at(&name, format!("config {}", manifest.config.digest), e)
            })?;
        }
        Ok(Image {
            name,
            source,
            index_digest,
            manifest_digest,
            manifest_bytes,
            manifest,
            config_bytes,
            config,
            platform,
            backend,
        })
    }

    /// The uncompressed digest the config promises for layer `i`.
    pub fn diff_id(&self, i: usize) -> Option<Digest> {
        self.config
            .rootfs
            .as_ref()
            .and_then(|r| r.diff_ids.get(i))
            .and_then(|d| Digest::parse(d).ok())
    }

    /// Opens any blob of the image, verified against its descriptor: the
    /// reader fails (no later than EOF) if the bytes do not match.
    pub fn open_blob(
        &self,
        desc: &Descriptor,
    ) -> Result<VerifyingReader<Box<dyn Read + Send>>, OciError> {
        let r = self
            .backend
            .fetch(desc)
            .map_err(|e| OciError::at(&self.name, format!("blob {}", desc.digest), e))?;
        Ok(VerifyingReader::new(r, desc.digest.clone(), desc.size))
    }

    pub fn runtime_defaults(&self) -> RuntimeDefaults {
        self.config.runtime_defaults()
    }

    pub fn oci_metadata(&self) -> OciMetadata {
        self.config.oci_metadata()
    }

    /// A name for the image inside an output layout.
    pub fn tag(&self) -> String {
        self.source.tag().unwrap_or_else(|| "latest".into())
    }
}
