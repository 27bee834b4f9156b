//! The build model: one typed path from the request the SDK sends to the
//! plan every consumer reads.
//!
//! - [`request`]: the wire request (`POST /v1/templates/build[s]`,
//!   validate, plan, retry) and the other request bodies, read leniently;
//! - [`rules`]: the value rules (env names, users, modes, context paths),
//!   each written once;
//! - [`step`]: the declarative steps, one enum, parsed from the SDK's JSON;
//! - [`probe`]: readiness probes with their defaults;
//! - [`context`]: the build context manifest and its digest;
//! - [`plan`]: [`plan::plan`] normalises a request into a
//!   [`plan::BuildPlan`]: what validate reports on, `/plan` serialises,
//!   the executor runs and the CLI's `--dry-run` prints;
//! - [`status`]: the status, phase, code and log vocabularies, exactly the
//!   strings the SDK accepts;
//! - [`wire`]: the template API's response bodies (build records, logs,
//!   templates, tags), sent by the server and read by the CLI;
//! - [`views`]: the plan's views (deps, dry-run, steps, outputs), each a
//!   function of the plan.

pub mod context;
pub mod plan;
pub mod probe;
pub mod request;
pub mod rules;
pub mod status;
pub mod step;
pub mod views;
pub mod wire;
