//! nullspace-build: the build pipeline. Today: importing an OCI image into a
//! template directory (`rootfs.ext4` + `template.json`), see [`import`].

pub mod import;
pub mod template;
