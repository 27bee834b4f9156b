//! The guest's side of the framing: a byte stream cut into request lines,
//! never holding more than [`MAX_LINE`] bytes of one.

use super::MAX_LINE;

/// Splits chunks of the host's stream into lines. A line of [`MAX_LINE`]
/// bytes or more is discarded up to its newline without being kept whole.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    skipping: bool,
}

impl LineSplitter {
    pub fn new() -> LineSplitter {
        LineSplitter::default()
    }

    /// Feeds `data`, calling `on_line` with each complete line (without its
    /// newline) shorter than [`MAX_LINE`]. Returns how many over-long lines
    /// started being discarded in this chunk (for the caller's log).
    pub fn push(&mut self, data: &[u8], on_line: &mut dyn FnMut(&[u8])) -> usize {
        let mut discarded = 0;
        let mut rest = data;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    if !self.skipping {
                        self.buf.extend_from_slice(&rest[..i]);
                        if self.buf.len() < MAX_LINE {
                            on_line(&self.buf);
                        } else {
                            discarded += 1;
                        }
                    }
                    self.buf.clear();
                    self.skipping = false;
                    rest = &rest[i + 1..];
                }
                None => {
                    if !self.skipping {
                        self.buf.extend_from_slice(rest);
                        if self.buf.len() >= MAX_LINE {
                            // Freed, not cleared: a line this long is hostile.
                            self.buf = Vec::new();
                            self.skipping = true;
                            discarded += 1;
                        }
                    }
                    rest = &[];
                }
            }
        }
        discarded
    }

    /// Drops a partial line (the host hung up mid-line).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }

    /// Bytes of the partial line held now (always below [`MAX_LINE`]).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded() {
        let mut l = LineSplitter::new();
        let mut got: Vec<Vec<u8>> = vec![];
        l.push(b"a\nbc", &mut |x| got.push(x.to_vec()));
        l.push(b"d\n", &mut |x| got.push(x.to_vec()));
        assert_eq!(got, vec![b"a".to_vec(), b"bcd".to_vec()]);
        // An over-long line is dropped up to its newline, never kept whole.
        got.clear();
        let big = vec![b'x'; 64 << 10];
        let mut discarded = 0;
        for _ in 0..(MAX_LINE / big.len() + 2) {
            discarded += l.push(&big, &mut |x| got.push(x.to_vec()));
            assert!(l.buffered() < MAX_LINE);
        }
        l.push(b"tail\nok\n", &mut |x| got.push(x.to_vec()));
        assert_eq!(got, vec![b"ok".to_vec()]);
        assert_eq!(discarded, 1);
    }
}
