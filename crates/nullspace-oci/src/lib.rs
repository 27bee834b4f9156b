//! nullspace-oci: where container images come from.
//!
//! - [`source`]: references and transports (`docker://`, `oci:`,
//!   `oci-archive:`, `docker-archive:`).
//! - [`resolve`]: from a reference to a verified [`Image`]: platform choice
//!   ([`platform`]), document checks ([`manifest`]), digests ([`digest`]).
//! - [`config`]: runtime defaults and metadata from the image config.
//! - [`layout`]: writing a verified OCI image layout.
//! - [`artifact`]: a set of files as an OCI 1.1 artifact in a registry.
//!
//! This crate knows nothing of root filesystems or templates.

pub mod artifact;
pub mod auth;
pub mod config;
pub mod demo;
/// Digests live in their own crate (the rootfs cache needs them too).
pub use nullspace_digest as digest;
pub mod error;
pub mod export;
pub mod layout;
mod local;
pub mod manifest;
pub mod platform;
mod registry;
pub mod report;
pub mod resolve;
pub mod source;

pub use digest::Digest;
pub use error::OciError;
pub use resolve::{Image, ResolveOptions};
pub use source::SourceRef;
