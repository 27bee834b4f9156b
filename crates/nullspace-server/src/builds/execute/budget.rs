//! The step log budget.

/// How much of a build's own output (a native step's, or a Dockerfile
/// engine's) reaches the durable log. A guest or a `RUN` may print without
/// end; past the limit output is counted, not stored, and one entry says
/// how much was left out. (The host side of the guest channel is bounded
/// on its own; this bounds the database and the SSE replay.)
#[derive(Debug, Clone)]
pub struct OutputBudget {
    limit: u64,
    logged: u64,
    dropped: u64,
}

impl OutputBudget {
    pub fn new(limit: u64) -> OutputBudget {
        OutputBudget {
            limit,
            logged: 0,
            dropped: 0,
        }
    }

    /// The part of `chunk` that may still be logged (cut on a UTF-8
    /// boundary); the rest is counted as dropped.
    pub fn admit<'a>(&mut self, chunk: &'a str) -> &'a str {
        let room = self.limit.saturating_sub(self.logged) as usize;
        let mut cut = chunk.len().min(room);
        while !chunk.is_char_boundary(cut) {
            cut -= 1;
        }
        self.logged += cut as u64;
        if cut < chunk.len() {
            // Once output was cut, nothing later in the step is logged (a
            // log with holes in it would read as the whole output).
            self.logged = self.limit;
        }
        self.dropped += (chunk.len() - cut) as u64;
        &chunk[..cut]
    }

    /// Bytes dropped since the last call, and a one-line entry for them.
    pub fn take_truncation(&mut self, what: &str) -> Option<String> {
        let d = std::mem::take(&mut self.dropped);
        (d > 0).then(|| {
            format!(
                "{what}: output truncated: {d} more bytes were not logged (limit {} bytes)",
                self.limit
            )
        })
    }

    /// Starts a new budget (the next step's).
    pub fn reset(&mut self) {
        self.logged = 0;
        self.dropped = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::OutputBudget;

    #[test]
    fn the_budget_cuts_on_char_boundaries_and_reports_what_it_dropped() {
        let mut b = OutputBudget::new(5);
        assert_eq!(b.admit("abc"), "abc");
        assert_eq!(b.take_truncation("step 1"), None);
        // 'é' is two bytes: only "d" fits before the limit of 5.
        assert_eq!(b.admit("déf"), "d");
        assert_eq!(b.admit("more"), "");
        let t = b.take_truncation("step 1").unwrap();
        assert!(t.contains("7 more bytes") && t.contains("limit 5"), "{t}");
        assert_eq!(b.take_truncation("step 1"), None);
        b.reset();
        assert_eq!(b.admit("abcdefg"), "abcde");
    }
}
