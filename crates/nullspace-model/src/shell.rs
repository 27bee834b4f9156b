//! The one POSIX `sh` quoter. Everything that writes a shell line (image
//! start commands, HEALTHCHECK mapping, rendered build steps, readiness
//! probes) uses it; `nullspace-oci`'s config tests run its output through a
//! real `sh -c` and check that the argv comes back unchanged.

// Words `sh` treats specially in command position; quoting them keeps them
// plain arguments.
const RESERVED: &[&str] = &[
    "!", "{", "}", "case", "do", "done", "elif", "else", "esac", "fi", "for", "if", "in", "then",
    "until", "while", "function", "select", "[[", "]]", "time",
];

/// Quotes one word for POSIX `sh` only when it needs it: a word made only of
/// characters with no meaning to the shell stays bare; anything else is
/// single-quoted (a `'` becomes `'\''`). `sh -c` splits the result back into
/// exactly the original word.
pub fn quote(word: &str) -> String {
    let safe = !word.is_empty()
        && !RESERVED.contains(&word)
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_@%+:,./-".contains(&b));
    if safe {
        return word.to_string();
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Joins an argv into one shell command line (see [`quote`]).
pub fn join<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_when_safe_quoted_otherwise() {
        assert_eq!(
            join(&["python3", "-m", "http.server"]),
            "python3 -m http.server"
        );
        assert_eq!(quote(""), "''");
        assert_eq!(quote("/tmp/ready flag"), "'/tmp/ready flag'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("A=b"), "'A=b'");
        assert_eq!(quote("if"), "'if'");
    }
}
