//! The fixtures of the timed cases, shared by `gmem bench` and the criterion
//! benches: each owns its files and mappings and offers `ours` and `floor`
//! (one iteration each).

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use gmem::{Attribute, Flags, GuestMemfd, HostMapping, Options, PAGE_SIZE, Pin};

use crate::floor::RawMapping;

const MIB: u64 = 1 << 20;

/// A conversion round trip of `len` bytes with one host mapping, and the raw
/// mapping change it cannot avoid.
pub struct RoundTrip {
    mem: GuestMemfd,
    map: HostMapping,
    raw: RawMapping,
    len: u64,
    floor: RawHiding,
}

/// How the floor hides a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawHiding {
    /// `MADV_GUARD_INSTALL` and `MADV_GUARD_REMOVE`.
    GuardMarkers,
    /// `mmap(MAP_FIXED)` of an empty file, then of the file again.
    EmptyFileRemap,
}

impl RoundTrip {
    /// Files of `len` bytes (at least 2 MiB), allocated; gmem with its
    /// default options, the floor with guard markers.
    pub fn new(len: u64) -> RoundTrip {
        Self::with(len, gmem::Options::default(), RawHiding::GuardMarkers)
    }

    /// As [`new`](Self::new), with gmem hiding private pages by remapping
    /// them to an empty file (its fallback where guard markers are refused),
    /// and the floor remapping too.
    pub fn remap(len: u64) -> RoundTrip {
        Self::with(len, remap_options(), RawHiding::EmptyFileRemap)
    }

    fn with(len: u64, options: gmem::Options, floor: RawHiding) -> RoundTrip {
        let size = len.max(2 * MIB);
        let mem = GuestMemfd::with_options(size, Flags::MMAP | Flags::INIT_SHARED, options)
            .expect("memfd");
        let map = mem.mmap().expect("mmap");
        mem.allocate(0, len).expect("allocate");
        let raw = RawMapping::new(size as usize).expect("raw mapping");
        RoundTrip {
            mem,
            map,
            raw,
            len,
            floor,
        }
    }

    /// How gmem's mapping hides private pages.
    pub fn hiding(&self) -> gmem::Hiding {
        self.map.hiding()
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

    /// The raw mapping's hide and show: guard install and remove, or the two
    /// remaps.
    pub fn floor(&self) {
        let len = self.len as usize;
        match self.floor {
            RawHiding::GuardMarkers => {
                self.raw.guard_install(0, len).expect("guard install");
                self.raw.guard_remove(0, len).expect("guard remove");
            }
            RawHiding::EmptyFileRemap => {
                self.raw.hide(0, len);
                self.raw.show(0, len);
            }
        }
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

/// gmem's options forcing the empty-file remap.
fn remap_options() -> gmem::Options {
    gmem::Options::new().hiding(gmem::Hiding::EmptyFileRemap)
}

/// Why guard markers cannot be measured here, if they cannot: the floor's
/// `MADV_GUARD_INSTALL` and `process_madvise` on a small raw mapping.
pub fn guard_markers_unsupported() -> Option<String> {
    let raw = match RawMapping::new(2 * MIB as usize) {
        Ok(raw) => raw,
        Err(e) => return Some(format!("raw mapping: {e}")),
    };
    let page = PAGE_SIZE as usize;
    if let Err(e) = raw.guard_install(0, page) {
        return Some(format!("MADV_GUARD_INSTALL: {e}"));
    }
    match raw.guard_remove_ranges(&[(0, page)]) {
        Ok(()) => None,
        Err(e) => Some(format!("process_madvise(MADV_GUARD_REMOVE): {e}")),
    }
}

/// The size of the fragmented cases' files.
pub const FRAGMENTED_LEN: u64 = 1 << 30;

/// A 1 GiB file, allocated, with one live host mapping, whose every other
/// page (the odd ones) is converted on its own; and a raw mapping of a 1 GiB
/// memfd for the floor. Neither mapping is populated: conversions zap the
/// pages they hide, so each iteration starts from unpopulated pages anyway.
pub struct Fragmented {
    mem: GuestMemfd,
    map: HostMapping,
    raw: RawMapping,
    /// The odd pages, ascending.
    odd: Vec<u64>,
    /// The odd pages in a fixed scattered order.
    scattered: Vec<u64>,
    /// The even pages' ranges, for the floor's batches.
    even_ranges: Vec<(usize, usize)>,
}

impl Default for Fragmented {
    fn default() -> Self {
        Self::new()
    }
}

impl Fragmented {
    /// The files and the page orders; every page shared, nothing guarded.
    pub fn new() -> Fragmented {
        let mem = GuestMemfd::new(FRAGMENTED_LEN, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
        let map = mem.mmap().expect("mmap");
        mem.allocate(0, FRAGMENTED_LEN).expect("allocate");
        let raw = RawMapping::new(FRAGMENTED_LEN as usize).expect("raw mapping");
        let pages = FRAGMENTED_LEN / PAGE_SIZE;
        let odd: Vec<u64> = (0..pages).filter(|p| p % 2 == 1).collect();
        let scattered = scattered_order(odd.len(), 0x9e37_79b9_7f4a_7c15)
            .into_iter()
            .map(|i| odd[i])
            .collect();
        let page = PAGE_SIZE as usize;
        let even_ranges = (0..pages as usize)
            .step_by(2)
            .map(|p| (p * page, page))
            .collect();
        Fragmented {
            mem,
            map,
            raw,
            odd,
            scattered,
            even_ranges,
        }
    }

    /// How gmem's mapping hides private pages.
    pub fn hiding(&self) -> gmem::Hiding {
        self.map.hiding()
    }

    /// The odd pages: ascending, or in the scattered order.
    pub fn odd_pages(&self, scattered: bool) -> &[u64] {
        if scattered {
            &self.scattered
        } else {
            &self.odd
        }
    }

    /// Converts each page of `pages` to `to`, one `set_attributes` call each.
    pub fn convert_each(&self, pages: &[u64], to: Attribute) -> Result<(), gmem::ConversionError> {
        for page in pages {
            self.mem.set_attributes(page * PAGE_SIZE, PAGE_SIZE, to)?;
        }
        Ok(())
    }

    /// The odd pages to private and back to shared, one call per page each
    /// way, in order or scattered.
    pub fn ours(&self, scattered: bool) {
        let pages = self.odd_pages(scattered);
        self.convert_each(pages, Attribute::Private)
            .expect("to private");
        self.convert_each(pages, Attribute::Shared)
            .expect("to shared");
    }

    /// The same single-page calls as raw guard installs and removes.
    pub fn floor(&self) {
        let page = PAGE_SIZE as usize;
        for p in &self.odd {
            self.raw
                .guard_install(*p as usize * page, page)
                .expect("guard install");
        }
        for p in &self.odd {
            self.raw
                .guard_remove(*p as usize * page, page)
                .expect("guard remove");
        }
    }

    /// Untimed, from any state: every page shared but the odd ones.
    pub fn try_prepare_batch_ours(&self) -> Result<(), gmem::ConversionError> {
        self.mem
            .set_attributes(0, FRAGMENTED_LEN, Attribute::Shared)?;
        self.convert_each(&self.odd, Attribute::Private)
    }

    /// [`try_prepare_batch_ours`](Self::try_prepare_batch_ours), which must succeed.
    pub fn prepare_batch_ours(&self) {
        self.try_prepare_batch_ours().expect("alternate pages");
    }

    /// One call over the whole file: hides the even pages' shared runs.
    pub fn try_batch_ours(&self) -> Result<(), gmem::ConversionError> {
        self.mem
            .set_attributes(0, FRAGMENTED_LEN, Attribute::Private)
    }

    /// [`try_batch_ours`](Self::try_batch_ours), which must succeed.
    pub fn batch_ours(&self) {
        self.try_batch_ours().expect("to private");
    }

    /// Untimed, from any state: every page guarded but the even ones.
    pub fn prepare_batch_floor(&self) {
        self.raw
            .guard_install(0, FRAGMENTED_LEN as usize)
            .expect("guard install");
        self.raw
            .guard_remove_ranges(&self.even_ranges)
            .expect("guard remove");
    }

    /// Guard markers over the even pages, by batched `process_madvise`.
    pub fn batch_floor(&self) {
        self.raw
            .guard_install_ranges(&self.even_ranges)
            .expect("guard install");
    }

    /// Untimed: every page shared and unguarded again.
    pub fn reset(&self) {
        self.mem
            .set_attributes(0, FRAGMENTED_LEN, Attribute::Shared)
            .expect("to shared");
        self.raw
            .guard_remove(0, FRAGMENTED_LEN as usize)
            .expect("guard remove");
    }
}

/// A fixed permutation of `0..n` from `seed` (Fisher-Yates driven by
/// splitmix64): the same scattered order in every run.
pub fn scattered_order(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The lines of a `/proc/<pid>/maps` text: one per VMA.
pub fn count_vmas(maps: &str) -> usize {
    maps.lines().filter(|line| !line.trim().is_empty()).count()
}

/// This process's VMAs now.
pub fn vma_count() -> std::io::Result<usize> {
    Ok(count_vmas(&std::fs::read_to_string("/proc/self/maps")?))
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
/// design's pin + unpin; and of 16 pages (a 64 KiB virtio buffer), on a file
/// with small folios and on one with huge folios, against 16 single-page
/// increment + decrement pairs.
pub struct PinUnpin {
    mem: GuestMemfd,
    huge: GuestMemfd,
    counter: AtomicU64,
    counters: [AtomicU64; 16],
    mutex: MutexRefs,
}

impl Default for PinUnpin {
    fn default() -> Self {
        Self::new()
    }
}

impl PinUnpin {
    /// Files with pages 0 to 15 pinned once (so the fast path is warm); the
    /// second counts references per 2 MiB huge folio.
    pub fn new() -> PinUnpin {
        let mem = GuestMemfd::new(4 * MIB, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
        drop(mem.pin(0, 16 * PAGE_SIZE).expect("pin"));
        let options = Options::new().huge_folios(true);
        let huge = GuestMemfd::with_options(4 * MIB, Flags::MMAP | Flags::INIT_SHARED, options)
            .expect("memfd");
        drop(huge.pin(0, 16 * PAGE_SIZE).expect("pin"));
        assert_eq!(huge.folio_range(0), Ok(0..2 * MIB), "a huge folio");
        PinUnpin {
            mem,
            huge,
            counter: AtomicU64::new(0),
            counters: Default::default(),
            mutex: MutexRefs::new(1024),
        }
    }

    /// gmem's pin and unpin.
    pub fn ours(&self) {
        drop(black_box(self.mem.pin(black_box(0), 1).expect("pin")));
    }

    /// gmem's pin and unpin of 16 pages.
    pub fn ours_16(&self) {
        drop(black_box(
            self.mem.pin(black_box(0), 16 * PAGE_SIZE).expect("pin"),
        ));
    }

    /// gmem's pin and unpin of 16 pages in a huge folio.
    pub fn ours_16_huge(&self) {
        drop(black_box(
            self.huge.pin(black_box(0), 16 * PAGE_SIZE).expect("pin"),
        ));
    }

    /// The floor: one uncontended atomic increment and decrement.
    pub fn atomic(&self) {
        // Relaxed: the floor is the bare locked instructions.
        black_box(self.counter.fetch_add(1, Ordering::Relaxed));
        black_box(self.counter.fetch_sub(1, Ordering::Relaxed));
    }

    /// Sixteen single-page floors, one per page's counter.
    pub fn atomic_16(&self) {
        for counter in black_box(&self.counters) {
            // Relaxed: as in `atomic`.
            black_box(counter.fetch_add(1, Ordering::Relaxed));
            black_box(counter.fetch_sub(1, Ordering::Relaxed));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_order_is_a_fixed_permutation() {
        for n in [0, 1, 2, 7, 1000] {
            let order = scattered_order(n, 42);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            assert_eq!(order, scattered_order(n, 42));
        }
        let order = scattered_order(1000, 42);
        assert!(order.windows(2).filter(|w| w[1] == w[0] + 1).count() < 10);
    }

    #[test]
    fn vmas_are_counted_by_line() {
        let maps = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234    /usr/bin/cat
7ffd1b3f0000-7ffd1b411000 rw-p 00000000 00:00 0       [stack]
7f00aa000000-7f00ba000000 rw-s 00000000 00:01 99      /memfd:floor (deleted)
";
        assert_eq!(count_vmas(maps), 3);
        assert_eq!(count_vmas(""), 0);
        assert!(vma_count().unwrap() > 3);
    }
}
