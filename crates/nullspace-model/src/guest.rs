//! The guest configuration: what the host writes to `/nullspace/config.json`
//! in the initramfs and `nullspace-init` reads at boot (runtime defaults,
//! the start command, boot switches).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Name of the virtio-serial port the guest agent serves on.
pub const AGENT_PORT: &str = "nullspace.agent";

/// Hostname of a guest whose config names none.
pub const DEFAULT_HOSTNAME: &str = "nullspace";

/// Runtime defaults and boot settings of a guest. Every field may be
/// missing from the JSON (older hosts, hand-written configs); empty
/// `user`, `workdir` and `start_cmd` mean "none" (see [`GuestConfig::normalized`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestConfig {
    pub hostname: String,
    /// Runtime environment of the start command and of every exec.
    pub env: BTreeMap<String, String>,
    /// Default user (`user`, `uid`, `user:group`, `uid:gid`) of the start
    /// command and of every exec and file operation.
    pub user: Option<String>,
    /// Default working directory.
    pub workdir: Option<String>,
    /// Run under `/bin/sh -c` at boot (unless `defer_start`).
    pub start_cmd: Option<String>,
    pub agent_port: String,
    /// Probe mode (KVM check): print the marker and power off.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub probe_only: bool,
    /// Boot without starting `start_cmd`: the host runs build steps first,
    /// then starts it with the agent's `start` op.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub defer_start: bool,
    /// The VM has a virtio-net device (QEMU user-mode networking): init
    /// loads `virtio_net`, configures `eth0` as 10.0.2.15/24 via 10.0.2.2
    /// and, when the rootfs has no usable `/etc/resolv.conf`, writes
    /// `nameserver 10.0.2.3` (QEMU's DNS forwarder) into it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    /// The root file system's block device (`/dev/vda` when absent): an
    /// exported disk's root is its second partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_device: Option<String>,
    /// Booted without nullspace (an exported disk under plain QEMU): no
    /// host agent will ever connect, so init runs the start command and
    /// only reaps, instead of waiting for the agent's port.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub standalone: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            hostname: DEFAULT_HOSTNAME.to_string(),
            env: BTreeMap::new(),
            user: None,
            workdir: None,
            start_cmd: None,
            agent_port: AGENT_PORT.to_string(),
            probe_only: false,
            defer_start: false,
            network: false,
            root_device: None,
            standalone: false,
        }
    }
}

impl GuestConfig {
    pub fn new(hostname: &str) -> GuestConfig {
        GuestConfig {
            hostname: hostname.to_string(),
            ..Default::default()
        }
    }

    /// Blank `user`/`workdir`/`start_cmd` become `None`; a blank hostname
    /// or agent port gets the default.
    pub fn normalized(mut self) -> GuestConfig {
        for f in [&mut self.user, &mut self.workdir, &mut self.start_cmd] {
            if f.as_deref().is_some_and(|s| s.trim().is_empty()) {
                *f = None;
            }
        }
        if self.hostname.trim().is_empty() {
            self.hostname = DEFAULT_HOSTNAME.to_string();
        }
        if self.agent_port.trim().is_empty() {
            self.agent_port = AGENT_PORT.to_string();
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let mut c = GuestConfig::new("demo");
        c.env.insert("A".into(), "1".into());
        c.user = Some("app".into());
        c.network = true;
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["agent_port"], AGENT_PORT);
        assert!(j.get("probe_only").is_none(), "false switches are omitted");
        assert!(j.get("standalone").is_none() && j.get("root_device").is_none());
        assert_eq!(serde_json::from_value::<GuestConfig>(j).unwrap(), c);

        // Missing fields take the defaults; blanks are none.
        let c: GuestConfig =
            serde_json::from_str(r#"{"user":" ","start_cmd":"","hostname":""}"#).unwrap();
        let c = c.normalized();
        assert_eq!(c.hostname, DEFAULT_HOSTNAME);
        assert_eq!((c.user, c.start_cmd), (None, None));
        assert_eq!(c.agent_port, AGENT_PORT);
    }
}
