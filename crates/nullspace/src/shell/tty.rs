//! The local terminal: whether standard input is one, the window size, and
//! raw mode held by a guard that puts the saved settings back when dropped
//! (on return, on error and on unwinding; the shell turns the signals that
//! would end the process into returns).

use std::io;

use nullspace_model::agent::pty::MAX_DIMENSION;
use rustix::termios::{self, OptionalActions, Termios};

/// Whether standard input is a terminal.
pub fn stdin_is_tty() -> bool {
    termios::isatty(io::stdin())
}

/// The window size as (cols, rows): standard input's terminal, else
/// standard output's (`… | nullspace machine shell` in a terminal); `None`
/// when neither is one or the size is unknown (0).
pub fn size() -> Option<(u16, u16)> {
    let of = |w: termios::Winsize| {
        let (c, r) = (w.ws_col, w.ws_row);
        (c > 0 && r > 0).then(|| (c.min(MAX_DIMENSION), r.min(MAX_DIMENSION)))
    };
    termios::tcgetwinsize(io::stdin())
        .ok()
        .and_then(of)
        .or_else(|| termios::tcgetwinsize(io::stdout()).ok().and_then(of))
}

/// Standard input's terminal in raw mode while this lives: no echo, no
/// line editing, no signals from keys (Ctrl-C travels as a byte to the
/// machine), no output processing (the machine's terminal does its own).
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> io::Result<RawMode> {
        let saved = termios::tcgetattr(io::stdin())?;
        let mut raw = saved.clone();
        raw.make_raw();
        // Drain: output already written is shown with the old settings;
        // keys typed ahead stay queued for the machine.
        termios::tcsetattr(io::stdin(), OptionalActions::Drain, &raw)?;
        Ok(RawMode { saved })
    }

    /// Raw mode again, after something else changed the settings (a
    /// job-control shell while this process was stopped).
    pub fn reapply(&self) -> io::Result<()> {
        let mut raw = self.saved.clone();
        raw.make_raw();
        Ok(termios::tcsetattr(io::stdin(), OptionalActions::Now, &raw)?)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing better to do on failure: the terminal may be gone (SIGHUP).
        let _ = termios::tcsetattr(io::stdin(), OptionalActions::Drain, &self.saved);
    }
}
