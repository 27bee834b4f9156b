//! `POST …/ssh-access` on the wire (SDK 1.0.3's `SshAccessRequest` and
//! `SshAccessResponse`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SshAccessBody {
    /// The OpenSSH public key line to certify (`ssh-ed25519 AAAA… comment`).
    pub public_key: String,
    /// The guest user the session runs as (default: the template's user).
    #[serde(default)]
    pub user: Option<String>,
    /// The certificate's lifetime in seconds (default 1800, at most 43200).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// The same in minutes, as the SDK sends it.
    #[serde(default)]
    pub expires_in_minutes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SshAccessReply {
    /// Where the server's SSH endpoint is reached.
    pub host: String,
    pub port: u16,
    /// The login name: the machine's id (the certificate's principal).
    pub user: String,
    /// When the certificate and the grant expire (RFC 3339).
    pub expires_at: String,
    pub access_id: String,
    /// The OpenSSH user certificate (`ssh-ed25519-cert-v01@openssh.com …`).
    pub certificate: String,
    /// An ssh command line for a key in the default place, with the
    /// certificate saved beside it as `<key>-cert.pub`.
    pub command: String,
    /// The endpoint's host key (`ssh-ed25519 AAAA…`), for known_hosts.
    pub host_key: String,
    /// The CA that signs access certificates (`ssh-ed25519 AAAA…`).
    pub user_ca: String,
    /// The guest user commands run as (`null`: the template's user).
    pub guest_user: Option<String>,
}
