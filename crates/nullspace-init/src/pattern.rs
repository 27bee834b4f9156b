//! The patterns of the search ops, compiled from hostile input with bounds:
//! a file-name glob ([`NameGlob`]) and a text pattern ([`TextPattern`], a
//! regular expression or plain text).

use nullspace_model::agent::MAX_PATTERN;
use regex::bytes::{NoExpand, Regex, RegexBuilder};
use std::borrow::Cow;
use std::path::Path;

/// Compiled program size a text pattern may reach (the regex crate's own
/// default is 10 MiB; the guest has little memory to spare).
const REGEX_SIZE_LIMIT: usize = 2 << 20;
/// Nesting depth of a text pattern (parsing recurses on a small stack).
const REGEX_NEST_LIMIT: u32 = 64;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("the pattern is empty")]
    Empty,
    #[error("the pattern has {0} bytes, more than {MAX_PATTERN}")]
    TooLong(usize),
    #[error("invalid glob {pattern:?}: {reason}")]
    Glob { pattern: String, reason: String },
    #[error("the pattern {0:?} compiles to more than the {REGEX_SIZE_LIMIT}-byte limit")]
    TooComplex(String),
}

fn check(pattern: &str) -> Result<(), PatternError> {
    if pattern.is_empty() {
        return Err(PatternError::Empty);
    }
    if pattern.len() > MAX_PATTERN {
        return Err(PatternError::TooLong(pattern.len()));
    }
    Ok(())
}

/// A glob on file names: `*`, `?`, `[a-z]`, `[!a]`, `{a,b}`, `\` escapes.
/// Without a `/` it matches an entry's name; with one, the entry's path
/// relative to the search root (where `*` stays within a name and `**`
/// spans directories; a leading `/` or `./` anchors at the root).
#[derive(Debug, Clone)]
pub struct NameGlob {
    matcher: globset::GlobMatcher,
    on_path: bool,
}

impl NameGlob {
    pub fn new(pattern: &str) -> Result<NameGlob, PatternError> {
        check(pattern)?;
        let on_path = pattern.contains('/');
        let body = if on_path {
            pattern.trim_start_matches("./").trim_start_matches('/')
        } else {
            pattern
        };
        let glob = globset::GlobBuilder::new(body)
            .literal_separator(true)
            .backslash_escape(true)
            .empty_alternates(true)
            .build()
            .map_err(|e| PatternError::Glob {
                pattern: pattern.to_string(),
                reason: e.kind().to_string(),
            })?;
        Ok(NameGlob {
            matcher: glob.compile_matcher(),
            on_path,
        })
    }

    /// Whether the entry at `rel` (relative to the search root, its last
    /// component the entry's name) matches.
    pub fn matches(&self, rel: &Path) -> bool {
        if self.on_path {
            self.matcher.is_match(rel)
        } else {
            rel.file_name()
                .is_some_and(|name| self.matcher.is_match(Path::new(name)))
        }
    }
}

/// A pattern matched against bytes: a regular expression, or plain text
/// when asked or when the pattern is not a valid expression (`foo(` is
/// searched as written).
///
/// `^` and `$` match at line starts and ends (before `\n` or `\r\n`),
/// in a line as in a whole file.
#[derive(Debug, Clone)]
pub struct TextPattern {
    re: Regex,
    literal: bool,
    /// `\A` or `\z` in the expression: they mean a line's start or end on
    /// a line but the file's on the whole text, so a whole file's miss says
    /// nothing about its lines.
    absolute_anchors: bool,
}

impl TextPattern {
    pub fn new(pattern: &str, literal: bool) -> Result<TextPattern, PatternError> {
        check(pattern)?;
        let build = |p: &str| {
            RegexBuilder::new(p)
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .nest_limit(REGEX_NEST_LIMIT)
                .multi_line(true)
                .crlf(true)
                .build()
        };
        if !literal {
            match build(pattern) {
                Ok(re) => {
                    return Ok(TextPattern {
                        re,
                        literal: false,
                        absolute_anchors: pattern.contains("\\A") || pattern.contains("\\z"),
                    });
                }
                Err(regex::Error::CompiledTooBig(_)) => {
                    return Err(PatternError::TooComplex(pattern.to_string()));
                }
                // Not an expression: searched as plain text.
                Err(_) => {}
            }
        }
        let re = build(&regex::escape(pattern))
            .map_err(|_| PatternError::TooComplex(pattern.to_string()))?;
        Ok(TextPattern {
            re,
            literal: true,
            absolute_anchors: false,
        })
    }

    /// Taken as plain text (asked, or not a valid expression).
    #[cfg(test)]
    pub fn is_literal(&self) -> bool {
        self.literal
    }

    pub fn is_match(&self, line: &[u8]) -> bool {
        self.re.is_match(line)
    }

    /// False only when no line of `text` can match (a quick look at a
    /// whole file before it is split into lines).
    pub fn may_match_lines_of(&self, text: &[u8]) -> bool {
        self.absolute_anchors || self.re.is_match(text)
    }

    /// `text` with every match replaced (`$1`, `${name}` expand for an
    /// expression; the replacement is plain text for a literal pattern),
    /// and the number of matches.
    pub fn replace_all<'t>(&self, text: &'t [u8], replacement: &str) -> (Cow<'t, [u8]>, u64) {
        let count = self.re.find_iter(text).count() as u64;
        if count == 0 {
            return (Cow::Borrowed(text), 0);
        }
        let out = if self.literal {
            self.re.replace_all(text, NoExpand(replacement.as_bytes()))
        } else {
            self.re.replace_all(text, replacement.as_bytes())
        };
        (out, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str, rel: &str) -> bool {
        NameGlob::new(p).unwrap().matches(Path::new(rel))
    }

    #[test]
    fn name_globs_match_names_anywhere() {
        assert!(glob("*.py", "a.py"));
        assert!(
            glob("*.py", "src/deep/b.py"),
            "a name pattern matches at any depth"
        );
        assert!(!glob("*.py", "src/b.pyc"));
        assert!(glob("?.txt", "x/a.txt"));
        assert!(!glob("?.txt", "ab.txt"));
        assert!(glob("[ab]*", "b1"));
        assert!(!glob("[!ab]*", "b1"));
        assert!(glob("*.{js,ts}", "web/app.ts"));
        assert!(glob("*", ".hidden"), "like find -name, dot files match");
        assert!(glob("a\\*", "a*") && !glob("a\\*", "ab"), "escapes");
    }

    #[test]
    fn path_globs_match_relative_paths() {
        assert!(glob("src/*.rs", "src/main.rs"));
        assert!(!glob("src/*.rs", "src/bin/x.rs"), "* stays within a name");
        assert!(glob("src/**/*.rs", "src/bin/x.rs"));
        assert!(glob("**/test_*.py", "a/b/test_x.py"));
        assert!(
            glob("/src/*.rs", "src/main.rs"),
            "a leading / anchors at the root"
        );
        assert!(glob("./src/*.rs", "src/main.rs"));
        assert!(!glob("src/*.rs", "other/src/main.rs"));
    }

    #[test]
    fn bad_globs_and_patterns_are_refused() {
        assert_eq!(NameGlob::new("").unwrap_err(), PatternError::Empty);
        assert!(matches!(
            NameGlob::new("[a").unwrap_err(),
            PatternError::Glob { .. }
        ));
        let long = "a".repeat(MAX_PATTERN + 1);
        assert_eq!(
            TextPattern::new(&long, false).unwrap_err(),
            PatternError::TooLong(MAX_PATTERN + 1)
        );
        // Counted repetition that would compile to gigabytes.
        assert!(matches!(
            TextPattern::new("(a{1000}){1000}", false).unwrap_err(),
            PatternError::TooComplex(_)
        ));
        // Deep nesting is refused (not a stack overflow): taken literally.
        let deep = format!("{}a{}", "(".repeat(200), ")".repeat(200));
        let p = TextPattern::new(&deep, false).unwrap();
        assert!(p.is_literal());
        assert!(p.is_match(deep.as_bytes()));
    }

    #[test]
    fn text_patterns_are_expressions_or_text() {
        let p = TextPattern::new(r"fn \w+\(", false).unwrap();
        assert!(!p.is_literal());
        assert!(p.is_match(b"pub fn main() {"));
        assert!(!p.is_match(b"fn ("));
        // Not a valid expression: plain text.
        let p = TextPattern::new("foo(", false).unwrap();
        assert!(p.is_literal());
        assert!(p.is_match(b"call foo(1)") && !p.is_match(b"foo"));
        // Literal on request: the dot is a dot.
        let p = TextPattern::new("a.b", true).unwrap();
        assert!(p.is_match(b"a.b") && !p.is_match(b"axb"));
        // Bytes that are not UTF-8 do not stop a match.
        let p = TextPattern::new("needle", false).unwrap();
        assert!(p.is_match(b"\xff\xfe needle"));
    }

    #[test]
    fn anchors_are_per_line_in_a_whole_file() {
        let p = TextPattern::new(r"^b\s*=\s*\d+$", false).unwrap();
        let text = b"a = 1\r\nb = 2\r\nc = 3\n";
        assert!(p.may_match_lines_of(text));
        assert!(p.is_match(b"b = 2"));
        let (out, n) = p.replace_all(text, "B");
        assert_eq!((&out[..], n), (&b"a = 1\r\nB\r\nc = 3\n"[..], 1));
        let p = TextPattern::new(r"\Ab", false).unwrap();
        assert!(
            p.may_match_lines_of(b"a\nb"),
            "an absolute anchor skips the quick look"
        );
        assert!(
            !TextPattern::new("zz", false)
                .unwrap()
                .may_match_lines_of(b"a\nb")
        );
    }

    #[test]
    fn replacement_expands_only_for_expressions() {
        let p = TextPattern::new(r"(\w+)@(\w+)", false).unwrap();
        let (out, n) = p.replace_all(b"a@b c@d", "$2@$1");
        assert_eq!((&out[..], n), (&b"b@a d@c"[..], 2));
        let p = TextPattern::new("$x", true).unwrap();
        let (out, n) = p.replace_all(b"$x and $x", "$1");
        assert_eq!((&out[..], n), (&b"$1 and $1"[..], 2));
        let (out, n) = p.replace_all(b"nothing", "y");
        assert!(matches!(out, Cow::Borrowed(_)));
        assert_eq!(n, 0);
    }
}
