//! Lexical path normalization for tar entry names and hard link targets.
//!
//! Policy: leading `/` and `./` are stripped, empty and `.` components are
//! dropped, `a/../b` is folded lexically (like containerd's
//! `filepath.Clean`), but a `..` that would climb above the root is
//! **rejected** rather than clamped: a layer that tries it is hostile or
//! broken, and silently rewriting the path would hide that.

use crate::Limits;
use crate::error::EntryRule;

/// A normalized, root-relative path: components joined by `/`, no leading
/// or trailing slash; the empty string is the root itself.
pub(crate) fn normalize(raw: &[u8], limits: &Limits) -> Result<String, EntryRule> {
    if raw.is_empty() {
        return Err(EntryRule::EmptyName);
    }
    if raw.contains(&0) {
        return Err(EntryRule::NulByte);
    }
    if raw.len() > limits.max_path_len {
        return Err(EntryRule::PathTooLong {
            len: raw.len(),
            limit: limits.max_path_len,
        });
    }
    // ext4 names in mkext4 are `&str`; non-UTF-8 names cannot be declared.
    let s = std::str::from_utf8(raw).map_err(|_| EntryRule::NonUtf8)?;
    let mut out: Vec<&str> = Vec::new();
    for comp in s.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(EntryRule::PathEscapes);
                }
            }
            c => {
                if c.len() > 255 {
                    return Err(EntryRule::ComponentTooLong(c.len()));
                }
                out.push(c);
            }
        }
    }
    Ok(out.join("/"))
}

/// Split a normalized path into (parent, name); the root has no name.
pub(crate) fn split_last(path: &str) -> Option<(&str, &str)> {
    if path.is_empty() {
        return None;
    }
    Some(match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<String, EntryRule> {
        normalize(s.as_bytes(), &Limits::default())
    }

    #[test]
    fn strips_and_folds() {
        assert_eq!(n("./a/b/").unwrap(), "a/b");
        assert_eq!(n("/a//./b").unwrap(), "a/b");
        assert_eq!(n("a/../b").unwrap(), "b");
        assert_eq!(n("./").unwrap(), "");
        assert_eq!(n("/").unwrap(), "");
        assert_eq!(n(".").unwrap(), "");
    }

    #[test]
    fn rejects_hostile() {
        assert_eq!(n(""), Err(EntryRule::EmptyName));
        assert_eq!(n("../etc/passwd"), Err(EntryRule::PathEscapes));
        assert_eq!(n("a/../../etc"), Err(EntryRule::PathEscapes));
        assert_eq!(n("a\0b"), Err(EntryRule::NulByte));
        assert_eq!(
            normalize(b"a/\xff", &Limits::default()),
            Err(EntryRule::NonUtf8)
        );
        let long = "x".repeat(256);
        assert_eq!(n(&long), Err(EntryRule::ComponentTooLong(256)));
        let limits = Limits {
            max_path_len: 10,
            ..Limits::default()
        };
        assert!(matches!(
            normalize(b"aaaa/bbbb/cccc", &limits),
            Err(EntryRule::PathTooLong { .. })
        ));
    }

    #[test]
    fn split() {
        assert_eq!(split_last("a/b/c"), Some(("a/b", "c")));
        assert_eq!(split_last("c"), Some(("", "c")));
        assert_eq!(split_last(""), None);
    }
}
