//! `gmem backend`: a backend process of a VMM's guest memory (the part of
//! a vhost-user backend that `gmem::remote` gives), and the echo peer the
//! benchmarks measure a cross-process floor against.
//!
//! The backend listens on a Unix socket (as vhost-user backends do), takes
//! one VMM, attaches to its file, maps it (so that conversions hide pages
//! from a real mapping of this process), and serves the VMM's conversions
//! until the VMM goes away.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use gmem::{GuestMemfd, Options};

use crate::floor::RawMapping;

/// Listens on `path` and accepts one connection (removing the path, so a
/// second backend can use it).
fn accept_one(path: &Path) -> Result<UnixStream, String> {
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let accepted = listener.accept().map_err(|e| format!("accept: {e}"));
    let _ = std::fs::remove_file(path);
    Ok(accepted?.0)
}

/// Serves one VMM: attach, map, serve until it goes; the requests served.
pub fn serve(path: &Path) -> Result<u64, String> {
    let socket = accept_one(path)?;
    let mut attached =
        GuestMemfd::attach(socket, Options::new()).map_err(|e| format!("attach: {e}"))?;
    let _mapping = attached
        .file()
        .mmap()
        .map_err(|e| format!("mapping the VMM's file: {e}"))?;
    attached.wait_for_vmm();
    Ok(attached.requests_served())
}

/// The floor's peer: for each 32-byte message, installs and removes guard
/// markers on one page of its own mapping of a memfd, then echoes it. The
/// page is not faulted in again between messages (cheaper than a backend's
/// hiding of a page it touched: the floor errs low).
pub fn echo(path: &Path) -> Result<(), String> {
    let mut socket = accept_one(path)?;
    let page = gmem::PAGE_SIZE as usize;
    let raw = RawMapping::new(page).map_err(|e| format!("memfd: {e}"))?;
    let mut message = [0; 32];
    while socket.read_exact(&mut message).is_ok() {
        let guarded = raw
            .guard_install(0, page)
            .and_then(|()| raw.guard_remove(0, page));
        guarded.map_err(|e| format!("guard markers: {e}"))?;
        if socket.write_all(&message).is_err() {
            break;
        }
    }
    Ok(())
}

/// What a torturing backend did, and what it found wrong.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tortured {
    /// Pins granted.
    pub pins: u64,
    /// Pins refused (a private page, or one the VMM is converting).
    pub refused: u64,
    /// Checked reads through its host mapping.
    pub reads: u64,
    /// Pins under which the replica showed a pinned page private: a
    /// conversion that passed a backend's pin.
    pub violations: u64,
}

impl Tortured {
    /// The one line the process prints at its end.
    pub fn line(&self) -> String {
        format!(
            "pins={} refused={} reads={} violations={}",
            self.pins, self.refused, self.reads, self.violations
        )
    }

    /// Parses [`line`](Self::line).
    pub fn parse(line: &str) -> Option<Tortured> {
        let mut values = line.split_whitespace().map(|word| {
            let (_, value) = word.split_once('=')?;
            value.parse().ok()
        });
        let mut next = || values.next().flatten();
        Some(Tortured {
            pins: next()?,
            refused: next()?,
            reads: next()?,
            violations: next()?,
        })
    }
}

/// `gmem stress`'s backend: attach, then two threads pin random pages of
/// the replica (1 to 4), read through the pins, hold them a moment, and
/// check that the pinned pages stay shared while held, until the VMM goes
/// away. Prints [`Tortured::line`].
pub fn torture(path: &Path) -> Result<Tortured, String> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let socket = accept_one(path)?;
    let attached =
        GuestMemfd::attach(socket, Options::new()).map_err(|e| format!("attach: {e}"))?;
    let file = attached.file();
    let map = file
        .mmap()
        .map_err(|e| format!("mapping the VMM's file: {e}"))?;
    let pages = file.size() / gmem::PAGE_SIZE;
    let counts: [AtomicU64; 4] = Default::default();
    std::thread::scope(|scope| {
        for thread in 0..2u64 {
            let (file, map, counts, attached) = (&**file, &map, &counts, &attached);
            scope.spawn(move || {
                let mut rng = gmem::testing::Rng::new(std::process::id() as u64 ^ thread << 40);
                let mut buf = vec![0u8; 4 * gmem::PAGE_SIZE as usize];
                while !attached.vmm_gone() {
                    let first = rng.below(pages);
                    let len = (1 + rng.below(4)).min(pages - first) * gmem::PAGE_SIZE;
                    let offset = first * gmem::PAGE_SIZE;
                    if rng.below(4) == 0 {
                        counts[2].fetch_add(1, Relaxed);
                        let _ = map.read(offset, &mut buf[..len as usize]);
                        continue;
                    }
                    let Ok(pin) = file.pin(offset, len) else {
                        counts[1].fetch_add(1, Relaxed);
                        continue;
                    };
                    counts[0].fetch_add(1, Relaxed);
                    pin.read(0, &mut buf[..len as usize])
                        .expect("read through a pin");
                    if rng.below(8) == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(rng.below(200)));
                    }
                    let private = (offset..offset + len)
                        .step_by(gmem::PAGE_SIZE as usize)
                        .any(|at| file.attribute(at) != Ok(gmem::Attribute::Shared));
                    if private {
                        counts[3].fetch_add(1, Relaxed);
                    }
                }
            });
        }
    });
    let [pins, refused, reads, violations] = counts.map(|c| c.into_inner());
    Ok(Tortured {
        pins,
        refused,
        reads,
        violations,
    })
}

/// A `gmem backend` child process of this binary, connected; killed when
/// dropped.
pub struct Process {
    /// The child.
    pub child: std::process::Child,
    /// The socket it accepted, until given to a file
    /// ([`attach`](Self::attach)).
    pub socket: Option<UnixStream>,
}

impl Process {
    /// Starts this binary as `gmem backend` with `extra` flags on a socket
    /// in a fresh path, with its standard output piped, and connects.
    pub fn start(extra: &[&str]) -> Result<Process, String> {
        use std::time::{Duration, Instant};
        let dir = std::env::temp_dir().join(format!("gmem-backend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let path = dir.join(format!("{}.sock", stamp.map_or(0, |d| d.as_nanos())));
        let exe = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
        let child = std::process::Command::new(exe)
            .arg("backend")
            .arg("--socket")
            .arg(&path)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting gmem backend: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(&path) {
                Ok(socket) => {
                    let socket = Some(socket);
                    return Ok(Process { child, socket });
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(format!("connecting to gmem backend: {e}")),
            }
        }
    }

    /// Starts a backend (`extra` flags beside) and attaches it to `mem`.
    pub fn attach(mem: &GuestMemfd, extra: &[&str]) -> Result<(Process, gmem::BackendId), String> {
        let mut process = Process::start(extra)?;
        // The file owns the only copy: detaching closes the channel.
        let socket = process.socket.take().ok_or("no socket")?;
        let id = mem
            .add_backend(socket, None)
            .map_err(|e| format!("attaching gmem backend: {e}"))?;
        Ok((process, id))
    }

    /// Waits up to `timeout` for the child to exit; its status and the
    /// last line it printed.
    pub fn finish(mut self, timeout: std::time::Duration) -> Result<(bool, String), String> {
        use std::io::BufRead;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    let out = self.child.stdout.take().ok_or("no output")?;
                    let lines = std::io::BufReader::new(out).lines();
                    let last = lines.map_while(Result::ok).last().unwrap_or_default();
                    return Ok((status.success(), last));
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Ok(None) => return Err("the backend did not exit".into()),
                Err(e) => return Err(format!("waiting for the backend: {e}")),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
