//! Guest output as WebSocket text frames: byte chunks turned into text
//! without splitting a UTF-8 character across frames.

/// Turns byte chunks into text without splitting a UTF-8 character.
#[derive(Default)]
pub struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    pub fn push(&mut self, d: &[u8]) -> String {
        self.0.extend_from_slice(d);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.0) {
                Ok(s) => {
                    out.push_str(s);
                    self.0.clear();
                    return out;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.0[..ok]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more.
                        None => {
                            self.0.drain(..ok);
                            return out;
                        }
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.0.drain(..ok + n);
                        }
                    }
                }
            }
        }
    }
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        s
    }
}
