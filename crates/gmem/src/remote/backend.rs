//! The backend's side: a replica of the VMM's file in the backend's
//! process, and the thread that serves the VMM's requests on it.
//!
//! The replica is a [`GuestMemfd`] over the VMM's descriptor, with the
//! VMM's size, flags and private runs, and everything of its own: the
//! backend's pins, host mappings (guard markers over private runs) and
//! vm-memory views are made by the same code as the VMM's. Only its
//! conversions are the VMM's: `set_attributes` and hole punches on a
//! replica fail with `EPERM`, and the serving thread runs each `Hide` and
//! `Show` as a conversion of the replica, answering `Done`, `Busy` with the
//! referenced page, or `Failed` with the errno.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::wire::{Channel, Kind, Message, PROTOCOL_VERSION, Received, WireError};
use super::{ATTACH_GRACE, BackendFault};
use crate::attributes::{Attribute, AttributeMap};
use crate::backing::{Backing, BackingKind};
use crate::file::{Flags, GuestMemfd, Options};
use crate::{ConversionError, Error, PAGE_SHIFT, PAGE_SIZE};

/// A backend's replica of a VMM's file, served while this lives.
///
/// Dropping it stops the serving thread (the VMM then sees the channel
/// close) and drops the replica once its last pin, mapping or view is gone.
#[derive(Debug)]
pub struct Attached {
    file: Arc<GuestMemfd>,
    socket: UnixStream,
    server: Option<JoinHandle<()>>,
    shared: Arc<Served>,
}

/// What the serving thread tells the backend.
#[derive(Debug, Default)]
struct Served {
    requests: AtomicU64,
    vmm_gone: AtomicBool,
}

impl Attached {
    /// The replica: pin, map and view it as the VMM's own file.
    pub fn file(&self) -> &Arc<GuestMemfd> {
        &self.file
    }

    /// The VMM's requests served so far.
    pub fn requests_served(&self) -> u64 {
        // Relaxed: a statistic.
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Serves the VMM's requests on this thread's behalf until the VMM goes
    /// away (closes the channel or breaks the protocol): a backend
    /// process's main loop once its devices run on other threads.
    pub fn wait_for_vmm(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }

    /// Whether the VMM closed the channel (or broke the protocol): no more
    /// requests will be served, and the backend should stop.
    pub fn vmm_gone(&self) -> bool {
        // Acquire pairs with the Release of the serving thread's last store.
        self.shared.vmm_gone.load(Ordering::Acquire)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

impl GuestMemfd {
    /// Attaches to a VMM's file over `socket`, whose other end the VMM
    /// passes to [`GuestMemfd::add_backend`]: receives the file's descriptor
    /// and state, makes the replica with `options`, and serves the VMM's
    /// conversions on it from a thread until the [`Attached`] is dropped or
    /// the VMM goes away.
    ///
    /// Errors: [`Error::Backend`] for a VMM that breaks the handshake, does
    /// not answer within the options' timeout (plus 5 s), or sends a file or
    /// state that does not check out (`EPROTO`); the errno of a socket,
    /// mapping or thread that fails. Nothing is left on error.
    pub fn attach(socket: UnixStream, options: Options) -> Result<Attached, Error> {
        let mut channel = Channel::new(socket.try_clone().map_err(io_error("dup"))?);
        let deadline = Instant::now() + options.backend_timeout + ATTACH_GRACE;
        let hello = Message::new(Kind::Hello, 0, PROTOCOL_VERSION, 0);
        channel.send(hello, None, deadline).map_err(fault)?;
        let welcome = channel.receive(deadline, None).map_err(fault)?;
        let (file, pages) = replica(welcome, options)?;
        let attrs = private_runs(&mut channel, pages, deadline)?;
        *file.state.write_attrs() = attrs;
        channel
            .send(Message::new(Kind::Done, 0, 0, 0), None, deadline)
            .map_err(fault)?;
        let file = Arc::new(file);
        let shared = Arc::new(Served::default());
        let serving = (file.clone(), shared.clone());
        let server = std::thread::Builder::new()
            .name("gmem-backend".into())
            .spawn(move || serve(&serving.0, channel, &serving.1))
            .map_err(io_error("spawning the serving thread"))?;
        Ok(Attached {
            file,
            socket,
            server: Some(server),
            shared,
        })
    }
}

/// The replica of the file a `Welcome` describes.
fn replica(welcome: Received, options: Options) -> Result<(GuestMemfd, u64), Error> {
    let Received { message, fd } = welcome;
    let protocol = |what| Error::Backend(BackendFault::Protocol(what));
    let (Kind::Welcome, 0, Some(fd)) = (message.kind, message.seq, fd) else {
        return Err(protocol(
            "the VMM's first message is no welcome with a file",
        ));
    };
    let (size, flags) = (message.a, Flags::from_bits(message.b));
    let flags = flags.ok_or(protocol("unknown flag bits"))?;
    GuestMemfd::validate(size, flags).map_err(|_| protocol("a file size out of range"))?;
    let stat = rustix::fs::fstat(&fd).map_err(Error::os("fstat"))?;
    if u64::try_from(stat.st_size) != Ok(size) {
        return Err(protocol("the file's size is not the size announced"));
    }
    let backing = Backing::from_fd(fd, BackingKind::Memfd, None);
    let file = GuestMemfd::with_backing_as(backing, size, flags, options, true)?;
    Ok((file, size >> PAGE_SHIFT))
}

/// Reads the private runs up to `Ready`, each checked: page-aligned,
/// non-empty, inside the file, after the previous one; as many as `Ready`
/// says. Every run read consumes a message, so a hostile count costs only
/// the messages sent.
fn private_runs(
    channel: &mut Channel,
    pages: u64,
    deadline: Instant,
) -> Result<AttributeMap, Error> {
    let protocol = |what| Error::Backend(BackendFault::Protocol(what));
    let mut attrs = AttributeMap::new(pages, Attribute::Shared);
    let (mut next, mut runs) = (0, 0);
    loop {
        let Received { message, fd } = channel.receive(deadline, None).map_err(fault)?;
        if fd.is_some() || message.seq != 0 {
            return Err(protocol("a descriptor or sequence number in the state"));
        }
        match message.kind {
            Kind::PrivateRun => {}
            Kind::Ready if message.a == runs => return Ok(attrs),
            _ => return Err(protocol("the state ends without a matching count")),
        }
        let (offset, len) = (message.a, message.b);
        let end = offset
            .checked_add(len)
            .ok_or(protocol("a run that wraps"))?;
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(protocol("a run that is empty or not page-aligned"));
        }
        if offset >> PAGE_SHIFT < next || end >> PAGE_SHIFT > pages {
            return Err(protocol("a run that overlaps another or leaves the file"));
        }
        attrs.prepare().map_err(|_| Error::Os {
            call: "reserving the attribute map",
            errno: Errno::NOMEM,
        })?;
        attrs.set(
            (offset >> PAGE_SHIFT)..(end >> PAGE_SHIFT),
            Attribute::Private,
        );
        (next, runs) = (end >> PAGE_SHIFT, runs + 1);
    }
}

/// The serving thread: each request, a conversion of the replica, answered.
fn serve(file: &GuestMemfd, mut channel: Channel, served: &Served) {
    loop {
        let request = match channel.receive(far(), None) {
            Ok(Received { message, fd: None }) => message,
            Ok(_) => break tracing::warn!("the VMM sent a descriptor with a request"),
            Err(WireError::Closed) => break,
            Err(WireError::TimedOut) => continue,
            Err(error) => break tracing::warn!(?error, "the VMM's channel failed"),
        };
        let to = match request.kind {
            Kind::Hide => Attribute::Private,
            Kind::Show => Attribute::Shared,
            Kind::PunchPrepare => {
                // Relaxed: a statistic.
                served.requests.fetch_add(1, Ordering::Relaxed);
                match hold_for_punch(file, &mut channel, request) {
                    Ok(()) => continue,
                    Err(error) => break tracing::warn!(?error, "a punch was not ended"),
                }
            }
            // The end of a punch this replica did not prepare (it was busy).
            Kind::PunchEnd => continue,
            _ => break tracing::warn!(kind = ?request.kind, "the VMM sent no request"),
        };
        let answer = match file.convert(request.a, request.b, to) {
            Ok(()) => Message::new(Kind::Done, request.seq, 0, 0),
            Err(ConversionError::Again { error_offset }) => {
                Message::new(Kind::Busy, request.seq, error_offset, 0)
            }
            Err(error) => Message::new(Kind::Failed, request.seq, error.errno() as u64, 0),
        };
        // Relaxed: a statistic.
        served.requests.fetch_add(1, Ordering::Relaxed);
        if channel.send(answer, None, far()).is_err() {
            break;
        }
    }
    // Release pairs with the Acquire in `vmm_gone`.
    served.vmm_gone.store(true, Ordering::Release);
}

/// A punch the VMM prepares: under the replica's invalidate lock, held
/// exclusively until the VMM's `PunchEnd`, no pin may hold the range (the
/// kernel's punch check, with its drain) and none can take it, so no
/// backend pin sees a page the VMM punches. A pin answers `Busy`.
fn hold_for_punch(
    file: &GuestMemfd,
    channel: &mut Channel,
    request: Message,
) -> Result<(), WireError> {
    let state = &*file.state;
    let answer = |kind, a| Message::new(kind, request.seq, a, 0);
    let pages = match file.conversion_pages(request.a, request.b) {
        Ok(pages) => pages,
        Err(error) => return channel.send(answer(Kind::Failed, error.errno() as u64), None, far()),
    };
    let attrs = state.write_attrs();
    state.refs.unmap(pages.clone());
    if let Err(page) = state.refs.check_unreferenced(pages.clone()) {
        drop(attrs);
        let busy = answer(Kind::Busy, (page << PAGE_SHIFT).max(request.a));
        return channel.send(busy, None, far());
    }
    channel.send(answer(Kind::Done, 0), None, far())?;
    let end = channel.receive(Instant::now() + PUNCH_HOLD, None)?;
    match end.message {
        Message {
            kind: Kind::PunchEnd,
            seq,
            a,
            ..
        } if seq == request.seq && end.fd.is_none() => {
            if a == 1 {
                state.refs.mark_unallocated(pages.clone());
                state.refs.reshape(pages, |range| attrs.is_uniform(range));
            }
            Ok(())
        }
        _ => Err(WireError::Protocol("a prepared punch was not ended")),
    }
}

/// The longest a replica holds still for a punch the VMM prepared.
const PUNCH_HOLD: Duration = Duration::from_secs(10);

/// A deadline no answer should reach.
fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn fault(error: WireError) -> Error {
    Error::Backend(super::frontend::wire_fault(error))
}

fn io_error(call: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |error| Error::Os {
        call,
        errno: Errno::from_io_error(&error).unwrap_or(Errno::IO),
    }
}
