//! Signed, expiring file-transfer tokens: what `upload_url` /
//! `download_url` hand out so a plain `GET`/`PUT` without the API key can
//! move one file of one machine.
//!
//! A token is `base64url(claims JSON) "." base64url(HMAC-SHA256(claims))`
//! with a per-server secret. The claims name the method, machine id,
//! namespace, guest path, guest user and expiry; the MAC covers the exact
//! claim bytes sent, so nothing is parsed before the MAC checks out
//! (compared in constant time by `hmac`).
//!
//! The secret is 32 random bytes in `DATA_DIR/signing.key`, mode 0600,
//! created once (written to a temporary file and hard-linked into place, so
//! two servers starting at once agree on one key). Deleting the file
//! invalidates every URL handed out.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// File name of the secret in the data directory.
pub const KEY_FILE: &str = "signing.key";
const KEY_LEN: usize = 32;
/// Longest token looked at (claims are a path of at most 4096 bytes and
/// short fields; anything longer is not ours).
const TOKEN_MAX: usize = 16 << 10;
/// Longest lifetime a grant may ask for.
pub const TTL_MAX: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum SignedUrlError {
    #[error("signing key {}: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key {} is accessible to group or others (mode {mode:o}); it must be 0600", path.display())]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("signing key {} holds {len} bytes, not {KEY_LEN}", path.display())]
    KeyLength { path: PathBuf, len: u64 },
    #[error("signed URL token is malformed: {0}")]
    Malformed(&'static str),
    #[error("signed URL signature does not match (tampered, or signed by another server key)")]
    BadSignature,
    #[error("signed URL expired at {expired} (unix seconds); ask for a new one")]
    Expired { expired: u64 },
    #[error("signed URL is for machine {granted}, not {asked}")]
    WrongMachine { granted: String, asked: String },
    #[error("signed URL allows {granted}, not {asked}")]
    WrongMethod { granted: Method, asked: Method },
    #[error("signed URL lifetime {0:?} is outside 1 s to 24 h")]
    Lifetime(Duration),
}

/// What a grant lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// Download the file.
    #[serde(rename = "GET")]
    Get,
    /// Upload (replace) the file.
    #[serde(rename = "PUT")]
    Put,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        })
    }
}

/// The claims of one token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    #[serde(rename = "m")]
    pub method: Method,
    #[serde(rename = "id")]
    pub machine: String,
    #[serde(rename = "ns")]
    pub namespace: String,
    #[serde(rename = "p")]
    pub path: String,
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Unix seconds after which the token is refused.
    #[serde(rename = "exp")]
    pub expires: u64,
}

/// The server's signing secret.
#[derive(Clone)]
pub struct SigningKey([u8; KEY_LEN]);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl SigningKey {
    /// Reads `DATA_DIR/signing.key`, creating it the first time.
    pub fn open(data_dir: &Path) -> Result<SigningKey, SignedUrlError> {
        let path = data_dir.join(KEY_FILE);
        let err = |source| SignedUrlError::Key {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::create(&path).map_err(err)?
            }
            Err(e) => return Err(err(e)),
        }
        let meta = std::fs::symlink_metadata(&path).map_err(err)?;
        if !meta.file_type().is_file() {
            return Err(err(std::io::Error::other("not a regular file")));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SignedUrlError::KeyMode { path, mode });
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(SignedUrlError::KeyLength {
                path,
                len: meta.len(),
            });
        }
        let bytes = std::fs::read(&path).map_err(err)?;
        let key: [u8; KEY_LEN] =
            bytes
                .try_into()
                .map_err(|b: Vec<u8>| SignedUrlError::KeyLength {
                    path: path.clone(),
                    len: b.len() as u64,
                })?;
        Ok(SigningKey(key))
    }

    /// Writes a fresh key next to `path` and links it into place; a key
    /// that appeared meanwhile (another server) wins.
    fn create(path: &Path) -> std::io::Result<()> {
        use rand::RngCore as _;
        let mut key = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut key);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()
        })();
        let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        });
        let _ = std::fs::remove_file(&tmp);
        linked
    }

    /// A key from given bytes (tests).
    pub fn from_bytes(key: [u8; KEY_LEN]) -> SigningKey {
        SigningKey(key)
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// A secret for `label` that only this key yields (E2B's per-sandbox
    /// `envdAccessToken`): stored nowhere, the same on every call.
    pub fn derive(&self, label: &str) -> String {
        let mut mac = self.mac();
        mac.update(label.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `token` is [`SigningKey::derive`]'s for `label`, in constant
    /// time.
    pub fn check_derived(&self, label: &str, token: &str) -> bool {
        let Ok(tag) = hex::decode(token) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(label.as_bytes());
        mac.verify_slice(&tag).is_ok()
    }

    /// A token for `grant`.
    pub fn sign(&self, grant: &Grant) -> String {
        self.seal(grant)
    }

    /// Any claims as a token: `base64url(JSON) "." base64url(MAC)`. Also
    /// what preview tokens are made of (`crate::machines::ports`).
    pub fn seal<T: serde::Serialize>(&self, claims: &T) -> String {
        let claims = serde_json::to_vec(claims).expect("claims serialise");
        let mut mac = self.mac();
        mac.update(&claims);
        let tag = mac.finalize().into_bytes();
        format!("{}.{}", B64.encode(&claims), B64.encode(tag))
    }

    /// A grant of `method` on `path` that expires `ttl` from `now`.
    #[allow(clippy::too_many_arguments)]
    pub fn grant(
        &self,
        method: Method,
        machine: &str,
        namespace: &str,
        path: &str,
        user: Option<&str>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Grant, String), SignedUrlError> {
        if ttl < Duration::from_secs(1) || ttl > TTL_MAX {
            return Err(SignedUrlError::Lifetime(ttl));
        }
        let g = Grant {
            method,
            machine: machine.to_string(),
            namespace: namespace.to_string(),
            path: path.to_string(),
            user: user.map(str::to_string),
            expires: unix(now + ttl),
        };
        let t = self.sign(&g);
        Ok((g, t))
    }

    /// The grant of `token` when its MAC is ours, it has not expired, and
    /// it is for `machine` and `method`.
    /// The claims of a token this key sealed: nothing is parsed before
    /// the MAC checks out. Expiry and scope are the caller's to check.
    pub fn unseal<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, SignedUrlError> {
        if token.len() > TOKEN_MAX {
            return Err(SignedUrlError::Malformed("longer than 16 KiB"));
        }
        let (claims, tag) = token.split_once('.').ok_or(SignedUrlError::Malformed(
            "no '.' between claims and signature",
        ))?;
        let claims = B64
            .decode(claims)
            .map_err(|_| SignedUrlError::Malformed("claims are not base64url"))?;
        let tag = B64
            .decode(tag)
            .map_err(|_| SignedUrlError::Malformed("signature is not base64url"))?;
        let mut mac = self.mac();
        mac.update(&claims);
        mac.verify_slice(&tag)
            .map_err(|_| SignedUrlError::BadSignature)?;
        // Ours from here on: a parse failure is a server bug, still refused.
        serde_json::from_slice(&claims)
            .map_err(|_| SignedUrlError::Malformed("claims do not parse"))
    }

    pub fn verify(
        &self,
        token: &str,
        method: Method,
        machine: &str,
        now: SystemTime,
    ) -> Result<Grant, SignedUrlError> {
        let g: Grant = self.unseal(token)?;
        if unix(now) >= g.expires {
            return Err(SignedUrlError::Expired { expired: g.expires });
        }
        if g.machine != machine {
            return Err(SignedUrlError::WrongMachine {
                granted: g.machine,
                asked: machine.to_string(),
            });
        }
        if g.method != method {
            return Err(SignedUrlError::WrongMethod {
                granted: g.method,
                asked: method,
            });
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes([7; KEY_LEN])
    }

    fn grant(k: &SigningKey, ttl: u64) -> String {
        k.grant(
            Method::Put,
            "m-1",
            "ns",
            "/workspace/a.txt",
            Some("user"),
            Duration::from_secs(ttl),
            SystemTime::now(),
        )
        .unwrap()
        .1
    }

    #[test]
    fn a_fresh_token_verifies_with_its_claims() {
        let k = key();
        let t = grant(&k, 60);
        let g = k.verify(&t, Method::Put, "m-1", SystemTime::now()).unwrap();
        assert_eq!(g.path, "/workspace/a.txt");
        assert_eq!(g.user.as_deref(), Some("user"));
        assert_eq!(g.namespace, "ns");
    }

    #[test]
    fn an_expired_token_is_refused() {
        let k = key();
        let t = grant(&k, 60);
        let later = SystemTime::now() + Duration::from_secs(61);
        let e = k.verify(&t, Method::Put, "m-1", later).unwrap_err();
        assert!(matches!(e, SignedUrlError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("expired"), "{e}");
    }

    #[test]
    fn tampered_claims_or_signature_are_refused() {
        let k = key();
        let t = grant(&k, 60);
        let (claims, tag) = t.split_once('.').unwrap();
        // Another path in the claims, the old signature.
        let mut c: serde_json::Value =
            serde_json::from_slice(&B64.decode(claims).unwrap()).unwrap();
        c["p"] = "/etc/shadow".into();
        let forged = format!("{}.{tag}", B64.encode(serde_json::to_vec(&c).unwrap()));
        let e = k
            .verify(&forged, Method::Put, "m-1", SystemTime::now())
            .unwrap_err();
        assert!(matches!(e, SignedUrlError::BadSignature), "{e}");
        // A later expiry, the old signature.
        c["p"] = "/workspace/a.txt".into();
        c["exp"] = (unix(SystemTime::now()) + 999_999).into();
        let forged = format!("{}.{tag}", B64.encode(serde_json::to_vec(&c).unwrap()));
        assert!(matches!(
            k.verify(&forged, Method::Put, "m-1", SystemTime::now()),
            Err(SignedUrlError::BadSignature)
        ));
        // One flipped signature character.
        let mut bad = t.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert!(
            k.verify(&bad, Method::Put, "m-1", SystemTime::now())
                .is_err()
        );
        // Another server's key.
        let other = SigningKey::from_bytes([8; KEY_LEN]);
        assert!(matches!(
            other.verify(&t, Method::Put, "m-1", SystemTime::now()),
            Err(SignedUrlError::BadSignature)
        ));
        // Garbage.
        for g in ["", "x", "a.b", "!!.!!"] {
            assert!(k.verify(g, Method::Put, "m-1", SystemTime::now()).is_err());
        }
    }

    #[test]
    fn a_token_works_only_for_its_machine_and_method() {
        let k = key();
        let t = grant(&k, 60);
        assert!(matches!(
            k.verify(&t, Method::Put, "m-2", SystemTime::now()),
            Err(SignedUrlError::WrongMachine { .. })
        ));
        assert!(matches!(
            k.verify(&t, Method::Get, "m-1", SystemTime::now()),
            Err(SignedUrlError::WrongMethod { .. })
        ));
    }

    #[test]
    fn lifetimes_are_bounded() {
        let k = key();
        for ttl in [Duration::ZERO, TTL_MAX + Duration::from_secs(1)] {
            assert!(matches!(
                k.grant(Method::Get, "m", "n", "/p", None, ttl, SystemTime::now()),
                Err(SignedUrlError::Lifetime(_))
            ));
        }
    }

    #[test]
    fn the_key_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = SigningKey::open(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = SigningKey::open(dir.path()).unwrap();
        assert_eq!(a.0, b.0, "a second open reads the same key");
        // A token of the first instance verifies with the second.
        let t = grant(&a, 60);
        b.verify(&t, Method::Put, "m-1", SystemTime::now()).unwrap();
        // No temporary files left.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_readable_or_short_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        SigningKey::open(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SigningKey::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, SignedUrlError::KeyMode { mode: 0o644, .. }),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            SigningKey::open(dir.path()),
            Err(SignedUrlError::KeyLength { len: 5, .. })
        ));
    }
}
