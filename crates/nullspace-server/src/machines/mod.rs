//! The machine lifecycle, in the domain's terms:
//!
//! ```text
//! creating ──▶ running ⇄ paused ──▶ destroyed | error
//! ```
//!
//! (`nullspace_model::machine::MachineStatus` checks every transition.)
//! A machine is restored from a template's ready snapshot (the start
//! command is already running, not run again) or from a machine snapshot,
//! owned by the caller's namespace (another caller gets "not found",
//! exactly as for a machine that does not exist) and by the node that runs
//! its VMM ([`crate::runtime`]). The record is written before the VM is
//! started and after every transition, gated on the status it was read in.
//!
//! Operations return [`MachineError`]; the HTTP status, the SDK's error
//! codes and the dialect (`/v1/machines` or `/v1/sandboxes`) are the edge's
//! (`crate::machine_api`).
//!
//! Commands get the template's runtime defaults (the guest applies them),
//! then the machine's create-time `envs` and `cwd`, then the command's own.
//! The start command never sees create-time envs: it was started when the
//! template was snapshotted.
//!
//! | module | its one job |
//! |---|---|
//! | [`record`] | the stored record, checked transitions, the API's view |
//! | [`rules`] | the values a request may carry |
//! | [`create`] | sources, the `creating` record, the restore |
//! | [`query`] | get and list |
//! | [`commands`] | the running machine a request needs; commands, processes |
//! | [`files`] | file operations as a user |
//! | [`file_ops`] | remove, rename, mkdir, permissions, batch write, search, find, replace; metrics |
//! | [`snapshots`] | taking, listing, deleting and collecting snapshots |
//! | [`pause`] | hibernate, resume, fork |
//! | [`end`] | delete and every other ending; timeouts |
//! | [`duties`] | recovery at start-up and the reaper |
//! | [`events`] | lifecycle events: recorded at transitions, listed, replayed |
//! | [`stdin`] | input to a background process |
//! | [`ports`] | who may reach a machine's ports; preview grants |

pub mod commands;
pub mod create;
pub mod duties;
pub mod egress;
pub mod end;
pub mod error;
pub mod events;
pub mod file_ops;
pub mod files;
pub mod pause;
pub mod ports;
pub mod query;
pub mod record;
pub mod rules;
pub mod snapshots;
pub mod stdin;

pub use duties::{recover, spawn_reaper};
pub use error::{MachineError, MachineResult};
