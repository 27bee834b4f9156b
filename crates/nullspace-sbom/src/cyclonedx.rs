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
            // `name`, not `id`: a recorded licence is not always an SPDX identifier.
            if let Some(l) = &p.license {
                c["licenses"] = json!([{ "license": { "name": l } }]);
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
