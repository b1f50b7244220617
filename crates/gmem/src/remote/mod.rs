//! Backends: other processes that map a file and do I/O on it (vhost-user
//! devices), held to the same rules as the VMM's own threads.
//!
//! The VMM owns the file ([`GuestMemfd`](crate::GuestMemfd)); a backend holds a *replica*
//! ([`GuestMemfd::attach`](crate::GuestMemfd::attach)): the same memory, mapped through gmem in the
//! backend's process, with its own attribute map, references, pins, host
//! mappings and guard markers, all made by the same code as the VMM's. The
//! VMM drives every conversion of the replica over a channel (a connected
//! Unix socket, `wire.rs`): a conversion to private completes only once
//! every live backend has run the kernel's algorithm on its replica (its
//! exact check, with its own drain, then hiding the range in its mappings)
//! and answered; a page a backend's pin holds fails it with `EAGAIN` and
//! that page's offset, as one of the VMM's own would. `frontend.rs` is the
//! VMM's side (the backends of a file and their part in a conversion),
//! `backend.rs` the backend's (the replica and the thread that serves the
//! VMM's requests).
//!
//! gmem keeps a backend from touching private pages *by accident*, as it
//! keeps the VMM's own threads: a backend holds the file's descriptor and
//! could map it again. It is no defence against a hostile backend.

mod backend;
mod frontend;
mod wire;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

pub use backend::Attached;

/// The longest an attachment may take beyond the timeout, on either side:
/// the state sent is as long as the file has private runs.
const ATTACH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
pub(crate) use frontend::Backends;

/// A backend of one file, as [`GuestMemfd::add_backend`] numbered it.
///
/// [`GuestMemfd::add_backend`]: crate::GuestMemfd::add_backend
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub(crate) u64);

impl BackendId {
    /// The number (from 1, in the order backends were added to the file).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Why a backend cannot take part in conversions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendFault {
    /// It did not answer within the file's
    /// [`backend_timeout`](crate::Options::backend_timeout) (`ETIMEDOUT`).
    #[error("the backend did not answer in time")]
    Unanswered,
    /// It closed its channel and its process has not exited (`EPIPE`).
    #[error("the backend closed its channel but its process lives")]
    ChannelClosed,
    /// It sent what the protocol does not allow (`EPROTO`).
    #[error("the backend broke the protocol: {0}")]
    Protocol(&'static str),
    /// It speaks another version of the protocol (`EPROTONOSUPPORT`).
    #[error("the backend speaks protocol version {0}, not 1")]
    Version(u64),
    /// Its channel, or its own conversion, failed with this errno.
    #[error("the backend failed: {0}")]
    Failed(Errno),
    /// Its process has exited (`ESRCH`): it no longer counts.
    #[error("the backend's process has exited")]
    Exited,
}

impl BackendFault {
    /// The errno that stands for the fault.
    pub fn errno(&self) -> Errno {
        match self {
            BackendFault::Unanswered => Errno::TIMEDOUT,
            BackendFault::ChannelClosed => Errno::PIPE,
            BackendFault::Protocol(_) => Errno::PROTO,
            BackendFault::Version(_) => Errno::PROTONOSUPPORT,
            BackendFault::Failed(errno) => *errno,
            BackendFault::Exited => Errno::SRCH,
        }
    }
}

/// A backend as the VMM sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendStatus {
    /// Its number.
    pub id: BackendId,
    /// Why it cannot take part, or `None` while it is live.
    pub fault: Option<BackendFault>,
}

/// Whether the process of `pidfd` exits by `deadline` (a pidfd polls
/// readable once its process has exited).
fn exits_by(pidfd: BorrowedFd<'_>, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = Timespec::try_from(left).unwrap_or_default();
        let mut fds = [PollFd::from_borrowed_fd(pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

/// The errno a backend reports, if it is one.
fn errno_of(raw: u64) -> Option<Errno> {
    (1..4096)
        .contains(&raw)
        .then(|| Errno::from_raw_os_error(raw as i32))
}

/// A pidfd of the process at the other end of `socket`, as the kernel
/// recorded it at `connect` (or `socketpair`): `None` where that is this
/// process (a pair made here and handed to a child) or unknown.
fn peer_process(socket: &UnixStream) -> Option<OwnedFd> {
    let peer = rustix::net::sockopt::socket_peercred(socket.as_fd()).ok()?;
    if peer.pid == rustix::process::getpid() {
        return None;
    }
    rustix::process::pidfd_open(peer.pid, rustix::process::PidfdFlags::empty()).ok()
}
