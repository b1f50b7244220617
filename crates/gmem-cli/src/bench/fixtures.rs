//! The fixtures of the timed cases, shared by `gmem bench` and the criterion
//! benches: each owns its files and mappings and offers `ours` and `floor`
//! (one iteration each).

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use gmem::{Attribute, Flags, GuestMemfd, HostMapping, PAGE_SIZE, Pin};

use crate::floor::RawMapping;

const MIB: u64 = 1 << 20;

/// A conversion round trip of `len` bytes with one host mapping, and the raw
/// mapping change it cannot avoid.
pub struct RoundTrip {
    mem: GuestMemfd,
    map: HostMapping,
    raw: RawMapping,
    len: u64,
}

impl RoundTrip {
    /// Files of `len` bytes (at least 2 MiB), allocated.
    pub fn new(len: u64) -> RoundTrip {
        let size = len.max(2 * MIB);
        let mem = GuestMemfd::new(size, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
        let map = mem.mmap().expect("mmap");
        mem.allocate(0, len).expect("allocate");
        let raw = RawMapping::new(size as usize).expect("raw mapping");
        RoundTrip { mem, map, raw, len }
    }

    /// Shared to private to shared.
    pub fn ours(&self) {
        self.mem
            .set_attributes(0, self.len, Attribute::Private)
            .expect("to private");
        self.mem
            .set_attributes(0, self.len, Attribute::Shared)
            .expect("to shared");
    }

    /// The two remaps of the raw mapping.
    pub fn floor(&self) {
        self.raw.hide(0, self.len as usize);
        self.raw.show(0, self.len as usize);
    }

    /// Faults in our range (untimed).
    pub fn populate_ours(&self) {
        crate::floor::populate(&self.map, self.len).expect("populate");
    }

    /// Faults in the floor's range (untimed).
    pub fn populate_floor(&self) {
        self.raw.touch(0, self.len as usize);
    }
}

/// A reference count guarded by a mutex, with the state in a map: the
/// design gmem's lock-free pin is measured against.
pub struct MutexRefs {
    inner: Mutex<MutexRefsState>,
}

/// State runs (start to end and state) and per-page counts.
type MutexRefsState = (BTreeMap<u64, (u64, Attribute)>, HashMap<u64, u32>);

impl MutexRefs {
    /// `pages` pages, all shared.
    pub fn new(pages: u64) -> MutexRefs {
        let runs = BTreeMap::from([(0, (pages, Attribute::Shared))]);
        MutexRefs {
            inner: Mutex::new((runs, HashMap::new())),
        }
    }

    /// Pins `page` if it is shared.
    pub fn pin(&self, page: u64) -> bool {
        let mut inner = self.inner.lock().expect("not poisoned");
        let shared = inner
            .0
            .range(..=page)
            .next_back()
            .is_some_and(|(_, (end, attr))| page < *end && *attr == Attribute::Shared);
        if shared {
            *inner.1.entry(page).or_insert(0) += 1;
        }
        shared
    }

    /// Unpins `page`.
    pub fn unpin(&self, page: u64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        if let Some(count) = inner.1.get_mut(&page) {
            *count -= 1;
            if *count == 0 {
                inner.1.remove(&page);
            }
        }
    }
}

/// Pin + unpin of one page, an atomic increment + decrement, and the mutex
/// design's pin + unpin.
pub struct PinUnpin {
    mem: GuestMemfd,
    counter: AtomicU64,
    mutex: MutexRefs,
}

impl Default for PinUnpin {
    fn default() -> Self {
        Self::new()
    }
}

impl PinUnpin {
    /// A file with page 0 pinned once (so the fast path is warm).
    pub fn new() -> PinUnpin {
        let mem = GuestMemfd::new(4 * MIB, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
        drop(mem.pin(0, 1).expect("pin"));
        PinUnpin {
            mem,
            counter: AtomicU64::new(0),
            mutex: MutexRefs::new(1024),
        }
    }

    /// gmem's pin and unpin.
    pub fn ours(&self) {
        drop(black_box(self.mem.pin(black_box(0), 1).expect("pin")));
    }

    /// The floor: one uncontended atomic increment and decrement.
    pub fn atomic(&self) {
        // Relaxed: the floor is the bare locked instructions.
        black_box(self.counter.fetch_add(1, Ordering::Relaxed));
        black_box(self.counter.fetch_sub(1, Ordering::Relaxed));
    }

    /// The mutex design.
    pub fn mutex(&self) {
        assert!(self.mutex.pin(black_box(0)));
        self.mutex.unpin(black_box(0));
    }
}

/// 64 KiB copies through a host mapping, a pin, and a raw mapping.
pub struct Copies {
    // `pin` borrows `mem`, which is leaked for the life of the process.
    pin: Pin<'static>,
    map: HostMapping,
    raw: RawMapping,
    buf: Vec<u8>,
}

impl Default for Copies {
    fn default() -> Self {
        Self::new()
    }
}

impl Copies {
    const LEN: usize = 64 << 10;

    /// Mappings of populated files and a pin over the first 64 KiB.
    pub fn new() -> Copies {
        let mem: &'static GuestMemfd = Box::leak(Box::new(
            GuestMemfd::new(2 * MIB, Flags::MMAP | Flags::INIT_SHARED).expect("memfd"),
        ));
        let map = mem.mmap().expect("mmap");
        map.write(0, &vec![3u8; Self::LEN]).expect("populate");
        let pin = mem.pin(0, Self::LEN as u64).expect("pin");
        let raw = RawMapping::new(2 * MIB as usize).expect("raw");
        raw.touch(0, Self::LEN);
        debug_assert!(Self::LEN as u64 % PAGE_SIZE == 0);
        Copies {
            pin,
            map,
            raw,
            buf: vec![0u8; Self::LEN],
        }
    }

    /// `HostMapping::read` of 64 KiB.
    pub fn host_read(&mut self) {
        self.map.read(0, black_box(&mut self.buf)).expect("read");
    }

    /// `HostMapping::write` of 64 KiB.
    pub fn host_write(&mut self) {
        self.map.write(0, black_box(&self.buf)).expect("write");
    }

    /// `Pin::read` of 64 KiB.
    pub fn pin_read(&mut self) {
        self.pin.read(0, black_box(&mut self.buf)).expect("read");
    }

    /// `Pin::write` of 64 KiB.
    pub fn pin_write(&mut self) {
        self.pin.write(0, black_box(&self.buf)).expect("write");
    }

    /// `copy_nonoverlapping` of 64 KiB out of a raw mapping.
    pub fn floor_read(&mut self) {
        self.raw.copy_out(0, black_box(&mut self.buf));
    }

    /// `copy_nonoverlapping` of 64 KiB into a raw mapping.
    pub fn floor_write(&mut self) {
        self.raw.copy_in(0, black_box(&self.buf));
    }
}
