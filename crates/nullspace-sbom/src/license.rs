//! A recorded licence as an SPDX licence expression, when it is one.
//!
//! Package databases record licences in their own words ("GPL-2+",
//! "GPLv2+ and BSD", "Apache-2.0 or MIT"). Only exact rewrites are made:
//! operators upper-cased, `<id>+` to `<id>-or-later` and a deprecated bare
//! GNU id to its `-only` form where the SPDX list has them. The result must
//! then parse strictly against the SPDX licence list (the `spdx` crate,
//! cargo-deny's). Guesses such as "BSD" → BSD-2-Clause are not made (the
//! crate's own `canonicalize` makes them): a vague record stays unasserted.

/// The SPDX expression `recorded` exactly denotes, or `None`.
pub fn spdx_expression(recorded: &str) -> Option<String> {
    let spaced = recorded.replace('(', " ( ").replace(')', " ) ");
    let mut out = String::with_capacity(recorded.len() + 16);
    for word in spaced.split_whitespace() {
        let token = match word.to_ascii_uppercase().as_str() {
            op @ ("AND" | "OR" | "WITH") => op.to_owned(),
            _ => exact_id(word),
        };
        if !(out.is_empty() || out.ends_with('(') || token == ")") {
            out.push(' ');
        }
        out.push_str(&token);
    }
    spdx::Expression::parse(&out).ok().map(|_| out)
}

fn exact_id(word: &str) -> String {
    if let Some(base) = word.strip_suffix('+') {
        let later = format!("{base}-or-later");
        if spdx::license_id(&later).is_some() {
            return later;
        }
    } else if spdx::license_id(word).is_some_and(|id| id.is_deprecated()) {
        let only = format!("{word}-only");
        if spdx::license_id(&only).is_some() {
            return only;
        }
    }
    word.to_owned()
}

#[cfg(test)]
mod tests {
    use super::spdx_expression;

    #[test]
    fn recorded_licences() {
        let cases = [
            ("MIT", Some("MIT")),
            ("Apache-2.0 or MIT", Some("Apache-2.0 OR MIT")),
            (
                "(Apache-2.0 or MIT) and MIT",
                Some("(Apache-2.0 OR MIT) AND MIT"),
            ),
            ("GPL-2.0+", Some("GPL-2.0-or-later")),
            ("GPL-2.0", Some("GPL-2.0-only")),
            (
                "MIT AND (Apache-2.0 WITH LLVM-exception)",
                Some("MIT AND (Apache-2.0 WITH LLVM-exception)"),
            ),
            // Vague records are not guessed at.
            ("GPL-2+", None),
            ("GPLv2+ and BSD", None),
            ("gpl", None),
            ("public domain", None),
            ("MIT AND", None),
            ("", None),
        ];
        for (recorded, want) in cases {
            assert_eq!(spdx_expression(recorded).as_deref(), want, "{recorded:?}");
        }
    }
}
