//! The embedded demo image: the host's static busybox (Debian's
//! `busybox-static`) as `/bin/busybox` with its applet links, a user
//! database, and an application layer serving `/srv` with busybox httpd.
//! Written entirely by code, so a server can build its `base` template
//! (and the tests and the set-up demo their templates) with no registry
//! and no internet.

use std::io;
use std::path::Path;

use serde_json::{Value, json};

use crate::digest::Digest;

/// Where the busybox binary comes from.
pub const BUSYBOX: &str = "/bin/busybox";
/// Every entry's mtime (fixed: the same host gives the same layers).
const MTIME: u64 = 1_700_000_000;

/// The layers (uncompressed tars, base first) and the image `config`
/// object (Env, User, WorkingDir, Entrypoint, Healthcheck, …).
pub struct DemoImage {
    pub layers: Vec<Vec<u8>>,
    pub config: Value,
}

struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    fn dir(mut self, path: &str, mode: u32) -> io::Result<Tar> {
        let mut h = Tar::header(tar::EntryType::Directory, mode, 0, 0);
        self.0.append_data(&mut h, path, io::empty())?;
        Ok(self)
    }

    fn file(mut self, path: &str, mode: u32, uid: u64, data: &[u8]) -> io::Result<Tar> {
        let mut h = Tar::header(tar::EntryType::Regular, mode, uid, data.len() as u64);
        self.0.append_data(&mut h, path, data)?;
        Ok(self)
    }

    fn symlink(mut self, path: &str, target: &str) -> io::Result<Tar> {
        let mut h = Tar::header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.0.append_link(&mut h, path, target)?;
        Ok(self)
    }

    fn finish(self) -> io::Result<Vec<u8>> {
        self.0.into_inner()
    }
}

/// The demo image's content; needs `/bin/busybox` (static).
pub fn demo_image() -> io::Result<DemoImage> {
    let busybox = std::fs::read(BUSYBOX).map_err(|e| {
        io::Error::new(e.kind(), format!("{BUSYBOX} (install busybox-static): {e}"))
    })?;
    let list = std::process::Command::new(BUSYBOX).arg("--list").output()?;
    let mut base = Tar::new()
        .dir("bin", 0o755)?
        .file("bin/busybox", 0o755, 0, &busybox)?
        .dir("etc", 0o755)?
        .file(
            "etc/passwd",
            0o644,
            0,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )?
        .file("etc/group", 0o644, 0, b"root:x:0:\napp:x:1000:\n")?
        .file("etc/hostname", 0o644, 0, b"nullspace-demo\n")?
        .dir("root", 0o700)?
        .file("home/app/.profile", 0o644, 1000, b"export PS1='$ '\n")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        base = base.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let app = Tar::new()
        .dir("srv", 0o755)?
        .file(
            "srv/index.html",
            0o644,
            0,
            b"<h1>hello from a nullspace template</h1>\n",
        )?
        .file(
            "srv/start.sh",
            0o755,
            0,
            b"#!/bin/sh\nexec httpd -f -p 8080 -h /srv\n",
        )?
        // A whiteout: the app layer deletes the base's /etc/hostname.
        .file("etc/.wh.hostname", 0o644, 0, b"")?;
    Ok(DemoImage {
        layers: vec![base.finish()?, app.finish()?],
        config: json!({
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/srv",
            "User": "app:app",
            "Entrypoint": ["/srv/start.sh"],
            "ExposedPorts": {"8080/tcp": {}},
            "Labels": {"org.opencontainers.image.title": "nullspace demo"},
            "Healthcheck": {"Test": ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:8080/"], "Interval": 1_000_000_000u64},
        }),
    })
}

fn put_blob(root: &Path, data: &[u8]) -> io::Result<Digest> {
    let d = Digest::sha256_of(data);
    let dir = root.join("blobs").join(d.algorithm().name());
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(d.hex()), data)?;
    Ok(d)
}

/// Writes the demo image as an OCI layout (uncompressed layers) at `out`
/// (created, or replaced), tagged `tag`; returns the manifest digest.
/// Written beside `out` and renamed into place.
pub fn write_layout(out: &Path, tag: &str) -> io::Result<Digest> {
    let img = demo_image()?;
    let tmp = crate::layout::TempDir::beside(out)?;
    let root = tmp.path();
    let mut layers = vec![];
    let mut diff_ids = vec![];
    for l in &img.layers {
        let d = put_blob(root, l)?;
        diff_ids.push(d.to_string());
        layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": l.len()}));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": img.config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .map_err(io::Error::other)?;
    let cd = put_blob(root, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": crate::manifest::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": layers,
    }))
    .map_err(io::Error::other)?;
    let md = put_blob(root, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": crate::manifest::OCI_INDEX,
        "manifests": [{
            "mediaType": crate::manifest::OCI_MANIFEST,
            "digest": md.to_string(),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    std::fs::write(
        root.join("index.json"),
        serde_json::to_vec(&index).map_err(io::Error::other)?,
    )?;
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    tmp.persist(out)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_layout_resolves_and_verifies() {
        if !std::path::Path::new(super::BUSYBOX).exists() {
            eprintln!("skipped: no {} (busybox-static)", super::BUSYBOX);
            return;
        }
        let dir = tempfile_dir();
        let out = dir.join("layout");
        let d = super::write_layout(&out, "base").unwrap();
        // Written twice, the same bytes: the same digest.
        assert_eq!(super::write_layout(&out, "base").unwrap(), d);
        let src = crate::SourceRef::parse(&format!("oci:{}:base", out.display())).unwrap();
        let img = crate::Image::resolve(&src, &Default::default()).unwrap();
        assert_eq!(img.manifest_digest, d);
        assert_eq!(img.manifest.layers.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ns-demo-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
