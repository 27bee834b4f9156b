//! An inventory as a CycloneDX 1.5 JSON document.

use crate::{DocumentInfo, Inventory};
use serde_json::{Value, json};

pub(crate) fn document(inv: &Inventory, info: &DocumentInfo) -> Value {
    let components: Vec<Value> = inv
        .packages
        .iter()
        .map(|p| {
            let mut c = json!({
                "type": "library",
                "bom-ref": p.purl,
                "name": p.name,
                "version": p.version,
                "purl": p.purl,
            });
            // An SPDX expression where the recorded licence is one (as
            // `expression`: a single `id` would have to be in the schema's
            // older licence list); otherwise the recorded words as a name.
            if let Some(l) = &p.license {
                c["licenses"] = match crate::license::spdx_expression(l) {
                    Some(e) => json!([{ "expression": e }]),
                    None => json!([{ "license": { "name": l } }]),
                };
            }
            c
        })
        .collect();
    let mut metadata = json!({
        "tools": { "components": [{
            "type": "application",
            "name": "nullspace-sbom",
            "version": env!("CARGO_PKG_VERSION"),
        }] },
        "component": { "type": "container", "name": info.name },
    });
    if let Some(t) = &info.created {
        metadata["timestamp"] = json!(t);
    }
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": metadata,
        "components": components,
    })
}
