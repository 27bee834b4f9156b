//! Types shared across nullspace crates, without I/O. One module per
//! concept; each is plain data with serde (de)serialisation.

pub mod agent;
pub mod guest;
pub mod snapshot;
