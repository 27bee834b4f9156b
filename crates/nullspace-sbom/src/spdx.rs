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
        // licenseDeclared must be an SPDX expression; the recorded words go
        // to licenseComments whenever they are not exactly that expression.
        let expression = p
            .license
            .as_deref()
            .and_then(crate::license::spdx_expression);
        if let Some(l) = &p.license
            && expression.as_deref() != Some(l.as_str())
        {
            pkg["licenseComments"] = json!(format!("recorded licence: {l}"));
        }
        let declared = expression.unwrap_or_else(|| "NOASSERTION".to_owned());
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
