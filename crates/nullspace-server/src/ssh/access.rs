//! SSH access grants: what `POST …/ssh-access` mints and what a login
//! must match. A grant is an OpenSSH user certificate signed by this
//! server's CA for the caller's public key, with the machine id as its
//! one principal (the login name) and the access id as its key id, and
//! an access record kept here (machine, namespace, guest user, key,
//! expiry). A login is admitted only when the certificate and its record
//! agree: a certificate signed by the same CA for another machine or
//! another namespace is refused.
//!
//! Records live in memory, at most [`MAX_RECORDS`], and are dropped when
//! they expire: a server restart ends every grant (they are short-lived;
//! the client mints another).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Algorithm, Fingerprint};
use russh::keys::{Certificate, HashAlg, PrivateKey, PublicKey};

/// Lifetime of a certificate when the request names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
/// Longest lifetime a request may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(12 * 3600);
/// Grants kept at once (expired ones are dropped first).
pub const MAX_RECORDS: usize = 10_000;
/// Longest public key line accepted.
const MAX_KEY_LEN: usize = 8 << 10;
/// Certificates start this long before they are minted (clock skew).
const BACKDATE: u64 = 60;

/// Why a grant was not minted (each one line naming the rule).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("public_key is empty: send an OpenSSH public key line (ssh-ed25519 AAAA…)")]
    EmptyKey,
    #[error("public_key is {0} bytes; at most {MAX_KEY_LEN}")]
    KeyTooLong(usize),
    #[error("public_key is not an OpenSSH public key line (type base64 [comment]): {0}")]
    MalformedKey(String),
    #[error("public_key type {0} is not supported: use ssh-ed25519 or ecdsa-sha2-nistp256/384/521")]
    UnsupportedKey(String),
    #[error("user {0:?} is not a guest user name (1-32 of a-z A-Z 0-9 _ . -, not starting with -)")]
    BadUser(String),
    #[error("{0}")]
    BadTtl(String),
    #[error("{MAX_RECORDS} SSH grants are open on this server; retry when some expire")]
    Full,
    #[error("signing the certificate: {0}")]
    Sign(String),
}

/// What a caller asks for (already in the domain's terms).
#[derive(Debug, Clone)]
pub struct AccessRequest {
    pub public_key: String,
    /// The guest user commands run as (`None`: the template's user).
    pub user: Option<String>,
    pub ttl_seconds: Option<u64>,
    pub expires_in_minutes: Option<u64>,
}

/// One grant, as kept for logins.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub access_id: String,
    pub machine_id: String,
    pub namespace: String,
    pub user: Option<String>,
    pub key: Fingerprint,
    /// Unix seconds.
    pub expires_at: u64,
}

/// A minted grant: its record and the certificate (OpenSSH line).
#[derive(Debug, Clone)]
pub struct Grant {
    pub record: AccessRecord,
    pub certificate: String,
}

/// Why a login was refused (logged in one line; the client only sees an
/// authentication failure).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the certificate is not signed by this server's CA")]
    NotOurCa,
    #[error("the certificate is not a user certificate")]
    NotUserCert,
    #[error("the certificate is outside its validity window (valid {after}..{before}, now {now})")]
    Expired { after: u64, before: u64, now: u64 },
    #[error("the certificate's signature does not verify")]
    BadSignature,
    #[error("login {login:?} is not a principal of the certificate (it names {principals:?})")]
    Principal {
        login: String,
        principals: Vec<String>,
    },
    #[error("no SSH access {0:?} is open on this server (expired, or minted before a restart)")]
    NoRecord(String),
    #[error("access {access} is for machine {granted}, not {login}")]
    OtherMachine {
        access: String,
        granted: String,
        login: String,
    },
    #[error("access {0} was granted to another key")]
    OtherKey(String),
    #[error("access {0} has expired")]
    RecordExpired(String),
    #[error("access {access} is for namespace {granted}; machine {machine} is not in it")]
    OtherNamespace {
        access: String,
        granted: String,
        machine: String,
    },
    #[error("machine {id} cannot take a login: {why}")]
    Machine { id: String, why: String },
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The public key a request carries, checked: one line, a supported type.
pub fn parse_public_key(line: &str) -> Result<PublicKey, AccessError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(AccessError::EmptyKey);
    }
    if line.len() > MAX_KEY_LEN {
        return Err(AccessError::KeyTooLong(line.len()));
    }
    if line.contains('\n') || line.contains('\r') {
        return Err(AccessError::MalformedKey("it spans several lines".into()));
    }
    // The type word first: a known type this server does not take is named
    // as such, whatever the rest of the line holds.
    let kind = line.split_ascii_whitespace().next().unwrap_or_default();
    if !(kind == "ssh-ed25519" || kind.starts_with("ecdsa-sha2-nistp")) {
        return Err(
            if kind.len() <= 64 && kind.bytes().all(|b| b.is_ascii_graphic()) && kind.contains('-')
            {
                AccessError::UnsupportedKey(kind.to_string())
            } else {
                AccessError::MalformedKey("it does not start with a key type".into())
            },
        );
    }
    let key =
        PublicKey::from_openssh(line).map_err(|e| AccessError::MalformedKey(e.to_string()))?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => Ok(key),
        other => Err(AccessError::UnsupportedKey(other.to_string())),
    }
}

/// A guest user name: what `useradd` accepts, bounded.
pub fn check_user(u: &str) -> Result<(), AccessError> {
    let ok = !u.is_empty()
        && u.len() <= 32
        && !u.starts_with('-')
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AccessError::BadUser(u.chars().take(64).collect()))
    }
}

/// The lifetime a request asks for, bounded.
pub fn ttl(r: &AccessRequest) -> Result<Duration, AccessError> {
    let from_minutes = r.expires_in_minutes.map(|m| m.saturating_mul(60));
    let secs = match (r.ttl_seconds, from_minutes) {
        (Some(s), Some(m)) if s != m => {
            return Err(AccessError::BadTtl(format!(
                "ttl_seconds ({s}) and expires_in_minutes ({}) disagree; send one",
                m / 60
            )));
        }
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => return Ok(DEFAULT_TTL),
    };
    if secs == 0 {
        return Err(AccessError::BadTtl(
            "the certificate lifetime must be more than 0".into(),
        ));
    }
    if secs > MAX_TTL.as_secs() {
        return Err(AccessError::BadTtl(format!(
            "the certificate lifetime is {secs} s; at most {} s ({} minutes)",
            MAX_TTL.as_secs(),
            MAX_TTL.as_secs() / 60
        )));
    }
    Ok(Duration::from_secs(secs))
}

/// The open grants, by access id.
#[derive(Default)]
pub struct Registry {
    records: Mutex<HashMap<String, AccessRecord>>,
}

impl Registry {
    /// Signs a certificate for `req` to log into `machine_id` (owned by
    /// `namespace`) and records the grant.
    pub fn mint(
        &self,
        ca: &PrivateKey,
        machine_id: &str,
        namespace: &str,
        req: &AccessRequest,
    ) -> Result<Grant, AccessError> {
        let key = parse_public_key(&req.public_key)?;
        if let Some(u) = &req.user {
            check_user(u)?;
        }
        let ttl = ttl(req)?;
        let now = now_secs();
        let expires_at = now + ttl.as_secs();
        let access_id = nullspace_store::new_id("ssh_");
        let nonce: [u8; 32] = rand::random();
        let sign = |e: russh::keys::ssh_key::Error| AccessError::Sign(e.to_string());
        let mut b = Builder::new(
            nonce.to_vec(),
            key.key_data().clone(),
            now.saturating_sub(BACKDATE),
            expires_at,
        )
        .map_err(sign)?;
        b.serial(rand::random()).map_err(sign)?;
        b.cert_type(CertType::User).map_err(sign)?;
        b.key_id(access_id.clone()).map_err(sign)?;
        b.valid_principal(machine_id).map_err(sign)?;
        // What OpenSSH grants by default, less forwarding (not served).
        b.extension("permit-pty", "").map_err(sign)?;
        b.comment(format!("nullspace {machine_id}")).map_err(sign)?;
        let cert = b.sign(ca).map_err(sign)?;
        let certificate = cert.to_openssh().map_err(sign)?;
        let record = AccessRecord {
            access_id: access_id.clone(),
            machine_id: machine_id.to_string(),
            namespace: namespace.to_string(),
            user: req.user.clone(),
            key: key.fingerprint(HashAlg::Sha256),
            expires_at,
        };
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() >= MAX_RECORDS {
            records.retain(|_, r| r.expires_at > now);
        }
        if records.len() >= MAX_RECORDS {
            return Err(AccessError::Full);
        }
        records.insert(access_id, record.clone());
        Ok(Grant {
            record,
            certificate,
        })
    }

    /// The record a certificate presented for `login` names, when the
    /// certificate is this CA's, in its window, for `login`, and the
    /// record agrees (machine, key, expiry). The namespace and the
    /// machine's state are the caller's to check against the store.
    pub fn admit(
        &self,
        ca: &Fingerprint,
        login: &str,
        cert: &Certificate,
        now: u64,
    ) -> Result<AccessRecord, Refusal> {
        if cert.signature_key().fingerprint(HashAlg::Sha256) != *ca {
            return Err(Refusal::NotOurCa);
        }
        if cert.cert_type() != CertType::User {
            return Err(Refusal::NotUserCert);
        }
        if !(cert.valid_after() <= now && now < cert.valid_before()) {
            return Err(Refusal::Expired {
                after: cert.valid_after(),
                before: cert.valid_before(),
                now,
            });
        }
        // Signature and window again, by the library's one check.
        cert.validate_at(now, [ca])
            .map_err(|_| Refusal::BadSignature)?;
        if !cert.valid_principals().iter().any(|p| p == login) {
            return Err(Refusal::Principal {
                login: login.chars().take(128).collect(),
                principals: cert.valid_principals().iter().take(8).cloned().collect(),
            });
        }
        let id = cert.key_id();
        let record = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Refusal::NoRecord(id.chars().take(128).collect()))?;
        if record.machine_id != login {
            return Err(Refusal::OtherMachine {
                access: record.access_id,
                granted: record.machine_id,
                login: login.to_string(),
            });
        }
        if cert.public_key().fingerprint(HashAlg::Sha256) != record.key {
            return Err(Refusal::OtherKey(record.access_id));
        }
        if record.expires_at <= now {
            return Err(Refusal::RecordExpired(record.access_id));
        }
        Ok(record)
    }

    /// Open grants (tests, bounds).
    pub fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn req(k: &PrivateKey) -> AccessRequest {
        AccessRequest {
            public_key: k.public_key().to_openssh().unwrap(),
            user: Some("root".into()),
            ttl_seconds: None,
            expires_in_minutes: Some(5),
        }
    }

    #[test]
    fn a_grant_admits_its_machine_only() {
        let (ca, user) = (key(1), key(2));
        let fp = ca.public_key().fingerprint(HashAlg::Sha256);
        let reg = Registry::default();
        let g = reg.mint(&ca, "mch_a", "team-a", &req(&user)).unwrap();
        assert_eq!(g.record.expires_at - now_secs(), 300);
        let cert = Certificate::from_openssh(&g.certificate).unwrap();
        assert_eq!(cert.valid_principals(), ["mch_a".to_string()]);
        assert_eq!(cert.key_id(), g.record.access_id);
        let now = now_secs();
        let r = reg.admit(&fp, "mch_a", &cert, now).unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.user.as_deref()),
            ("team-a", Some("root"))
        );
        assert!(matches!(
            reg.admit(&fp, "mch_b", &cert, now),
            Err(Refusal::Principal { .. })
        ));
        assert!(matches!(
            reg.admit(&fp, "mch_a", &cert, now + 301),
            Err(Refusal::Expired { .. })
        ));
        // Another CA's certificate is refused whatever it names.
        let other = key(3);
        let g2 = reg.mint(&other, "mch_a", "team-a", &req(&user)).unwrap();
        let c2 = Certificate::from_openssh(&g2.certificate).unwrap();
        assert_eq!(
            reg.admit(&fp, "mch_a", &c2, now).err(),
            Some(Refusal::NotOurCa)
        );
    }

    #[test]
    fn a_forged_principal_meets_its_record() {
        // A certificate of this CA naming machine B under machine A's
        // access id (as an insider with the CA could sign) is refused by
        // the record.
        let (ca, user) = (key(1), key(2));
        let fp = ca.public_key().fingerprint(HashAlg::Sha256);
        let reg = Registry::default();
        let g = reg.mint(&ca, "mch_a", "team-a", &req(&user)).unwrap();
        let now = now_secs();
        let mut b = Builder::new(
            vec![0; 32],
            user.public_key().key_data().clone(),
            now - 10,
            now + 100,
        )
        .unwrap();
        b.cert_type(CertType::User).unwrap();
        b.key_id(g.record.access_id.clone()).unwrap();
        b.valid_principal("mch_b").unwrap();
        let forged = b.sign(&ca).unwrap();
        assert!(matches!(
            reg.admit(&fp, "mch_b", &forged, now),
            Err(Refusal::OtherMachine { .. })
        ));
    }

    #[test]
    fn requests_are_checked() {
        let ca = key(1);
        let reg = Registry::default();
        let mut r = req(&key(2));
        r.public_key = "ssh-ed25519 not-base64!".into();
        let e = reg.mint(&ca, "m", "n", &r).unwrap_err();
        assert!(matches!(e, AccessError::MalformedKey(_)), "{e}");
        r.public_key = String::new();
        assert_eq!(
            reg.mint(&ca, "m", "n", &r).unwrap_err(),
            AccessError::EmptyKey
        );
        r = req(&key(2));
        r.user = Some("-rf".into());
        assert!(matches!(
            reg.mint(&ca, "m", "n", &r),
            Err(AccessError::BadUser(_))
        ));
        r = req(&key(2));
        r.expires_in_minutes = Some(100_000);
        assert!(matches!(
            reg.mint(&ca, "m", "n", &r),
            Err(AccessError::BadTtl(_))
        ));
        r.expires_in_minutes = None;
        r.ttl_seconds = Some(0);
        assert!(matches!(
            reg.mint(&ca, "m", "n", &r),
            Err(AccessError::BadTtl(_))
        ));
        assert_eq!(
            ttl(&AccessRequest {
                ttl_seconds: None,
                ..r
            })
            .unwrap(),
            DEFAULT_TTL
        );
        assert!(reg.is_empty());
    }
}
