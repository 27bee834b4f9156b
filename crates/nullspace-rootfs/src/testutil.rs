//! Craft tar layers in memory, including hostile ones (feature
//! `testutil`). Headers are written byte by byte, so any field can be
//! made to lie.
//!
//! ```
//! use nullspace_rootfs::testutil::LayerBuilder;
//! let tar = LayerBuilder::new()
//!     .dir("etc", 0o755)
//!     .file("etc/hostname", 0o644, b"box\n")
//!     .symlink("bin", "usr/bin")
//!     .whiteout("var/cache")
//!     .into_tar();
//! assert_eq!(tar.len() % 512, 0);
//! ```

use std::io::Write;

/// Fields of one crafted header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Path as written into the archive (long paths get a PAX record).
    pub path: String,
    /// Type flag byte (`b'0'`, `b'5'`, ...).
    pub typeflag: u8,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time (seconds).
    pub mtime: u64,
    /// Link target for symlinks and hard links.
    pub linkname: String,
    /// Size written into the ustar size field.
    pub size: u64,
    /// Device major/minor (for device entries).
    pub dev: (u32, u32),
}

impl Header {
    /// A header with root ownership, mtime 1700000000 and the given type.
    pub fn new(path: &str, typeflag: u8, mode: u32) -> Header {
        Header {
            path: path.to_owned(),
            typeflag,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            linkname: String::new(),
            size: 0,
            dev: (0, 0),
        }
    }
}

fn octal(dst: &mut [u8], v: u64) {
    let s = format!("{:0width$o}", v, width = dst.len() - 1);
    let s = s.as_bytes();
    // Truncate from the left if too long (a test may want a lying field).
    let s = &s[s.len().saturating_sub(dst.len() - 1)..];
    dst[..s.len()].copy_from_slice(s);
    dst[s.len()] = 0;
}

/// Render a raw 512-byte ustar header (name and linkname truncated to
/// 100 bytes; use PAX records for longer ones).
pub fn raw_header(h: &Header) -> [u8; 512] {
    let mut b = [0u8; 512];
    let name = h.path.as_bytes();
    let n = name.len().min(100);
    b[..n].copy_from_slice(&name[..n]);
    octal(&mut b[100..108], u64::from(h.mode));
    octal(&mut b[108..116], h.uid.min(0o7777777));
    octal(&mut b[116..124], h.gid.min(0o7777777));
    octal(&mut b[124..136], h.size);
    octal(&mut b[136..148], h.mtime);
    b[156] = h.typeflag;
    let link = h.linkname.as_bytes();
    let l = link.len().min(100);
    b[157..157 + l].copy_from_slice(&link[..l]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], u64::from(h.dev.0));
    octal(&mut b[337..345], u64::from(h.dev.1));
    set_checksum(&mut b);
    b
}

/// Recompute the checksum of a raw header (after hand edits).
pub fn set_checksum(b: &mut [u8; 512]) {
    b[148..156].fill(b' ');
    let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
}

/// Encode PAX records (`"<len> key=value\n"`).
pub fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body_len = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body_len + 1;
        while len != body_len + len.to_string().len() {
            len = body_len + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// Builds one tar layer.
#[derive(Debug, Default, Clone)]
pub struct LayerBuilder {
    buf: Vec<u8>,
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        LayerBuilder::default()
    }

    fn pad(&mut self) {
        let rem = self.buf.len() % 512;
        if rem != 0 {
            self.buf.resize(self.buf.len() + 512 - rem, 0);
        }
    }

    /// Append raw bytes (no padding).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// Append a PAX extended header ('x') with these records.
    pub fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let body = pax_records(records);
        self.ext_header(b'x', "PaxHeaders/entry", &body)
    }

    /// Append an extended header of any type ('x', 'g', 'L', 'K').
    pub fn ext_header(mut self, typeflag: u8, name: &str, body: &[u8]) -> Self {
        let mut h = Header::new(name, typeflag, 0o644);
        h.size = body.len() as u64;
        self.buf.extend_from_slice(&raw_header(&h));
        self.buf.extend_from_slice(body);
        self.pad();
        self
    }

    /// Append a header plus `data` (padded). The header's size field is
    /// used as given, so it can disagree with `data`.
    pub fn entry(mut self, h: &Header, data: &[u8]) -> Self {
        let mut extra: Vec<(&str, Vec<u8>)> = Vec::new();
        if h.path.len() > 100 {
            extra.push(("path", h.path.as_bytes().to_vec()));
        }
        if h.linkname.len() > 100 {
            extra.push(("linkpath", h.linkname.as_bytes().to_vec()));
        }
        if h.uid > 0o7777777 {
            extra.push(("uid", h.uid.to_string().into_bytes()));
        }
        if h.gid > 0o7777777 {
            extra.push(("gid", h.gid.to_string().into_bytes()));
        }
        if !extra.is_empty() {
            let recs: Vec<(&str, &[u8])> = extra.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            self = self.pax(&recs);
        }
        self.buf.extend_from_slice(&raw_header(h));
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// A directory.
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.entry(&Header::new(path, b'5', mode), &[])
    }

    /// A regular file.
    pub fn file(self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Header::new(path, b'0', mode);
        h.size = data.len() as u64;
        self.entry(&h, data)
    }

    /// A regular file with owner and mtime.
    pub fn file_owned(
        self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        data: &[u8],
    ) -> Self {
        let mut h = Header::new(path, b'0', mode);
        h.size = data.len() as u64;
        h.uid = uid;
        h.gid = gid;
        h.mtime = mtime;
        self.entry(&h, data)
    }

    /// A symlink.
    pub fn symlink(self, path: &str, target: &str) -> Self {
        let mut h = Header::new(path, b'2', 0o777);
        h.linkname = target.to_owned();
        self.entry(&h, &[])
    }

    /// A hard link to `target` (an archive path).
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        let mut h = Header::new(path, b'1', 0o644);
        h.linkname = target.to_owned();
        self.entry(&h, &[])
    }

    /// `.wh.NAME` deleting `path` from lower layers.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rfind('/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => ("", path),
        };
        self.file(&format!("{dir}.wh.{name}"), 0o644, &[])
    }

    /// `DIR/.wh..wh..opq` (use "" for the root).
    pub fn opaque(self, dir: &str) -> Self {
        let p = if dir.is_empty() {
            ".wh..wh..opq".to_owned()
        } else {
            format!("{}/.wh..wh..opq", dir.trim_end_matches('/'))
        };
        self.file(&p, 0o644, &[])
    }

    /// The archive with its end-of-archive marker (two zero blocks).
    pub fn into_tar(mut self) -> Vec<u8> {
        self.pad();
        self.buf.extend_from_slice(&[0u8; 1024]);
        self.buf
    }

    /// The archive without an end marker (for truncation tests).
    pub fn into_raw(self) -> Vec<u8> {
        self.buf
    }

    /// gzip-compressed archive.
    pub fn into_gzip(self) -> Vec<u8> {
        gzip(&self.into_tar())
    }

    /// zstd-compressed archive.
    pub fn into_zstd(self) -> Vec<u8> {
        zstd(&self.into_tar())
    }
}

/// gzip `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

/// zstd `data`.
pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap_or_default()
}
