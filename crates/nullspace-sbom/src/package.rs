//! One installed package, and its package URL (purl).

use serde::{Deserialize, Serialize};

/// The package manager, or language ecosystem, that recorded a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ecosystem {
    Deb,
    Rpm,
    Apk,
    Alpm,
    Pypi,
    Npm,
}

impl Ecosystem {
    /// The purl type (purl-spec's "type" component).
    pub fn purl_type(self) -> &'static str {
        match self {
            Ecosystem::Deb => "deb",
            Ecosystem::Rpm => "rpm",
            Ecosystem::Apk => "apk",
            Ecosystem::Alpm => "alpm",
            Ecosystem::Pypi => "pypi",
            Ecosystem::Npm => "npm",
        }
    }
}

/// An installed package as its database records it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Package {
    pub ecosystem: Ecosystem,
    pub name: String,
    /// As the package manager prints it (rpm: `[epoch:]version-release`).
    pub version: String,
    /// The licence as recorded (not necessarily an SPDX expression).
    pub license: Option<String>,
    pub purl: String,
    /// The database or metadata file it was read from.
    pub source: String,
}

/// The parts a purl is made of; `distro` is the namespace of OS packages.
pub(crate) struct PurlParts<'a> {
    pub ecosystem: Ecosystem,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub version: &'a str,
    /// Qualifiers, already in key order.
    pub qualifiers: &'a [(&'a str, &'a str)],
}

impl PurlParts<'_> {
    pub fn render(&self) -> String {
        let mut s = format!("pkg:{}/", self.ecosystem.purl_type());
        if let Some(ns) = self.namespace {
            s.push_str(&encode(ns));
            s.push('/');
        }
        s.push_str(&encode(self.name));
        s.push('@');
        s.push_str(&encode(self.version));
        let mut sep = '?';
        for (k, v) in self.qualifiers.iter().filter(|(_, v)| !v.is_empty()) {
            s.push(sep);
            s.push_str(k);
            s.push('=');
            s.push_str(&encode(v));
            sep = '&';
        }
        s
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters, so a `+`, `:`
/// or `/` in a name or version can never be read as purl syntax.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purl_encodes_epoch_plus_and_scope() {
        let p = PurlParts {
            ecosystem: Ecosystem::Deb,
            namespace: Some("debian"),
            name: "libstdc++6",
            version: "1:12.2.0-14",
            qualifiers: &[("arch", "amd64"), ("distro", "")],
        };
        assert_eq!(
            p.render(),
            "pkg:deb/debian/libstdc%2B%2B6@1%3A12.2.0-14?arch=amd64"
        );
        let n = PurlParts {
            ecosystem: Ecosystem::Npm,
            namespace: Some("@types"),
            name: "node",
            version: "20.1.0",
            qualifiers: &[],
        };
        assert_eq!(n.render(), "pkg:npm/%40types/node@20.1.0");
    }
}
