//! The VMM's side: the backends attached to one file, each a process that
//! maps the file through gmem and holds its own references, and the part
//! they play in a conversion.
//!
//! A conversion to private asks every backend to hide the range (`Hide`)
//! once the VMM's own check has passed and before its own mappings change:
//! the backend converts its replica of the file in place with the same
//! algorithm (its own exact check, with its own drain, then its guard
//! markers) and answers `Done`, or `Busy` with the referenced page, which
//! fails the conversion with `EAGAIN` at that page. The requests go out to
//! every backend before any answer is awaited. A backend that does not
//! answer within the file's [`Options::backend_timeout`] fails the
//! conversion ([`BackendFault::Unanswered`], `ETIMEDOUT`); whatever any
//! backend may have hidden is shown again. A conversion to shared tells the
//! backends after its point of no return and waits for their answers (so a
//! guest that posts a buffer right after sharing it finds it shown in the
//! backend), but never fails for them.
//!
//! A backend whose process exits (its pidfd becomes readable) is dropped
//! and stops counting: its pins died with it. One that closes its channel
//! while alive, breaks the protocol, or lets a request time out is
//! *broken*: until it exits or the VMM detaches it, conversions to private
//! fail with its fault, because its mappings may still show what they must
//! not. Nothing a backend sends changes the VMM's state: answers are
//! checked against the request in flight (an answer to a request never
//! sent, a page outside the range, a descriptor, a flood) and any mismatch
//! breaks that backend only.

use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::wire::{Channel, Kind, Message, PROTOCOL_VERSION, WireError};
use super::{ATTACH_GRACE, BackendFault, BackendId, BackendStatus, errno_of, exits_by};
use crate::attributes::{Attribute, AttributeMap};
use crate::file::{FileState, GuestMemfd};
use crate::{ConversionError, Error, PAGE_SHIFT};

/// Answers a backend may send for older requests (late answers of
/// requests that timed out) before the one awaited: more is a flood.
const LATE_ANSWERS: u32 = 64;

/// The backends of one file.
#[derive(Debug, Default)]
pub(crate) struct Backends {
    list: Mutex<Vec<Backend>>,
    /// Whether `list` may be non-empty: the conversion's cheap test.
    any: AtomicBool,
    next_id: AtomicU64,
}

/// What the VMM knows of one backend.
#[derive(Debug)]
struct Backend {
    id: BackendId,
    channel: Channel,
    /// The backend's process, when known: its exit drops the backend.
    process: Option<OwnedFd>,
    /// The last request sent.
    last_sent: u64,
    /// Why the backend can no longer take part, if it cannot.
    broken: Option<BackendFault>,
}

/// Why a request failed at one backend.
#[derive(Debug)]
enum Refusal {
    /// Its page at this offset is referenced.
    Busy(u64),
    /// It cannot take part.
    Fault(BackendFault),
}

/// How one backend answered one request.
enum Answer {
    Done,
    Busy(u64),
    Exited,
}

impl Backends {
    /// Whether any backend is attached. Relaxed: the list is read under its
    /// lock; a backend attached concurrently attached under the invalidate
    /// lock, which the caller holds.
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Asks every backend to hide `pages` of a conversion to private whose
    /// own check has passed. On error every backend shows them again and
    /// the error is the conversion's.
    pub(crate) fn hide(
        &self,
        pages: Range<u64>,
        offset: u64,
        timeout: Duration,
    ) -> Result<(), ConversionError> {
        let mut list = self.lock();
        let deadline = Instant::now() + timeout;
        let failure = exchange(&mut list, Kind::Hide, pages.clone(), deadline).err();
        let Some((id, refusal)) = failure else {
            self.forget_exited(&mut list);
            return Ok(());
        };
        // Put back whatever any backend hid; a late answer is dropped.
        let undo_deadline = Instant::now() + timeout;
        let _ = exchange(&mut list, Kind::Show, pages, undo_deadline);
        self.forget_exited(&mut list);
        Err(match refusal {
            Refusal::Busy(page) => ConversionError::Again { error_offset: page },
            Refusal::Fault(fault) => ConversionError::Backend {
                error_offset: offset,
                backend: id,
                fault,
            },
        })
    }

    /// Tells every backend that `pages` are shared (a conversion past its
    /// point of no return, or the undo of a hide). Never fails: a backend
    /// that does not answer is broken, and logged.
    pub(crate) fn show(&self, pages: Range<u64>, timeout: Duration) {
        let mut list = self.lock();
        let deadline = Instant::now() + timeout;
        if let Err((id, refusal)) = exchange(&mut list, Kind::Show, pages, deadline) {
            tracing::warn!(
                backend = id.0,
                ?refusal,
                "a backend failed to show a shared range"
            );
        }
        self.forget_exited(&mut list);
    }

    /// Has every backend check that no pin holds `pages`, about to be
    /// punched, and hold its replica still until [`end_punch`](Self::end_punch).
    /// A backend's pin fails the punch with `EBUSY` at its page (and every
    /// backend lets go at once).
    pub(crate) fn prepare_punch(
        &self,
        pages: Range<u64>,
        offset: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut list = self.lock();
        let deadline = Instant::now() + timeout;
        let prepared = exchange(&mut list, Kind::PunchPrepare, pages, deadline);
        let Err((_, refusal)) = prepared else {
            return Ok(());
        };
        end_punch(&mut list, false, deadline);
        self.forget_exited(&mut list);
        Err(match refusal {
            Refusal::Busy(page) => Error::Pinned {
                offset: page.max(offset),
            },
            Refusal::Fault(fault) => Error::Backend(fault),
        })
    }

    /// Tells every backend that the punch `prepare_punch` announced is done
    /// (or abandoned): no answer is awaited.
    pub(crate) fn end_punch(&self, punched: bool, timeout: Duration) {
        let mut list = self.lock();
        end_punch(&mut list, punched, Instant::now() + timeout);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Backend>> {
        self.list
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn forget_exited(&self, list: &mut Vec<Backend>) {
        list.retain(|backend| {
            let exited = matches!(backend.broken, Some(BackendFault::Exited));
            if exited {
                tracing::info!(
                    backend = backend.id.0,
                    "a backend exited and stops counting"
                );
            }
            !exited
        });
        self.any.store(!list.is_empty(), Ordering::Relaxed);
    }
}

/// Sends `PunchEnd` for the last request to every live backend (one that
/// did not prepare ignores it).
fn end_punch(list: &mut [Backend], punched: bool, deadline: Instant) {
    for backend in list.iter_mut().filter(|backend| backend.broken.is_none()) {
        let end = Message::new(Kind::PunchEnd, backend.last_sent, u64::from(punched), 0);
        if let Err(error) = backend.channel.send(end, None, deadline) {
            backend.fail(error);
        }
    }
}

/// Sends `kind` for `pages` to every backend, then awaits every answer.
/// Returns the first failure (a backend that exited is no failure).
fn exchange(
    list: &mut [Backend],
    kind: Kind,
    pages: Range<u64>,
    deadline: Instant,
) -> Result<(), (BackendId, Refusal)> {
    let (offset, len) = (
        pages.start << PAGE_SHIFT,
        (pages.end - pages.start) << PAGE_SHIFT,
    );
    let mut first = None;
    list.iter_mut().for_each(Backend::notice_exit);
    for backend in list.iter_mut().filter(|backend| backend.broken.is_none()) {
        backend.last_sent += 1;
        let request = Message::new(kind, backend.last_sent, offset, len);
        if let Err(error) = backend.channel.send(request, None, deadline) {
            backend.fail(error);
        }
    }
    for backend in list.iter_mut() {
        if backend.broken.is_none() {
            match backend.await_answer(offset..offset + len, deadline) {
                Ok(Answer::Done) => {}
                Ok(Answer::Busy(page)) => {
                    first.get_or_insert((backend.id, Refusal::Busy(page)));
                }
                Ok(Answer::Exited) => backend.broken = Some(BackendFault::Exited),
                Err(error) => backend.fail(error),
            }
        }
        if let Some(fault) = backend.fault_for(kind) {
            first.get_or_insert((backend.id, Refusal::Fault(fault)));
        }
    }
    first.map_or(Ok(()), Err)
}

impl Backend {
    /// Awaits the answer to the last request, for `range` (bytes).
    fn await_answer(&mut self, range: Range<u64>, deadline: Instant) -> Result<Answer, WireError> {
        let mut late = 0;
        loop {
            let watch = self.process.as_ref().map(|fd| fd.as_fd());
            let received = match self.channel.receive(deadline, watch) {
                Ok(received) => received,
                Err(WireError::Closed) => return self.closed(deadline),
                Err(error) => return Err(error),
            };
            if received.fd.is_some() {
                return Err(WireError::Protocol("a descriptor came with an answer"));
            }
            let answer = received.message;
            if answer.seq > self.last_sent || answer.seq == 0 {
                return Err(WireError::Protocol("an answer to a request never sent"));
            }
            if answer.seq < self.last_sent {
                late += 1;
                if late > LATE_ANSWERS {
                    return Err(WireError::Protocol("a flood of answers"));
                }
                continue;
            }
            return match answer.kind {
                Kind::Done => Ok(Answer::Done),
                Kind::Busy if range.contains(&answer.a) && answer.a % crate::PAGE_SIZE == 0 => {
                    Ok(Answer::Busy(answer.a))
                }
                Kind::Busy => Err(WireError::Protocol("a referenced page outside the request")),
                Kind::Failed => match errno_of(answer.a) {
                    Some(errno) => Err(WireError::Os(errno)),
                    None => Err(WireError::Protocol("a failure that is no errno")),
                },
                _ => Err(WireError::Protocol("a message that is no answer")),
            };
        }
    }

    /// The channel closed: the process is exiting (its files close after
    /// its memory is gone) or closed it alive. Waits for the exit until
    /// `deadline`.
    fn closed(&self, deadline: Instant) -> Result<Answer, WireError> {
        match &self.process {
            Some(pidfd) if exits_by(pidfd.as_fd(), deadline) => Ok(Answer::Exited),
            _ => Err(WireError::Closed),
        }
    }

    /// Marks a broken backend whose process has exited since.
    fn notice_exit(&mut self) {
        let exited = |pidfd: &OwnedFd| exits_by(pidfd.as_fd(), Instant::now());
        if self.broken.is_some() && self.process.as_ref().is_some_and(exited) {
            self.broken = Some(BackendFault::Exited);
        }
    }

    fn fail(&mut self, error: WireError) {
        let fault = wire_fault(error);
        tracing::warn!(backend = self.id.0, %fault, "a backend is broken");
        self.broken = Some(fault);
    }

    /// The fault that fails a conversion of `kind` now, if any.
    fn fault_for(&self, kind: Kind) -> Option<BackendFault> {
        match (&self.broken, kind) {
            (None | Some(BackendFault::Exited), _) | (_, Kind::Show) => None,
            (Some(fault), _) => Some(fault.clone()),
        }
    }
}

impl GuestMemfd {
    /// Attaches a backend: a process connected by `socket` that calls
    /// [`GuestMemfd::attach`] on its end. From the moment this returns
    /// every conversion of the file waits for it as described in
    /// [`gmem::remote`](crate::remote).
    ///
    /// `process` is a pidfd of the backend's process, whose exit drops the
    /// backend; without it, the kernel's record of the socket's peer is
    /// used (`SO_PEERCRED`), which names the backend only if it connected
    /// the socket itself (a `socketpair` made here names this process, and
    /// then a backend is dropped only by [`detach_backend`](Self::detach_backend)).
    ///
    /// Runs under the invalidate lock: no conversion runs between the state
    /// sent to the backend and its registration.
    ///
    /// Errors: `EPERM` ([`Error::Attached`]) on a backend's own replica;
    /// `EDEADLK` from a conversion listener's callback of this file;
    /// the backend's fault ([`Error::Backend`]: `ETIMEDOUT`, `EPROTO`,
    /// `EPROTONOSUPPORT`, `EPIPE`, or the socket's errno). Nothing is
    /// registered on error.
    pub fn add_backend(
        &self,
        socket: UnixStream,
        process: Option<OwnedFd>,
    ) -> Result<BackendId, Error> {
        let state = &*self.state;
        if state.attached {
            return Err(Error::Attached);
        }
        if crate::held::is_held(state.refs.id()) {
            return Err(Error::WouldDeadlock);
        }
        let process = process.or_else(|| super::peer_process(&socket));
        let mut channel = Channel::new(socket);
        let deadline = Instant::now() + state.backend_timeout + ATTACH_GRACE;
        let attrs = state.write_attrs();
        let welcomed = welcome(state, &attrs, &mut channel, process.as_ref(), deadline);
        welcomed.map_err(Error::Backend)?;
        let id = BackendId(state.backends.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let mut list = state.backends.lock();
        list.push(Backend {
            id,
            channel,
            process,
            last_sent: 0,
            broken: None,
        });
        state.backends.any.store(true, Ordering::Relaxed);
        tracing::debug!(backend = id.0, "a backend attached");
        Ok(id)
    }

    /// Stops counting a backend: its references no longer block
    /// conversions and conversions no longer wait for it. Call it once the
    /// backend's process is gone (or its mappings can no longer matter):
    /// while it lives it may map the range a conversion hides. Waits for a
    /// conversion in progress. Returns whether the backend was detached
    /// (from a conversion listener's callback of this file, where it would
    /// deadlock, nothing is: `false`).
    pub fn detach_backend(&self, id: BackendId) -> bool {
        let state = &*self.state;
        if crate::held::is_held(state.refs.id()) {
            return false;
        }
        let _attrs_locked = state.write_attrs();
        let mut list = state.backends.lock();
        let before = list.len();
        list.retain(|backend| backend.id != id);
        state
            .backends
            .any
            .store(!list.is_empty(), Ordering::Relaxed);
        list.len() != before
    }

    /// The backends attached to the file, and whether each is live.
    pub fn backends(&self) -> Vec<BackendStatus> {
        let state = &*self.state;
        let mut list = state.backends.lock();
        list.iter_mut().for_each(Backend::notice_exit);
        state.backends.forget_exited(&mut list);
        let status = |backend: &Backend| BackendStatus {
            id: backend.id,
            fault: backend.broken.clone(),
        };
        list.iter().map(status).collect()
    }
}

/// The VMM's side of the handshake: the backend's `Hello`, then the file
/// (its size, flags and descriptor) and its private runs, then the
/// backend's `Done`.
fn welcome(
    state: &FileState,
    attrs: &AttributeMap,
    channel: &mut Channel,
    process: Option<&OwnedFd>,
    deadline: Instant,
) -> Result<(), BackendFault> {
    let watch = process.map(|fd| fd.as_fd());
    let hello = channel.receive(deadline, watch).map_err(wire_fault)?;
    if hello.message.kind != Kind::Hello || hello.message.seq != 0 || hello.fd.is_some() {
        return Err(BackendFault::Protocol("the first message is no hello"));
    }
    if hello.message.a != PROTOCOL_VERSION {
        return Err(BackendFault::Version(hello.message.a));
    }
    let send = |message, fd| channel.send(message, fd, deadline).map_err(wire_fault);
    let flags = state.flags.bits();
    send(
        Message::new(Kind::Welcome, 0, state.size, flags),
        Some(state.backing.as_fd()),
    )?;
    let pages = state.size >> PAGE_SHIFT;
    let private = attrs
        .runs_in(0..pages)
        .filter(|run| run.attr == Attribute::Private);
    let mut runs = 0;
    for run in private {
        let range = run.range();
        let (start, len) = (
            range.start << PAGE_SHIFT,
            (range.end - range.start) << PAGE_SHIFT,
        );
        send(Message::new(Kind::PrivateRun, 0, start, len), None)?;
        runs += 1;
    }
    send(Message::new(Kind::Ready, 0, runs, 0), None)?;
    let done = channel.receive(deadline, watch).map_err(wire_fault)?;
    match done.message {
        Message {
            kind: Kind::Done,
            seq: 0,
            ..
        } if done.fd.is_none() => Ok(()),
        Message {
            kind: Kind::Failed,
            a,
            ..
        } => Err(errno_of(a).map_or(
            BackendFault::Protocol("a failure that is no errno"),
            BackendFault::Failed,
        )),
        _ => Err(BackendFault::Protocol(
            "the attachment was not acknowledged",
        )),
    }
}

pub(crate) fn wire_fault(error: WireError) -> BackendFault {
    match error {
        WireError::Closed => BackendFault::ChannelClosed,
        WireError::TimedOut => BackendFault::Unanswered,
        WireError::Protocol(what) => BackendFault::Protocol(what),
        WireError::Os(errno) => BackendFault::Failed(errno),
    }
}
