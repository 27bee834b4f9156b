//! `ns-demo-image DIR [TAG]`: writes the embedded demo image (see
//! `nullspace_testkit::image::demo_image`) as an OCI layout.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, tag) = match &args[..] {
        [_, dir] => (dir.as_str(), "demo"),
        [_, dir, tag] => (dir.as_str(), tag.as_str()),
        _ => {
            eprintln!("usage: ns-demo-image DIR [TAG]");
            std::process::exit(2);
        }
    };
    let img = nullspace_testkit::image::demo_image()?;
    nullspace_testkit::image::Layout::create(std::path::Path::new(dir))
        .image(tag, &img)
        .finish();
    println!("wrote {dir} ({tag}, manifest {})", img.manifest_digest);
    Ok(())
}
