//! Local image sources: OCI layout directories, OCI layout archives and
//! `docker save` archives. Archives are read in place through an index of
//! the tar (no extraction), so a multi-gigabyte archive costs one header walk.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::manifest::{self, Descriptor, Manifest};
use crate::resolve::{Backend, Root};

/// Where the files of a layout live.
pub(crate) trait Store: Send + Sync {
    /// Opens a file by its path relative to the layout root, with its size.
    fn open(&self, rel: &str) -> io::Result<(Box<dyn Read + Send>, u64)>;

    fn read_limited(&self, rel: &str, limit: u64) -> io::Result<Vec<u8>> {
        let (r, size) = self.open(rel)?;
        if size > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{rel} is {size} bytes, over the {limit}-byte limit"),
            ));
        }
        let mut buf = Vec::with_capacity(size as usize);
        r.take(limit).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

pub(crate) struct DirStore {
    root: PathBuf,
}

impl Store for DirStore {
    fn open(&self, rel: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        // `rel` is a fixed name or built from a validated digest; never from
        // untrusted free text (see blob_path).
        let f = File::open(self.root.join(rel))?;
        let size = f.metadata()?.len();
        Ok((Box::new(f), size))
    }
}

/// A tar archive indexed by member path; members are read in place.
pub(crate) struct TarStore {
    path: PathBuf,
    members: HashMap<String, (u64, u64)>,
    links: HashMap<String, String>,
}

fn normalize_member(p: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

impl TarStore {
    pub(crate) fn open_archive(path: &Path) -> io::Result<TarStore> {
        let file = File::open(path)?;
        let mut ar = tar::Archive::new(io::BufReader::with_capacity(1 << 16, file));
        let mut members = HashMap::new();
        let mut links = HashMap::new();
        for entry in ar.entries()? {
            let entry = entry?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(name) = normalize_member(&name) else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    members.insert(name, (entry.raw_file_position(), entry.size()));
                }
                tar::EntryType::Symlink => {
                    if let Some(target) = entry.link_name_bytes() {
                        let target = String::from_utf8_lossy(&target).into_owned();
                        let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                        let joined = if target.starts_with('/') {
                            target
                        } else {
                            format!("{dir}/{target}")
                        };
                        if let Some(t) = normalize_member(&joined) {
                            links.insert(name, t);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(TarStore {
            path: path.to_path_buf(),
            members,
            links,
        })
    }

    fn lookup(&self, rel: &str) -> Option<(u64, u64)> {
        let mut name = normalize_member(rel)?;
        // docker save's newer format links `<id>/layer.tar` to a blob.
        for _ in 0..8 {
            if let Some(m) = self.members.get(&name) {
                return Some(*m);
            }
            name = self.links.get(&name)?.clone();
        }
        None
    }
}

impl Store for TarStore {
    fn open(&self, rel: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let (offset, size) = self.lookup(rel).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{rel} is not in the archive"),
            )
        })?;
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(offset))?;
        Ok((
            Box::new(io::BufReader::with_capacity(1 << 16, f).take(size)),
            size,
        ))
    }
}

fn blob_path(d: &Digest) -> String {
    let (alg, hex) = d.path_components();
    format!("blobs/{alg}/{hex}")
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout, in a directory or an archive.
pub(crate) struct OciLayout {
    store: Box<dyn Store>,
    reference: Option<String>,
}

impl OciLayout {
    pub(crate) fn dir(path: &Path, reference: Option<String>) -> Result<OciLayout, ErrorKind> {
        if !path.is_dir() {
            return Err(ErrorKind::NotFound(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        Ok(OciLayout {
            store: Box::new(DirStore {
                root: path.to_path_buf(),
            }),
            reference,
        })
    }

    pub(crate) fn archive(path: &Path, reference: Option<String>) -> Result<OciLayout, ErrorKind> {
        Ok(OciLayout {
            store: Box::new(TarStore::open_archive(path)?),
            reference,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

impl Backend for OciLayout {
    fn root(&self) -> Result<Root, ErrorKind> {
        let marker = self
            .store
            .read_limited("oci-layout", 4096)
            .map_err(|e| ErrorKind::Invalid(format!("oci-layout file: {e}")))?;
        let marker: LayoutMarker = serde_json::from_slice(&marker)
            .map_err(|e| ErrorKind::Invalid(format!("oci-layout file: {e}")))?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(ErrorKind::Invalid(format!(
                "oci-layout version {:?} is not supported",
                marker.image_layout_version
            )));
        }
        let bytes = self
            .store
            .read_limited("index.json", manifest::MAX_MANIFEST_BYTES)
            .map_err(|e| ErrorKind::Invalid(format!("index.json: {e}")))?;
        let index = match manifest::parse_document(&bytes, None) {
            Ok(manifest::Document::Index(i)) => i,
            Ok(_) => {
                return Err(ErrorKind::Invalid(
                    "index.json is not an image index".into(),
                ));
            }
            Err(e) => return Err(ErrorKind::Invalid(format!("index.json {e}"))),
        };
        let name_of = |d: &Descriptor| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
        };
        let chosen = match &self.reference {
            Some(r) => index
                .manifests
                .iter()
                .find(|d| name_of(d).as_deref() == Some(r.as_str()) || d.digest.to_string() == *r),
            None if index.manifests.len() == 1 => index.manifests.first(),
            None => {
                // Several entries and no name: the whole index is the image
                // (a multi-platform layout) when none is named.
                if index.manifests.iter().all(|d| name_of(d).is_none()) {
                    return Ok(Root {
                        bytes,
                        expected: None,
                        declared_type: None,
                    });
                }
                let names: Vec<String> = index.manifests.iter().filter_map(name_of).collect();
                return Err(ErrorKind::Invalid(format!(
                    "the layout holds several images; name one (oci:PATH:REF) of: {}",
                    names.join(", ")
                )));
            }
        };
        let Some(desc) = chosen else {
            let names: Vec<String> = index.manifests.iter().filter_map(name_of).collect();
            return Err(ErrorKind::NotFound(format!(
                "reference {:?} is not in index.json (it has: {})",
                self.reference.as_deref().unwrap_or_default(),
                if names.is_empty() {
                    "no named images".into()
                } else {
                    names.join(", ")
                }
            )));
        };
        let mut body = Vec::new();
        self.fetch(desc)?
            .take(manifest::MAX_MANIFEST_BYTES)
            .read_to_end(&mut body)?;
        Ok(Root {
            bytes: body,
            expected: Some((desc.digest.clone(), desc.size)),
            declared_type: Some(desc.media_type.clone()),
        })
    }

    fn fetch(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>, ErrorKind> {
        let path = blob_path(&desc.digest);
        match self.store.open(&path) {
            Ok((r, _)) => Ok(r),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ErrorKind::NotFound(format!(
                "blob {path} is missing from the layout"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

/// `docker save` output. Its blobs are not all content-addressed by name
/// (old format: `<id>/layer.tar`), so descriptors are made by hashing each
/// member once, and an OCI manifest is synthesised over them.
pub(crate) struct DockerArchive {
    store: TarStore,
    reference: Option<String>,
    blobs: std::sync::Mutex<HashMap<Digest, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl DockerArchive {
    pub(crate) fn open(path: &Path, reference: Option<String>) -> Result<DockerArchive, ErrorKind> {
        Ok(DockerArchive {
            store: TarStore::open_archive(path)?,
            reference,
            blobs: Default::default(),
        })
    }

    fn describe(&self, member: &str, media_type: Option<&str>) -> Result<Descriptor, ErrorKind> {
        let (mut r, size) = self
            .store
            .open(member)
            .map_err(|e| ErrorKind::Invalid(format!("archive member {member:?}: {e}")))?;
        let mut hasher = crate::digest::Hasher::new(crate::digest::Algorithm::Sha256);
        let mut head = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if head.len() < 8 {
                head.extend_from_slice(&buf[..n.min(8)]);
            }
            hasher.update(&buf[..n]);
        }
        let digest = hasher.finish();
        let media_type = media_type.map(str::to_string).unwrap_or_else(|| {
            if head.starts_with(&[0x1f, 0x8b]) {
                manifest::OCI_LAYER_GZIP.into()
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                manifest::OCI_LAYER_ZSTD.into()
            } else {
                manifest::OCI_LAYER_TAR.into()
            }
        });
        self.blobs
            .lock()
            .expect("blob map lock")
            .insert(digest.clone(), member.to_string());
        Ok(Descriptor {
            media_type,
            digest,
            size,
            urls: None,
            annotations: None,
            platform: None,
        })
    }
}

impl Backend for DockerArchive {
    fn root(&self) -> Result<Root, ErrorKind> {
        let bytes = self
            .store
            .read_limited("manifest.json", manifest::MAX_MANIFEST_BYTES)
            .map_err(|e| ErrorKind::Invalid(format!("manifest.json: {e}")))?;
        let entries: Vec<SaveEntry> = serde_json::from_slice(&bytes)
            .map_err(|e| ErrorKind::Invalid(format!("manifest.json: {e}")))?;
        let entry = match &self.reference {
            Some(r) => entries.iter().find(|e| {
                e.repo_tags.iter().flatten().any(|t| {
                    t == r
                        || t.strip_prefix("docker.io/library/") == Some(r)
                        || t.strip_prefix("docker.io/") == Some(r)
                })
            }),
            None if entries.len() == 1 => entries.first(),
            None => {
                let tags: Vec<&str> = entries
                    .iter()
                    .flat_map(|e| e.repo_tags.iter().flatten().map(String::as_str))
                    .collect();
                return Err(ErrorKind::Invalid(format!(
                    "the archive holds {} images; name one (docker-archive:PATH:REF) of: {}",
                    entries.len(),
                    tags.join(", ")
                )));
            }
        };
        let Some(entry) = entry else {
            return Err(ErrorKind::NotFound(format!(
                "reference {:?} is not in manifest.json",
                self.reference.as_deref().unwrap_or_default()
            )));
        };
        let config = self.describe(&entry.config, Some(manifest::OCI_CONFIG))?;
        let layers = entry
            .layers
            .iter()
            .map(|l| self.describe(l, None))
            .collect::<Result<Vec<_>, _>>()?;
        let m = Manifest {
            schema_version: 2,
            media_type: Some(manifest::OCI_MANIFEST.into()),
            config,
            layers,
            annotations: None,
        };
        let bytes = serde_json::to_vec(&m).map_err(|e| ErrorKind::Invalid(e.to_string()))?;
        Ok(Root {
            bytes,
            expected: None,
            declared_type: Some(manifest::OCI_MANIFEST.into()),
        })
    }

    fn fetch(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>, ErrorKind> {
        let member = self
            .blobs
            .lock()
            .expect("blob map lock")
            .get(&desc.digest)
            .cloned()
            .ok_or_else(|| {
                ErrorKind::NotFound(format!("blob {} is not in the archive", desc.digest))
            })?;
        Ok(self.store.open(&member)?.0)
    }
}

/// Keeps annotation maps ordered in what we write.
pub(crate) fn ref_annotation(tag: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(REF_NAME.to_string(), tag.to_string())])
}
