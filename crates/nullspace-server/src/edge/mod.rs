//! The HTTP edge: what every request meets before a handler and every
//! answer after it, whatever the route.
//!
//! - [`serve`]: the accept loop: at most `max_connections` connections
//!   (WebSockets included), a deadline for each request's headers, and
//!   one for a write the client does not read.
//! - [`drain`]: a request body the handler left unread is read and
//!   discarded (within bounds) so the keep-alive connection survives and
//!   an early answer (401, 404, 413) reaches a client still sending.
//! - [`errors`]: every error answer the API's routes give is the API's
//!   JSON error shape, including the framework's own rejections (413, 415,
//!   bad paths or queries) that would otherwise be plain text.
//! - [`proxy`]: one HTTP/1 exchange (upgrades included) over a stream the
//!   caller opened: the preview proxy's and the forward to another node's.

pub mod drain;
pub mod errors;
pub mod proxy;
pub mod serve;

use std::time::Duration;

/// Bounds on what one client can hold at the edge (`nullspace serve
/// --max-connections`, `--header-read-timeout-secs`,
/// `--write-stall-timeout-secs`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections open at once, upgraded WebSockets included; more wait
    /// in the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a client has to send a request's headers (also how long an
    /// idle keep-alive connection stays open). Also bounds the time spent
    /// discarding an unread body.
    pub header_read_timeout: Duration,
    /// How long a write to a client may make no progress (a client that
    /// stopped reading, a WebSocket never read) before the connection is
    /// ended.
    pub write_stall_timeout: Duration,
    /// The most bytes of an unread body discarded to keep its connection;
    /// past it the answer says `Connection: close`.
    pub drain_max_bytes: u64,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(60),
            drain_max_bytes: crate::http::BODY_LIMIT as u64,
        }
    }
}
