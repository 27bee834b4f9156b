//! Prints the SBOM of an unpacked root filesystem:
//! `cargo run -p nullspace-sbom --example sbom -- ROOT [spdx-json|cyclonedx-json]`.

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(root), format) = (args.next(), args.next()) else {
        eprintln!("usage: sbom ROOT [spdx-json|cyclonedx-json]");
        std::process::exit(2);
    };
    let format: nullspace_sbom::Format = match format.as_deref().unwrap_or("spdx-json").parse() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let fs = nullspace_sbom::HostDir::new(&root);
    match nullspace_sbom::scan(&fs) {
        Ok(inv) => {
            let info = nullspace_sbom::DocumentInfo {
                name: root,
                created: None,
            };
            use std::io::Write;
            let _ = std::io::stdout().write_all(&nullspace_sbom::render(&inv, format, &info));
            for s in &inv.skipped {
                eprintln!("skipped: {s}");
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
