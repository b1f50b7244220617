//! `gmem stress --backends N`: backend processes (`gmem backend
//! --torture`) attached to the stressed file, pinning, reading and
//! checking random pages of their replicas while the workers convert.
//!
//! A backend's pin makes the workers' conversions fail with `EAGAIN` at
//! its page, which the workers accept as for their own pins. Each backend
//! checks, under every pin it holds, that its replica still shows the
//! pages shared (a conversion never passes a backend's pin); at the end
//! the backends are detached (their channels close), and each exits,
//! printing what it did. A backend that reports a violation, dies, or does
//! not exit is a violation of the run.

use std::time::Duration;

use gmem::{BackendId, GuestMemfd};

use crate::backend::{Process, Tortured};

/// The backend processes of a run.
pub(crate) struct Backends {
    processes: Vec<(BackendId, Process)>,
}

impl Backends {
    /// Starts and attaches `count` torturing backends to `mem`.
    pub(crate) fn start(mem: &GuestMemfd, count: u64) -> Result<Backends, String> {
        let mut processes = Vec::new();
        for _ in 0..count {
            let (process, id) = Process::attach(mem, &["--torture"])?;
            processes.push((id, process));
        }
        Ok(Backends { processes })
    }

    /// Detaches every backend, waits for each to exit, and adds up what they
    /// did; `violation` hears what went wrong.
    pub(crate) fn finish(self, mem: &GuestMemfd, violation: &dyn Fn(String)) -> Tortured {
        let mut total = Tortured::default();
        for (id, process) in self.processes {
            if !mem.detach_backend(id) {
                violation(format!("backend {} was no longer attached", id.get()));
            }
            let tortured = process
                .finish(Duration::from_secs(10))
                .and_then(|(success, line)| {
                    let parsed = Tortured::parse(&line);
                    parsed
                        .filter(|_| success)
                        .ok_or(format!("it exited with failure, saying {line:?}"))
                });
            match tortured {
                Ok(one) => {
                    total.pins += one.pins;
                    total.refused += one.refused;
                    total.reads += one.reads;
                    total.violations += one.violations;
                }
                Err(why) => violation(format!("backend {}: {why}", id.get())),
            }
        }
        if total.violations > 0 {
            violation(format!(
                "backends saw {} pinned pages turn private",
                total.violations
            ));
        }
        total
    }
}
