//! Delta memory: a QEMU migration stream with the RAM pages that equal a
//! base RAM image dropped.
//!
//! A restored VM maps its snapshot's RAM file private (copy-on-write), and
//! QEMU can leave RAM out of a migration stream only when it is a *shared*
//! file mapping (`x-ignore-shared`). So a snapshot of a restored VM gets a
//! full stream from QEMU, and this filter drops every page that is the same
//! in the base image. A restore maps the same base file private and loads
//! the filtered stream without `x-ignore-shared`: the pages in the stream
//! land in the VM's private copies, the others stay the base's. Since the
//! base is always the template's RAM file (a VM restored from a delta maps
//! that same file), pause → resume → pause never stacks deltas: each holds
//! at most what differs from the template.
//!
//! No crate parses QEMU's stream (it is QEMU's internal format, see
//! `migration/savevm.c` and `migration/ram.c`), so this reads exactly the
//! parts it must change: the header, the configuration section, and the
//! RAM sections' page records. Device sections (`FULL`) have no length, so
//! once the RAM's `END` section (or anything this reader does not know at
//! a section boundary) is reached, the rest is copied unchanged. Copying
//! is always correct: a restore of the unfiltered remainder only writes
//! pages the base already has. Inside a RAM section a record this reader
//! does not know is an error, not a copy: later records may name their
//! block by "the one before", which dropping pages has changed.

use super::migration::{stop_migration, wait_migration};
use crate::VmError;
use crate::process::Watch;
use crate::qmp::Qmp;
use serde_json::json;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why a stream could not be filtered.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("migration stream: {0}")]
    Io(#[from] io::Error),
    #[error("migration stream: {0}")]
    Format(String),
}

/// What the filter did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeltaStats {
    /// Page records read (data and zero pages, every block).
    pub pages_in: u64,
    /// Page records written.
    pub pages_out: u64,
    /// Bytes read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Whether the reader met a section it does not know before the RAM
    /// ended (everything from there was copied unchanged).
    pub copied_unknown: bool,
}

const MAGIC: u32 = 0x5145_564d; // "QEVM"
const VERSION: u32 = 3;

// Section types (savevm.c).
const EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const FOOTER: u8 = 0x7e;

// RAM record flags (ram.c), in the low bits of a page-aligned offset.
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MULTIFD_FLUSH: u64 = 0x200;
const KNOWN_FLAGS: u64 =
    FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE | FLAG_MULTIFD_FLUSH;

/// x86's target page (TARGET_PAGE_SIZE): the unit of RAM records.
pub const PAGE: usize = 4096;
const FLAG_MASK: u64 = PAGE as u64 - 1;

/// The RAM image pages are compared against, with where its file has data
/// (the rest are holes, zero): most of a guest's pages are zero, and a
/// zero page in a hole is dropped without touching the mapping.
pub struct Base<'a> {
    bytes: &'a [u8],
    /// Sorted, disjoint data extents (start, end); None: all data.
    data: Option<Vec<(u64, u64)>>,
}

static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

impl<'a> Base<'a> {
    /// `bytes` without hole information (every page compared).
    #[cfg(test)]
    pub fn whole(bytes: &'a [u8]) -> Base<'a> {
        Base { bytes, data: None }
    }

    /// `bytes` mapped from `file`, whose data extents are asked of the
    /// file system (SEEK_DATA/SEEK_HOLE).
    pub fn of_file(bytes: &'a [u8], file: &std::fs::File) -> io::Result<Base<'a>> {
        Ok(Base {
            bytes,
            data: Some(crate::snapshot::data_extents(file, bytes.len() as u64)?),
        })
    }

    /// Whether any byte of the page at `at` may be data.
    fn has_data(&self, at: u64) -> bool {
        let Some(d) = &self.data else { return true };
        let i = d.partition_point(|e| e.1 <= at);
        d.get(i).is_some_and(|e| e.0 < at + PAGE as u64)
    }
}

/// Filters the migration stream `input` into `out`, dropping the RAM
/// records of block `block` whose page equals the same page of `base` (a
/// zero page where `base` is zero, a data page with the same bytes). Pages
/// beyond `base`'s length, and other blocks' pages, are kept.
pub fn filter<R: Read, W: Write>(
    input: R,
    out: W,
    block: &str,
    base: &Base<'_>,
) -> Result<DeltaStats, DeltaError> {
    let mut f = Filter {
        r: Counting { inner: input, n: 0 },
        w: Counting { inner: out, n: 0 },
        block: block.as_bytes(),
        base,
        ram_section: None,
        read_block: None,
        stats: DeltaStats::default(),
        page: vec![0u8; PAGE],
    };
    f.run()?;
    f.w.flush()?;
    f.stats.bytes_in = f.r.n;
    f.stats.bytes_out = f.w.n;
    Ok(f.stats)
}

/// A reader or writer that counts the bytes through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Filter<'a, R, W> {
    r: Counting<R>,
    w: Counting<W>,
    block: &'a [u8],
    base: &'a Base<'a>,
    /// The RAM's section id, once its START was read.
    ram_section: Option<u32>,
    /// The block the last page record read was in: QEMU's CONTINUE refers
    /// to it across sections.
    read_block: Option<Vec<u8>>,
    stats: DeltaStats,
    page: Vec<u8>,
}

fn bad<T>(what: impl Into<String>) -> Result<T, DeltaError> {
    Err(DeltaError::Format(what.into()))
}

impl<R: Read, W: Write> Filter<'_, R, W> {
    fn u8(&mut self) -> Result<u8, DeltaError> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        Ok(b[0])
    }
    fn be16(&mut self) -> Result<u16, DeltaError> {
        let mut b = [0u8; 2];
        self.r.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    fn be32(&mut self) -> Result<u32, DeltaError> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn be64(&mut self) -> Result<u64, DeltaError> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    /// A length-prefixed (one byte) name.
    fn name(&mut self) -> Result<Vec<u8>, DeltaError> {
        let n = self.u8()? as usize;
        let mut v = vec![0u8; n];
        self.r.read_exact(&mut v)?;
        Ok(v)
    }
    fn put(&mut self, b: &[u8]) -> Result<(), DeltaError> {
        self.w.write_all(b)?;
        Ok(())
    }
    fn put_name(&mut self, n: &[u8]) -> Result<(), DeltaError> {
        self.put(&[n.len() as u8])?;
        self.put(n)
    }
    /// Copies `n` bytes through.
    fn copy(&mut self, n: u64) -> Result<(), DeltaError> {
        let got = io::copy(&mut (&mut self.r).take(n), &mut self.w)?;
        if got != n {
            return bad("truncated");
        }
        Ok(())
    }
    /// Copies everything left.
    fn copy_rest(&mut self) -> Result<(), DeltaError> {
        io::copy(&mut self.r, &mut self.w)?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), DeltaError> {
        let magic = self.be32()?;
        let version = self.be32()?;
        if magic != MAGIC || version != VERSION {
            return bad(format!(
                "not a QEMU migration stream of version {VERSION} (magic {magic:#x}, version {version})"
            ));
        }
        self.put(&magic.to_be_bytes())?;
        self.put(&version.to_be_bytes())?;
        // The byte after the configuration's last subsection is read to
        // find where it ends: it is the next section's type.
        let mut next: Option<u8> = None;
        loop {
            let t = match next.take() {
                Some(t) => t,
                None => self.u8()?,
            };
            self.put(&[t])?;
            match t {
                CONFIGURATION => match self.configuration()? {
                    Some(t) => next = Some(t),
                    None => {
                        self.stats.copied_unknown = true;
                        return self.copy_rest();
                    }
                },
                SECTION_START => {
                    let id = self.be32()?;
                    let idstr = self.name()?;
                    let instance = self.be32()?;
                    let version = self.be32()?;
                    self.put(&id.to_be_bytes())?;
                    self.put_name(&idstr)?;
                    self.put(&instance.to_be_bytes())?;
                    self.put(&version.to_be_bytes())?;
                    if idstr != b"ram" || self.ram_section.is_some() {
                        self.stats.copied_unknown = true;
                        return self.copy_rest();
                    }
                    self.ram_section = Some(id);
                    self.ram_setup()?;
                    self.ram_records()?;
                    self.footer(id)?;
                }
                SECTION_PART | SECTION_END => {
                    let id = self.be32()?;
                    self.put(&id.to_be_bytes())?;
                    if Some(id) != self.ram_section {
                        self.stats.copied_unknown = true;
                        return self.copy_rest();
                    }
                    self.ram_records()?;
                    self.footer(id)?;
                    if t == SECTION_END {
                        // Device state and the end follow: unchanged.
                        return self.copy_rest();
                    }
                }
                COMMAND => {
                    let cmd = self.be16()?;
                    let len = self.be16()?;
                    self.put(&cmd.to_be_bytes())?;
                    self.put(&len.to_be_bytes())?;
                    self.copy(len as u64)?;
                }
                EOF => return self.copy_rest(),
                _ => {
                    // A device section before the RAM ended (or a section
                    // a later QEMU added): it has no length, so the rest
                    // goes through as it is.
                    self.stats.copied_unknown = true;
                    return self.copy_rest();
                }
            }
        }
    }

    /// The configuration section (the machine type and the subsections
    /// QEMU 10 may add). Returns the type byte of the section after it, or
    /// None at a subsection it does not know (its tag, name and version
    /// copied; the caller copies the rest).
    fn configuration(&mut self) -> Result<Option<u8>, DeltaError> {
        let len = self.be32()?;
        if len > 256 {
            return bad(format!("machine type name of {len} bytes"));
        }
        self.put(&len.to_be_bytes())?;
        self.copy(len as u64)?;
        loop {
            let t = self.u8()?;
            if t != SUBSECTION {
                return Ok(Some(t));
            }
            self.put(&[t])?;
            let name = self.name()?;
            let version = self.be32()?;
            self.put_name(&name)?;
            self.put(&version.to_be_bytes())?;
            match name.as_slice() {
                b"configuration/target-page-bits" => self.copy(4)?,
                b"configuration/uuid" => self.copy(16)?,
                b"configuration/capabilities" => {
                    let n = self.be32()?;
                    if n > 1024 {
                        return bad(format!("{n} capabilities in the configuration"));
                    }
                    self.put(&n.to_be_bytes())?;
                    for _ in 0..n {
                        let c = self.name()?;
                        self.put_name(&c)?;
                    }
                }
                _ => return Ok(None),
            }
        }
    }

    /// The RAM section's setup: the total size, then each block's name and
    /// used length until they add up to it.
    fn ram_setup(&mut self) -> Result<(), DeltaError> {
        let v = self.be64()?;
        if v & FLAG_MEM_SIZE == 0 {
            return bad(format!("RAM setup without its size (record {v:#x})"));
        }
        self.put(&v.to_be_bytes())?;
        let mut left = v & !FLAG_MASK;
        let mut blocks = 0;
        while left > 0 {
            blocks += 1;
            if blocks > 4096 {
                return bad("more than 4096 RAM blocks");
            }
            let name = self.name()?;
            let used = self.be64()?;
            self.put_name(&name)?;
            self.put(&used.to_be_bytes())?;
            left = left.checked_sub(used).ok_or_else(|| {
                DeltaError::Format(format!(
                    "RAM block {:?} of {used} bytes is beyond the total",
                    String::from_utf8_lossy(&name)
                ))
            })?;
        }
        Ok(())
    }

    /// A section's footer, when QEMU sends one (its tag then the id).
    fn footer(&mut self, id: u32) -> Result<(), DeltaError> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        if b[0] != FOOTER {
            // No footers in this stream: the byte is the next section's
            // type; only a part or end of the RAM can follow here.
            return bad(format!(
                "RAM section {id} not followed by a footer (byte {:#x})",
                b[0]
            ));
        }
        let got = self.be32()?;
        if got != id {
            return bad(format!("footer of section {got} ends section {id}"));
        }
        self.put(&b)?;
        self.put(&got.to_be_bytes())
    }

    /// Page records up to the end-of-section record. The first kept page
    /// of each section names its block (CONTINUE is recomputed from what
    /// was written, not what was read).
    fn ram_records(&mut self) -> Result<(), DeltaError> {
        let mut written_block: Option<Vec<u8>> = None;
        loop {
            let v = self.be64()?;
            let flags = v & FLAG_MASK;
            if flags & !KNOWN_FLAGS != 0 {
                return bad(format!("RAM record flags {flags:#x} not supported"));
            }
            if flags & FLAG_EOS != 0 {
                self.put(&v.to_be_bytes())?;
                return Ok(());
            }
            if flags & FLAG_MULTIFD_FLUSH != 0 && flags & (FLAG_ZERO | FLAG_PAGE) == 0 {
                self.put(&v.to_be_bytes())?;
                continue;
            }
            let zero = flags & FLAG_ZERO != 0;
            if zero == (flags & FLAG_PAGE != 0) {
                return bad(format!("RAM record flags {flags:#x}"));
            }
            if flags & FLAG_CONTINUE == 0 {
                self.read_block = Some(self.name()?);
            }
            let Some(blk) = self.read_block.clone() else {
                return bad("a RAM page continues a block never named");
            };
            let fill = if zero {
                Some(self.u8()?)
            } else {
                let mut p = std::mem::take(&mut self.page);
                let r = self.r.read_exact(&mut p);
                self.page = p;
                r?;
                None
            };
            self.stats.pages_in += 1;
            let addr = v & !FLAG_MASK;
            if blk == self.block && self.same_as_base(addr, fill) {
                continue;
            }
            self.stats.pages_out += 1;
            let cont = written_block.as_deref() == Some(blk.as_slice());
            let flags = (flags & !FLAG_CONTINUE) | if cont { FLAG_CONTINUE } else { 0 };
            self.put(&(addr | flags).to_be_bytes())?;
            if !cont {
                self.put_name(&blk)?;
                written_block = Some(blk);
            }
            match fill {
                Some(b) => self.put(&[b])?,
                None => {
                    let p = std::mem::take(&mut self.page);
                    let r = self.put(&p);
                    self.page = p;
                    r?;
                }
            }
        }
    }

    /// Whether the page at `addr` (a zero page filled with `fill`, or the
    /// data just read) equals the base's page there.
    fn same_as_base(&self, addr: u64, fill: Option<u8>) -> bool {
        let Some(end) = addr.checked_add(PAGE as u64) else {
            return false;
        };
        if end > self.base.bytes.len() as u64 {
            return false;
        }
        if !self.base.has_data(addr) {
            // A hole: zero.
            return match fill {
                Some(c) => c == 0,
                None => self.page.as_slice() == ZERO_PAGE,
            };
        }
        let b = &self.base.bytes[addr as usize..end as usize];
        match fill {
            Some(0) => b == ZERO_PAGE,
            Some(c) => b.iter().all(|&x| x == c),
            None => b == self.page.as_slice(),
        }
    }
}

/// Migrates the stopped VM behind `q` through [`filter`] into `out` (a new
/// file), against the RAM image `base` of block `block`. QEMU writes to a
/// Unix socket this side reads, so the full stream is never stored. On
/// failure the migration is cancelled and `out` may be left for the
/// caller's directory guard.
pub(super) fn migrate(
    q: &mut Qmp,
    block: &str,
    base: &Path,
    out: &Path,
    watch: &Watch,
    limit: Duration,
) -> Result<DeltaStats, VmError> {
    let file = std::fs::File::open(base).map_err(VmError::io(base.display().to_string()))?;
    // SAFETY: the base is a committed, read-only snapshot file (0444, never
    // written again: a change would fail its sha256 at the next restore);
    // the mapping is read-only and private to this call.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(VmError::io(format!("map {}", base.display())))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    let holes = Base::of_file(&map, &file)
        .map_err(VmError::io(format!("extents of {}", base.display())))?;
    let sink = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(VmError::io(out.display().to_string()))?;
    // A short path (sun_path is 108 bytes) in a directory only we can enter.
    let dir = tempfile::Builder::new()
        .prefix("ns-delta-")
        .tempdir()
        .map_err(VmError::io("socket directory"))?;
    let sock = dir.path().join("m");
    let listener = UnixListener::bind(&sock).map_err(VmError::io(sock.display().to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(VmError::io("socket"))?;
    let give_up = AtomicBool::new(false);
    let deadline = Instant::now() + limit;
    // Scoped: the reader borrows the mapping and ends before it is unmapped.
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| -> Result<DeltaStats, VmError> {
            let conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if give_up.load(Ordering::Relaxed) || Instant::now() > deadline {
                            return Err(VmError::Snapshot("QEMU never connected".into()));
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(VmError::io("accept")(e)),
                }
            };
            conn.set_nonblocking(false).map_err(VmError::io("socket"))?;
            // A QEMU that stalls must not hold this thread past the deadline.
            conn.set_read_timeout(Some(limit))
                .map_err(VmError::io("socket"))?;
            let r = io::BufReader::with_capacity(1 << 20, conn);
            let mut w = io::BufWriter::with_capacity(1 << 20, sink);
            let stats = filter(r, &mut w, block, &holes)
                .map_err(|e| VmError::Snapshot(format!("writing the memory delta: {e}")))?;
            let sink = w
                .into_inner()
                .map_err(|e| VmError::io("write the memory delta")(e.into_error()))?;
            sink.sync_all()
                .map_err(VmError::io("sync the memory delta"))?;
            Ok(stats)
        });
        let channel = json!([{"channel-type": "main",
            "addr": {"transport": "socket", "type": "unix", "path": sock}}]);
        let migrated = q
            .execute("migrate", json!({"channels": channel}))
            .and_then(|_| wait_migration(q, watch, limit));
        if migrated.is_err() {
            stop_migration(q);
            give_up.store(true, Ordering::Relaxed);
        }
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(VmError::Snapshot("the delta writer panicked".into())));
        match (migrated, read) {
            (Ok(()), Ok(stats)) => Ok(stats),
            // A cancel truncates the stream: that, not the reader, is the
            // cause.
            (Err(VmError::Cancelled), _) => Err(VmError::Cancelled),
            // Otherwise a reader that stopped is why QEMU's writes failed.
            (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a stream the way QEMU lays one out (header, configuration,
    /// RAM start/part/end with footers, a device section, EOF), from
    /// records given as (block, page index, Some(data) | None = zero).
    /// (bytes, the block of the last page record: CONTINUE carries across
    /// sections, as QEMU's does.)
    struct Stream(Vec<u8>, Option<String>);

    impl Stream {
        fn new() -> Stream {
            let mut s = Stream(Vec::new(), None);
            s.0.extend(MAGIC.to_be_bytes());
            s.0.extend(VERSION.to_be_bytes());
            s.0.push(CONFIGURATION);
            s.0.extend(7u32.to_be_bytes());
            s.0.extend(b"microvm");
            s
        }
        fn name(&mut self, n: &str) {
            self.0.push(n.len() as u8);
            self.0.extend(n.as_bytes());
        }
        fn start(&mut self, blocks: &[(&str, u64)]) {
            self.0.push(SECTION_START);
            self.0.extend(2u32.to_be_bytes());
            self.name("ram");
            self.0.extend(0u32.to_be_bytes());
            self.0.extend(4u32.to_be_bytes());
            let total: u64 = blocks.iter().map(|b| b.1).sum();
            self.0.extend((total | FLAG_MEM_SIZE).to_be_bytes());
            for (n, len) in blocks {
                self.name(n);
                self.0.extend(len.to_be_bytes());
            }
            self.eos();
        }
        fn eos(&mut self) {
            self.0.extend(FLAG_EOS.to_be_bytes());
            self.0.push(FOOTER);
            self.0.extend(2u32.to_be_bytes());
        }
        fn pages(&mut self, t: u8, recs: &[(&str, u64, Option<u8>)]) {
            self.0.push(t);
            self.0.extend(2u32.to_be_bytes());
            for (blk, idx, data) in recs {
                let cont = self.1.as_deref() == Some(*blk);
                let mut v = idx * PAGE as u64;
                v |= if data.is_some() { FLAG_PAGE } else { FLAG_ZERO };
                if cont {
                    v |= FLAG_CONTINUE;
                }
                self.0.extend(v.to_be_bytes());
                if !cont {
                    self.name(blk);
                }
                match data {
                    Some(b) => self.0.extend(vec![*b; PAGE]),
                    None => self.0.push(0),
                }
                self.1 = Some(blk.to_string());
            }
            self.eos();
        }
        fn devices(&mut self) {
            // A FULL section with opaque content, then EOF.
            self.0.push(0x04);
            self.0.extend(3u32.to_be_bytes());
            self.name("timer");
            self.0
                .extend([0, 0, 0, 0, 0, 0, 0, 2, 0xde, 0xad, 0xbe, 0xef]);
            self.0.push(FOOTER);
            self.0.extend(3u32.to_be_bytes());
            self.0.push(EOF);
        }
    }

    /// Applies a stream's RAM records to `ram` (of block "mem0") as a
    /// loader would, checking block names and CONTINUE; returns the bytes
    /// after the RAM's END.
    fn load(stream: &[u8], ram: &mut [u8]) -> Vec<u8> {
        let mut out = Vec::new();
        // Re-filtering with an empty base keeps every record: reuse the
        // reader by collecting what a loader writes through a tiny parser.
        let mut i = 8 + 1 + 4 + 7;
        let be64 = |s: &[u8], i: usize| u64::from_be_bytes(s[i..i + 8].try_into().unwrap());
        let mut current: Option<String> = None;
        loop {
            let t = stream[i];
            i += 1;
            match t {
                SECTION_START => {
                    i += 4;
                    let n = stream[i] as usize;
                    i += 1 + n + 8;
                    let total = be64(stream, i) & !FLAG_MASK;
                    i += 8;
                    let mut left = total;
                    while left > 0 {
                        let n = stream[i] as usize;
                        i += 1 + n;
                        left -= be64(stream, i);
                        i += 8;
                    }
                }
                SECTION_PART | SECTION_END => i += 4,
                _ => {
                    out.extend(&stream[i - 1..]);
                    return out;
                }
            }
            loop {
                let v = be64(stream, i);
                i += 8;
                if v & FLAG_EOS != 0 {
                    break;
                }
                if v & FLAG_CONTINUE == 0 {
                    let n = stream[i] as usize;
                    current = Some(String::from_utf8(stream[i + 1..i + 1 + n].to_vec()).unwrap());
                    i += 1 + n;
                }
                let at = (v & !FLAG_MASK) as usize;
                let blk = current.clone().expect("a named block");
                if v & FLAG_ZERO != 0 {
                    if blk == "mem0" {
                        ram[at..at + PAGE].fill(stream[i]);
                    }
                    i += 1;
                } else {
                    if blk == "mem0" {
                        ram[at..at + PAGE].copy_from_slice(&stream[i..i + PAGE]);
                    }
                    i += PAGE;
                }
            }
            assert_eq!(stream[i], FOOTER);
            i += 5;
        }
    }

    #[test]
    fn pages_equal_to_the_base_are_dropped_and_a_load_gives_the_same_memory() {
        let pages = 8;
        let mut base = vec![0u8; pages * PAGE];
        for p in 0..4 {
            base[p * PAGE..(p + 1) * PAGE].fill(p as u8 + 1);
        }
        // The VM's memory: pages 0,1 as in the base, page 2 changed, page 3
        // zeroed, page 4 written (zero in the base), 5..8 zero like the base.
        let mut s = Stream::new();
        s.start(&[("mem0", (pages * PAGE) as u64), ("rom", PAGE as u64)]);
        s.pages(
            SECTION_PART,
            &[
                ("mem0", 0, Some(1)),
                ("mem0", 1, Some(2)),
                ("mem0", 2, Some(9)),
                ("rom", 0, Some(7)),
                ("mem0", 3, None),
                ("mem0", 4, Some(5)),
                ("mem0", 5, None),
            ],
        );
        s.pages(SECTION_END, &[("mem0", 6, None), ("mem0", 7, None)]);
        s.devices();
        let mut out = Vec::new();
        let st = filter(s.0.as_slice(), &mut out, "mem0", &Base::whole(&base)).unwrap();
        assert_eq!(st.pages_in, 9);
        // Kept: mem0 2, rom 0, mem0 3, mem0 4.
        assert_eq!(st.pages_out, 4);
        assert_eq!(st.bytes_in, s.0.len() as u64);
        assert_eq!(st.bytes_out, out.len() as u64);
        assert!(out.len() < s.0.len() - 2 * PAGE, "two data pages dropped");
        let mut full = base.clone();
        let tail_full = load(&s.0, &mut full);
        let mut delta = base.clone();
        let tail_delta = load(&out, &mut delta);
        assert_eq!(full, delta, "loading the delta over the base = loading all");
        assert_eq!(tail_full, tail_delta, "device state copied unchanged");
        assert_eq!(delta[2 * PAGE], 9);
        assert_eq!(delta[3 * PAGE], 0);
        assert_eq!(delta[4 * PAGE], 5);
    }

    #[test]
    fn a_sparse_base_file_gives_the_same_delta_as_its_bytes() {
        use std::io::{Seek, SeekFrom};
        let pages = 16u64;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.ram");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(pages * PAGE as u64).unwrap();
        // Data at pages 1 and 2 (page 2 written as zeros: data, not a hole).
        f.seek(SeekFrom::Start(PAGE as u64)).unwrap();
        f.write_all(&[0x11; PAGE]).unwrap();
        f.write_all(&[0; PAGE]).unwrap();
        f.sync_all().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let sparse = Base::of_file(&bytes, &f).unwrap();
        assert!(sparse.has_data(PAGE as u64));
        assert!(!sparse.has_data(9 * PAGE as u64), "a hole");
        let mut s = Stream::new();
        s.start(&[("mem0", pages * PAGE as u64)]);
        s.pages(
            SECTION_END,
            &[
                ("mem0", 0, None),
                ("mem0", 1, Some(0x11)),
                ("mem0", 2, None),
                ("mem0", 3, Some(0x22)),
                ("mem0", 9, None),
                ("mem0", 10, Some(0)),
                ("mem0", 1, None),
            ],
        );
        s.devices();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let sa = filter(s.0.as_slice(), &mut a, "mem0", &sparse).unwrap();
        let sb = filter(s.0.as_slice(), &mut b, "mem0", &Base::whole(&bytes)).unwrap();
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        // Kept: page 3 (new data) and page 1 zeroed.
        assert_eq!(sa.pages_out, 2);
    }

    #[test]
    fn an_empty_base_keeps_everything_and_a_bad_stream_is_an_error() {
        let mut s = Stream::new();
        s.start(&[("mem0", 2 * PAGE as u64)]);
        s.pages(SECTION_END, &[("mem0", 0, Some(3)), ("mem0", 1, None)]);
        s.devices();
        let mut out = Vec::new();
        let st = filter(s.0.as_slice(), &mut out, "mem0", &Base::whole(&[])).unwrap();
        assert_eq!(st.pages_out, 2);
        assert_eq!(out, s.0, "nothing dropped: the same bytes");

        let e = filter(
            &b"not a stream at all"[..],
            Vec::new(),
            "mem0",
            &Base::whole(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a QEMU migration stream"), "{e}");
        // Cut inside a page: an error, not a short success.
        let cut = &s.0[..s.0.len() - 40 - PAGE / 2];
        assert!(filter(cut, Vec::new(), "mem0", &Base::whole(&[])).is_err());
        // An unknown record flag inside the RAM is refused.
        let mut odd = Stream::new();
        odd.start(&[("mem0", PAGE as u64)]);
        odd.0.push(SECTION_PART);
        odd.0.extend(2u32.to_be_bytes());
        odd.0.extend(0x40u64.to_be_bytes());
        let e = filter(odd.0.as_slice(), Vec::new(), "mem0", &Base::whole(&[])).unwrap_err();
        assert!(e.to_string().contains("0x40"), "{e}");
    }
}
