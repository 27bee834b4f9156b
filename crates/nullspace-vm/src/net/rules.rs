//! The nftables rule sets, as text for `nft -f -`: one table in each
//! machine's network namespace (its egress policy) and one on the host
//! (machines never reach the host, nor each other). Pure functions, so
//! that what a policy becomes can be read and tested without root.

use nullspace_model::machine::egress::Egress;
use std::fmt::Write;
use std::net::Ipv4Addr;

/// The TAP device QEMU's NIC is joined to, in the machine's namespace.
pub const TAP: &str = "tap0";
/// The machine namespace's end of its veth pair.
pub const UPLINK: &str = "vn";
/// Host ends of machines' veth pairs: `nsv<index>`.
pub const HOST_PREFIX: &str = "nsv";
/// The guest's resolver address (its `/etc/resolv.conf`), redirected to
/// the host's resolver in the namespace.
pub const GUEST_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Every machine's veth pair takes a /30 of this /16.
pub const VETH_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 200, 0, 0), 16);

/// A machine's egress table. Every packet between the TAP and the uplink
/// is checked against the allowed ranges in both directions (not only new
/// flows), so a changed policy also stops established connections; the
/// file replaces the table in one transaction.
pub fn machine_table(e: &Egress, resolver: Option<Ipv4Addr>) -> String {
    let mut s = String::new();
    // `add` first so that the `delete` finds a table on the first load.
    s.push_str("table inet nullspace {}\ndelete table inet nullspace\n");
    s.push_str("table inet nullspace {\n");
    s.push_str("  set allowed {\n    type ipv4_addr\n    flags interval\n");
    let ranges = e.allowed_ranges();
    if !ranges.is_empty() {
        let elems: Vec<String> = ranges
            .iter()
            .map(|(a, b)| {
                if a == b {
                    Ipv4Addr::from(*a).to_string()
                } else {
                    format!("{}-{}", Ipv4Addr::from(*a), Ipv4Addr::from(*b))
                }
            })
            .collect();
        let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
    }
    s.push_str("  }\n");
    let dns = resolver.filter(|_| e.dns());
    if let Some(r) = resolver {
        let _ = writeln!(
            s,
            "  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    iifname \"{TAP}\" ip daddr {GUEST_DNS} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {r}\n  }}"
        );
    }
    let _ = writeln!(
        s,
        "  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{UPLINK}\" masquerade\n  }}"
    );
    s.push_str("  chain forward {\n    type filter hook forward priority filter; policy drop;\n");
    let _ = writeln!(s, "    iifname \"{TAP}\" meta nfproto ipv6 drop");
    if let Some(r) = e.rate_limit {
        let burst = r.burst.unwrap_or(0);
        if let Some(k) = r.kbit_per_sec {
            let bytes = (k * 1000 / 8).max(1);
            let burst = if burst > 0 { burst } else { bytes.max(1500) };
            let _ = writeln!(
                s,
                "    iifname \"{TAP}\" limit rate over {bytes} bytes/second burst {burst} bytes drop"
            );
        } else if let Some(p) = r.pps {
            let burst = if burst > 0 { burst } else { p.max(5) };
            let _ = writeln!(
                s,
                "    iifname \"{TAP}\" limit rate over {p}/second burst {burst} packets drop"
            );
        }
    }
    if let Some(r) = dns {
        let _ = writeln!(
            s,
            "    iifname \"{TAP}\" oifname \"{UPLINK}\" ct status dnat ip daddr {r} meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
    }
    let _ = writeln!(
        s,
        "    iifname \"{TAP}\" oifname \"{UPLINK}\" ip daddr @allowed accept\n    iifname \"{TAP}\" reject with icmpx type admin-prohibited"
    );
    if dns.is_some() {
        let _ = writeln!(
            s,
            "    iifname \"{UPLINK}\" oifname \"{TAP}\" ct status dnat accept"
        );
    }
    let _ = writeln!(
        s,
        "    iifname \"{UPLINK}\" oifname \"{TAP}\" ip saddr @allowed ct state established,related accept\n  }}"
    );
    // Nothing of the namespace itself answers the guest (its resolver
    // address is redirected before this hook).
    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    iifname \"{TAP}\" drop\n  }}\n}}"
    );
    s
}

/// The host's table: what comes from a machine's veth may be forwarded
/// out (masqueraded) but never reach the host itself or another machine.
pub fn host_table() -> String {
    let (net, len) = VETH_NET;
    let p = HOST_PREFIX;
    format!(
        "table inet nullspace_host {{}}\ndelete table inet nullspace_host\n\
table inet nullspace_host {{\n\
  chain input {{\n    type filter hook input priority filter; policy accept;\n\
    iifname \"{p}*\" ct state established,related accept\n\
    iifname \"{p}*\" reject with icmpx type admin-prohibited\n  }}\n\
  chain forward {{\n    type filter hook forward priority filter; policy accept;\n\
    iifname \"{p}*\" oifname \"{p}*\" drop\n  }}\n\
  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
    ip saddr {net}/{len} oifname != \"{p}*\" masquerade\n  }}\n}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nullspace_model::machine::egress::{EgressMode, EgressPolicy, EgressRateLimit};

    #[test]
    fn policies_become_their_sets_and_rules() {
        let r = Some(Ipv4Addr::new(198, 51, 100, 53));
        let all = machine_table(&EgressPolicy::allow_all().check().unwrap(), r);
        assert!(
            all.contains("elements = { 0.0.0.0-255.255.255.255 }"),
            "{all}"
        );
        assert!(all.contains("dnat ip to 198.51.100.53"));
        assert!(all.contains("ct status dnat ip daddr 198.51.100.53"));
        let none = machine_table(&EgressPolicy::deny_all().check().unwrap(), r);
        assert!(!none.contains("elements"), "{none}");
        assert!(!none.contains("ct status dnat"), "deny_all also denies DNS");
        let custom = EgressPolicy {
            mode: EgressMode::Custom,
            allow_cidrs: vec!["198.51.100.10".into(), "10.0.0.0/8".into()],
            deny_cidrs: vec!["10.1.0.0/16".into()],
            rate_limit: Some(EgressRateLimit {
                kbit_per_sec: Some(800),
                ..Default::default()
            }),
        };
        let t = machine_table(&custom.check().unwrap(), None);
        assert!(
            t.contains(
                "elements = { 10.0.0.0-10.0.255.255, 10.2.0.0-10.255.255.255, 198.51.100.10 }"
            ),
            "{t}"
        );
        assert!(t.contains("limit rate over 100000 bytes/second"), "{t}");
        assert!(!t.contains("dnat"), "no resolver, no redirect: {t}");
    }
}
