//! The agent calls over many files: searches by name and by content,
//! replace in files, and the guest's metrics. What the guest answers is
//! checked against the request's bounds (a guest that sends more results
//! or more result text than asked fails the call), so the host holds at
//! most [`MAX_SEARCH_BYTES`] of results per search, plus the events in
//! flight of the module doc's bound.

use super::{AgentClient, unexpected};
use crate::VmError;
use nullspace_model::agent::{
    ContentMatch, DEFAULT_MAX_MATCHES, DEFAULT_MAX_RESULTS, Event, GuestMetrics, MAX_MATCHES,
    MAX_RESULTS, MAX_SEARCH_BYTES, Op, ReplaceResult, ReplaceSpec, SearchContentSpec, SearchLimit,
    SearchNamesSpec,
};
use std::time::{Duration, Instant};

/// What a search found, in the guest's walk order.
#[derive(Debug, Clone, PartialEq)]
pub struct Found<T> {
    pub items: Vec<T>,
    /// The bound that ended the search early, if one did.
    pub truncated: Option<SearchLimit>,
    /// Directory entries the guest walked.
    pub visited: u64,
}

/// Accepts a search's results up to its bounds.
struct Gather<T> {
    found: Found<T>,
    max: usize,
    bytes: usize,
}

impl<T> Gather<T> {
    fn new(max: u32) -> Self {
        Gather {
            found: Found {
                items: Vec::new(),
                truncated: None,
                visited: 0,
            },
            max: max as usize,
            bytes: 0,
        }
    }

    fn add(&mut self, op: &str, items: Vec<T>, size: impl Fn(&T) -> usize) -> Result<(), VmError> {
        self.bytes += items.iter().map(size).sum::<usize>();
        if self.found.items.len() + items.len() > self.max || self.bytes > MAX_SEARCH_BYTES {
            return Err(VmError::Agent(format!(
                "{op}: the guest sent more than the {} results or {MAX_SEARCH_BYTES} bytes asked for",
                self.max
            )));
        }
        self.found.items.extend(items);
        Ok(())
    }
}

impl AgentClient {
    /// Paths under `spec.path` whose name (or relative path) matches the
    /// glob, as `spec.user`.
    pub fn search_names(
        &self,
        spec: &SearchNamesSpec,
        limit: Duration,
    ) -> Result<Found<String>, VmError> {
        let deadline = Instant::now() + limit;
        let max = spec
            .max_results
            .unwrap_or(DEFAULT_MAX_RESULTS)
            .clamp(1, MAX_RESULTS);
        let mut c = self.start_call(Op::SearchNames(spec.clone()))?;
        let mut g = Gather::new(max);
        loop {
            match c.next(deadline)? {
                Event::Paths { paths } => g.add("search_names", paths, String::len)?,
                Event::SearchEnd { truncated, visited } => {
                    g.found.truncated = truncated;
                    g.found.visited = visited;
                    return Ok(g.found);
                }
                ev => return Err(unexpected("search_names", ev)),
            }
        }
    }

    /// Lines matching `spec.pattern` in the files under `spec.path` (or the
    /// file `spec.path`), as `spec.user`.
    pub fn search_content(
        &self,
        spec: &SearchContentSpec,
        limit: Duration,
    ) -> Result<Found<ContentMatch>, VmError> {
        let deadline = Instant::now() + limit;
        let max = spec
            .max_matches
            .unwrap_or(DEFAULT_MAX_MATCHES)
            .clamp(1, MAX_MATCHES);
        let mut c = self.start_call(Op::SearchContent(spec.clone()))?;
        let mut g = Gather::new(max);
        loop {
            match c.next(deadline)? {
                Event::Matches { matches } => g.add("search_content", matches, |m| {
                    m.file.len() + m.content.len()
                })?,
                Event::SearchEnd { truncated, visited } => {
                    g.found.truncated = truncated;
                    g.found.visited = visited;
                    return Ok(g.found);
                }
                ev => return Err(unexpected("search_content", ev)),
            }
        }
    }

    /// Replaces a pattern in files (all checked before any changes), as
    /// `spec.user`.
    pub fn replace(&self, spec: &ReplaceSpec, limit: Duration) -> Result<ReplaceResult, VmError> {
        match self.call(Op::Replace(spec.clone()), limit)? {
            Event::Replaced(r) => Ok(r),
            ev => Err(unexpected("replace", ev)),
        }
    }

    /// The guest's CPU (sampled over `sample`), memory, disk and network
    /// figures, made plausible (a share within 0..=100, used within total).
    pub fn metrics(
        &self,
        sample: Option<Duration>,
        limit: Duration,
    ) -> Result<GuestMetrics, VmError> {
        let op = Op::Metrics {
            sample_ms: sample.map(|s| s.as_millis() as u64),
        };
        match self.call(op, limit)? {
            Event::Metrics(m) => Ok(plausible(m)),
            ev => Err(unexpected("metrics", ev)),
        }
    }
}

/// Guest figures are hostile input: clamp what cannot be.
fn plausible(mut m: GuestMetrics) -> GuestMetrics {
    m.cpu_percent = if m.cpu_percent.is_finite() {
        m.cpu_percent.clamp(0.0, 100.0)
    } else {
        0.0
    };
    m.cpu_count = m.cpu_count.max(1);
    m.mem_used_bytes = m.mem_used_bytes.min(m.mem_total_bytes);
    m.disk_used_bytes = m.disk_used_bytes.min(m.disk_total_bytes);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathering_stops_at_the_bounds() {
        let mut g = Gather::<String>::new(3);
        g.add("t", vec!["a".into(), "b".into()], String::len)
            .unwrap();
        g.add("t", vec!["c".into()], String::len).unwrap();
        let e = g.add("t", vec!["d".into()], String::len).unwrap_err();
        assert!(e.to_string().contains("more than the 3 results"), "{e}");
        let mut g = Gather::<String>::new(10);
        let big = "x".repeat(MAX_SEARCH_BYTES / 2 + 1);
        g.add("t", vec![big.clone()], String::len).unwrap();
        assert!(g.add("t", vec![big], String::len).is_err(), "bytes bounded");
    }

    #[test]
    fn metrics_are_made_plausible() {
        let m = plausible(GuestMetrics {
            cpu_percent: 250.0,
            cpu_count: 0,
            mem_used_bytes: 10,
            mem_total_bytes: 5,
            disk_used_bytes: 1,
            disk_total_bytes: 2,
            ..Default::default()
        });
        assert_eq!(
            (
                m.cpu_percent,
                m.cpu_count,
                m.mem_used_bytes,
                m.disk_used_bytes
            ),
            (100.0, 1, 5, 1)
        );
        assert_eq!(
            plausible(GuestMetrics {
                cpu_percent: -1.0,
                ..Default::default()
            })
            .cpu_percent,
            0.0
        );
    }
}
