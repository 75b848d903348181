//! Byte progress bars with ETA; silent when stderr is not a terminal or when asked to be quiet.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar for one transfer.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar labelled `label`; hidden when `quiet`.
    pub fn new(label: &str, quiet: bool) -> Self {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_message(label.to_string());
        Progress { bar }
    }

    /// Starts a transfer of `total` bytes (if known) with `done` already on disk.
    pub fn start(&self, total: Option<u64>, done: u64) {
        let style = match total {
            Some(t) => {
                self.bar.set_length(t);
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
            }
            None => ProgressStyle::with_template("{msg} {bytes} {bytes_per_sec}"),
        };
        if let Ok(s) = style {
            self.bar.set_style(s.progress_chars("=> "));
        }
        self.bar.set_position(done);
    }

    /// Adds `n` bytes.
    pub fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Ends the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
