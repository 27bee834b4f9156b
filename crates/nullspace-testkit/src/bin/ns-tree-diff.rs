//! `ns-tree-diff IMAGE.ext4 DIR`: compares an ext4 image with a directory
//! (e.g. `umoci unpack`'s rootfs) entry by entry: path, type, mode, uid,
//! gid, size, content hash, symlink target, hard-link grouping. Exit 0 when
//! they agree, 1 with the differences otherwise.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, image, dir] = &args[..] else {
        eprintln!("usage: ns-tree-diff IMAGE.ext4 DIR");
        std::process::exit(2);
    };
    let ours = nullspace_testkit::tree::from_ext4(std::path::Path::new(image))?;
    let reference = nullspace_testkit::tree::from_dir(std::path::Path::new(dir))?;
    let d = nullspace_testkit::tree::diff(&ours, &reference);
    if d.is_empty() {
        println!("identical: {} entries", reference.len());
        return Ok(());
    }
    for line in d.iter().take(50) {
        println!("{line}");
    }
    println!(
        "{} differences ({} entries in ours, {} in reference)",
        d.len(),
        ours.len(),
        reference.len()
    );
    std::process::exit(1);
}
