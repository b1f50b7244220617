//! The virtio device of `gmem run`: one split virtqueue (`virtio-queue`)
//! per vCPU, served by a device thread that checks the guest's payload
//! pattern and rewrites it with its own.
//!
//! **Layout.** Each queue owns [`QUEUE_PAGES`] pages of the firmware area,
//! which stay shared for the whole run: the descriptor table, the available
//! ring and [`SLOTS`] request slots (a header and a status each) in the
//! first page, the used ring in the second ([`QueueLayout`]). Up to
//! [`SLOTS`] requests are in flight: request `n` (the `n`th available entry)
//! uses slot `n % SLOTS`, its descriptors `4 * slot` to `4 * slot + 3`.
//!
//! **A request** is one chain of four descriptors:
//!
//! | # | what | direction | length |
//! |---|---|---|---|
//! | 0 | header, in the slot: the payload's seed (`u32`) | device-readable | [`HEADER_LEN`] |
//! | 1 | payload: whole pages under the pattern of the seed | device-readable | pages |
//! | 2 | reply: whole pages the device writes with [`reply_seed`]'s pattern | device-writable | as the payload |
//! | 3 | status, in the slot: a [`RequestStatus`] (`u32`) | device-writable | [`STATUS_LEN`] |
//!
//! The guest of `gmem run` points the payload and the reply at the same
//! pages, so the device rewrites them in place. Patterns touch the first and
//! last dword of each page, as the guest interpreter's do
//! ([`crate::guest::fill_page`]).
//!
//! **Memory.** The device is generic over `vm_memory::GuestMemory` for its
//! rings; a [`BufferAccess`] holds a request's four buffers for the device
//! in one call while it works on them ([`HeldBuffers`]: on gmem's view, the
//! chain pinned once, `gmem::vm_memory::PinnedChain`), serves the device's
//! copies into and out of them, and says when the VMM asked devices to let
//! go. A buffer the device cannot hold or access (a private page) fails the
//! request with [`RequestStatus::AccessError`]; nothing panics.

use std::fmt;
use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use gmem::PAGE_SIZE;

use crate::guest::pattern_word;

/// Entries of each queue (a power of two, as split queues need).
pub const QUEUE_SIZE: u16 = 16;
/// Pages each queue's rings take.
pub const QUEUE_PAGES: u64 = 2;
/// Bytes of a request's header.
pub const HEADER_LEN: u32 = 16;
/// Bytes of a request's status.
pub const STATUS_LEN: u32 = 4;
/// Descriptors of one request's chain.
pub const CHAIN_LEN: u16 = 4;
/// Requests in flight at most: one a slot (a power of two).
pub const SLOTS: u16 = QUEUE_SIZE / CHAIN_LEN;
/// Bytes of a request slot: its descriptors' bytes, so that one offset
/// serves both.
pub const SLOT_SIZE: u64 = 16 * CHAIN_LEN as u64;
/// Offset of a slot's status from the slot.
pub const SLOT_STATUS: u64 = HEADER_LEN as u64;

/// How often a device tries a request again after a let-go request, and
/// waits [`LET_GO_PAUSE`] at most this often for the VMM to lift it.
pub const LET_GO_TRIES: u32 = 100;
/// The pause between looks at a let-go request.
pub const LET_GO_PAUSE: std::time::Duration = std::time::Duration::from_micros(50);

/// Where one queue's parts live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// The first byte of the queue's pages (page-aligned).
    pub base: u64,
}

impl QueueLayout {
    /// Offset of the descriptor table from [`base`](Self::base).
    pub const DESC_TABLE: u64 = 0;
    /// Offset of the available ring.
    pub const AVAIL_RING: u64 = 0x100;
    /// Offset of the request slots (each a header, then a status).
    pub const SLOTS: u64 = 0x200;
    /// Offset of the used ring (its own page).
    pub const USED_RING: u64 = 0x1000;

    /// The guest-physical address of the part at `offset`.
    pub fn at(&self, offset: u64) -> GuestAddress {
        GuestAddress(self.base + offset)
    }

    /// Where slot `slot`'s header is.
    pub fn header(&self, slot: u16) -> GuestAddress {
        self.at(Self::SLOTS + u64::from(slot) * SLOT_SIZE)
    }

    /// Where slot `slot`'s status is.
    pub fn status(&self, slot: u16) -> GuestAddress {
        self.at(Self::SLOTS + u64::from(slot) * SLOT_SIZE + SLOT_STATUS)
    }

    /// Where descriptor `index` is.
    pub fn descriptor(&self, index: u16) -> GuestAddress {
        self.at(Self::DESC_TABLE + 16 * u64::from(index))
    }

    /// The bytes the queue's pages cover.
    pub fn len(&self) -> u64 {
        QUEUE_PAGES * PAGE_SIZE
    }

    /// Never: a queue always covers its pages.
    pub fn is_empty(&self) -> bool {
        false
    }
}

// The parts fit where the layout puts them.
const _: () = assert!(
    QueueLayout::AVAIL_RING >= QueueLayout::DESC_TABLE + 16 * QUEUE_SIZE as u64
        && QueueLayout::SLOTS >= QueueLayout::AVAIL_RING + 6 + 2 * QUEUE_SIZE as u64
        && SLOT_STATUS + STATUS_LEN as u64 <= SLOT_SIZE
        && QueueLayout::USED_RING >= QueueLayout::SLOTS + SLOTS as u64 * SLOT_SIZE
        && QueueLayout::USED_RING + 6 + 8 * QUEUE_SIZE as u64 <= QUEUE_PAGES * PAGE_SIZE
        && SLOTS.is_power_of_two()
);

/// The seed of the pattern the device writes in reply to a payload of
/// `seed`.
pub fn reply_seed(seed: u32) -> u32 {
    seed.rotate_left(8) ^ 0x5a00_005a
}

/// What the device writes in a request's status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RequestStatus {
    /// Served: the payload held the pattern and the reply is written.
    Ok = 0,
    /// Served, but the payload's pattern was wrong somewhere.
    DataError = 1,
    /// A buffer could not be accessed (a private page, or the VMM asked
    /// devices to let go of it): not served.
    AccessError = 2,
    /// The chain is not a request (see the module's table): not served.
    BadChain = 3,
}

/// A queue-level failure: the device cannot go on with this queue.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// The queue's configuration was refused (size or ring addresses).
    #[error("setting up the virtqueue at {base:#x}: {source}")]
    Setup {
        /// The queue's base.
        base: u64,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// The rings do not fit the device's memory.
    #[error("the virtqueue at {base:#x} is not in the device's memory")]
    Invalid {
        /// The queue's base.
        base: u64,
    },
    /// The available ring could not be read, or holds more entries than the
    /// queue.
    #[error("reading the available ring: {0}")]
    AvailRing(#[source] virtio_queue::Error),
    /// The used ring could not be read.
    #[error("reading the used ring: {0}")]
    UsedRing(#[source] virtio_queue::Error),
    /// A used entry could not be added.
    #[error("adding the used entry of chain {head}: {source}")]
    AddUsed {
        /// The chain's head.
        head: u16,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// A device resumed where its rings say a request is in flight, or at
    /// another place than the one saved.
    #[error(
        "the virtqueue at {base:#x} has available index {avail} and used index {used}, \
         not both {} and {} where the device resumes",
        .saved.next_avail,
        .saved.next_used
    )]
    NotAtRest {
        /// The queue's base.
        base: u64,
        /// The available index in the rings.
        avail: u16,
        /// The used index in the rings.
        used: u16,
        /// Where the device was to resume.
        saved: QueuePosition,
    },
}

/// Where a device is in its queue: the next available entry it pops and the
/// next used entry it adds (equal when every request popped was used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    /// The next available entry the device pops.
    pub next_avail: u16,
    /// The next used entry the device adds.
    pub next_used: u16,
}

/// Why a request's buffers cannot be held for the device.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("holding the request's buffers for the device: {why}")]
pub struct HoldRefused {
    /// What refused (the pin's error, as text).
    pub why: String,
}

/// Buffer indices of a request's chain, as held (the module's table).
const HEADER: usize = 0;
const PAYLOAD: usize = 1;
const REPLY: usize = 2;
const STATUS: usize = 3;

/// A request's buffers, held for the device until dropped: the copies into
/// and out of them, each checked against its buffer's bounds.
pub trait HeldBuffers {
    /// Copies from `offset` within buffer `index` into `buf`.
    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), String>;

    /// Copies `data` to `offset` within buffer `index`.
    fn write(&self, index: usize, offset: u64, data: &[u8]) -> Result<(), String>;
}

/// How a device keeps a request's buffers accessible while it works on
/// them.
pub trait BufferAccess {
    /// What keeps the buffers accessible until dropped, and copies through
    /// them.
    type Held<'a>: HeldBuffers
    where
        Self: 'a;

    /// Holds the `(guest address, length)` buffers of one chain for the
    /// device, all or none, or says why not (a private page, a range
    /// outside guest memory).
    fn hold(&self, buffers: &[(GuestAddress, u64)]) -> Result<Self::Held<'_>, HoldRefused>;

    /// Whether the VMM asked devices to let go of memory overlapping
    /// `[gpa, gpa + len)` (a conversion there met `EAGAIN`).
    fn asked_to_let_go(&self, gpa: GuestAddress, len: u64) -> bool;
}

/// A [`BufferAccess`] on memory `M` that holds nothing and is never asked
/// to let go: for memory without private pages, or whose accesses check the
/// page state themselves. Its copies go through `M`'s `Bytes`.
#[derive(Debug, Clone, Copy)]
pub struct Unchecked<'m, M>(pub &'m M);

impl<M: GuestMemory> BufferAccess for Unchecked<'_, M> {
    type Held<'a>
        = Unheld<'a, M>
    where
        Self: 'a;

    fn hold(&self, buffers: &[(GuestAddress, u64)]) -> Result<Unheld<'_, M>, HoldRefused> {
        Ok(Unheld {
            mem: self.0,
            buffers: buffers.to_vec(),
        })
    }

    fn asked_to_let_go(&self, _: GuestAddress, _: u64) -> bool {
        false
    }
}

/// The buffers [`Unchecked`] hands out: their ranges, and the memory that
/// serves each copy.
#[derive(Debug)]
pub struct Unheld<'a, M> {
    mem: &'a M,
    buffers: Vec<(GuestAddress, u64)>,
}

impl<M: GuestMemory> Unheld<'_, M> {
    /// The guest address of `[offset, offset + len)` in buffer `index`, if
    /// it is inside the buffer.
    fn at(&self, index: usize, offset: u64, len: usize) -> Result<GuestAddress, String> {
        let (gpa, buffer_len) = *self
            .buffers
            .get(index)
            .ok_or_else(|| format!("no buffer {index}"))?;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > buffer_len)
        {
            return Err(format!("{offset:#x}+{len:#x} outside buffer {index}"));
        }
        Ok(GuestAddress(gpa.0 + offset))
    }
}

impl<M: GuestMemory> HeldBuffers for Unheld<'_, M> {
    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let at = self.at(index, offset, buf.len())?;
        self.mem.read_slice(buf, at).map_err(|e| e.to_string())
    }

    fn write(&self, index: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        let at = self.at(index, offset, data.len())?;
        self.mem.write_slice(data, at).map_err(|e| e.to_string())
    }
}

/// What a device has done (its own counts; the workload adds them up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Chains popped and completed with a used entry.
    pub requests: u64,
    /// Requests served ([`RequestStatus::Ok`] or [`RequestStatus::DataError`]).
    pub served: u64,
    /// Payload bytes of the requests served.
    pub bytes: u64,
    /// Dwords of payload that did not hold the guest's pattern.
    pub data_errors: u64,
    /// Requests failed because a buffer could not be held or accessed.
    pub access_errors: u64,
    /// Times the device dropped a request's buffers on a let-go request
    /// and tried again.
    pub let_go_retries: u64,
    /// Chains that were not requests.
    pub bad_chains: u64,
}

/// One request's descriptors, checked against the module's table.
#[derive(Debug, Clone, Copy)]
struct Request {
    header: Descriptor,
    payload: Descriptor,
    reply: Descriptor,
    status: Descriptor,
}

/// Why a request was not served.
#[derive(Debug)]
enum Failure {
    /// Not a request; no status descriptor to write to, maybe.
    BadChain(&'static str),
    /// A buffer could not be held or accessed.
    Access(String),
    /// The VMM asked devices to let go of a buffer before the device wrote
    /// to it.
    LetGo,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::BadChain(why) => write!(f, "not a request: {why}"),
            Failure::Access(why) => write!(f, "buffer not accessible: {why}"),
            Failure::LetGo => write!(
                f,
                "the VMM kept asking devices to let go of the buffers ({LET_GO_TRIES} tries)"
            ),
        }
    }
}

/// The device behind one queue.
#[derive(Debug)]
pub struct PatternDevice {
    queue: Queue,
    layout: QueueLayout,
    stats: DeviceStats,
    last_failure: Option<String>,
}

impl PatternDevice {
    /// The device of the queue at `layout`, set up (size, ring addresses)
    /// and ready, its rings checked against `mem`.
    pub fn new<M: GuestMemory>(layout: QueueLayout, mem: &M) -> Result<Self, VirtioError> {
        let setup = |source| VirtioError::Setup {
            base: layout.base,
            source,
        };
        let mut queue = Queue::new(QUEUE_SIZE).map_err(setup)?;
        queue.try_set_size(QUEUE_SIZE).map_err(setup)?;
        queue
            .try_set_desc_table_address(layout.at(QueueLayout::DESC_TABLE))
            .map_err(setup)?;
        queue
            .try_set_avail_ring_address(layout.at(QueueLayout::AVAIL_RING))
            .map_err(setup)?;
        queue
            .try_set_used_ring_address(layout.at(QueueLayout::USED_RING))
            .map_err(setup)?;
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(VirtioError::Invalid { base: layout.base });
        }
        Ok(PatternDevice {
            queue,
            layout,
            stats: DeviceStats::default(),
            last_failure: None,
        })
    }

    /// The device of the queue at `layout`, resumed at `saved` (a queue
    /// restored with guest memory): its rings must show no request in
    /// flight, their available and used indices both where the device
    /// stopped.
    pub fn resume<M: GuestMemory>(
        layout: QueueLayout,
        mem: &M,
        saved: QueuePosition,
    ) -> Result<Self, VirtioError> {
        let mut device = Self::new(layout, mem)?;
        let queue = &mut device.queue;
        // Acquire: as in `serve` (nothing runs the guest meanwhile here).
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(VirtioError::AvailRing)?
            .0;
        let used = queue
            .used_idx(mem, Ordering::Acquire)
            .map_err(VirtioError::UsedRing)?
            .0;
        if avail != saved.next_avail || used != saved.next_used || avail != used {
            return Err(VirtioError::NotAtRest {
                base: layout.base,
                avail,
                used,
                saved,
            });
        }
        queue.set_next_avail(saved.next_avail);
        queue.set_next_used(saved.next_used);
        Ok(device)
    }

    /// Where the device is in its queue.
    pub fn position(&self) -> QueuePosition {
        QueuePosition {
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
        }
    }

    /// What the device has done so far.
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// Why the last request that was not served failed, if one was not.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// Serves every chain in the available ring: pops it, checks and
    /// rewrites its payload, writes its status and adds the used entry.
    /// Returns the chains completed; fails only if the queue itself is
    /// broken (its rings unreadable, or more entries than the queue holds).
    pub fn serve<M: GuestMemory, A: BufferAccess>(
        &mut self,
        mem: &M,
        access: &A,
    ) -> Result<u64, VirtioError> {
        let mut completed = 0;
        loop {
            // Acquire: pairs with the guest's publication of the entry
            // (its stores are ordered: x86 TSO), as `pop_descriptor_chain`
            // also reads it.
            let avail = self
                .queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(VirtioError::AvailRing)?;
            if avail.0 == self.queue.next_avail() {
                return Ok(completed);
            }
            let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                return Err(VirtioError::AvailRing(
                    virtio_queue::Error::InvalidAvailRingIndex,
                ));
            };
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.take(usize::from(CHAIN_LEN) + 1).collect();
            let written = self.complete(mem, access, &descriptors);
            // `add_used` stores the used idx with Release after the entry:
            // the guest reads it (and the status) after the notification
            // returns.
            self.queue
                .add_used(mem, head, written)
                .map_err(|source| VirtioError::AddUsed { head, source })?;
            self.stats.requests += 1;
            completed += 1;
        }
    }

    /// Serves one chain and writes its status; returns the bytes written
    /// into its device-writable buffers (the used entry's length).
    fn complete<M: GuestMemory, A: BufferAccess>(
        &mut self,
        mem: &M,
        access: &A,
        descriptors: &[Descriptor],
    ) -> u32 {
        let request = match parse(descriptors) {
            Ok(request) => request,
            Err(why) => return self.refuse(mem, descriptors, Failure::BadChain(why)),
        };
        match self.serve_letting_go(access, &request) {
            Ok(wrong) => {
                self.stats.served += 1;
                self.stats.bytes += u64::from(request.payload.len());
                self.stats.data_errors += wrong;
                request.reply.len() + STATUS_LEN
            }
            Err(failure) => self.refuse(mem, descriptors, failure),
        }
    }

    /// Serves `request`; when the VMM asks devices to let go of its buffers
    /// before the device wrote to them, drops them at once, waits until the
    /// request is lifted, and tries again (up to [`LET_GO_TRIES`] times).
    fn serve_letting_go<A: BufferAccess>(
        &mut self,
        access: &A,
        request: &Request,
    ) -> Result<u64, Failure> {
        for _ in 0..LET_GO_TRIES {
            match self.serve_request(access, request) {
                Err(Failure::LetGo) => {
                    self.stats.let_go_retries += 1;
                    let asked = || {
                        access.asked_to_let_go(request.payload.addr(), request.len())
                            || access.asked_to_let_go(request.reply.addr(), request.len())
                    };
                    for _ in 0..LET_GO_TRIES {
                        if !asked() {
                            break;
                        }
                        std::thread::sleep(LET_GO_PAUSE);
                    }
                }
                other => return other,
            }
        }
        Err(Failure::LetGo)
    }

    /// Counts a request not served and writes its status where the chain
    /// has a status descriptor; returns the bytes written.
    fn refuse<M: GuestMemory>(
        &mut self,
        mem: &M,
        descriptors: &[Descriptor],
        failure: Failure,
    ) -> u32 {
        let status = match failure {
            Failure::BadChain(_) => {
                self.stats.bad_chains += 1;
                RequestStatus::BadChain
            }
            Failure::Access(_) | Failure::LetGo => {
                self.stats.access_errors += 1;
                RequestStatus::AccessError
            }
        };
        self.last_failure = Some(format!("queue at {:#x}: {failure}", self.layout.base));
        let last = descriptors.last().filter(|d| is_status(d));
        match last.map(|d| write_status(mem, d, status)) {
            Some(Ok(())) => STATUS_LEN,
            _ => 0,
        }
    }

    /// Checks the payload, writes the reply page by page and the status,
    /// holding the chain's four buffers in one [`BufferAccess::hold`];
    /// returns the payload's wrong dwords. A let-go request is heeded until
    /// the first write: after it, the device finishes (a few microseconds)
    /// rather than leave a reply half written.
    fn serve_request<A: BufferAccess>(
        &self,
        access: &A,
        request: &Request,
    ) -> Result<u64, Failure> {
        let len = request.len();
        let (payload, reply) = (request.payload.addr(), request.reply.addr());
        let let_go = || {
            if access.asked_to_let_go(payload, len) || access.asked_to_let_go(reply, len) {
                return Err(Failure::LetGo);
            }
            Ok(())
        };
        let_go()?;
        let held = access
            .hold(&request.buffers())
            .map_err(|e| Failure::Access(e.to_string()))?;
        let seed =
            read_u32(&held, HEADER, 0).map_err(|e| Failure::Access(format!("header: {e}")))?;
        // The whole payload is read before the reply is written: a payload
        // the device cannot read fails the request with nothing written.
        let mut wrong = 0;
        for page in (0..len).step_by(PAGE_SIZE as usize) {
            let_go()?;
            wrong += check_page(&held, page, payload.0 + page, seed)?;
        }
        for page in (0..len).step_by(PAGE_SIZE as usize) {
            write_page(&held, page, reply.0 + page, reply_seed(seed))?;
        }
        let status = if wrong == 0 {
            RequestStatus::Ok
        } else {
            RequestStatus::DataError
        };
        held.write(STATUS, 0, &(status as u32).to_le_bytes())
            .map_err(|e| Failure::Access(format!("status: {e}")))?;
        Ok(wrong)
    }
}

impl Request {
    /// The payload's (and the reply's) length.
    fn len(&self) -> u64 {
        u64::from(self.payload.len())
    }

    /// The chain's buffers, in the order of the module's table.
    fn buffers(&self) -> [(GuestAddress, u64); 4] {
        [self.header, self.payload, self.reply, self.status].map(|d| (d.addr(), u64::from(d.len())))
    }
}

/// Checks a chain's shape against the module's table.
fn parse(descriptors: &[Descriptor]) -> Result<Request, &'static str> {
    let [header, payload, reply, status] = descriptors else {
        return Err("a request is a chain of 4 descriptors");
    };
    let pages = |d: &Descriptor| d.len() > 0 && u64::from(d.len()) % PAGE_SIZE == 0;
    let aligned = |d: &Descriptor| d.addr().0 % PAGE_SIZE == 0;
    if header.is_write_only() || header.len() < 4 {
        return Err("descriptor 0 must be a device-readable header of at least 4 bytes");
    }
    if payload.is_write_only() || !pages(payload) || !aligned(payload) {
        return Err("descriptor 1 must be device-readable whole pages");
    }
    if !reply.is_write_only() || reply.len() != payload.len() || !aligned(reply) {
        return Err("descriptor 2 must be device-writable pages as long as the payload");
    }
    if !is_status(status) {
        return Err("descriptor 3 must be a device-writable status of 4 bytes");
    }
    Ok(Request {
        header: *header,
        payload: *payload,
        reply: *reply,
        status: *status,
    })
}

/// Whether `d` can take a status.
fn is_status(d: &Descriptor) -> bool {
    d.is_write_only() && d.len() >= STATUS_LEN
}

fn write_status<M: GuestMemory>(
    mem: &M,
    d: &Descriptor,
    status: RequestStatus,
) -> Result<(), String> {
    mem.write_obj(status as u32, d.addr())
        .map_err(|e| format!("status: {e}"))
}

/// A `u32` from `offset` within held buffer `index`.
fn read_u32(held: &impl HeldBuffers, index: usize, offset: u64) -> Result<u32, String> {
    let mut word = [0u8; 4];
    held.read(index, offset, &mut word)?;
    Ok(u32::from_le_bytes(word))
}

/// The payload page at `offset` in the payload, guest address `gpa`: its
/// wrong dwords under the pattern of `seed`.
fn check_page(held: &impl HeldBuffers, offset: u64, gpa: u64, seed: u32) -> Result<u64, Failure> {
    let word = pattern_word(seed, gpa);
    let read = |at: u64| {
        read_u32(held, PAYLOAD, at)
            .map_err(|e| Failure::Access(format!("payload at {:#x}: {e}", gpa - offset + at)))
    };
    let first = read(offset)?;
    let last = read(offset + PAGE_SIZE - 4)?;
    Ok(u64::from(first != word) + u64::from(last != !word))
}

/// Writes the pattern of `seed` into the reply page at `offset` in the
/// reply, guest address `gpa`.
fn write_page(held: &impl HeldBuffers, offset: u64, gpa: u64, seed: u32) -> Result<(), Failure> {
    let word = pattern_word(seed, gpa);
    let write = |value: u32, at: u64| {
        held.write(REPLY, at, &value.to_le_bytes())
            .map_err(|e| Failure::Access(format!("reply at {:#x}: {e}", gpa - offset + at)))
    };
    write(word, offset)?;
    write(!word, offset + PAGE_SIZE - 4)
}

/// The driver's side of one request, as the guest interpreter posts it:
/// writes the chain and the header in the next request's slot, poisons its
/// status with `0xff`, and publishes the available entry. Returns the slot.
/// For tests and tools on the host; it does not wait for a free slot.
pub fn post_request<M: GuestMemory>(
    mem: &M,
    layout: QueueLayout,
    buffer: GuestAddress,
    len: u32,
    seed: u32,
) -> Result<u16, vm_memory::GuestMemoryError> {
    let idx_at = layout.at(QueueLayout::AVAIL_RING + 2);
    let idx: u16 = mem.read_obj(idx_at)?;
    let slot = idx % SLOTS;
    let head = slot * CHAIN_LEN;
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let chain = [
        (layout.header(slot).0, HEADER_LEN, next),
        (buffer.0, len, next),
        (buffer.0, len, next | write),
        (layout.status(slot).0, STATUS_LEN, write),
    ];
    for (i, (addr, len, flags)) in (head..).zip(chain) {
        let next = if flags & next != 0 { i + 1 } else { 0 };
        mem.write_obj(
            Descriptor::new(addr, len, flags, next),
            layout.descriptor(i),
        )?;
    }
    mem.write_obj(seed, layout.header(slot))?;
    mem.write_obj(0xffu32, layout.status(slot))?;
    let entry = QueueLayout::AVAIL_RING + 4 + 2 * u64::from(idx % QUEUE_SIZE);
    mem.write_obj(head, layout.at(entry))?;
    // Release: the entries above are visible before the new index.
    mem.store(idx.wrapping_add(1), idx_at, Ordering::Release)?;
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use vm_memory::{Address, GuestMemoryMmap};

    use super::*;
    use crate::guest::{fill_page, page_matches};

    const LAYOUT: QueueLayout = QueueLayout { base: 0x8000 };
    const BUFFER: u64 = 0x10000;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).expect("anonymous memory")
    }

    /// Writes the pattern of `seed` into `pages` pages at `gpa`.
    fn fill(mem: &GuestMemoryMmap<()>, gpa: u64, pages: u64, seed: u32) {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for at in (gpa..gpa + pages * PAGE_SIZE).step_by(PAGE_SIZE as usize) {
            fill_page(&mut page, seed, at);
            mem.write_slice(&page, GuestAddress(at)).unwrap();
        }
    }

    /// Whether `pages` pages at `gpa` hold the pattern of `seed`.
    fn holds(mem: &GuestMemoryMmap<()>, gpa: u64, pages: u64, seed: u32) -> bool {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        (gpa..gpa + pages * PAGE_SIZE)
            .step_by(PAGE_SIZE as usize)
            .all(|at| {
                mem.read_slice(&mut page, GuestAddress(at)).unwrap();
                page_matches(&page, seed, at)
            })
    }

    /// The status of request `n` (from 0).
    fn status(mem: &GuestMemoryMmap<()>, n: u16) -> u32 {
        mem.read_obj(LAYOUT.status(n % SLOTS)).unwrap()
    }

    /// The used ring's index and its entry (head, length) for request `n`.
    fn used(mem: &GuestMemoryMmap<()>, n: u16) -> (u16, u32, u32) {
        let idx = mem.read_obj(LAYOUT.at(QueueLayout::USED_RING + 2)).unwrap();
        let entry = QueueLayout::USED_RING + 4 + 8 * u64::from(n % QUEUE_SIZE);
        let id = mem.read_obj(LAYOUT.at(entry)).unwrap();
        let len = mem.read_obj(LAYOUT.at(entry + 4)).unwrap();
        (idx, id, len)
    }

    /// Refuses to hold a chain over one page, as a pin refuses a private
    /// page; counts holds, and asks devices to let go the first `let_go`
    /// times it is asked. Copies through `mem`.
    struct Refusing<'m> {
        mem: &'m GuestMemoryMmap<()>,
        private_page: Option<u64>,
        let_go: Cell<u32>,
        holds: Cell<u32>,
    }

    impl<'m> Refusing<'m> {
        fn new(mem: &'m GuestMemoryMmap<()>) -> Self {
            Refusing {
                mem,
                private_page: None,
                let_go: Cell::new(0),
                holds: Cell::new(0),
            }
        }
    }

    impl BufferAccess for Refusing<'_> {
        type Held<'a>
            = Unheld<'a, GuestMemoryMmap<()>>
        where
            Self: 'a;

        fn hold(
            &self,
            buffers: &[(GuestAddress, u64)],
        ) -> Result<Unheld<'_, GuestMemoryMmap<()>>, HoldRefused> {
            self.holds.set(self.holds.get() + 1);
            let private = |&(gpa, len): &(GuestAddress, u64)| {
                self.private_page
                    .is_some_and(|page| (gpa.0..gpa.0 + len).contains(&page))
            };
            if buffers.iter().any(private) {
                return Err(HoldRefused {
                    why: "EFAULT: a private page".into(),
                });
            }
            Ok(Unheld {
                mem: self.mem,
                buffers: buffers.to_vec(),
            })
        }

        fn asked_to_let_go(&self, _: GuestAddress, _: u64) -> bool {
            let asks = self.let_go.get();
            self.let_go.set(asks.saturating_sub(1));
            asks > 0
        }
    }

    #[test]
    fn a_request_is_checked_rewritten_and_used() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        fill(&mem, BUFFER, 2, 7);
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, 7).unwrap();
        let access = Refusing::new(&mem);
        assert_eq!(device.serve(&mem, &access).unwrap(), 1);
        assert_eq!(access.holds.get(), 1, "the chain is held once");
        let stats = device.stats();
        assert_eq!((stats.requests, stats.served, stats.bytes), (1, 1, 0x2000));
        assert_eq!(
            (stats.data_errors, stats.access_errors, stats.bad_chains),
            (0, 0, 0)
        );
        assert_eq!(status(&mem, 0), RequestStatus::Ok as u32);
        assert_eq!(used(&mem, 0), (1, 0, 0x2000 + STATUS_LEN));
        assert!(holds(&mem, BUFFER, 2, reply_seed(7)));
        assert_eq!(
            device.serve(&mem, &access).unwrap(),
            0,
            "nothing more posted"
        );
    }

    #[test]
    fn a_wrong_payload_counts_its_dwords_and_is_still_rewritten() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        fill(&mem, BUFFER, 3, 7);
        mem.write_obj(0u32, GuestAddress(BUFFER + PAGE_SIZE))
            .unwrap();
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x3000, 7).unwrap();
        device.serve(&mem, &Unchecked(&mem)).unwrap();
        assert_eq!(device.stats().data_errors, 1);
        assert_eq!(status(&mem, 0), RequestStatus::DataError as u32);
        assert!(holds(&mem, BUFFER, 3, reply_seed(7)));
    }

    #[test]
    fn a_private_page_fails_the_request_and_leaves_the_buffer() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        fill(&mem, BUFFER, 2, 7);
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, 7).unwrap();
        let access = Refusing {
            private_page: Some(BUFFER + PAGE_SIZE),
            ..Refusing::new(&mem)
        };
        assert_eq!(device.serve(&mem, &access).unwrap(), 1);
        let stats = device.stats();
        assert_eq!(
            (stats.requests, stats.served, stats.access_errors),
            (1, 0, 1)
        );
        assert_eq!(status(&mem, 0), RequestStatus::AccessError as u32);
        assert_eq!(used(&mem, 0), (1, 0, STATUS_LEN));
        assert!(holds(&mem, BUFFER, 2, 7), "the buffer is untouched");
        assert!(device.last_failure().unwrap().contains("EFAULT"));
    }

    #[test]
    fn a_let_go_request_drops_the_buffers_and_the_request_is_tried_again() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        fill(&mem, BUFFER, 2, 7);
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, 7).unwrap();
        // Asked before the hold, then while checking (after the hold).
        let access = Refusing::new(&mem);
        for asks in [1, 3] {
            access.let_go.set(asks);
            access.holds.set(0);
            device.serve(&mem, &access).unwrap();
            post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, reply_seed(7)).unwrap();
        }
        let stats = device.stats();
        assert_eq!((stats.served, stats.access_errors), (2, 0));
        assert!(stats.let_go_retries >= 2, "{stats:?}");
        assert_eq!(status(&mem, 1), RequestStatus::Ok as u32);
        assert!(holds(&mem, BUFFER, 2, reply_seed(reply_seed(7))));
    }

    #[test]
    fn a_let_go_request_that_stays_fails_the_request() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        fill(&mem, BUFFER, 1, 7);
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x1000, 7).unwrap();
        let access = Refusing::new(&mem);
        access.let_go.set(u32::MAX);
        device.serve(&mem, &access).unwrap();
        assert_eq!(device.stats().access_errors, 1);
        assert_eq!(access.holds.get(), 0, "nothing held while asked to let go");
        assert_eq!(status(&mem, 0), RequestStatus::AccessError as u32);
        assert!(holds(&mem, BUFFER, 1, 7), "nothing written");
        assert!(device.last_failure().unwrap().contains("let go"));
    }

    #[test]
    fn a_buffer_outside_memory_fails_the_request_without_a_panic() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        fill(&mem, 0x3f000, 1, 7);
        post_request(&mem, LAYOUT, GuestAddress(0x3f000), 0x2000, 7).unwrap();
        device.serve(&mem, &Unchecked(&mem)).unwrap();
        assert_eq!(device.stats().access_errors, 1);
        assert_eq!(status(&mem, 0), RequestStatus::AccessError as u32);
        assert!(holds(&mem, 0x3f000, 1, 7), "nothing written");
    }

    #[test]
    fn chains_that_are_not_requests_are_refused() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        // A reply shorter than the payload.
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, 7).unwrap();
        let reply = LAYOUT.descriptor(2).unchecked_add(8);
        mem.write_obj(0x1000u32, reply).unwrap();
        device.serve(&mem, &Unchecked(&mem)).unwrap();
        assert_eq!(status(&mem, 0), RequestStatus::BadChain as u32);
        // A chain of one descriptor: no status to write.
        let slot = post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, 7).unwrap();
        let head = LAYOUT.descriptor(slot * CHAIN_LEN);
        mem.write_obj(0u16, head.unchecked_add(12)).unwrap();
        device.serve(&mem, &Unchecked(&mem)).unwrap();
        assert_eq!(
            status(&mem, 1),
            0xff,
            "no status descriptor, nothing written"
        );
        assert_eq!(used(&mem, 1), (2, u32::from(CHAIN_LEN), 0));
        let stats = device.stats();
        assert_eq!((stats.requests, stats.bad_chains, stats.served), (2, 2, 0));
    }

    #[test]
    fn requests_go_round_the_rings_many_times() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        for n in 0..3 * QUEUE_SIZE {
            let seed = u32::from(n);
            fill(&mem, BUFFER, 1, seed);
            post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x1000, seed).unwrap();
            assert_eq!(device.serve(&mem, &Unchecked(&mem)).unwrap(), 1);
            assert_eq!(status(&mem, n), 0);
            let head = u32::from(n % SLOTS * CHAIN_LEN);
            assert_eq!(used(&mem, n), (n + 1, head, 0x1000 + STATUS_LEN));
        }
        assert_eq!(device.stats().served, 3 * u64::from(QUEUE_SIZE));
    }

    #[test]
    fn a_request_in_every_slot_is_served_by_one_call() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        for n in 0..SLOTS {
            let gpa = BUFFER + u64::from(n) * PAGE_SIZE;
            fill(&mem, gpa, 1, u32::from(n));
            let slot = post_request(&mem, LAYOUT, GuestAddress(gpa), 0x1000, u32::from(n));
            assert_eq!(slot.unwrap(), n);
        }
        assert_eq!(
            device.serve(&mem, &Unchecked(&mem)).unwrap(),
            u64::from(SLOTS)
        );
        for n in 0..SLOTS {
            assert_eq!(status(&mem, n), 0);
            let gpa = BUFFER + u64::from(n) * PAGE_SIZE;
            assert!(holds(&mem, gpa, 1, reply_seed(u32::from(n))));
        }
    }

    /// On gmem's vm-memory view, a private page of a buffer fails the
    /// request (the view's error, not a fault), and the shared ones are
    /// served.
    #[test]
    fn on_gmem_a_private_buffer_fails_the_request_and_a_shared_one_is_served() {
        use gmem::vm_memory::GuestMemoryGmem;
        use gmem::{Attribute, Flags, GuestMemfd};
        let file = std::sync::Arc::new(
            GuestMemfd::new(0x40000, Flags::MMAP | Flags::INIT_SHARED).expect("a memfd"),
        );
        let mem = GuestMemoryGmem::from_regions([(GuestAddress(0), file.clone(), 0, 0x40000)])
            .expect("a view");
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for n in 0..2u64 {
            let gpa = BUFFER + n * PAGE_SIZE;
            fill_page(&mut page, 7, gpa);
            mem.write_slice(&page, GuestAddress(gpa)).unwrap();
        }
        file.set_attributes(BUFFER + PAGE_SIZE, PAGE_SIZE, Attribute::Private)
            .unwrap();
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, 7).unwrap();
        device.serve(&mem, &Unchecked(&mem)).unwrap();
        assert_eq!(device.stats().access_errors, 1);
        let status: u32 = mem.read_obj(LAYOUT.status(0)).unwrap();
        assert_eq!(status, RequestStatus::AccessError as u32);
        file.set_attributes(BUFFER + PAGE_SIZE, PAGE_SIZE, Attribute::Shared)
            .unwrap();
        post_request(&mem, LAYOUT, GuestAddress(BUFFER), 0x2000, 7).unwrap();
        device.serve(&mem, &Unchecked(&mem)).unwrap();
        let status: u32 = mem.read_obj(LAYOUT.status(1)).unwrap();
        assert_eq!((status, device.stats().served), (0, 1));
        assert_eq!(file.stats().pins_live, 0, "no slice outlives the request");
    }

    #[test]
    fn an_available_index_past_the_queue_is_a_queue_error() {
        let mem = memory();
        let mut device = PatternDevice::new(LAYOUT, &mem).unwrap();
        mem.write_obj(QUEUE_SIZE + 1, LAYOUT.at(QueueLayout::AVAIL_RING + 2))
            .unwrap();
        let err = device.serve(&mem, &Unchecked(&mem)).unwrap_err();
        assert!(matches!(err, VirtioError::AvailRing(_)), "{err}");
    }

    #[test]
    fn rings_outside_memory_are_refused_at_set_up() {
        let mem = memory();
        let err = PatternDevice::new(QueueLayout { base: 0x3f000 }, &mem).unwrap_err();
        assert!(
            matches!(err, VirtioError::Invalid { base: 0x3f000 }),
            "{err}"
        );
    }
}
