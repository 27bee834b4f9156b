//! nullspace-build: the build pipeline: importing an OCI image into a
//! template directory (`rootfs.ext4` + `template.json`, see [`import`]),
//! Dockerfile engines ([`engine`]: buildah, BuildKit), Dockerfile analysis
//! ([`dockerfile`]), declarative steps rendered to a Dockerfile ([`render`])
//! and build contexts ([`context`]).

pub mod context;
pub mod dockerfile;
pub mod engine;
pub mod export;
pub mod import;
pub mod render;
pub mod sbom;
pub mod template;
