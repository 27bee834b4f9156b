//! An inventory as an SPDX 2.3 JSON document.

use crate::{DocumentInfo, Inventory};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub(crate) fn document(inv: &Inventory, info: &DocumentInfo) -> Value {
    // The namespace must be unique per document: derive it from the content,
    // so the same inventory and name always give the same document.
    let mut hash = Sha256::new();
    hash.update(info.name.as_bytes());
    for p in &inv.packages {
        hash.update([0]);
        hash.update(p.purl.as_bytes());
    }
    let digest = hex::encode(hash.finalize());
    let mut packages = Vec::new();
    let mut relationships = Vec::new();
    for (i, p) in inv.packages.iter().enumerate() {
        let id = format!("SPDXRef-Package-{}-{}", p.ecosystem.purl_type(), i + 1);
        let mut pkg = json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": p.purl,
            }],
        });
        // licenseDeclared must be an SPDX expression: a recorded licence that
        // cannot be one is kept verbatim in licenseComments instead.
        let declared = match &p.license {
            Some(l) if is_expression(l) => l.clone(),
            Some(l) => {
                pkg["licenseComments"] = json!(format!("recorded licence: {l}"));
                "NOASSERTION".to_owned()
            }
            None => "NOASSERTION".to_owned(),
        };
        pkg["licenseDeclared"] = json!(declared);
        relationships.push(json!({
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": id,
        }));
        packages.push(pkg);
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": info.name,
        "documentNamespace": format!("https://nullspace.invalid/spdx/{digest}"),
        "creationInfo": {
            "created": info.created.as_deref().unwrap_or("1970-01-01T00:00:00Z"),
            "creators": [format!("Tool: nullspace-sbom-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "relationships": relationships,
    })
}

/// Whether `s` has the shape of an SPDX licence expression: identifiers
/// (letters, digits, `.`, `-`, a trailing `+`) joined by AND/OR/WITH, with
/// balanced parentheses. Debian's `GPL-2+` passes; prose does not.
fn is_expression(s: &str) -> bool {
    let spaced = s.replace('(', " ( ").replace(')', " ) ");
    let mut depth = 0i32;
    let mut want_id = true;
    for tok in spaced.split_whitespace() {
        match tok {
            "(" if want_id => depth += 1,
            ")" if !want_id => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            "AND" | "OR" | "WITH" if !want_id => want_id = true,
            id if want_id => {
                let body = id.strip_suffix('+').unwrap_or(id);
                let ok = !body.is_empty()
                    && body
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
                if !ok {
                    return false;
                }
                want_id = false;
            }
            _ => return false,
        }
    }
    depth == 0 && !want_id
}

#[cfg(test)]
mod tests {
    #[test]
    fn expressions() {
        for ok in [
            "MIT",
            "GPL-2+",
            "GPL-2.0-or-later OR (MIT AND BSD-3-Clause)",
            "Apache-2.0 WITH LLVM-exception",
        ] {
            assert!(super::is_expression(ok), "{ok}");
        }
        for bad in [
            "",
            "MIT AND",
            "public domain",
            "(MIT",
            "BSD and MIT",
            "GPL, v2",
        ] {
            assert!(!super::is_expression(bad), "{bad}");
        }
    }
}
