//! Sparse files: their data extents (SEEK_DATA/SEEK_HOLE) and the sha256
//! of their content, holes hashed as the zeros they read as without being
//! read. A guest RAM file is mostly holes, and reading a hole costs the
//! kernel a zeroed page-cache page per 4 KiB.
//!
//! The one place this rule lives: snapshots hash their files with it, and
//! artifacts (`nullspace_oci::artifact`) chunk files by it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// The data extents (start, end) of the first `len` bytes of `f`, in
/// order, as the file system reports them (SEEK_DATA/SEEK_HOLE); the rest
/// reads as zeros.
pub fn data_extents(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match seek(f, SeekFrom::Data(pos)) {
            Ok(p) => p,
            // Only a hole is left.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = seek(f, SeekFrom::Hole(start))?.min(len);
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// Feeds `n` zero bytes to `h`.
fn hash_zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Reads `buf.len()` bytes of `f` at `off`, holes as zeros without
/// reading them; `extents` are the file's data extents
/// ([`data_extents`]). Fails if the file is shorter than asked.
pub fn read_at_sparse(
    f: &File,
    extents: &[(u64, u64)],
    off: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    buf.fill(0);
    let end = off + buf.len() as u64;
    let first = extents.partition_point(|&(_, e)| e <= off);
    for &(s, e) in &extents[first..] {
        if s >= end {
            break;
        }
        let (a, b) = (s.max(off), e.min(end));
        f.read_exact_at(&mut buf[(a - off) as usize..(b - off) as usize], a)?;
    }
    Ok(())
}

/// The sha256 (lowercase hex) of a file's content. Holes are hashed as
/// the zeros they read as, without reading them.
pub fn sha256_file(p: &Path) -> io::Result<String> {
    let f = File::open(p)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    for (start, end) in data_extents(&f, len)? {
        hash_zeros(&mut h, start - pos);
        let mut off = start;
        while off < end {
            let want = ((end - off) as usize).min(buf.len());
            let n = f.read_at(&mut buf[..want], off)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while hashed", p.display()),
                ));
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
        pos = end;
    }
    hash_zeros(&mut h, len - pos);
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_cases(d: &Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![];
        for (i, (len, writes)) in [
            (0u64, vec![]),
            (10 << 20, vec![]),
            (10 << 20, vec![(0u64, 7usize)]),
            (10 << 20, vec![(3 << 20, 5000), (9 << 20, 1)]),
            ((10 << 20) + 3, vec![((10 << 20) - 2, 5)]),
        ]
        .into_iter()
        .enumerate()
        {
            let p = d.join(format!("f{i}"));
            let f = File::create(&p).unwrap();
            f.set_len(len).unwrap();
            for (off, n) in writes {
                f.write_all_at(&vec![0xa5; n], off).unwrap();
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn sha256_of_a_sparse_file_is_the_sha256_of_its_content() {
        let d = tempfile::tempdir().unwrap();
        for (i, p) in sparse_cases(d.path()).into_iter().enumerate() {
            let whole = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
            assert_eq!(sha256_file(&p).unwrap(), whole, "case {i}");
        }
    }

    #[test]
    fn sparse_reads_equal_plain_reads() {
        let d = tempfile::tempdir().unwrap();
        for (i, p) in sparse_cases(d.path()).into_iter().enumerate() {
            let whole = std::fs::read(&p).unwrap();
            let f = File::open(&p).unwrap();
            let ext = data_extents(&f, whole.len() as u64).unwrap();
            for (off, n) in [(0usize, whole.len()), (1 << 20, 3 << 20), (3 << 20, 4097)] {
                if off + n > whole.len() {
                    continue;
                }
                let mut buf = vec![0xffu8; n];
                read_at_sparse(&f, &ext, off as u64, &mut buf).unwrap();
                assert!(buf == whole[off..off + n], "case {i} at {off}+{n}");
            }
        }
    }
}
