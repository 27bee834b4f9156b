//! The serialisable description of a resolved image, shared by
//! `nullspace image inspect --json` and the `image` part of `template.json`.

use serde::Serialize;

use crate::config::{OciMetadata, RuntimeDefaults};
use crate::digest::Digest;
use crate::resolve::Image;

#[derive(Debug, Clone, Serialize)]
pub struct PlatformReport {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub diff_id: Option<Digest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub reference: String,
    pub index_digest: Option<Digest>,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config_digest: Digest,
    pub platform: PlatformReport,
    pub layers: Vec<LayerReport>,
}

impl ImageReport {
    pub fn of(image: &Image) -> ImageReport {
        ImageReport {
            reference: image.name.clone(),
            index_digest: image.index_digest.clone(),
            manifest_digest: image.manifest_digest.clone(),
            manifest_media_type: image.manifest.effective_media_type().to_string(),
            config_digest: image.manifest.config.digest.clone(),
            platform: PlatformReport {
                os: image.platform.os.clone(),
                architecture: image.platform.architecture.clone(),
                variant: image.platform.variant.clone(),
            },
            layers: image
                .manifest
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| LayerReport {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                    diff_id: image.diff_id(i),
                })
                .collect(),
        }
    }
}

/// `image` + `runtime` + `oci`: what `inspect --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub image: ImageReport,
    pub runtime: RuntimeDefaults,
    pub oci: OciMetadata,
}

impl InspectReport {
    pub fn of(image: &Image) -> InspectReport {
        InspectReport {
            image: ImageReport::of(image),
            runtime: image.runtime_defaults(),
            oci: image.oci_metadata(),
        }
    }
}
