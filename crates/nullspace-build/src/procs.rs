//! The child processes of a build are accounted for by
//! [`nullspace_vm::process`], the one owner of process groups,
//! `PR_SET_PDEATHSIG`, pidfiles and stale reaping (the build VM's QEMUs and
//! the engines' commands share its run directory format). Re-exported here
//! for the engines and existing callers.

pub use nullspace_vm::process::*;
