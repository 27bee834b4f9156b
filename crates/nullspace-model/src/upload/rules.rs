//! What an upload client names, checked: the target path, part numbers in
//! URLs, and sha256 digests.

/// Why a target path is refused (the caller names the path and the user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetRule {
    #[error("contains NUL")]
    Nul,
    #[error("is longer than 4096 bytes")]
    TooLong,
    #[error("contains '..'")]
    DotDot,
    #[error("has a component longer than 255 bytes")]
    LongComponent,
    #[error("names no file")]
    NoFile,
    #[error("is under the reserved /workspace/.nullspace")]
    Reserved,
}

/// `path` without `.` and empty components, refusing `..`, NUL and
/// overlong names: absolute stays absolute, relative stays relative.
pub fn normalize_target(path: &str) -> Result<String, TargetRule> {
    if path.contains('\0') {
        return Err(TargetRule::Nul);
    }
    if path.len() > 4096 {
        return Err(TargetRule::TooLong);
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(TargetRule::DotDot),
            c if c.len() > 255 => return Err(TargetRule::LongComponent),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(TargetRule::NoFile);
    }
    if parts.len() >= 2
        && parts[0] == "workspace"
        && parts[1] == ".nullspace"
        && path.starts_with('/')
    {
        return Err(TargetRule::Reserved);
    }
    let joined = parts.join("/");
    Ok(if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    })
}

/// A part number as the URL spells it: decimal, no sign, no leading zero.
pub fn parse_part(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// A sha256 as the SDK sends it: 64 lowercase hex digits.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_normalise_or_name_the_rule() {
        assert_eq!(normalize_target("/a//./b/").as_deref(), Ok("/a/b"));
        assert_eq!(normalize_target("./a/b").as_deref(), Ok("a/b"));
        assert_eq!(normalize_target("/a/../b"), Err(TargetRule::DotDot));
        assert_eq!(normalize_target("/./"), Err(TargetRule::NoFile));
        assert_eq!(normalize_target("a\0b"), Err(TargetRule::Nul));
        assert_eq!(
            normalize_target("//workspace/./.nullspace/x"),
            Err(TargetRule::Reserved)
        );
        assert_eq!(
            normalize_target(&"x".repeat(256)),
            Err(TargetRule::LongComponent)
        );
    }

    #[test]
    fn part_numbers_are_canonical_decimals() {
        assert_eq!(parse_part("0"), Some(0));
        assert_eq!(parse_part("4294967295"), Some(u32::MAX));
        for bad in ["", "00", "01", "+1", "-1", "4294967296", "1a", " 1"] {
            assert_eq!(parse_part(bad), None, "{bad:?}");
        }
        assert!(valid_sha256(&"ab".repeat(32)));
        assert!(!valid_sha256(&"AB".repeat(32)));
    }
}
