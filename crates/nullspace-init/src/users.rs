//! Users and groups from /etc/passwd and /etc/group (no NSS in a static
//! binary). Spec forms: `user`, `uid`, `user:group`, `user:gid`, `uid:group`,
//! `uid:gid`.

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

fn read(path: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

pub fn resolve(spec: Option<&str>) -> Result<Ident, String> {
    resolve_in(spec, &read("/etc/passwd"), &read("/etc/group"))
}

/// uid and gid → name, read once (e.g. for a directory listing).
pub struct Names {
    users: std::collections::HashMap<u32, String>,
    groups: std::collections::HashMap<u32, String>,
}

impl Names {
    pub fn load() -> Names {
        Names::from_dbs(&read("/etc/passwd"), &read("/etc/group"))
    }

    fn from_dbs(passwd: &[Vec<String>], group: &[Vec<String>]) -> Names {
        let map = |db: &[Vec<String>]| {
            let mut m = std::collections::HashMap::new();
            for e in db.iter().filter(|e| e.len() >= 3) {
                if let Ok(id) = e[2].parse::<u32>() {
                    // The first entry for an id wins, as with getpwuid.
                    m.entry(id).or_insert_with(|| e[0].clone());
                }
            }
            m
        };
        Names {
            users: map(passwd),
            groups: map(group),
        }
    }

    /// The user's name, or the uid as a string.
    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

pub fn resolve_in(
    spec: Option<&str>,
    passwd: &[Vec<String>],
    group: &[Vec<String>],
) -> Result<Ident, String> {
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("root");
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = passwd
        .iter()
        .find(|p| p.len() >= 4 && (p[0] == user || (user.parse::<u32>().is_ok() && p[2] == user)));
    let (name, uid, mut gid, home) = match entry {
        Some(p) => (
            Some(p[0].clone()),
            p[2].parse::<u32>()
                .map_err(|_| format!("bad uid in /etc/passwd for {}", p[0]))?,
            p[3].parse::<u32>().unwrap_or(0),
            p.get(5)
                .cloned()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "/".into()),
        ),
        None => match user.parse::<u32>() {
            // A numeric uid need not exist in /etc/passwd.
            Ok(uid) => (None, uid, uid, "/".into()),
            Err(_) => return Err(format!("user {user:?} not found in /etc/passwd")),
        },
    };
    if uid == 0 && name.is_none() {
        gid = 0;
    }
    if let Some(g) = grp.filter(|g| !g.is_empty()) {
        gid = match group.iter().find(|e| e.len() >= 3 && e[0] == g) {
            Some(e) => e[2]
                .parse()
                .map_err(|_| format!("bad gid in /etc/group for {g}"))?,
            None => g
                .parse::<u32>()
                .map_err(|_| format!("group {g:?} not found in /etc/group"))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(n) = &name {
        for e in group {
            if e.len() >= 4
                && e[3].split(',').any(|m| m == n)
                && let Ok(g) = e[2].parse::<u32>()
                && !groups.contains(&g)
            {
                groups.push(g);
            }
        }
    }
    Ok(Ident {
        name,
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn db(s: &str) -> Vec<Vec<String>> {
        s.lines()
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()
    }
    #[test]
    fn forms() {
        let p = db("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh");
        let g = db("root:x:0:\napp:x:1000:\nwheel:x:10:app");
        let r = resolve_in(None, &p, &g).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (0, 0, "/root"));
        let a = resolve_in(Some("app:app"), &p, &g).unwrap();
        assert_eq!(
            (a.uid, a.gid, a.groups.clone()),
            (1000, 1000, vec![1000, 10])
        );
        let n = resolve_in(Some("1000:10"), &p, &g).unwrap();
        assert_eq!((n.uid, n.gid), (1000, 10));
        let x = resolve_in(Some("4242:4343"), &p, &g).unwrap();
        assert_eq!((x.uid, x.gid, x.name), (4242, 4343, None));
        assert!(resolve_in(Some("nobody"), &p, &g).is_err());
        let names = Names::from_dbs(&p, &g);
        assert_eq!(
            (names.user(1000), names.group(10), names.user(7)),
            ("app".to_string(), "wheel".to_string(), "7".to_string())
        );
        assert!(resolve_in(Some("app:nogroup"), &p, &g).is_err());
    }
}
