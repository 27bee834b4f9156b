//! Names, tags and template references: `nullspace_model::refs`, shared
//! with the build plan and the CLI.

pub use nullspace_model::refs::*;
