//! nullspace-digest: content digests (`algorithm:hex`), the one place a
//! digest string is validated.
//!
//! A digest taken from a manifest, an index or a user is hostile input: it is
//! parsed and validated here before it is ever compared, logged as trusted, or
//! turned into a path (`blobs/<alg>/<hex>`). Only the algorithms the OCI image
//! spec registers are accepted, with hex of exactly the right length.

pub mod sparse;

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256, Sha512};

/// A digest algorithm registered by the OCI image spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest. Construction guarantees a known algorithm and
/// lowercase hex of the algorithm's length, so `path_components` is safe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} is malformed: expected ALGORITHM:HEX")]
    Malformed(String),
    #[error("digest {0:?} uses an unsupported algorithm (sha256 and sha512 are accepted)")]
    UnsupportedAlgorithm(String),
    #[error("digest {0:?} is malformed: {1} needs {2} lowercase hex characters")]
    BadHex(String, &'static str, usize),
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(truncate(s)))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ if alg.is_empty() => return Err(DigestError::Malformed(truncate(s))),
            _ => return Err(DigestError::UnsupportedAlgorithm(truncate(s))),
        };
        let ok = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(DigestError::BadHex(
                truncate(s),
                algorithm.name(),
                algorithm.hex_len(),
            ));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(Sha256::digest(data)),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
    pub fn hex(&self) -> &str {
        &self.hex
    }
    /// `(algorithm, hex)`: safe path components, by construction.
    pub fn path_components(&self) -> (&'static str, &str) {
        (self.algorithm.name(), &self.hex)
    }
    /// The first bytes of the hash, for deriving reproducible identifiers.
    pub fn bytes32(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let raw = hex::decode(&self.hex).unwrap_or_default();
        let n = raw.len().min(32);
        out[..n].copy_from_slice(&raw[..n]);
        out
    }
    /// A short form for progress displays.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

// Error messages quote the offending string; keep hostile input from
// flooding a one-line error.
fn truncate(s: &str) -> String {
    if s.len() <= 80 {
        s.to_string()
    } else {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// An incremental hasher for either algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(alg: Algorithm) -> Hasher {
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

/// Wraps a blob stream and enforces its descriptor: the stream must produce
/// exactly `size` bytes whose digest is `expected`. A violation surfaces as
/// an `io::Error` wrapping [`VerifyError`] from the read that detects it
/// (no later than EOF), so a consumer never sees a "successful" end of a
/// blob that does not match.
pub struct VerifyingReader<R> {
    inner: R,
    expected: Digest,
    size: u64,
    read: u64,
    hasher: Option<Hasher>,
}

/// A blob did not match its descriptor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("digest mismatch: content hashes to {actual}")]
    DigestMismatch { actual: Digest },
    #[error("size mismatch: descriptor says {expected} bytes, content has {actual}")]
    SizeShort { expected: u64, actual: u64 },
    #[error("size mismatch: descriptor says {expected} bytes, content is longer")]
    SizeLong { expected: u64 },
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, size: u64) -> Self {
        let hasher = Some(Hasher::new(expected.algorithm()));
        VerifyingReader {
            inner,
            expected,
            size,
            read: 0,
            hasher,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.hasher.is_none() {
            return Ok(0);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        // Read at most one byte past the declared size: enough to notice an
        // over-long blob without buffering it.
        let remaining = self.size - self.read;
        let cap = (remaining.saturating_add(1)).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..cap])?;
        if n as u64 > remaining {
            self.hasher = None;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                VerifyError::SizeLong {
                    expected: self.size,
                },
            ));
        }
        if n == 0 {
            let hasher = self.hasher.take().expect("checked above");
            if self.read != self.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    VerifyError::SizeShort {
                        expected: self.size,
                        actual: self.read,
                    },
                ));
            }
            let actual = hasher.finish();
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    VerifyError::DigestMismatch { actual },
                ));
            }
            return Ok(0);
        }
        self.read += n as u64;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Checks an in-memory blob against its descriptor.
pub fn verify_bytes(data: &[u8], expected: &Digest, size: u64) -> Result<(), VerifyError> {
    if data.len() as u64 != size {
        return if (data.len() as u64) < size {
            Err(VerifyError::SizeShort {
                expected: size,
                actual: data.len() as u64,
            })
        } else {
            Err(VerifyError::SizeLong { expected: size })
        };
    }
    let mut h = Hasher::new(expected.algorithm());
    h.update(data);
    let actual = h.finish();
    if &actual != expected {
        return Err(VerifyError::DigestMismatch { actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_valid_digests() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.path_components().0, "sha256");
        assert_eq!(Digest::sha256_of(b""), d);
        let long = format!("sha512:{}", "a".repeat(128));
        assert!(Digest::parse(&long).is_ok());
    }

    #[test]
    fn rejects_malformed_digests_before_any_path_use() {
        for bad in [
            "",
            "sha256",
            ":abc",
            "sha256:../../../etc/passwd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "../sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn verifying_reader_enforces_digest_and_size() {
        let d = Digest::sha256_of(b"hello");
        let mut out = Vec::new();
        VerifyingReader::new(&b"hello"[..], d.clone(), 5)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"hello");

        let err = VerifyingReader::new(&b"hellO"[..], d.clone(), 5)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        let err = VerifyingReader::new(&b"hello!"[..], d.clone(), 5)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("longer"), "{err}");
        let err = VerifyingReader::new(&b"hell"[..], d.clone(), 5)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("4"), "{err}");
        assert!(verify_bytes(b"hello", &d, 5).is_ok());
        assert!(verify_bytes(b"hello", &d, 6).is_err());
    }
}
