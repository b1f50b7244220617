//! The channel between a VMM and one backend process: fixed-size messages
//! on a connected Unix stream socket, with file descriptors passed beside
//! them (`SCM_RIGHTS`), and waits bounded by a deadline.
//!
//! Every message is [`MESSAGE_BYTES`] bytes, little-endian: its kind
//! (`u32`), four reserved bytes that must be zero, a sequence number and
//! two operands (`u64` each). A reader decodes a message only once it has
//! all its bytes and refuses any kind, reserved bits or descriptor it did
//! not expect, so nothing a peer sends reaches the caller unchecked.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The bytes of one message.
pub(crate) const MESSAGE_BYTES: usize = 32;

/// The version of the protocol this gmem speaks.
pub(crate) const PROTOCOL_VERSION: u64 = 1;

/// What a message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    /// Backend to VMM, first: `a` the protocol version, `b` the table's
    /// pages; the backend's reference table rides along.
    Hello = 1,
    /// VMM to backend: `a` the file's size, `b` its flags; the guest
    /// memory's descriptor rides along. Private runs and `Ready` follow.
    Welcome = 2,
    /// VMM to backend: `[a, a + b)` is private.
    PrivateRun = 3,
    /// VMM to backend: the state is complete; `a` runs were sent.
    Ready = 4,
    /// VMM to backend, request `seq`: make `[a, a + b)` private.
    Hide = 5,
    /// VMM to backend, request `seq`: make `[a, a + b)` shared.
    Show = 6,
    /// Backend to VMM: request `seq` is done (for `seq` 0, attached).
    Done = 7,
    /// Backend to VMM: request `seq` failed, the page at `a` is referenced.
    Busy = 8,
    /// Backend to VMM: request `seq` failed with errno `a`.
    Failed = 9,
    /// VMM to backend, request `seq`: `[a, a + b)` is about to be punched;
    /// check that no pin holds it and hold the replica's invalidate lock
    /// until `PunchEnd`.
    PunchPrepare = 10,
    /// VMM to backend, for the prepare `seq` (no answer): the punch is done
    /// (`a` 1) or abandoned (`a` 0); let go of the lock.
    PunchEnd = 11,
}

impl Kind {
    fn from_u32(raw: u32) -> Option<Kind> {
        Some(match raw {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::PrivateRun,
            4 => Kind::Ready,
            5 => Kind::Hide,
            6 => Kind::Show,
            7 => Kind::Done,
            8 => Kind::Busy,
            9 => Kind::Failed,
            10 => Kind::PunchPrepare,
            11 => Kind::PunchEnd,
            _ => return None,
        })
    }
}

/// One message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) kind: Kind,
    pub(crate) seq: u64,
    pub(crate) a: u64,
    pub(crate) b: u64,
}

impl Message {
    pub(crate) fn new(kind: Kind, seq: u64, a: u64, b: u64) -> Message {
        Message { kind, seq, a, b }
    }

    fn encode(&self) -> [u8; MESSAGE_BYTES] {
        let mut bytes = [0; MESSAGE_BYTES];
        bytes[0..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        bytes[8..16].copy_from_slice(&self.seq.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.a.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.b.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8; MESSAGE_BYTES]) -> Result<Message, WireError> {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let raw = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
        let kind = Kind::from_u32(raw).ok_or(WireError::Protocol("unknown message kind"))?;
        if bytes[4..8] != [0; 4] {
            return Err(WireError::Protocol("reserved bytes are not zero"));
        }
        Ok(Message::new(kind, word(8), word(16), word(24)))
    }
}

/// Why a channel could not carry a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WireError {
    /// The peer closed the channel (or, with a process to watch, exited).
    Closed,
    /// The deadline passed first.
    TimedOut,
    /// The peer broke the protocol.
    Protocol(&'static str),
    /// The socket failed.
    Os(Errno),
}

/// A message received, with the descriptor that came with it.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) message: Message,
    pub(crate) fd: Option<OwnedFd>,
}

/// One end of a channel: the socket and the part of a message read so far.
#[derive(Debug)]
pub(crate) struct Channel {
    socket: UnixStream,
    partial: [u8; MESSAGE_BYTES],
    filled: usize,
    /// A descriptor received with the partial message.
    partial_fd: Option<OwnedFd>,
}

impl Channel {
    pub(crate) fn new(socket: UnixStream) -> Channel {
        Channel {
            socket,
            partial: [0; MESSAGE_BYTES],
            filled: 0,
            partial_fd: None,
        }
    }

    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Sends `message`, with `fd` beside it. A full socket buffer waits
    /// until `deadline`.
    pub(crate) fn send(
        &self,
        message: Message,
        fd: Option<BorrowedFd<'_>>,
        deadline: Instant,
    ) -> Result<(), WireError> {
        let bytes = message.encode();
        let mut sent = 0;
        while sent < MESSAGE_BYTES {
            let fds = fd.as_slice();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if sent == 0 && !fds.is_empty() {
                control.push(SendAncillaryMessage::ScmRights(fds));
            }
            let iov = [IoSlice::new(&bytes[sent..])];
            let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
            match rustix::net::sendmsg(&self.socket, &iov, &mut control, flags) {
                Ok(n) => sent += n,
                Err(Errno::AGAIN) => wait_for(self.socket(), PollFlags::OUT, None, deadline)?,
                Err(Errno::INTR) => {}
                Err(Errno::PIPE | Errno::CONNRESET) => return Err(WireError::Closed),
                Err(errno) => return Err(WireError::Os(errno)),
            }
        }
        Ok(())
    }

    /// Receives the next message by `deadline`. With `watch` (a pidfd of the
    /// peer), the peer's exit ends the wait as a closed channel.
    pub(crate) fn receive(
        &mut self,
        deadline: Instant,
        watch: Option<BorrowedFd<'_>>,
    ) -> Result<Received, WireError> {
        while self.filled < MESSAGE_BYTES {
            match self.receive_some() {
                Ok(0) => return Err(WireError::Closed),
                Ok(_) => {}
                Err(Errno::AGAIN) => wait_for(self.socket(), PollFlags::IN, watch, deadline)?,
                Err(Errno::INTR) => {}
                Err(Errno::CONNRESET) => return Err(WireError::Closed),
                Err(errno) => return Err(WireError::Os(errno)),
            }
        }
        self.filled = 0;
        let fd = self.partial_fd.take();
        let message = Message::decode(&self.partial)?;
        Ok(Received { message, fd })
    }

    fn receive_some(&mut self) -> Result<usize, Errno> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut self.partial[self.filled..])];
        let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
        let got = rustix::net::recvmsg(&self.socket, &mut iov, &mut control, flags)?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    // More than one descriptor for a message: the extra
                    // ones are closed here; the receiver sees the first.
                    self.partial_fd.get_or_insert(fd);
                }
            }
        }
        self.filled += got.bytes;
        Ok(got.bytes)
    }
}

/// Waits until `socket` is ready for `events`, `watch` (a pidfd) becomes
/// readable (the process exited), or `deadline` passes.
fn wait_for(
    socket: BorrowedFd<'_>,
    events: PollFlags,
    watch: Option<BorrowedFd<'_>>,
    deadline: Instant,
) -> Result<(), WireError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::TimedOut);
        }
        let timeout = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::from_borrowed_fd(socket, events)];
        let mut both;
        let polled: &mut [PollFd<'_>] = match watch {
            Some(pidfd) => {
                both = [
                    fds[0].clone(),
                    PollFd::from_borrowed_fd(pidfd, PollFlags::IN),
                ];
                &mut both
            }
            None => &mut fds,
        };
        match rustix::event::poll(polled, Some(&timeout)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => {}
            Err(errno) => return Err(WireError::Os(errno)),
        }
        if polled.len() == 2 && !polled[1].revents().is_empty() {
            return Err(WireError::Closed);
        }
        let ready = polled[0].revents();
        if ready.intersects(events | PollFlags::HUP | PollFlags::ERR) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn messages_and_descriptors_cross() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (Channel::new(a), Channel::new(b));
        let memfd = rustix::fs::memfd_create("wire", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let sent = Message::new(Kind::Welcome, 0, 4096, 3);
        a.send(sent, Some(memfd.as_fd()), soon()).unwrap();
        a.send(Message::new(Kind::Ready, 0, 0, 0), None, soon())
            .unwrap();
        let got = b.receive(soon(), None).unwrap();
        assert_eq!(got.message, sent);
        assert!(got.fd.is_some());
        let next = b.receive(soon(), None).unwrap();
        assert_eq!(next.message.kind, Kind::Ready);
        assert!(next.fd.is_none());
    }

    #[test]
    fn a_message_in_pieces_is_put_together() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        let bytes = Message::new(Kind::Hide, 7, 8192, 4096).encode();
        a.write_all(&bytes[..5]).unwrap();
        let early = Instant::now() + Duration::from_millis(20);
        assert_eq!(b.receive(early, None).unwrap_err(), WireError::TimedOut);
        a.write_all(&bytes[5..]).unwrap();
        let got = b.receive(soon(), None).unwrap().message;
        assert_eq!(got, Message::new(Kind::Hide, 7, 8192, 4096));
    }

    #[test]
    fn unknown_kinds_and_reserved_bits_are_refused() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        let mut bytes = Message::new(Kind::Done, 1, 0, 0).encode();
        bytes[0] = 99;
        a.write_all(&bytes).unwrap();
        let mut reserved = Message::new(Kind::Done, 1, 0, 0).encode();
        reserved[6] = 1;
        a.write_all(&reserved).unwrap();
        assert!(matches!(
            b.receive(soon(), None),
            Err(WireError::Protocol(_))
        ));
        assert!(matches!(
            b.receive(soon(), None),
            Err(WireError::Protocol(_))
        ));
    }

    #[test]
    fn a_closed_peer_ends_the_wait() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        drop(a);
        assert_eq!(b.receive(soon(), None).unwrap_err(), WireError::Closed);
    }
}
