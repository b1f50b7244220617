//! The `virtio-chain-64k` rows: a virtio device's request loop through
//! vm-memory, on gmem's view ([`GuestMemoryGmem`]: the chain's buffers
//! pinned once, or every access pinned) against the same code on a plain
//! `GuestMemoryMmap` (no pins: the floor).
//!
//! Guest memory holds a split virtqueue of 32 entries (descriptor table at
//! 0, available ring at 4 KiB, used ring at 8 KiB) and one request: a chain
//! of a readable 16-byte header and 16 writable 4 KiB buffers (64 KiB), as a
//! block read or a network receive has. An iteration pops the chain with
//! `Queue::pop_descriptor_chain`, reads the header, writes 64 KiB into the
//! buffers (`write_slice`), and adds the used entry; the queue's indices are
//! reset before each, so the same request is served every time.

use std::sync::Arc;

use gmem::vm_memory::GuestMemoryGmem;
use gmem::{Flags, GuestMemfd};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{CaseResult, Goal, measure};

/// Guest memory of either side: the ring, the header and the buffers.
const MEMORY: u64 = 256 << 10;
const QUEUE_SIZE: u16 = 32;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const HEADER_LEN: u32 = 16;
const BUFFERS: u64 = 0x10000;
const BUFFER_LEN: u32 = 4096;
const BUFFER_COUNT: u16 = 16;
/// `VRING_DESC_F_NEXT` and `VRING_DESC_F_WRITE` (virtio 1.2, 2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One device queue on memory `M`, with the data it writes.
pub struct VirtioChain<M: GuestMemory> {
    mem: M,
    queue: Queue,
    /// The payload, from `payload_at` (page-aligned) on.
    data: Vec<u8>,
    payload_at: usize,
    header: [u8; HEADER_LEN as usize],
    /// The popped chain's descriptors (kept: no allocation per request).
    descriptors: Vec<Descriptor>,
}

impl<M: GuestMemory> VirtioChain<M> {
    /// The queue and the request laid out in `mem` (at least `MEMORY` bytes
    /// from guest address 0).
    pub fn new(mem: M) -> VirtioChain<M> {
        mem.write_slice(&vec![0u8; MEMORY as usize], GuestAddress(0))
            .expect("populate");
        let header = Descriptor::new(HEADER, HEADER_LEN, F_NEXT, 1);
        mem.write_obj(header, GuestAddress(DESC_TABLE))
            .expect("header");
        for i in 1..=BUFFER_COUNT {
            let addr = BUFFERS + u64::from(i - 1) * u64::from(BUFFER_LEN);
            let (flags, next) = if i < BUFFER_COUNT {
                (F_WRITE | F_NEXT, i + 1)
            } else {
                (F_WRITE, 0)
            };
            let desc = Descriptor::new(addr, BUFFER_LEN, flags, next);
            let at = GuestAddress(DESC_TABLE + 16 * u64::from(i));
            mem.write_obj(desc, at).expect("descriptor");
        }
        // The available ring: flags, idx = 1, ring[0] = head 0.
        mem.write_obj([0u16, 1, 0], GuestAddress(AVAIL_RING))
            .expect("avail");
        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem), "the queue's layout is valid");
        let (data, payload_at) = page_aligned_payload();
        VirtioChain {
            mem,
            queue,
            data,
            payload_at,
            header: [0; HEADER_LEN as usize],
            descriptors: Vec::with_capacity(usize::from(BUFFER_COUNT) + 1),
        }
    }

    /// Serves the request once; returns the bytes written.
    pub fn serve(&mut self) -> u32 {
        let VirtioChain {
            mem,
            queue,
            data,
            payload_at,
            header,
            ..
        } = self;
        let data = &data[*payload_at..];
        queue.set_next_avail(0);
        queue.set_next_used(0);
        let chain = queue.pop_descriptor_chain(&*mem).expect("a chain");
        let head = chain.head_index();
        let mut written = 0usize;
        for desc in chain {
            let len = desc.len() as usize;
            if desc.is_write_only() {
                mem.write_slice(&data[written..written + len], desc.addr())
                    .expect("buffer");
                written += len;
            } else {
                mem.read_slice(&mut header[..len], desc.addr())
                    .expect("header");
            }
        }
        let written = written as u32;
        queue.add_used(&*mem, head, written).expect("used");
        written
    }
}

impl VirtioChain<GuestMemoryGmem> {
    /// Serves the request once with its buffers pinned once
    /// ([`GuestMemoryGmem::pin_ranges`]): the header and the buffers are
    /// copied through the pinned set, with no pin per access; the set drops
    /// before the used entry is added. Returns the bytes written.
    pub fn serve_pinned(&mut self) -> u32 {
        let VirtioChain {
            mem,
            queue,
            data,
            payload_at,
            header,
            descriptors,
        } = self;
        let data = &data[*payload_at..];
        queue.set_next_avail(0);
        queue.set_next_used(0);
        let chain = queue.pop_descriptor_chain(&*mem).expect("a chain");
        let head = chain.head_index();
        descriptors.clear();
        descriptors.extend(chain);
        let ranges = descriptors.iter().map(|d| (d.addr(), d.len() as usize));
        let pinned = mem.pin_ranges(ranges).expect("pin the chain");
        let mut written = 0usize;
        for (i, desc) in descriptors.iter().enumerate() {
            let len = desc.len() as usize;
            if desc.is_write_only() {
                pinned
                    .write(i, 0, &data[written..written + len])
                    .expect("buffer");
                written += len;
            } else {
                pinned.read(i, 0, &mut header[..len]).expect("header");
            }
        }
        drop(pinned);
        let written = written as u32;
        queue.add_used(&*mem, head, written).expect("used");
        written
    }
}

/// The payload a chain writes, in a buffer where it starts on a page
/// boundary, as the guest's buffers do: where the payload starts in the page
/// changes how fast the copies run (a source and a destination a few bytes
/// apart in the page are one of `memmove`'s slow cases: the floor moved
/// between 1.1 and 1.9 us from one build to the next), so both sides
/// copy from the same alignment. Returns the buffer and the payload's start.
fn page_aligned_payload() -> (Vec<u8>, usize) {
    const PAGE: usize = 4096;
    let len = usize::from(BUFFER_COUNT) * BUFFER_LEN as usize;
    let mut data = vec![0u8; len + PAGE];
    let at = data.as_ptr().align_offset(PAGE);
    for (i, byte) in data[at..at + len].iter_mut().enumerate() {
        *byte = i as u8;
    }
    (data, at)
}

/// The device on gmem's view of a memfd-backed file, with its rings
/// resident (pinned for the view's life, as a device pins them once the
/// driver has set the queue up): ring accesses take no pin; the header and
/// the buffers one each, in one set ([`VirtioChain::serve_pinned`]) or one
/// per access and per clone vm-memory makes of its slice
/// ([`VirtioChain::serve`]).
pub fn gmem_side() -> VirtioChain<GuestMemoryGmem> {
    let file = Arc::new(GuestMemfd::new(MEMORY, Flags::MMAP | Flags::INIT_SHARED).expect("memfd"));
    let rings = (GuestAddress(DESC_TABLE), HEADER - DESC_TABLE);
    let view =
        GuestMemoryGmem::from_regions_with_resident([(GuestAddress(0), file, 0, MEMORY)], [rings])
            .expect("view");
    VirtioChain::new(view)
}

/// The device on vm-memory's own anonymous mapping.
pub fn mmap_side() -> VirtioChain<GuestMemoryMmap<()>> {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).expect("mmap");
    VirtioChain::new(mem)
}

/// The rows: gmem's view against `GuestMemoryMmap`, each with its own
/// floor measured alternately in the same run.
///
/// `virtio-chain-64k` (goal 1.05) pins the chain's buffers once
/// ([`VirtioChain::serve_pinned`]): 17 pins a chain (the header and 16
/// buffers, 17 pages, a locked add each), then copies through the pinned
/// set with no pin per access. The 21 ring accesses still go through the
/// view (resident: no pin, but vm-memory's generic slice code around a
/// bitmap that owns something).
///
/// `virtio-chain-64k-per-slice` (goal 1.15) is the device that only uses
/// vm-memory's `Bytes`: 38 accesses a chain, 21 to the rings (resident
/// here) and 17 to the header and buffers, each pinned and each cloned once
/// by vm-memory (`VolatileSlice::offset`), so 34 pins a chain. Measured per
/// access against `GuestMemoryMmap` (16-byte `read_obj` 6 ns, 4 KiB
/// `write_slice` 37 ns): a resident access costs 17 ns more with no atomic
/// at all (vm-memory's slice code is not inlined around a bitmap with a
/// drop, and moves the 48-byte slice through memory: store-forwarding
/// stalls), a pinned one 37 ns more (the pin and its clone's).
pub fn virtio_chain() -> Vec<CaseResult> {
    let (mut ours, mut floor) = (gmem_side(), mmap_side());
    assert_eq!(ours.serve_pinned(), floor.serve());
    assert_eq!(ours.serve(), floor.serve());
    let (pinned, pinned_floor) = measure(
        &mut || {
            std::hint::black_box(ours.serve_pinned());
        },
        Some(&mut || {
            std::hint::black_box(floor.serve());
        }),
    );
    let (per_slice, per_slice_floor) = measure(
        &mut || {
            std::hint::black_box(ours.serve());
        },
        Some(&mut || {
            std::hint::black_box(floor.serve());
        }),
    );
    vec![
        CaseResult::timed(
            "virtio-chain-64k",
            pinned,
            pinned_floor,
            Goal::RatioAtMost(1.05),
        )
        .against("GuestMemoryMmap, no pins"),
        CaseResult::timed(
            "virtio-chain-64k-per-slice",
            per_slice,
            per_slice_floor,
            Goal::RatioAtMost(1.15),
        )
        .against("GuestMemoryMmap, no pins"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides serve the request and leave the same bytes in memory.
    #[test]
    fn both_sides_serve_the_chain() {
        let (mut ours, mut floor) = (gmem_side(), mmap_side());
        for _ in 0..3 {
            assert_eq!(ours.serve(), 64 << 10);
            assert_eq!(ours.serve_pinned(), 64 << 10);
            assert_eq!(floor.serve(), 64 << 10);
        }
        let mut a = vec![0u8; MEMORY as usize];
        let mut b = vec![0u8; MEMORY as usize];
        ours.mem.read_slice(&mut a, GuestAddress(0)).unwrap();
        floor.mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "the two memories differ");
        assert_eq!(&a[BUFFERS as usize..][..4], &[0, 1, 2, 3]);
        // The used ring's index and entry: head 0, 64 KiB.
        assert_eq!(
            ours.mem
                .read_obj::<u16>(GuestAddress(USED_RING + 2))
                .unwrap(),
            1
        );
        let used = ours
            .mem
            .read_obj::<[u32; 2]>(GuestAddress(USED_RING + 4))
            .unwrap();
        assert_eq!(used, [0, 64 << 10]);
        // The gmem side's rings are resident, its header and buffers not.
        assert!(
            ours.mem
                .is_resident(GuestAddress(DESC_TABLE), HEADER - DESC_TABLE)
        );
        assert!(!ours.mem.is_resident(GuestAddress(HEADER), 1));
    }
}
