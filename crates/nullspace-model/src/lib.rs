//! Types shared across nullspace crates, without I/O. One module per
//! concept; each is plain data with serde (de)serialisation.
//!
//! - [`agent`]: the host-guest agent protocol; [`guest`]: the guest
//!   configuration; [`snapshot`]: the snapshot manifest;
//! - [`refs`]: template names, tags and references;
//! - [`shell`]: the one POSIX shell quoter; [`size`]: the sizes a VM can
//!   take after its snapshot (its ceiling);
//! - [`build`]: the build model: the request as the SDK sends it, its
//!   normalisation into a [`build::plan::BuildPlan`] (steps, probes,
//!   context manifest, digests) and the status/phase/code vocabularies;
//! - [`machine`]: the machine API's request and response bodies (both SDK
//!   dialects), shared by the server and the CLI; [`machine_files`]: the
//!   bodies of its file operations beyond read and write, and metrics;
//!   [`upload`]: its upload sessions and signed transfer URLs;
//!   [`terminal`]: the SDK's terminal and directory-watch WebSocket frames
//!   and pty bodies.

pub mod agent;
pub mod build;
pub mod guest;
pub mod machine;
pub mod machine_files;
pub mod node;
pub mod refs;
pub mod shell;
pub mod size;
pub mod snapshot;
pub mod terminal;
pub mod upload;
pub mod utf8;
