//! Progress of a long run where no bar is drawn (stderr is not a terminal,
//! or the output is JSON): one line every few seconds.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::ProgressBar;

/// How often [`Ticker`] writes a line in `gmem run`.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Writes a line about a progress bar every interval until dropped.
pub struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts writing `bar`'s progress to `out` every `every`, the first
    /// line after `every` (a short run writes none).
    pub fn start(
        bar: ProgressBar,
        every: Duration,
        mut out: impl Write + Send + 'static,
    ) -> std::io::Result<Ticker> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let (lock, wake) = &*stopped;
                let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let (guard, timeout) = wake
                        .wait_timeout_while(done, every, |done| !*done)
                        .unwrap_or_else(|e| e.into_inner());
                    done = guard;
                    if !timeout.timed_out() {
                        return;
                    }
                    // A closed stderr is no reason to stop the run.
                    let _ = writeln!(out, "{}", line(&bar));
                }
            })?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line: `gmem run: <phase>: <pos>/<len> (<percent>%), <seconds> s`.
pub fn line(bar: &ProgressBar) -> String {
    let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
    let percent = (pos.saturating_mul(100)).checked_div(len).unwrap_or(0);
    format!(
        "gmem run: {}: {pos}/{len} ({percent}%), {} s",
        bar.message(),
        bar.elapsed().as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_hidden_bar_still_reports_a_line_every_interval() {
        let bar = ProgressBar::hidden();
        bar.set_message("converting chunks");
        bar.set_length(200);
        bar.set_position(50);
        let out = Shared::default();
        let ticker = Ticker::start(bar.clone(), Duration::from_millis(20), out.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(110));
        drop(ticker);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert!(lines.len() >= 2, "{text}");
        assert!(
            lines[0].starts_with("gmem run: converting chunks: 50/200 (25%), "),
            "{text}"
        );
        // Dropped: no more lines.
        let before = text.len();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(out.0.lock().unwrap().len(), before);
    }

    #[test]
    fn a_short_run_writes_nothing() {
        let out = Shared::default();
        let ticker =
            Ticker::start(ProgressBar::hidden(), Duration::from_secs(5), out.clone()).unwrap();
        drop(ticker);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
