//! The server's two SSH keys, made on first start and kept under
//! `DATA_DIR/ssh/`: the certificate authority (`ca_ed25519`) that signs
//! access certificates, and the host key (`host_ed25519`) the endpoint
//! proves itself with. Both are ed25519 in OpenSSH's format, 0600, in a
//! 0700 directory; the CA's public half is beside it (`ca_ed25519.pub`).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey};

/// Why a key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("SSH key {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("SSH key {} is not an OpenSSH private key without a passphrase: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("SSH key {} must be ed25519, not {algorithm}", path.display())]
    Algorithm { path: PathBuf, algorithm: String },
    #[error("SSH key {} is readable by others (mode {mode:o}); it must be 0600", path.display())]
    Exposed { path: PathBuf, mode: u32 },
}

/// The CA and the host key.
pub struct ServerKeys {
    pub ca: PrivateKey,
    pub host: PrivateKey,
}

impl ServerKeys {
    /// Reads both keys from `DATA_DIR/ssh`, making what is missing.
    pub fn open(data_dir: &Path) -> Result<ServerKeys, KeyError> {
        let dir = data_dir.join("ssh");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let ca = load_or_create(&dir.join("ca_ed25519"), "nullspace-ssh-ca")?;
        let pub_path = dir.join("ca_ed25519.pub");
        let line = ca.public_key().to_openssh().map_err(|e| KeyError::Format {
            path: pub_path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&pub_path, format!("{line}\n")).map_err(io(&pub_path))?;
        let host = load_or_create(&dir.join("host_ed25519"), "nullspace-ssh-host")?;
        Ok(ServerKeys { ca, host })
    }

    /// The host key's public half as a known_hosts entry takes it
    /// (`ssh-ed25519 AAAA…`).
    pub fn host_public(&self) -> String {
        public_line(&self.host)
    }

    /// The CA's public half (`ssh-ed25519 AAAA…`).
    pub fn ca_public(&self) -> String {
        public_line(&self.ca)
    }

    pub fn ca_fingerprint(&self) -> russh::keys::ssh_key::Fingerprint {
        self.ca.public_key().fingerprint(HashAlg::Sha256)
    }
}

fn public_line(k: &PrivateKey) -> String {
    // An ed25519 public key always encodes; no comment is carried.
    let mut p = k.public_key().clone();
    p.set_comment("");
    p.to_openssh().unwrap_or_default()
}

/// The key at `path`, or a new one written there (0600, created
/// exclusively: two servers starting at once cannot both write it).
fn load_or_create(path: &Path, comment: &str) -> Result<PrivateKey, KeyError> {
    match std::fs::read(path) {
        Ok(bytes) => return read_key(path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(KeyError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A name of this process's own: a server starting beside it writes its own.
    let tmp = path.with_extension(format!(
        "tmp.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        // A hard link fails if another server made the key first: read theirs.
        .and_then(|()| std::fs::hard_link(&tmp, path));
    match written {
        Ok(()) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::info!(path = %path.display(), "made a new SSH key");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            let bytes = std::fs::read(path).map_err(io)?;
            read_key(path, &bytes)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io(e))
        }
    }
}

fn read_key(path: &Path, bytes: &[u8]) -> Result<PrivateKey, KeyError> {
    let mode = std::fs::metadata(path)
        .map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let key = PrivateKey::from_openssh(bytes).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(KeyError::Format {
            path: path.to_path_buf(),
            reason: "it is encrypted".into(),
        });
    }
    if key.algorithm() != russh::keys::Algorithm::Ed25519 {
        return Err(KeyError::Algorithm {
            path: path.to_path_buf(),
            algorithm: key.algorithm().to_string(),
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_private_and_reread() {
        let tmp = tempfile::tempdir().unwrap();
        let a = ServerKeys::open(tmp.path()).unwrap();
        let ca = tmp.path().join("ssh/ca_ed25519");
        let mode = std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = ServerKeys::open(tmp.path()).unwrap();
        assert_eq!(a.ca_public(), b.ca_public());
        assert_eq!(a.host_public(), b.host_public());
        assert_ne!(a.ca_public(), a.host_public());
        assert!(a.host_public().starts_with("ssh-ed25519 "));
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ServerKeys::open(tmp.path()).err().unwrap();
        assert!(matches!(e, KeyError::Exposed { .. }), "{e}");
    }
}
