//! `nullspace image import`: the rootfs agrees with `umoci unpack` entry by
//! entry, passes `e2fsck -fn`, is byte-reproducible, reuses cached layers,
//! and bad input leaves nothing behind.

use std::path::Path;
use std::process::Command;

use nullspace_testkit::image::{self, Compression, Header, ImageSpec, Layer, Layout, TarLayer};
use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::{nullspace, run, tree};
use serde_json::{Value, json};

const T: u64 = 1_700_000_000;

/// Three layers exercising replacement, whiteouts, links and modes.
fn crafted_image() -> image::BuiltImage {
    let l1 = TarLayer::new()
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .symlink("lib", "usr/lib")
        .file("usr/lib/libc.so", 0o755, b"ELF-ish")
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .file("etc/shadow", 0o640, b"root:*::0:::::\n")
        .dir("bin", 0o755)
        .file("bin/su", 0o4755, b"setuid")
        .file("bin/wall", 0o2755, b"setgid")
        .dir("scratch", 0o1777)
        .dir("home", 0o755)
        .file_owned("home/app/.profile", 0o600, 1000, 1000, T, b"export A=1\n")
        .dir("old", 0o755)
        .file("old/a", 0o644, b"a")
        .file("old/b", 0o644, b"b")
        .dir("opq", 0o750)
        .file("opq/gone", 0o644, b"gone")
        .file("was-file", 0o644, b"file")
        .dir("was-dir", 0o755)
        .file("was-dir/child", 0o644, b"child")
        .file("data/big.bin", 0o644, &vec![7u8; 300_000])
        .hardlink("data/big-link", "data/big.bin")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .symlink("dangling", "does/not/exist")
        .into_tar();
    let l2 = TarLayer::new()
        .whiteout("old/a")
        .opaque("opq")
        .file("opq/new", 0o600, b"new")
        .dir("was-file", 0o700)
        .file("was-file/inside", 0o644, b"inside")
        .file("was-dir", 0o644, b"now a file")
        .file("lib/libextra.so", 0o755, b"through the lib symlink")
        .hardlink("bin/su-again", "bin/su")
        .file_owned("srv/owned", 0o640, 1234, 5678, T, b"owned")
        .into_tar();
    let l3 = TarLayer::new()
        .whiteout("data/big.bin")
        .file("etc/passwd", 0o600, b"replaced\n")
        .dir("etc", 0o700)
        .into_tar();
    ImageSpec::new(vec![
        Layer::new(l1, Compression::Gzip),
        Layer::new(l2, Compression::Gzip),
        Layer::new(l3, Compression::None),
    ])
    .config(
        json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "echo ready"], "WorkingDir": "/srv"}),
    )
    .build()
}

fn fsck(img: &Path) {
    let r = run(Command::new("e2fsck").arg("-fn").arg(img));
    assert!(
        r.status.success(),
        "e2fsck failed on {}:\n{}{}",
        img.display(),
        r.stdout,
        r.stderr
    );
}

fn import(src: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["image", "import", src, "--output", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    nullspace(&args).ok();
    serde_json::from_slice(&std::fs::read(out.join("template.json")).unwrap()).unwrap()
}

fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> tree::Tree {
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle))
    .ok();
    tree::from_dir(&bundle.join("rootfs")).unwrap()
}

#[test]
fn crafted_image_matches_umoci_unpack_entry_by_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let img = crafted_image();
    let layout = tmp.path().join("l");
    Layout::create(&layout).image("v1", &img).finish();
    let out = tmp.path().join("t");
    let meta = import(
        &format!("oci:{}:v1", layout.display()),
        &out,
        &["--no-cache"],
    );
    let rootfs = out.join("rootfs.ext4");
    fsck(&rootfs);

    let ours = tree::from_ext4(&rootfs).unwrap();
    let reference = umoci_unpack(&layout, "v1", &tmp.path().join("bundle"));
    let d = tree::diff(&ours, &reference);
    assert!(
        d.is_empty(),
        "rootfs differs from umoci unpack:\n{}",
        d.join("\n")
    );

    // Spot checks that the comparison covers what matters.
    assert_eq!(ours["bin/su"].mode, 0o4755);
    assert_eq!(ours["bin/wall"].mode, 0o2755);
    assert_eq!(ours["scratch"].mode, 0o1777);
    assert_eq!((ours["srv/owned"].uid, ours["srv/owned"].gid), (1234, 5678));
    assert_eq!(ours["bin/su-again"].link_group.as_deref(), Some("bin/su"));
    assert_eq!(ours["data/big-link"].size, 300_000);
    assert!(
        !ours.contains_key("data/big.bin")
            && !ours.contains_key("old/a")
            && !ours.contains_key("opq/gone")
    );
    assert_eq!(ours["was-dir"].kind, 'f');
    assert_eq!(ours["was-file"].kind, 'd');
    assert!(ours.contains_key("usr/lib/libextra.so"));
    assert_eq!(ours["lib"].target.as_deref(), Some("usr/lib"));
    for mp in ["dev", "proc", "sys", "dev/pts", "dev/shm", "tmp", "run"] {
        assert_eq!(ours[mp].kind, 'd', "{mp} mount point");
    }

    // template.json carries the documented fields.
    assert_eq!(meta["image"]["manifest_digest"], img.manifest_digest);
    assert_eq!(meta["image"]["layers"].as_array().unwrap().len(), 3);
    assert!(
        meta["image"]["layers"][0]["diff_id"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(meta["runtime"]["start_cmd"], "/bin/sh -c 'echo ready'");
    assert_eq!(meta["runtime"]["env"]["PATH"], "/bin");
    assert_eq!(meta["runtime"]["workdir"], "/srv");
    assert!(meta["runtime"]["user"].is_null());
    assert_eq!(meta["rootfs"]["file"], "rootfs.ext4");
    assert_eq!(
        meta["rootfs"]["size_bytes"].as_u64().unwrap(),
        std::fs::metadata(&rootfs).unwrap().len()
    );
    assert!(meta["rootfs"]["inodes"].as_u64().unwrap() > 30);
    assert!(meta["oci"]["labels"].is_object());
}

/// A realistic tree: real files from this machine (Python's stdlib,
/// timezone data with its many hard links and symlinks, /etc).
fn host_tree_layer(paths: &[&str]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    for p in paths {
        let src = Path::new("/").join(p);
        if src.exists() {
            b.append_dir_all(p, &src).unwrap();
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn realistic_host_tree_matches_umoci_unpack() {
    let tmp = tempfile::tempdir().unwrap();
    let l1 = host_tree_layer(&["usr/share/zoneinfo", "etc"]);
    let l2 = host_tree_layer(&["usr/lib/python3.11"]);
    let img = ImageSpec::new(vec![
        Layer::new(l1, Compression::Gzip),
        Layer::new(l2, Compression::Gzip),
    ])
    .build();
    let layout = tmp.path().join("l");
    Layout::create(&layout).image("v1", &img).finish();
    let out = tmp.path().join("t");
    import(
        &format!("oci:{}:v1", layout.display()),
        &out,
        &["--no-cache"],
    );
    fsck(&out.join("rootfs.ext4"));
    let ours = tree::from_ext4(&out.join("rootfs.ext4")).unwrap();
    let reference = umoci_unpack(&layout, "v1", &tmp.path().join("bundle"));
    assert!(
        reference.len() > 1000,
        "realistic tree has {} entries",
        reference.len()
    );
    let d = tree::diff(&ours, &reference);
    assert!(
        d.is_empty(),
        "{} differences:\n{}",
        d.len(),
        d[..d.len().min(20)].join("\n")
    );
}

#[test]
fn imports_are_byte_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let img = crafted_image();
    let layout = tmp.path().join("l");
    Layout::create(&layout).image("v1", &img).finish();
    let src = format!("oci:{}:v1", layout.display());
    let cache = tmp.path().join("cache");
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    import(&src, &a, &["--no-cache"]);
    import(&src, &b, &["--cache-dir", cache.to_str().unwrap()]);
    // Third: every layer from the cache.
    let meta = import(&src, &c, &["--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(meta["cache"]["layers_reused"], 3);
    let ra = std::fs::read(a.join("rootfs.ext4")).unwrap();
    assert!(
        ra == std::fs::read(b.join("rootfs.ext4")).unwrap(),
        "cold vs cached import differ"
    );
    assert!(
        ra == std::fs::read(c.join("rootfs.ext4")).unwrap(),
        "cache-hit import differs"
    );

    // A different image gives different bytes.
    let spec_changed = ImageSpec::new(vec![Layer::new(
        TarLayer::new().file("x", 0o644, b"y").into_tar(),
        Compression::Gzip,
    )])
    .build();
    let l2 = tmp.path().join("l2");
    Layout::create(&l2).image("v1", &spec_changed).finish();
    let d = tmp.path().join("d");
    import(&format!("oci:{}:v1", l2.display()), &d, &["--no-cache"]);
    assert!(ra != std::fs::read(d.join("rootfs.ext4")).unwrap());
}

#[test]
fn layer_cache_is_shared_between_images_and_skips_the_registry() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let base = Layer::new(
        TarLayer::new()
            .file("base.txt", 0o644, &vec![1u8; 100_000])
            .into_tar(),
        Compression::Gzip,
    );
    let a = ImageSpec::new(vec![
        base.clone(),
        Layer::new(
            TarLayer::new().file("a", 0o644, b"a").into_tar(),
            Compression::Gzip,
        ),
    ])
    .build();
    let b = ImageSpec::new(vec![
        base,
        Layer::new(
            TarLayer::new().file("b", 0o644, b"b").into_tar(),
            Compression::Zstd,
        ),
    ])
    .build();
    let la = tmp.path().join("la");
    let lb = tmp.path().join("lb");
    Layout::create(&la).image("v1", &a).finish();
    Layout::create(&lb).image("v1", &b).finish();
    let ra = reg.push_layout(&la, "v1", "cache/a");
    let rb = reg.push_layout(&lb, "v1", "cache/b");
    let cache = tmp.path().join("cache");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];

    let m = import(&ra, &tmp.path().join("ta"), &cache_arg);
    assert_eq!(
        (
            m["cache"]["layers_fetched"].as_u64(),
            m["cache"]["layers_reused"].as_u64()
        ),
        (Some(2), Some(0))
    );

    // Break the registry's copy of the shared base layer: image b still
    // imports, so that layer was neither fetched nor decompressed again.
    let shared = &a.layer_digests()[0];
    std::fs::write(reg.blob_data_path(shared), b"corrupt").unwrap();
    let m = import(&rb, &tmp.path().join("tb"), &cache_arg);
    assert_eq!(
        (
            m["cache"]["layers_fetched"].as_u64(),
            m["cache"]["layers_reused"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let ours = tree::from_ext4(&tmp.path().join("tb/rootfs.ext4")).unwrap();
    assert!(ours.contains_key("base.txt") && ours.contains_key("b"));

    // --no-cache imports cold: it has to fetch the (now corrupt) layer.
    let e = nullspace(&[
        "image",
        "import",
        &rb,
        "--output",
        tmp.path().join("tc").to_str().unwrap(),
        "--no-cache",
    ]);
    assert!(!e.status.success());
    assert!(e.stderr.contains(shared.as_str()), "{}", e.stderr);
    assert!(!tmp.path().join("tc").exists());

    // The cache bound is enforced: a 0 MiB cache keeps only what the last
    // import used, and evicts the rest.
    let layers_dir = cache.join("layers/sha256");
    let before = std::fs::read_dir(&layers_dir).unwrap().count();
    import(
        &rb,
        &tmp.path().join("td"),
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-max-mb",
            "0",
        ],
    );
    let after = std::fs::read_dir(&layers_dir).unwrap().count();
    assert!(
        after < before,
        "eviction removed nothing ({before} -> {after})"
    );
}

#[test]
fn disk_mb_sets_a_minimum_size() {
    let tmp = tempfile::tempdir().unwrap();
    let img = crafted_image();
    let layout = tmp.path().join("l");
    Layout::create(&layout).image("v1", &img).finish();
    let out = tmp.path().join("t");
    let meta = import(
        &format!("oci:{}:v1", layout.display()),
        &out,
        &["--no-cache", "--disk-mb", "700"],
    );
    assert!(meta["rootfs"]["size_bytes"].as_u64().unwrap() >= 700 << 20);
    fsck(&out.join("rootfs.ext4"));
}

fn hostile_import(layers: Vec<Layer>, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let img = ImageSpec::new(layers).build();
    let layout = tmp.path().join("l");
    Layout::create(&layout).image("v1", &img).finish();
    let out = tmp.path().join("t");
    let e = nullspace(&[
        "image",
        "import",
        &format!("oci:{}:v1", layout.display()),
        "--output",
        out.to_str().unwrap(),
        "--no-cache",
    ]);
    assert!(!e.status.success(), "hostile image imported");
    for n in needles {
        assert!(e.stderr.contains(n), "missing {n:?} in: {}", e.stderr);
    }
    assert_eq!(e.stderr.trim().lines().count(), 1, "{}", e.stderr);
    assert!(!out.exists(), "partial output left");
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["l"], "temporary files left behind");
}

#[test]
fn bad_layers_fail_with_layer_and_path_and_leave_nothing() {
    let fifo = TarLayer::new()
        .entry(&Header::new("run/pipe", b'6', 0o644), &[])
        .into_tar();
    let d = image::sha256(&Compression::Gzip.compress(&fifo));
    hostile_import(
        vec![Layer::new(fifo, Compression::Gzip)],
        &[&d, "run/pipe", "FIFO"],
    );

    let escape = TarLayer::new()
        .file("../../etc/evil", 0o644, b"x")
        .into_tar();
    hostile_import(
        vec![Layer::new(escape, Compression::Gzip)],
        &["../../etc/evil"],
    );

    // xz is sniffed and refused with a clear message.
    let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0x00];
    xz.extend_from_slice(&[0u8; 64]);
    let mut l = Layer::new(xz, Compression::None);
    l.media_type = Some("application/vnd.oci.image.layer.v1.tar+gzip".into());
    hostile_import(vec![l], &["xz"]);
}

#[test]
fn diff_id_mismatch_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let img = crafted_image();
    // Rewrite the config with a wrong diff_id, and the manifest to match.
    let mut config: Value = serde_json::from_slice(&img.config_bytes).unwrap();
    let wrong = image::sha256(b"not the layer");
    config["rootfs"]["diff_ids"][1] = json!(wrong);
    let cbytes = serde_json::to_vec(&config).unwrap();
    let mut m: Value = serde_json::from_slice(&img.manifest_bytes).unwrap();
    m["config"]["digest"] = json!(image::sha256(&cbytes));
    m["config"]["size"] = json!(cbytes.len());
    let layout_dir = tmp.path().join("l");
    let layout = Layout::create(&layout_dir);
    for (dg, data) in &img.blobs {
        layout.blob(dg, data);
    }
    layout.blob(&image::sha256(&cbytes), &cbytes);
    layout
        .raw("v1", image::OCI_MANIFEST, &serde_json::to_vec(&m).unwrap())
        .finish();
    let out = tmp.path().join("t");
    let e = nullspace(&[
        "image",
        "import",
        &format!("oci:{}:v1", layout_dir.display()),
        "--output",
        out.to_str().unwrap(),
        "--no-cache",
    ]);
    assert!(!e.status.success());
    assert!(
        e.stderr.contains("diff_id mismatch") && e.stderr.contains(&wrong),
        "{}",
        e.stderr
    );
    assert!(!out.exists());
}

/// Two imports at once into one layer cache bounded to 0 bytes: each
/// import's eviction runs while the other is still reading its layers, and
/// must leave those (leased) alone, so both succeed, round after round.
#[test]
fn concurrent_imports_with_a_tiny_cache_limit_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // Pseudo-random bytes: layers that take a moment to decompress.
    let noise = |seed: u64, n: usize| -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    };
    for round in 0..8u64 {
        let shared = Layer::new(
            TarLayer::new()
                .file("shared.bin", 0o644, &noise(1000 + round, 2 << 20))
                .into_tar(),
            Compression::Gzip,
        );
        let mut srcs = vec![];
        for side in 0..2u64 {
            let mut layers = vec![shared.clone()];
            for l in 0..4u64 {
                layers.push(Layer::new(
                    TarLayer::new()
                        .file(
                            &format!("side{side}/layer{l}.bin"),
                            0o644,
                            &noise(round * 100 + side * 10 + l, 1 << 20),
                        )
                        .into_tar(),
                    if l % 2 == 0 {
                        Compression::Gzip
                    } else {
                        Compression::Zstd
                    },
                ));
            }
            let layout = tmp.path().join(format!("l{round}-{side}"));
            Layout::create(&layout)
                .image("v1", &ImageSpec::new(layers).build())
                .finish();
            srcs.push(format!("oci:{}:v1", layout.display()));
        }
        let children: Vec<_> = srcs
            .iter()
            .enumerate()
            .map(|(side, src)| {
                let out = tmp.path().join(format!("t{round}-{side}"));
                let child = Command::new(nullspace_testkit::nullspace_bin())
                    .args(["image", "import", src, "--output"])
                    .arg(&out)
                    .args(["--cache-max-mb", "0", "--cache-dir"])
                    .arg(&cache)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (out, child)
            })
            .collect();
        for (side, (out, child)) in children.into_iter().enumerate() {
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "round {round}, import {side}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let t = tree::from_ext4(&out.join("rootfs.ext4")).unwrap();
            assert!(
                t.contains_key("shared.bin") && t.contains_key(&format!("side{side}/layer3.bin"))
            );
        }
    }
}
