//! npm: `package.json` of each package under a `node_modules` directory.

use crate::package::{Ecosystem, Package, PurlParts};
use crate::{META_LIMIT, SbomError, Scan};

#[derive(serde::Deserialize)]
struct Manifest {
    name: Option<String>,
    version: Option<String>,
    license: Option<serde_json::Value>,
    licenses: Option<Vec<serde_json::Value>>,
}

pub(crate) fn package(
    scan: &mut Scan<'_>,
    dir: &str,
    scope: Option<&str>,
) -> Result<(), SbomError> {
    let path = format!("{dir}/package.json");
    let bytes = match scan.fs.read(&path, META_LIMIT) {
        Ok(Some(b)) => b,
        // node_modules also holds .bin and other non-package directories.
        Ok(None) => return Ok(()),
        Err(crate::FsError::TooLarge { .. }) => {
            scan.skipped.push(path);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
        scan.skipped.push(path);
        return Ok(());
    };
    let (Some(full), Some(version)) = (manifest.name, manifest.version) else {
        scan.skipped.push(path);
        return Ok(());
    };
    let (namespace, name) = match full.split_once('/') {
        Some((ns, n)) if ns.starts_with('@') => (Some(ns.to_owned()), n.to_owned()),
        _ => (scope.map(|s| format!("@{s}")), full.clone()),
    };
    let license = match manifest.license {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Object(o)) => {
            o.get("type").and_then(|t| t.as_str()).map(str::to_owned)
        }
        _ => manifest.licenses.and_then(|ls| {
            crate::dpkg::join_licenses(
                ls.iter()
                    .filter_map(|l| l.get("type").and_then(|t| t.as_str()).map(str::to_owned)),
            )
        }),
    };
    let purl = PurlParts {
        ecosystem: Ecosystem::Npm,
        namespace: namespace.as_deref(),
        name: &name,
        version: &version,
        qualifiers: &[],
    }
    .render();
    scan.push(Package {
        ecosystem: Ecosystem::Npm,
        name: full,
        version,
        license: license.filter(|l| !l.is_empty()),
        purl,
        source: path,
    })
}
