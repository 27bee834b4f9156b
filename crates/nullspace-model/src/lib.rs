//! Types shared across nullspace crates. No I/O: serde, serde_json and
//! thiserror only. One module per concept.

pub mod snapshot;
