//! The template API's wire model, re-exported from `nullspace_model::build`
//! (requests, the plan's views, and the response bodies in `wire`, which the
//! CLI reads too), plus the server's timestamp form.

pub use nullspace_model::build::plan::{Issue, PlanResponse, ValidateResult};
pub use nullspace_model::build::request::*;
/// The log vocabularies (`kind`, `level`) are the model's.
pub use nullspace_model::build::status::{LogKind, LogLevel};
pub use nullspace_model::build::wire::*;

/// RFC 3339 UTC with `Z`, the form the SDK parses.
pub fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
