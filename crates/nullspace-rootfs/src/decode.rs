//! Phase A: decode one layer blob into an uncompressed spool file and an
//! index of its entries.
//!
//! The tar framing is driven here rather than by `tar::Archive`: the
//! crate reads GNU long names and PAX headers into memory without a bound
//! and splits PAX records on newlines (which breaks binary
//! `security.capability` values), so this module walks the 512-byte
//! blocks itself and uses `tar::Header` only to decode header fields. That
//! also puts every size decision (ustar vs PAX, header-only types) in one
//! place, so the offsets recorded here are exactly the ones a reader of
//! the spool file sees.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Limits;
use crate::error::{EntryRule, Error, lossy};
use crate::path::normalize;

const BLOCK: u64 = 512;
/// Largest size an 11-digit octal ustar field can carry (8 GiB - 1).
const MAX_OCTAL_SIZE: u64 = 0o77_777_777_777;
/// Buffer sizes for the decode pipeline: large enough that syscalls and
/// decoder calls are amortized, small enough to keep RSS flat when
/// several layers decode in parallel.
const IO_BUF: usize = 1 << 20;

/// Compression detected from the blob's magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (possibly multi-member).
    Gzip,
    /// zstd (possibly multi-frame).
    Zstd,
}

/// Metadata carried by a tar entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// Permission bits including setuid/setgid/sticky (`& 0o7777`).
    pub mode: u32,
    /// Owner (PAX `uid` wins over the header field).
    pub uid: u32,
    /// Group (PAX `gid` wins over the header field).
    pub gid: u32,
    /// Modification time: seconds and nanoseconds (PAX `mtime` keeps the
    /// fraction).
    pub mtime: (i64, u32),
    /// Extended attributes from PAX `SCHILY.xattr.*`, sorted by name.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// Regular file whose `size` bytes start at `offset` in the
    /// uncompressed layer stream (= the spool file).
    File {
        /// Byte offset of the data in the uncompressed stream.
        offset: u64,
        /// Data length.
        size: u64,
    },
    /// Directory.
    Dir,
    /// Symbolic link; the target is stored verbatim.
    Symlink {
        /// Link target (never interpreted on the host).
        target: String,
    },
    /// Hard link to an earlier path (normalized).
    Hardlink {
        /// Normalized root-relative target path.
        target: String,
    },
    /// `.wh.NAME`: deletes `path` from lower layers.
    Whiteout,
    /// `.wh..wh..opq`: deletes every lower-layer child of the directory
    /// `path`.
    Opaque,
}

/// One indexed entry. `path` is normalized (see the crate docs); for
/// whiteouts it is the path being deleted, for opaque markers the
/// directory being made opaque.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRec {
    /// Normalized root-relative path ("" = the root).
    pub path: String,
    /// Entry kind.
    pub kind: EntryKind,
    /// Metadata (ignored for whiteouts).
    pub meta: EntryMeta,
}

/// The result of indexing one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    /// `sha256:<hex>` of the uncompressed stream (the OCI diff_id).
    pub diff_id: String,
    /// Length of the uncompressed stream in bytes.
    pub uncompressed_size: u64,
    /// Compression the blob was decoded with (by magic bytes).
    pub compression: Compression,
    /// Entries in archive order.
    pub entries: Vec<EntryRec>,
}

/// Decode one layer blob: sniff the compression by magic bytes, stream
/// the uncompressed tar into `spool` (from its current position, which
/// should be 0 of an empty file) while hashing it, and index the entries.
///
/// `layer_name` (normally the layer digest) is used in errors only;
/// `media_type` too — the magic bytes decide, so a mislabelled gzip/zstd
/// layer still decodes. Independent per layer: callers may run several
/// decodes on separate threads.
pub fn decode_layer(
    layer_name: &str,
    compressed: impl Read,
    media_type: &str,
    spool: &mut File,
    limits: &Limits,
) -> Result<LayerIndex, Error> {
    let mut compressed = compressed;
    let mut prefix = Vec::with_capacity(512);
    (&mut compressed)
        .take(512)
        .read_to_end(&mut prefix)
        .map_err(|e| Error::LayerIo {
            layer: layer_name.to_owned(),
            context: "reading layer blob",
            source: e,
        })?;
    let compression = sniff(&prefix).map_err(|c| match c {
        Some(name) => Error::UnsupportedCompression {
            layer: layer_name.to_owned(),
            compression: name,
            media_type: media_type.to_owned(),
        },
        None => Error::UnrecognizedFormat {
            layer: layer_name.to_owned(),
            media_type: media_type.to_owned(),
        },
    })?;
    let raw = io::Cursor::new(prefix).chain(compressed);
    let writer = BufWriter::with_capacity(IO_BUF, spool);
    let (entries, size, hash) = match compression {
        Compression::None => run_tee(layer_name, raw, writer, limits)?,
        Compression::Gzip => run_tee(
            layer_name,
            flate2::read::MultiGzDecoder::new(raw),
            writer,
            limits,
        )?,
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::new(raw).map_err(|e| Error::LayerIo {
                layer: layer_name.to_owned(),
                context: "initializing zstd",
                source: e,
            })?;
            run_tee(layer_name, dec, writer, limits)?
        }
    };
    Ok(LayerIndex {
        diff_id: format!("sha256:{}", hex::encode(hash)),
        uncompressed_size: size,
        compression,
        entries,
    })
}

fn run_tee<R: Read>(
    layer: &str,
    reader: R,
    writer: BufWriter<&mut File>,
    limits: &Limits,
) -> Result<(Vec<EntryRec>, u64, [u8; 32]), Error> {
    let mut src = TeeSource {
        layer,
        inner: BufReader::with_capacity(IO_BUF, reader),
        out: writer,
        hasher: Sha256::new(),
        pos: 0,
        limit: limits.max_layer_bytes,
    };
    let entries = scan(&mut src, layer, limits)?;
    src.drain()?;
    src.out.flush().map_err(|e| Error::LayerIo {
        layer: layer.to_owned(),
        context: "writing spool file",
        source: e,
    })?;
    Ok((entries, src.pos, src.hasher.finalize().into()))
}

/// Re-index an already spooled (uncompressed) tar, seeking over file data.
/// Used for cache hits; `diff_id` is taken from the cache record (the
/// spool is not re-hashed — [`crate::LayerCache::verify`] does that).
pub fn index_tar_file(
    layer_name: &str,
    path: &Path,
    diff_id: &str,
    limits: &Limits,
) -> Result<LayerIndex, Error> {
    let file = File::open(path).map_err(|e| Error::LayerIo {
        layer: layer_name.to_owned(),
        context: "opening spooled layer",
        source: e,
    })?;
    let len = file
        .metadata()
        .map_err(|e| Error::LayerIo {
            layer: layer_name.to_owned(),
            context: "stat of spooled layer",
            source: e,
        })?
        .len();
    if len > limits.max_layer_bytes {
        return Err(Error::Limit {
            layer: layer_name.to_owned(),
            what: "uncompressed layer size",
            limit: limits.max_layer_bytes,
        });
    }
    let mut src = FileSource {
        layer: layer_name,
        inner: BufReader::with_capacity(64 * 1024, file),
        pos: 0,
        len,
    };
    let entries = scan(&mut src, layer_name, limits)?;
    Ok(LayerIndex {
        diff_id: diff_id.to_owned(),
        uncompressed_size: len,
        compression: Compression::None,
        entries,
    })
}

/// `Ok(c)` for a decodable stream; `Err(Some(name))` for a recognized but
/// unsupported compression; `Err(None)` for anything else.
fn sniff(p: &[u8]) -> Result<Compression, Option<&'static str>> {
    if p.starts_with(&[0x1f, 0x8b]) {
        return Ok(Compression::Gzip);
    }
    // zstd frame, or a skippable frame (0x184D2A50..=0x184D2A5F).
    if p.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (p.len() >= 4 && p[0] & 0xf0 == 0x50 && p[1..4] == [0x2a, 0x4d, 0x18])
    {
        return Ok(Compression::Zstd);
    }
    if p.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Err(Some("xz"));
    }
    if p.starts_with(b"BZh") {
        return Err(Some("bzip2"));
    }
    // An empty blob is an empty layer.
    if p.is_empty() {
        return Ok(Compression::None);
    }
    if p.len() == 512 && (&p[257..262] == b"ustar" || p.iter().all(|&b| b == 0) || checksum_ok(p)) {
        return Ok(Compression::None);
    }
    Err(None)
}

/// POSIX says unsigned; some historic writers used signed sums (Go
/// accepts both, so do we).
fn checksum_ok(h: &[u8]) -> bool {
    let Ok(stored) = parse_octal(&h[148..156]) else {
        return false;
    };
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed)
}

fn parse_octal(field: &[u8]) -> Result<u64, ()> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let s = std::str::from_utf8(&field[..end]).map_err(|_| ())?.trim();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| ())
}

/// Sequential access to the uncompressed stream.
trait Source {
    fn pos(&self) -> u64;
    /// Fill `buf`; `Ok(false)` on a clean EOF before the first byte.
    fn read_block(&mut self, buf: &mut [u8]) -> Result<bool, Error>;
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error>;
    fn skip(&mut self, n: u64) -> Result<(), Error>;
}

fn truncated(layer: &str, offset: u64) -> Error {
    Error::CorruptTar {
        layer: layer.to_owned(),
        offset,
        reason: "unexpected end of stream".into(),
    }
}

/// Decompressed stream tee'd into the spool file and the diff_id hash.
/// Bytes are hashed and written straight out of the reader's buffer (no
/// intermediate copy) as they are consumed.
struct TeeSource<'a, R: Read> {
    layer: &'a str,
    inner: BufReader<R>,
    out: BufWriter<&'a mut File>,
    hasher: Sha256,
    pos: u64,
    limit: u64,
}

impl<R: Read> TeeSource<'_, R> {
    /// Consume up to `n` bytes (all of them unless EOF), copying into
    /// `copy` when given. Returns the number consumed.
    fn consume(&mut self, n: u64, mut copy: Option<&mut [u8]>) -> Result<u64, Error> {
        let mut done = 0u64;
        while done < n {
            let buf = self.inner.fill_buf().map_err(|e| Error::LayerIo {
                layer: self.layer.to_owned(),
                context: "decompressing layer",
                source: e,
            })?;
            if buf.is_empty() {
                break;
            }
            let take = (buf.len() as u64).min(n - done) as usize;
            let chunk = &buf[..take];
            if self.pos + take as u64 > self.limit {
                return Err(Error::Limit {
                    layer: self.layer.to_owned(),
                    what: "uncompressed layer size",
                    limit: self.limit,
                });
            }
            self.hasher.update(chunk);
            self.out.write_all(chunk).map_err(|e| Error::LayerIo {
                layer: self.layer.to_owned(),
                context: "writing spool file",
                source: e,
            })?;
            if let Some(c) = copy.as_deref_mut() {
                c[done as usize..done as usize + take].copy_from_slice(chunk);
            }
            self.inner.consume(take);
            self.pos += take as u64;
            done += take as u64;
        }
        Ok(done)
    }

    /// Everything after the end-of-archive marker still belongs to the
    /// diff_id, so it is hashed and spooled too.
    fn drain(&mut self) -> Result<(), Error> {
        while self.consume(IO_BUF as u64, None)? > 0 {}
        Ok(())
    }
}

impl<R: Read> Source for TeeSource<'_, R> {
    fn pos(&self) -> u64 {
        self.pos
    }
    fn read_block(&mut self, buf: &mut [u8]) -> Result<bool, Error> {
        let start = self.pos;
        let n = self.consume(buf.len() as u64, Some(buf))?;
        if n == 0 {
            return Ok(false);
        }
        if n < buf.len() as u64 {
            return Err(truncated(self.layer, start));
        }
        Ok(true)
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        let start = self.pos;
        if self.consume(buf.len() as u64, Some(buf))? < buf.len() as u64 {
            return Err(truncated(self.layer, start));
        }
        Ok(())
    }
    fn skip(&mut self, n: u64) -> Result<(), Error> {
        let start = self.pos;
        if self.consume(n, None)? < n {
            return Err(truncated(self.layer, start));
        }
        Ok(())
    }
}

/// A spooled tar on disk; data is skipped by seeking.
struct FileSource<'a> {
    layer: &'a str,
    inner: BufReader<File>,
    pos: u64,
    len: u64,
}

impl FileSource<'_> {
    fn io(&self, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return truncated(self.layer, self.pos);
        }
        Error::LayerIo {
            layer: self.layer.to_owned(),
            context: "reading spooled layer",
            source: e,
        }
    }
}

impl Source for FileSource<'_> {
    fn pos(&self) -> u64 {
        self.pos
    }
    fn read_block(&mut self, buf: &mut [u8]) -> Result<bool, Error> {
        if self.pos == self.len {
            return Ok(false);
        }
        self.read_exact(buf)?;
        Ok(true)
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        self.inner.read_exact(buf).map_err(|e| self.io(e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn skip(&mut self, n: u64) -> Result<(), Error> {
        if self.pos.saturating_add(n) > self.len {
            return Err(truncated(self.layer, self.pos));
        }
        let delta = i64::try_from(n).map_err(|_| truncated(self.layer, self.pos))?;
        self.inner.seek_relative(delta).map_err(|e| self.io(e))?;
        self.pos += n;
        Ok(())
    }
}

/// Parsed PAX records we act on.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: BTreeMap<String, Vec<u8>>,
    sparse: bool,
}

/// Parse `"<len> <key>=<value>\n"` records by their length prefix (values
/// may contain newlines and arbitrary bytes).
fn parse_pax(buf: &[u8]) -> Result<Pax, EntryRule> {
    let bad = |m: &str| EntryRule::BadPax(m.to_owned());
    let mut pax = Pax::default();
    let mut i = 0usize;
    while i < buf.len() {
        // Some writers pad the record area with NULs.
        if buf[i..].iter().all(|&b| b == 0) {
            break;
        }
        let sp = buf[i..]
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("missing length"))?;
        let len: usize = std::str::from_utf8(&buf[i..i + sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad length"))?;
        if len <= sp + 1 || i.checked_add(len).is_none_or(|e| e > buf.len()) {
            return Err(bad("record length out of range"));
        }
        let rec = &buf[i + sp + 1..i + len];
        i += len;
        let Some((&b'\n', rec)) = rec.split_last() else {
            return Err(bad("record not newline-terminated"));
        };
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("record without '='"))?;
        let key = std::str::from_utf8(&rec[..eq]).map_err(|_| bad("non-UTF-8 key"))?;
        let value = &rec[eq + 1..];
        // An empty value deletes the keyword (POSIX); absence is the same
        // for our purposes.
        let num = |v: &[u8]| -> Result<u64, EntryRule> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| EntryRule::BadNumber(format!("PAX {key}={}", lossy(v))))
        };
        match key {
            "path" => pax.path = (!value.is_empty()).then(|| value.to_vec()),
            "linkpath" => pax.linkpath = (!value.is_empty()).then(|| value.to_vec()),
            "size" if !value.is_empty() => pax.size = Some(num(value)?),
            "uid" if !value.is_empty() => pax.uid = Some(num(value)?),
            "gid" if !value.is_empty() => pax.gid = Some(num(value)?),
            "mtime" if !value.is_empty() => pax.mtime = Some(parse_pax_time(value)?),
            _ if key.starts_with("SCHILY.xattr.") => {
                let name = &key["SCHILY.xattr.".len()..];
                pax.xattrs.insert(name.to_owned(), value.to_vec());
            }
            _ if key.starts_with("GNU.sparse.") => pax.sparse = true,
            _ => {} // uname/gname/atime/ctime/comment/...: not represented
        }
    }
    Ok(pax)
}

/// PAX time: `[-]secs[.frac]`.
fn parse_pax_time(v: &[u8]) -> Result<(i64, u32), EntryRule> {
    let bad = || EntryRule::BadNumber(format!("PAX mtime={}", lossy(v)));
    let s = std::str::from_utf8(v).map_err(|_| bad())?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: i64 = int.parse().map_err(|_| bad())?;
    let mut nsec: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    Ok(if !neg {
        (secs, nsec)
    } else if nsec == 0 {
        (-secs, 0)
    } else {
        (-secs - 1, 1_000_000_000 - nsec)
    })
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(i) = v.iter().position(|&b| b == 0) {
        v.truncate(i);
    }
    v
}

fn pad(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// xattr namespaces mkext4 can store.
fn xattr_supported(name: &str) -> bool {
    ["user.", "security.", "trusted.", "system."]
        .iter()
        .any(|p| name.len() > p.len() && name.starts_with(p))
}

#[derive(Default)]
struct Pending {
    pax: Option<Pax>,
    longname: Option<Vec<u8>>,
    longlink: Option<Vec<u8>>,
}

/// Walk the tar framing and index every entry.
fn scan<S: Source>(src: &mut S, layer: &str, limits: &Limits) -> Result<Vec<EntryRec>, Error> {
    let mut entries = Vec::new();
    let mut count: u64 = 0;
    let mut hdr = [0u8; BLOCK as usize];
    let mut pending = Pending::default();
    let mut ext = Vec::new();
    loop {
        let hdr_off = src.pos();
        let corrupt = |reason: String| Error::CorruptTar {
            layer: layer.to_owned(),
            offset: hdr_off,
            reason,
        };
        let dangling =
            pending.pax.is_some() || pending.longname.is_some() || pending.longlink.is_some();
        if !src.read_block(&mut hdr)? {
            if dangling {
                return Err(corrupt("extended header without a following entry".into()));
            }
            break;
        }
        if hdr.iter().all(|&b| b == 0) {
            // End-of-archive marker; the caller drains the rest.
            if dangling {
                return Err(corrupt("extended header without a following entry".into()));
            }
            break;
        }
        if !checksum_ok(&hdr) {
            return Err(corrupt("header checksum mismatch".into()));
        }
        let h = tar::Header::from_byte_slice(&hdr);
        let typeflag = hdr[156];
        let hdr_size = h.entry_size().map_err(|e| corrupt(e.to_string()))?;

        if matches!(typeflag, b'x' | b'g' | b'L' | b'K') {
            // Bound extended headers BEFORE buffering them.
            if hdr_size > limits.max_pax_bytes as u64 {
                return Err(Error::entry(
                    layer,
                    lossy(&h.path_bytes()),
                    EntryRule::ExtendedHeaderTooLarge {
                        size: hdr_size,
                        limit: limits.max_pax_bytes,
                    },
                ));
            }
            ext.clear();
            ext.resize(hdr_size as usize, 0);
            src.read_exact(&mut ext)?;
            src.skip(pad(hdr_size))?;
            let dup = |what| {
                Error::entry(
                    layer,
                    lossy(&h.path_bytes()),
                    EntryRule::DuplicateExtendedHeader(what),
                )
            };
            let pax_err = |rule| Error::entry(layer, lossy(&h.path_bytes()), rule);
            match typeflag {
                b'x' => {
                    if pending.pax.is_some() {
                        return Err(dup("PAX"));
                    }
                    pending.pax = Some(parse_pax(&ext).map_err(pax_err)?);
                }
                // Global headers are validated but not applied: Docker and
                // containerd ignore them too (git archive puts a comment
                // there).
                b'g' => {
                    parse_pax(&ext).map_err(pax_err)?;
                }
                b'L' => {
                    if pending.longname.is_some() {
                        return Err(dup("GNU long name"));
                    }
                    pending.longname = Some(trim_nul(ext.clone()));
                }
                _ => {
                    if pending.longlink.is_some() {
                        return Err(dup("GNU long link"));
                    }
                    pending.longlink = Some(trim_nul(ext.clone()));
                }
            }
            continue;
        }

        let Pending {
            pax,
            longname,
            longlink,
        } = std::mem::take(&mut pending);
        let pax = pax.unwrap_or_default();
        let raw_path: Vec<u8> = match (pax.path.clone(), longname) {
            (Some(p), _) => p,
            (None, Some(l)) => l,
            (None, None) => h.path_bytes().into_owned(),
        };
        let shown = lossy(&raw_path);
        let reject = |rule: EntryRule| Error::entry(layer, shown.clone(), rule);

        // ustar vs PAX size: a disagreement is the TARmageddon desync
        // shape (parsers that honour different fields see different
        // archives). The only legitimate difference is a >8 GiB file whose
        // ustar field could not hold the size and was left at 0.
        let mut size = hdr_size;
        if let Some(ps) = pax.size
            && ps != hdr_size
        {
            if hdr_size == 0 && ps > MAX_OCTAL_SIZE {
                size = ps;
            } else {
                return Err(reject(EntryRule::PaxSizeMismatch {
                    ustar: hdr_size,
                    pax: ps,
                }));
            }
        }
        let data_off = src.pos();

        // Entry type first: devices etc. are rejected whatever their name.
        enum Ty {
            File,
            Dir,
            Symlink,
            Hardlink,
        }
        let ends_with_slash = raw_path.last() == Some(&b'/');
        let ty = match typeflag {
            b'0' | b'7' => Ty::File,
            // Pre-POSIX tar: a '\0' entry whose name ends in '/' is a dir.
            0 if ends_with_slash => Ty::Dir,
            0 => Ty::File,
            b'1' => Ty::Hardlink,
            b'2' => Ty::Symlink,
            b'5' => Ty::Dir,
            b'3' => return Err(reject(EntryRule::CharDevice)),
            b'4' => return Err(reject(EntryRule::BlockDevice)),
            b'6' => return Err(reject(EntryRule::Fifo)),
            b'S' => return Err(reject(EntryRule::Sparse)),
            t => return Err(reject(EntryRule::UnknownType(t as char))),
        };
        if pax.sparse {
            return Err(reject(EntryRule::Sparse));
        }
        // Header-only types must not carry data: Go's archive/tar skips 0
        // bytes for them while tar-rs skips `size`, another desync shape.
        if !matches!(ty, Ty::File) && size != 0 {
            let kind = match ty {
                Ty::Dir => "directory",
                Ty::Symlink => "symlink",
                _ => "hard link",
            };
            return Err(reject(EntryRule::HeaderOnlyWithData { kind, size }));
        }

        count += 1;
        if count > limits.max_entries {
            return Err(Error::Limit {
                layer: layer.to_owned(),
                what: "entry count",
                limit: limits.max_entries,
            });
        }

        let path = normalize(&raw_path, limits).map_err(&reject)?;

        // Metadata.
        let mode = h.mode().map_err(|e| corrupt(e.to_string()))? & 0o7777;
        let uid = match pax.uid {
            Some(u) => u,
            None => h.uid().map_err(|e| corrupt(e.to_string()))?,
        };
        let gid = match pax.gid {
            Some(g) => g,
            None => h.gid().map_err(|e| corrupt(e.to_string()))?,
        };
        let uid = u32::try_from(uid).map_err(|_| reject(EntryRule::NumberOutOfRange("uid")))?;
        let gid = u32::try_from(gid).map_err(|_| reject(EntryRule::NumberOutOfRange("gid")))?;
        let mtime = match pax.mtime {
            Some(t) => t,
            None => {
                let m = h.mtime().map_err(|e| corrupt(e.to_string()))?;
                (i64::try_from(m).unwrap_or(i64::MAX), 0)
            }
        };
        let mut xattrs = Vec::with_capacity(pax.xattrs.len());
        for (name, value) in pax.xattrs {
            if !xattr_supported(&name) {
                return Err(reject(EntryRule::UnsupportedXattr(name)));
            }
            xattrs.push((name, value));
        }
        let meta = EntryMeta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        };

        let mut kind = match ty {
            Ty::File => EntryKind::File {
                offset: data_off,
                size,
            },
            Ty::Dir => EntryKind::Dir,
            Ty::Symlink => {
                let raw = match (pax.linkpath, longlink) {
                    (Some(p), _) => p,
                    (None, Some(l)) => l,
                    (None, None) => h
                        .link_name_bytes()
                        .map(|c| c.into_owned())
                        .unwrap_or_default(),
                };
                let target = symlink_target(raw).map_err(&reject)?;
                EntryKind::Symlink { target }
            }
            Ty::Hardlink => {
                let raw = match (pax.linkpath, longlink) {
                    (Some(p), _) => p,
                    (None, Some(l)) => l,
                    (None, None) => h
                        .link_name_bytes()
                        .map(|c| c.into_owned())
                        .unwrap_or_default(),
                };
                let target = normalize(&raw, limits)
                    .map_err(|r| reject(EntryRule::HardlinkTarget(lossy(&raw), Box::new(r))))?;
                EntryKind::Hardlink { target }
            }
        };

        // Whiteouts (OCI image-spec "Whiteouts").
        let mut skip_entry = false;
        let mut final_path = path;
        {
            let (parent, base) = match final_path.rfind('/') {
                Some(i) => (&final_path[..i], &final_path[i + 1..]),
                None => ("", final_path.as_str()),
            };
            if parent.split('/').any(|c| c.starts_with(".wh.")) {
                return Err(reject(EntryRule::BadWhiteout));
            }
            if let Some(name) = base.strip_prefix(".wh.") {
                if name == ".wh..opq" {
                    kind = EntryKind::Opaque;
                    final_path = parent.to_owned();
                } else if name.starts_with(".wh.") {
                    // Other `.wh..wh.*` names are AUFS bookkeeping
                    // (plnk/aufs); Docker and containerd skip them.
                    skip_entry = true;
                } else if name.is_empty() || name == "." || name == ".." {
                    return Err(reject(EntryRule::BadWhiteout));
                } else {
                    kind = EntryKind::Whiteout;
                    final_path = if parent.is_empty() {
                        name.to_owned()
                    } else {
                        format!("{parent}/{name}")
                    };
                }
            }
        }

        if matches!(ty, Ty::File) {
            src.skip(size)?;
            src.skip(pad(size))?;
        }
        if !skip_entry {
            entries.push(EntryRec {
                path: final_path,
                kind,
                meta,
            });
        }
    }
    Ok(entries)
}

fn symlink_target(raw: Vec<u8>) -> Result<String, EntryRule> {
    if raw.is_empty() {
        return Err(EntryRule::BadSymlinkTarget("empty"));
    }
    if raw.len() > 4095 {
        return Err(EntryRule::BadSymlinkTarget("longer than 4095 bytes"));
    }
    if raw.contains(&0) {
        return Err(EntryRule::BadSymlinkTarget("contains a NUL byte"));
    }
    String::from_utf8(raw).map_err(|_| EntryRule::BadSymlinkTarget("not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_with_binary_values() {
        let val = b"a\nb=c\x00\xff";
        let rec_body = [b"SCHILY.xattr.security.capability=".as_slice(), val, b"\n"].concat();
        let len = rec_body.len() + 3; // "NN " prefix, 2 digits
        let rec = [format!("{len} ").into_bytes(), rec_body].concat();
        assert_eq!(rec.len(), len);
        let pax = parse_pax(&rec).unwrap();
        assert_eq!(pax.xattrs["security.capability"], val);
    }

    #[test]
    fn pax_time() {
        assert_eq!(parse_pax_time(b"12.5").unwrap(), (12, 500_000_000));
        assert_eq!(parse_pax_time(b"-1.25").unwrap(), (-2, 750_000_000));
        assert_eq!(parse_pax_time(b"7").unwrap(), (7, 0));
        assert!(parse_pax_time(b"x").is_err());
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8]), Ok(Compression::Gzip));
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Ok(Compression::Zstd));
        assert_eq!(sniff(b"\xfd7zXZ\x00rest"), Err(Some("xz")));
        assert_eq!(sniff(b"BZh91AY"), Err(Some("bzip2")));
        assert_eq!(sniff(b"hello"), Err(None));
        assert_eq!(sniff(&[0u8; 512]), Ok(Compression::None));
    }
}
