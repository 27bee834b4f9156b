//! Registry credentials: from flags or stdin (the caller passes them), else
//! from the Docker client config (`$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`). Credential helpers are not run.
//!
//! Credentials live only in memory; `Debug` never prints a password.

use std::path::PathBuf;

use base64::Engine as _;

#[derive(Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Looks `registry` (host[:port]) up in the Docker client config.
pub fn from_docker_config(registry: &str) -> Option<Credentials> {
    let text = std::fs::read(docker_config_path()?).ok()?;
    lookup(&text, registry)
}

/// Looks `registry` up in the text of a Docker client config. Public for
/// the fuzz target `docker_auth`.
#[doc(hidden)]
pub fn lookup(config: &[u8], registry: &str) -> Option<Credentials> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let hub = matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    );
    let entry = auths.iter().find_map(|(k, v)| {
        let host = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        let matches =
            host == registry || (hub && (host == "index.docker.io" || host == "docker.io"));
        matches.then_some(v)
    })?;
    if let Some(auth) = entry
        .get("auth")
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
    {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (u, p) = raw.split_once(':')?;
        return Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    let u = entry.get("username")?.as_str()?;
    let p = entry.get("password")?.as_str()?;
    Some(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    })
}

/// Plain HTTP is allowed only for loopback registries and those named
/// insecure by the caller.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry)
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_auth_forms() {
        let cfg = br#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},"https://index.docker.io/v1/":{"username":"hub","password":"pw"}}}"#;
        let c = lookup(cfg, "127.0.0.1:5000").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        let c = lookup(cfg, "docker.io").unwrap();
        assert_eq!(c.username, "hub");
        assert!(lookup(cfg, "other.example.com").is_none());
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn loopback_detection() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "registry.example.com",
            "10.0.0.1:5000",
            "localhost.evil.com:5000",
            "[::2]:1",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
