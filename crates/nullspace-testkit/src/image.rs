//! Images written by code: tar layers, configs, manifests and indexes, as OCI
//! layouts, OCI archives and docker-archives. Nothing comes from the
//! internet; skopeo and umoci cross-check what is written here.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => data.to_vec(),
            Compression::Gzip => nullspace_rootfs::testutil::gzip(data),
            Compression::Zstd => nullspace_rootfs::testutil::zstd(data),
        }
    }
}

/// Tar layers are crafted with the rootfs crate's builder (it can also
/// write the hostile shapes raw headers allow).
pub use nullspace_rootfs::testutil::{Header, LayerBuilder as TarLayer};

/// A layer ready to go into an image.
#[derive(Clone)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub compression: Compression,
    /// Overrides the media type written in the manifest (for tests of
    /// mislabelled layers).
    pub media_type: Option<String>,
}

impl Layer {
    pub fn new(tar: Vec<u8>, compression: Compression) -> Layer {
        Layer {
            tar,
            compression,
            media_type: None,
        }
    }
}

/// An image: config fields plus layers.
#[derive(Clone)]
pub struct ImageSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    /// The `config` object (Env, Cmd, …).
    pub config: Value,
    pub layers: Vec<Layer>,
    /// Write Docker schema2 media types instead of OCI ones.
    pub docker: bool,
}

impl ImageSpec {
    pub fn new(layers: Vec<Layer>) -> ImageSpec {
        ImageSpec {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
            config: json!({}),
            layers,
            docker: false,
        }
    }
    /// Docker schema2 media types (layers must be gzip).
    pub fn docker(mut self) -> Self {
        self.docker = true;
        self
    }
    pub fn platform(mut self, os: &str, arch: &str, variant: Option<&str>) -> Self {
        self.os = os.into();
        self.architecture = arch.into();
        self.variant = variant.map(str::to_string);
        self
    }
    pub fn config(mut self, c: Value) -> Self {
        self.config = c;
        self
    }

    pub fn build(&self) -> BuiltImage {
        let mut blobs = BTreeMap::new();
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in &self.layers {
            let data = l.compression.compress(&l.tar);
            let d = sha256(&data);
            diff_ids.push(sha256(&l.tar));
            let default_type = if self.docker {
                assert_eq!(l.compression, Compression::Gzip, "Docker layers are gzip");
                DOCKER_LAYER
            } else {
                l.compression.media_type()
            };
            layer_descs.push(json!({
                "mediaType": l.media_type.clone().unwrap_or_else(|| default_type.to_string()),
                "digest": d, "size": data.len(),
            }));
            blobs.insert(d, data);
        }
        // One history entry per layer: buildah refuses base images whose
        // history lists no layers.
        let history: Vec<Value> = diff_ids
            .iter()
            .map(|_| json!({"created": "2024-01-01T00:00:00Z", "created_by": "nullspace-testkit"}))
            .collect();
        let mut config = json!({
            "architecture": self.architecture, "os": self.os,
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
            "created": "2024-01-01T00:00:00Z",
        });
        if let Some(v) = &self.variant {
            config["variant"] = json!(v);
        }
        let config_bytes = serde_json::to_vec(&config).expect("json");
        let config_digest = sha256(&config_bytes);
        blobs.insert(config_digest.clone(), config_bytes.clone());
        let (manifest_type, config_type) = if self.docker {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        let manifest = json!({
            "schemaVersion": 2, "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": config_bytes.len()},
            "layers": layer_descs,
        });
        let manifest_bytes = serde_json::to_vec(&manifest).expect("json");
        BuiltImage {
            manifest_digest: sha256(&manifest_bytes),
            manifest_bytes,
            config_bytes,
            config_digest,
            blobs,
            platform: json!({"os": self.os, "architecture": self.architecture}),
            variant: self.variant.clone(),
            manifest_media_type: manifest_type.to_string(),
        }
    }
}

/// A built image: every blob, plus its manifest.
#[derive(Clone)]
pub struct BuiltImage {
    pub manifest_bytes: Vec<u8>,
    pub manifest_digest: String,
    pub config_bytes: Vec<u8>,
    pub config_digest: String,
    pub blobs: BTreeMap<String, Vec<u8>>,
    pub platform: Value,
    pub variant: Option<String>,
    pub manifest_media_type: String,
}

impl BuiltImage {
    pub fn descriptor(&self) -> Value {
        let mut platform = self.platform.clone();
        if let Some(v) = &self.variant {
            platform["variant"] = json!(v);
        }
        json!({"mediaType": self.manifest_media_type, "digest": self.manifest_digest,
               "size": self.manifest_bytes.len(), "platform": platform})
    }
    /// Layer blob digests in manifest order.
    pub fn layer_digests(&self) -> Vec<String> {
        let m: Value = serde_json::from_slice(&self.manifest_bytes).expect("json");
        m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["digest"].as_str().expect("digest").to_string())
            .collect()
    }
}

/// An OCI layout being written.
pub struct Layout<'a> {
    dir: &'a Path,
    index: Vec<Value>,
}

impl<'a> Layout<'a> {
    pub fn create(dir: &'a Path) -> Layout<'a> {
        fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        Layout {
            dir,
            index: Vec::new(),
        }
    }

    pub fn blob(&self, digest: &str, data: &[u8]) {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        fs::write(self.dir.join("blobs/sha256").join(hex), data).expect("blob");
    }

    fn add_blobs(&self, img: &BuiltImage) {
        for (d, data) in &img.blobs {
            self.blob(d, data);
        }
        self.blob(&img.manifest_digest, &img.manifest_bytes);
    }

    /// Adds a single-platform image under `tag`.
    pub fn image(mut self, tag: &str, img: &BuiltImage) -> Self {
        self.add_blobs(img);
        let mut d = img.descriptor();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(d);
        self
    }

    /// Adds a multi-platform index under `tag`. Returns the index digest.
    pub fn index(mut self, tag: &str, images: &[&BuiltImage]) -> (Self, String) {
        let manifests: Vec<Value> = images
            .iter()
            .map(|i| {
                self.add_blobs(i);
                i.descriptor()
            })
            .collect();
        let bytes = serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
        )
        .expect("json");
        let digest = sha256(&bytes);
        self.blob(&digest, &bytes);
        self.index.push(
            json!({"mediaType": OCI_INDEX, "digest": digest, "size": bytes.len(),
                               "annotations": {"org.opencontainers.image.ref.name": tag}}),
        );
        (self, digest)
    }

    /// Adds a raw document (any bytes) under `tag` with the given media type.
    pub fn raw(mut self, tag: &str, media_type: &str, bytes: &[u8]) -> Self {
        let digest = sha256(bytes);
        self.blob(&digest, bytes);
        self.index.push(
            json!({"mediaType": media_type, "digest": digest, "size": bytes.len(),
                               "annotations": {"org.opencontainers.image.ref.name": tag}}),
        );
        self
    }

    pub fn finish(self) {
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("index.json");
    }
}

/// Tars a directory tree (an OCI layout) into `out`: an `oci-archive`.
pub fn tar_dir(dir: &Path, out: &Path) {
    let f = fs::File::create(out).expect("archive");
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", dir).expect("tar dir");
    b.finish().expect("tar finish");
}

/// Writes a `docker save` archive. `new_format`: layers stored as
/// `blobs/sha256/<hex>` (Docker 25+) instead of `<n>/layer.tar`.
pub fn docker_archive(out: &Path, tag: &str, img: &BuiltImage, new_format: bool) {
    let f = fs::File::create(out).expect("archive");
    let mut b = tar::Builder::new(f);
    let add = |b: &mut tar::Builder<fs::File>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).expect("tar member");
    };
    let config_name = if new_format {
        format!("blobs/sha256/{}", &img.config_digest[7..])
    } else {
        format!("{}.json", &img.config_digest[7..])
    };
    add(&mut b, &config_name, &img.config_bytes);
    let mut layers = Vec::new();
    for (n, d) in img.layer_digests().iter().enumerate() {
        let name = if new_format {
            format!("blobs/sha256/{}", &d[7..])
        } else {
            format!("{n}/layer.tar")
        };
        add(&mut b, &name, &img.blobs[d]);
        layers.push(name);
    }
    let manifest = json!([{"Config": config_name, "RepoTags": [tag], "Layers": layers}]);
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("json"),
    );
    b.finish().expect("tar finish");
}

/// A layer carrying host programs and every shared library `ldd` names for
/// them, at the paths the loader asks for, plus symlinks `(path, target)`:
/// for a template that needs a tool the demo's busybox lacks (git), built
/// without a network.
pub fn host_programs_layer(programs: &[&str], links: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let mut files = std::collections::BTreeSet::new();
    for p in programs {
        files.insert(p.to_string());
        let out = std::process::Command::new("ldd")
            .arg(p)
            .output()
            .with_context(|| format!("ldd {p}"))?;
        // A static program (the guest fixture) needs no libraries.
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") {
            continue;
        }
        anyhow::ensure!(out.status.success(), "ldd {p}: {text}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libz.so.1 => /lib/…/libz.so.1 (0x…)` or `/lib64/ld-linux-….so.2 (0x…)`.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line.trim(),
            };
            if let Some(path) = path
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                files.insert(path.to_string());
            }
        }
    }
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    let mut add_parents = |b: &mut tar::Builder<Vec<u8>>, path: &str| -> anyhow::Result<()> {
        let rel = path.trim_start_matches('/');
        let mut acc = String::new();
        for part in Path::new(rel).parent().into_iter().flat_map(|p| p.iter()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(&part.to_string_lossy());
            if dirs.insert(acc.clone()) {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, format!("{acc}/"), std::io::empty())?;
            }
        }
        Ok(())
    };
    for f in &files {
        let data = fs::read(f).with_context(|| format!("reading {f}"))?;
        add_parents(&mut b, f)?;
        let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
        b.append_data(&mut h, f.trim_start_matches('/'), &data[..])?;
    }
    for (path, target) in links {
        add_parents(&mut b, path)?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, path.trim_start_matches('/'), target)?;
    }
    Ok(b.into_inner()?)
}

/// [`demo_image`] with one more layer on top (gzip).
pub fn demo_image_with(layer: Vec<u8>) -> anyhow::Result<BuiltImage> {
    let demo = nullspace_oci::demo::demo_image()?;
    let mut layers: Vec<Layer> = demo
        .layers
        .into_iter()
        .map(|l| Layer::new(l, Compression::Gzip))
        .collect();
    layers.push(Layer::new(layer, Compression::Gzip));
    Ok(ImageSpec::new(layers).config(demo.config).build())
}

/// The embedded demo image (`nullspace_oci::demo`: Debian's static busybox
/// with its applet links, a user database, an application layer), with a
/// gzip base layer and a zstd app layer. Needs the `busybox-static` package.
pub fn demo_image() -> anyhow::Result<BuiltImage> {
    let demo = nullspace_oci::demo::demo_image()?;
    let mut layers = demo.layers.into_iter();
    let (base, app) = (
        layers.next().expect("base layer"),
        layers.next().expect("app layer"),
    );
    Ok(ImageSpec::new(vec![
        Layer::new(base, Compression::Gzip),
        Layer::new(app, Compression::Zstd),
    ])
    .config(demo.config)
    .build())
}
