//! `POST …/processes/{pid}/stdin` on the wire (the SDK's
//! `SendStdinRequest`; the answer is 204 without a body).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StdinBody {
    /// Written as UTF-8 to the process's stdin, which stays open.
    pub data: String,
}
