//! A progress line on stderr while a benchmark runs: redrawn in place on a terminal, a line
//! every few seconds otherwise (CI logs).

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// Prints progress lines.
#[derive(Debug)]
pub struct Progress {
    tty: bool,
    quiet: bool,
    last: Option<Instant>,
}

/// Width of the bar in characters.
const WIDTH: usize = 24;

impl Progress {
    /// Progress on stderr; `quiet` prints nothing.
    pub fn new(quiet: bool) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            quiet,
            last: None,
        }
    }

    /// Shows `done` of 0..=1 and a status text.
    pub fn show(&mut self, done: f64, text: &str) {
        if self.quiet {
            return;
        }
        let filled = ((done.clamp(0.0, 1.0)) * WIDTH as f64).round() as usize;
        let bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(WIDTH - filled));
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{bar} {text}");
            let _ = err.flush();
        } else if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last = Some(Instant::now());
            let _ = writeln!(err, "{bar} {text}");
        }
    }

    /// Ends the progress line.
    pub fn finish(&mut self) {
        if self.tty && !self.quiet {
            let _ = writeln!(std::io::stderr());
        }
    }

    /// A plain message (a phase change).
    pub fn say(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{text}");
    }
}
