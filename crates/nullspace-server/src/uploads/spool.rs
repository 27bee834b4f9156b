//! Part files on the host disk: a request body streamed to a temporary
//! file (one frame in memory at a time, hashed on the way), renamed to the
//! part's name once accepted; and a reader over the parts in order.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::UploadError;

pub(super) fn part_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(n.to_string())
}

/// A received part not yet committed; removed when dropped uncommitted.
pub(super) struct Staged {
    tmp: Option<PathBuf>,
    pub sha256: [u8; 32],
}

impl Staged {
    /// Moves it to `to` (the part's name).
    pub fn commit(mut self, to: &Path) -> Result<(), UploadError> {
        let tmp = self.tmp.take().expect("staged once");
        std::fs::rename(&tmp, to).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            UploadError::Spool {
                path: to.to_path_buf(),
                source,
            }
        })
    }

    pub fn discard(self) {}

    /// Keeps the file at its temporary name (the caller removes it).
    pub fn keep(mut self) -> PathBuf {
        self.tmp.take().expect("staged once")
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(t) = self.tmp.take() {
            let _ = std::fs::remove_file(t);
        }
    }
}

/// Streams `body` into a temporary file in `dir`: exactly `expected`
/// bytes (with `exact`) or at most that many, or refused (reading stops at
/// the first byte too many).
pub(super) async fn receive<S, B, E>(
    dir: &Path,
    id: &str,
    n: u32,
    expected: u64,
    exact: bool,
    mut body: S,
) -> Result<(Staged, u64), UploadError>
where
    S: futures_util::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let tmp = dir.join(format!("{n}.tmp-{:016x}", {
        use rand::Rng as _;
        rand::rng().random::<u64>()
    }));
    let spool = |source| UploadError::Spool {
        path: tmp.clone(),
        source,
    };
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                // The session's directory went (expired, aborted) meanwhile.
                UploadError::NotFound { id: id.to_string() }
            } else {
                spool(e)
            }
        })?;
    // From here the temporary file is removed on every early return.
    let mut staged = Staged {
        tmp: Some(tmp.clone()),
        sha256: [0; 32],
    };
    let mut hash = Sha256::new();
    let mut got = 0u64;
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| UploadError::Body {
            id: id.to_string(),
            part: n,
            message: e.to_string(),
        })?;
        let data = frame.as_ref();
        got += data.len() as u64;
        if got > expected {
            return Err(UploadError::PartSize {
                id: id.to_string(),
                part: n,
                expected,
                got: format!("more than {expected}"),
            });
        }
        hash.update(data);
        f.write_all(data).await.map_err(spool)?;
    }
    if exact && got != expected {
        return Err(UploadError::PartSize {
            id: id.to_string(),
            part: n,
            expected,
            got: got.to_string(),
        });
    }
    f.flush().await.map_err(spool)?;
    drop(f);
    staged.sha256 = hash.finalize().into();
    Ok((staged, got))
}

/// The parts of a session read as one stream, in order; seekable (the
/// archive passes skip file contents).
pub struct PartsReader {
    parts: Vec<(PathBuf, u64)>,
    /// Index of the open part and the file.
    cur: Option<(usize, std::fs::File)>,
    pos: u64,
    len: u64,
}

impl PartsReader {
    pub fn new(parts: Vec<(PathBuf, u64)>) -> PartsReader {
        let len = parts.iter().map(|p| p.1).sum();
        PartsReader {
            parts,
            cur: None,
            pos: 0,
            len,
        }
    }

    /// The part holding `pos` and the offset in it.
    fn locate(&self, pos: u64) -> Option<(usize, u64)> {
        let mut start = 0;
        for (i, (_, size)) in self.parts.iter().enumerate() {
            if pos < start + size {
                return Some((i, pos - start));
            }
            start += size;
        }
        None
    }
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() || self.pos >= self.len {
            return Ok(0);
        }
        let (i, off) = self.locate(self.pos).expect("pos < len");
        let (path, size) = &self.parts[i];
        let f = match &mut self.cur {
            Some((j, f)) if *j == i => f,
            cur => {
                let mut f = std::fs::File::open(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                })?;
                f.seek(SeekFrom::Start(off))?;
                &mut cur.insert((i, f)).1
            }
        };
        let want = buf.len().min((size - off) as usize);
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} is shorter than {size} bytes", path.display()),
            ));
        }
        self.pos += n as u64;
        if off + n as u64 == *size {
            self.cur = None;
        }
        Ok(n)
    }
}

impl Seek for PartsReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| std::io::Error::other("seek before the start of the upload"))?;
        if pos != self.pos {
            self.pos = pos;
            // Reopened (and positioned) at the next read.
            self.cur = None;
        }
        Ok(pos)
    }
}
