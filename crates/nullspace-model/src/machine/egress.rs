//! A machine's egress policy: the wire shapes SDK 1.0.3 sends
//! (`network.egress` at create, `PATCH …/egress`, and the legacy
//! `network.allow_out` / `deny_out` lists) and what they mean, as one
//! checked [`Egress`] with the IPv4 ranges a machine may reach.
//!
//! Meaning (the SDK says "IPv4 only; no domain/DNS filtering; `deny_all`
//! is fail-closed"; where it is silent, this is the rule):
//! - `allow_all`: every IPv4 destination; `deny_all`: none, DNS included.
//! - `custom`: a destination takes the verdict of the **longest** prefix
//!   of either list that holds it (on a tie, deny); one that no prefix
//!   holds is allowed unless `allow_cidrs` is non-empty (an allow-list).
//!   The legacy lists mean the same (`deny_out: ["0.0.0.0/0"]` plus
//!   `allow_out: ["1.2.3.4/32"]` reaches exactly 1.2.3.4).
//! - Name resolution through the machine's resolver is allowed unless the
//!   mode is `deny_all` (so an allow-list of addresses still resolves
//!   names); every other packet, whatever its protocol, is checked by
//!   destination. IPv6 is never forwarded.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// At most this many CIDRs per list (each is one rule set element).
pub const MAX_CIDRS: usize = 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    #[default]
    AllowAll,
    DenyAll,
    Custom,
}

/// Best-effort outbound rate limit: exactly one of `kbit_per_sec`, `pps`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EgressRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kbit_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

/// `NetworkEgressPolicy` on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EgressPolicy {
    pub mode: EgressMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<EgressRateLimit>,
}

/// `PATCH …/egress` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EgressBody {
    pub egress: EgressPolicy,
}

/// `PATCH …/egress` answer: the policy now in effect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EgressReply {
    pub machine_id: String,
    pub egress: EgressPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("{field}: {value:?} is not an IPv4 CIDR (a.b.c.d/n or a.b.c.d)")]
    Cidr { field: &'static str, value: String },
    #[error("{field}: {n} CIDRs, at most {MAX_CIDRS}")]
    TooMany { field: &'static str, n: usize },
    #[error("egress.{field} is only for mode custom (mode is {mode})")]
    NotCustom {
        field: &'static str,
        mode: &'static str,
    },
    #[error("egress.rate_limit: set exactly one of kbit_per_sec and pps, above 0")]
    RateLimit,
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub mode: EgressMode,
    pub allow: Vec<Ipv4Net>,
    pub deny: Vec<Ipv4Net>,
    pub rate_limit: Option<EgressRateLimit>,
}

fn mode_name(m: EgressMode) -> &'static str {
    match m {
        EgressMode::AllowAll => "allow_all",
        EgressMode::DenyAll => "deny_all",
        EgressMode::Custom => "custom",
    }
}

fn cidrs(field: &'static str, v: &[String]) -> Result<Vec<Ipv4Net>, EgressError> {
    if v.len() > MAX_CIDRS {
        return Err(EgressError::TooMany { field, n: v.len() });
    }
    v.iter()
        .map(|s| {
            let s = s.trim();
            let net = match s.parse::<Ipv4Net>() {
                Ok(n) => Some(n.trunc()),
                Err(_) => s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from),
            };
            net.ok_or_else(|| EgressError::Cidr {
                field,
                value: s.to_string(),
            })
        })
        .collect()
}

impl EgressPolicy {
    pub fn allow_all() -> EgressPolicy {
        EgressPolicy::default()
    }

    pub fn deny_all() -> EgressPolicy {
        EgressPolicy {
            mode: EgressMode::DenyAll,
            ..Default::default()
        }
    }

    /// The legacy `network.allow_out` / `deny_out` lists as a policy.
    pub fn legacy(allow_out: Vec<String>, deny_out: Vec<String>) -> EgressPolicy {
        EgressPolicy {
            mode: EgressMode::Custom,
            allow_cidrs: allow_out,
            deny_cidrs: deny_out,
            rate_limit: None,
        }
    }

    /// Checks every field; the error names the one that broke a rule.
    pub fn check(&self) -> Result<Egress, EgressError> {
        let custom = self.mode == EgressMode::Custom;
        for (field, v) in [
            ("allow_cidrs", &self.allow_cidrs),
            ("deny_cidrs", &self.deny_cidrs),
        ] {
            if !custom && !v.is_empty() {
                return Err(EgressError::NotCustom {
                    field,
                    mode: mode_name(self.mode),
                });
            }
        }
        if let Some(r) = &self.rate_limit {
            let ok = matches!(
                (r.kbit_per_sec, r.pps),
                (Some(k), None) if k > 0
            ) || matches!((r.kbit_per_sec, r.pps), (None, Some(p)) if p > 0);
            if !ok {
                return Err(EgressError::RateLimit);
            }
        }
        Ok(Egress {
            mode: self.mode,
            allow: cidrs("egress.allow_cidrs", &self.allow_cidrs)?,
            deny: cidrs("egress.deny_cidrs", &self.deny_cidrs)?,
            rate_limit: self.rate_limit,
        })
    }
}

impl Egress {
    pub fn deny_all() -> Egress {
        Egress {
            mode: EgressMode::DenyAll,
            allow: vec![],
            deny: vec![],
            rate_limit: None,
        }
    }

    /// Whether the machine's resolver may be asked (every mode but deny_all).
    pub fn dns(&self) -> bool {
        self.mode != EgressMode::DenyAll
    }

    /// The policy as inclusive IPv4 ranges `(first, last)` a machine may
    /// reach: sorted, disjoint and not adjacent. Computed by painting the
    /// address space with the default verdict, then each prefix from the
    /// shortest to the longest (allow before deny at equal length), so the
    /// longest prefix decides.
    pub fn allowed_ranges(&self) -> Vec<(u32, u32)> {
        let default = match self.mode {
            EgressMode::AllowAll => return vec![(0, u32::MAX)],
            EgressMode::DenyAll => return vec![],
            EgressMode::Custom => self.allow.is_empty(),
        };
        let mut prefixes: Vec<(u8, bool, Ipv4Net)> = self
            .allow
            .iter()
            .map(|n| (n.prefix_len(), false, *n))
            .chain(self.deny.iter().map(|n| (n.prefix_len(), true, *n)))
            .collect();
        prefixes.sort_by_key(|(len, deny, _)| (*len, *deny));
        // Boundaries: each range starts at a key and runs to the next one.
        let mut paint: std::collections::BTreeMap<u64, bool> = [(0u64, default)].into();
        for (_, deny, n) in prefixes {
            let lo = u32::from(n.network()) as u64;
            let hi = u32::from(n.broadcast()) as u64 + 1;
            // What the range after `hi` had before this paint.
            let after = paint.range(..=hi).next_back().map(|(_, v)| *v);
            let inner: Vec<u64> = paint.range(lo..hi).map(|(k, _)| *k).collect();
            for k in inner {
                paint.remove(&k);
            }
            paint.insert(lo, !deny);
            if hi <= u32::MAX as u64
                && let Some(a) = after
            {
                paint.entry(hi).or_insert(a);
            }
        }
        let keys: Vec<(u64, bool)> = paint.into_iter().collect();
        let mut out: Vec<(u32, u32)> = vec![];
        for (i, (start, allowed)) in keys.iter().enumerate() {
            let end = keys.get(i + 1).map_or(1u64 << 32, |(k, _)| *k) - 1;
            if !allowed {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 as u64 + 1 == *start => last.1 = end as u32,
                _ => out.push((*start as u32, end as u32)),
            }
        }
        out
    }

    /// Whether `ip` may be reached (the longest-prefix rule, for tests and
    /// for callers that check one address).
    pub fn allows(&self, ip: Ipv4Addr) -> bool {
        match self.mode {
            EgressMode::AllowAll => true,
            EgressMode::DenyAll => false,
            EgressMode::Custom => {
                let best = self
                    .allow
                    .iter()
                    .map(|n| (n, false))
                    .chain(self.deny.iter().map(|n| (n, true)))
                    .filter(|(n, _)| n.contains(&ip))
                    .max_by_key(|(n, deny)| (n.prefix_len(), *deny));
                match best {
                    Some((_, deny)) => !deny,
                    None => self.allow.is_empty(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom(allow: &[&str], deny: &[&str]) -> Egress {
        EgressPolicy {
            mode: EgressMode::Custom,
            allow_cidrs: allow.iter().map(|s| s.to_string()).collect(),
            deny_cidrs: deny.iter().map(|s| s.to_string()).collect(),
            rate_limit: None,
        }
        .check()
        .unwrap()
    }

    fn in_ranges(r: &[(u32, u32)], ip: Ipv4Addr) -> bool {
        let x = u32::from(ip);
        r.iter().any(|(a, b)| *a <= x && x <= *b)
    }

    #[test]
    fn ranges_agree_with_the_longest_prefix_rule() {
        let cases = [
            custom(&[], &[]),
            custom(&["1.2.3.4"], &["0.0.0.0/0"]),
            custom(&["10.0.0.0/8"], &["10.1.0.0/16"]),
            custom(&["10.1.2.0/24", "198.51.100.0/24"], &["10.0.0.0/8"]),
            custom(&[], &["203.0.113.0/24", "0.0.0.0/1"]),
            custom(&["203.0.113.7/32"], &["203.0.113.7/32"]),
            custom(&["255.255.255.255/32", "0.0.0.0/32"], &[]),
            custom(&["128.0.0.0/1"], &["192.0.0.0/2", "200.0.0.0/8"]),
        ];
        let mut rng = 0x9e3779b97f4a7c15u64;
        for e in &cases {
            let r = e.allowed_ranges();
            for w in r.windows(2) {
                assert!(w[0].1 as u64 + 1 < w[1].0 as u64, "{r:?} not disjoint");
            }
            let mut probes: Vec<u32> = vec![0, u32::MAX];
            for n in e.allow.iter().chain(&e.deny) {
                let (a, b) = (u32::from(n.network()), u32::from(n.broadcast()));
                probes.extend([a, b, a.wrapping_sub(1), b.wrapping_add(1)]);
            }
            for _ in 0..2000 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                probes.push(rng as u32);
            }
            for p in probes {
                let ip = Ipv4Addr::from(p);
                assert_eq!(in_ranges(&r, ip), e.allows(ip), "{ip} in {e:?}: {r:?}");
            }
        }
        let legacy = custom(&["1.2.3.4"], &["0.0.0.0/0"]);
        let one = u32::from(Ipv4Addr::new(1, 2, 3, 4));
        assert_eq!(legacy.allowed_ranges(), vec![(one, one)]);
    }

    #[test]
    fn bad_policies_name_the_field() {
        let bad = |p: EgressPolicy, want: &str| {
            let e = p.check().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        bad(
            EgressPolicy {
                mode: EgressMode::Custom,
                allow_cidrs: vec!["10.0.0.0/33".into()],
                ..Default::default()
            },
            "egress.allow_cidrs: \"10.0.0.0/33\"",
        );
        bad(
            EgressPolicy {
                mode: EgressMode::Custom,
                deny_cidrs: vec!["::1/128".into()],
                ..Default::default()
            },
            "egress.deny_cidrs",
        );
        bad(
            EgressPolicy {
                mode: EgressMode::DenyAll,
                allow_cidrs: vec!["10.0.0.0/8".into()],
                ..Default::default()
            },
            "only for mode custom (mode is deny_all)",
        );
        bad(
            EgressPolicy {
                rate_limit: Some(EgressRateLimit {
                    kbit_per_sec: Some(10),
                    pps: Some(10),
                    burst: None,
                }),
                ..Default::default()
            },
            "exactly one",
        );
        let many = EgressPolicy {
            mode: EgressMode::Custom,
            deny_cidrs: vec!["1.1.1.1".into(); MAX_CIDRS + 1],
            ..Default::default()
        };
        bad(many, "at most 1024");
        // The SDK's shapes round-trip.
        let p: EgressPolicy = serde_json::from_value(serde_json::json!({
            "mode": "custom", "allow_cidrs": ["198.51.100.0/24"], "rate_limit": {"kbit_per_sec": 800}
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"mode": "custom", "allow_cidrs": ["198.51.100.0/24"], "rate_limit": {"kbit_per_sec": 800}})
        );
    }
}
