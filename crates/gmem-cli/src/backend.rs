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
