//! The reference model of a `GuestMemfd` and a driver that runs a sequence
//! of operations on a real file and checks every result (errno, offset,
//! state, contents, counters, what listeners heard) against it. Shared by
//! the model proptest (`tests/model.rs`) and the fuzz target (`fuzz/`).
//!
//! Not part of the API: behind the `testing` feature, and `Arbitrary` for
//! the operations behind `arbitrary`.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::{
    Attribute, ConversionError, ConversionListener, Error, Flags, GuestMemfd, HostMapping,
    ListenerId, Options, PAGE_SIZE, Pin, Refusal,
};

/// A small xorshift generator: no dependency, reproducible per seed. For
/// the concurrency tests and `gmem stress`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; never the all-zero state).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 for an `n` of 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Pages of the file under test.
pub const PAGES: u64 = 16;
/// Bytes of the file under test.
pub const SIZE: u64 = PAGES * PAGE_SIZE;
const P: u64 = PAGE_SIZE;
/// Host mappings held at most (the oldest is dropped past this).
pub const MAX_MAPPINGS: usize = 4;

/// One operation on the file. Indices pick among live objects modulo their
/// number; out-of-range offsets and lengths are part of the test.
#[derive(Debug, Clone)]
pub enum Op {
    /// `set_attributes(offset, len, to)`.
    Convert {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The state asked for.
        to: Attribute,
    },
    /// `pin(offset, len)`, kept by the driver.
    Pin {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Drops one held pin.
    Unpin {
        /// Which.
        index: usize,
    },
    /// `punch_hole(offset, len)`.
    Punch {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `allocate(offset, len)`.
    Allocate {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `HostMapping::read` through one mapping.
    Read {
        /// Which mapping.
        map: usize,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// `HostMapping::write` of a pattern through one mapping.
    Write {
        /// Which mapping.
        map: usize,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
        /// The pattern's seed.
        seed: u8,
    },
    /// `Pin::read`.
    PinRead {
        /// Which pin.
        index: usize,
        /// Byte offset in the pin.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// `Pin::write` of a pattern.
    PinWrite {
        /// Which pin.
        index: usize,
        /// Byte offset in the pin.
        offset: u64,
        /// Bytes.
        len: usize,
        /// The pattern's seed.
        seed: u8,
    },
    /// `drain_pin_batches`.
    Drain,
    /// `mmap_len(len)` (`u64::MAX`: `mmap`), kept by the driver.
    Map {
        /// Bytes.
        len: u64,
    },
    /// Drops one mapping.
    Unmap {
        /// Which.
        index: usize,
    },
    /// Registers a listener that records what it hears, and refuses every
    /// conversion to private if `refuse`.
    AddListener {
        /// Whether it refuses.
        refuse: bool,
    },
    /// Registers a listener that, in every commit phase, pins `page` (and
    /// keeps the pin if `keep`, until it is removed) and reads it through a
    /// mapping of its own: both must fail inside the range in flight or on
    /// a private page, and succeed elsewhere.
    AddProbe {
        /// The page it pins and reads (modulo the file's pages).
        page: u64,
        /// Whether it keeps its pins.
        keep: bool,
    },
    /// Removes a listener (one of those ever added: a removed one again
    /// answers false).
    RemoveListener {
        /// Which.
        index: usize,
    },
    /// Creates (and drops) another file: sizes and flags checked.
    Create {
        /// Bytes.
        size: u64,
        /// Flag bits, known or not.
        flags: u64,
        /// `Options::huge_folios`.
        huge_folios: bool,
    },
}

/// A test case: the file's initial state and the operations.
#[derive(Debug, Clone)]
pub struct Case {
    /// `INIT_SHARED` or not.
    pub init_shared: bool,
    /// What to do.
    pub ops: Vec<Op>,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) | 1)
        .collect()
}

fn fault_offset(err: &Error) -> Option<u64> {
    match err {
        Error::Private { offset } | Error::Pinned { offset } => Some(*offset),
        _ => None,
    }
}

fn pages_of(offset: u64, end: u64) -> Range<usize> {
    if end <= offset {
        return 0..0;
    }
    (offset / P) as usize..end.div_ceil(P) as usize
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($fmt:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{}: {:?} != {:?}", format!($($fmt)+), left, right));
        }
    }};
}

/// What a listener hears.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    BeforePrivate(u64, u64),
    /// A commit phase, with the errno of the probe's pin and read (0: it
    /// succeeded).
    Committed(u64, u64, Attribute, i32, i32),
    Converted(u64, u64, Attribute),
}

/// A listener that records, and may refuse.
struct Recorder {
    refuse: bool,
    log: Mutex<Vec<Heard>>,
    probe: Option<Probe>,
}

/// What a probing listener pins and reads in its commit phases.
struct Probe {
    page: u64,
    keep: bool,
    file: std::sync::Weak<GuestMemfd>,
    /// Its own mapping (none can be made in a callback); dropped with the
    /// listener's removal, which breaks the cycle through the file.
    map: Mutex<Option<HostMapping>>,
    kept: Mutex<Vec<crate::OwnedPin>>,
}

impl Probe {
    /// Pins and reads the page: the errnos (0 for success).
    fn probe(&self) -> (i32, i32) {
        let file = self.file.upgrade().expect("the model holds the file");
        let pin = file.pin_owned(self.page * P, P);
        let pinned = pin.as_ref().map_or_else(Error::errno, |_| 0);
        if let (Ok(pin), true) = (pin, self.keep) {
            self.kept.lock().unwrap().push(pin);
        }
        let map = self.map.lock().unwrap();
        let mut buf = [0u8; 8];
        let read = map.as_ref().map(|map| map.read(self.page * P, &mut buf));
        (
            pinned,
            read.map_or(0, |r| r.map_or_else(|e| e.errno(), |()| 0)),
        )
    }
}

impl ConversionListener for Recorder {
    fn before_private(&self, offset: u64, len: u64) -> Result<(), Refusal> {
        self.log
            .lock()
            .unwrap()
            .push(Heard::BeforePrivate(offset, len));
        if self.refuse {
            Err(Refusal::new("the model's listener refuses"))
        } else {
            Ok(())
        }
    }

    fn commit(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Refusal> {
        if let Some(probe) = &self.probe {
            let (pin, read) = probe.probe();
            let heard = Heard::Committed(offset, len, to, pin, read);
            self.log.lock().unwrap().push(heard);
        }
        Ok(())
    }

    fn converted(&self, offset: u64, len: u64, to: Attribute) {
        self.log
            .lock()
            .unwrap()
            .push(Heard::Converted(offset, len, to));
    }
}

/// A listener, as the model knows it.
struct Listening {
    id: ListenerId,
    recorder: Arc<Recorder>,
    live: bool,
    expected: Vec<Heard>,
    /// Pins its probe keeps.
    kept: u64,
}

/// The reference model.
struct Model {
    attrs: Vec<Attribute>,
    bytes: Vec<u8>,
    /// Live pins per page.
    pinned: Vec<u32>,
    /// `(offset, len)` of each live pin, parallel to the real `Vec<Pin>`.
    pins: Vec<(u64, u64)>,
    /// Pages of pins dropped since the last observed drain: their release
    /// may still be parked in this thread's batch.
    maybe_parked: Vec<bool>,
    /// Pages that must be allocated.
    allocated: Vec<bool>,
    /// Pages that may be allocated (touched since the last punch).
    touched: Vec<bool>,
    listeners: Vec<Listening>,
    to_private: u64,
    to_shared: u64,
    eagain: u64,
    refused: u64,
    drains: u64,
}

impl Model {
    fn new(initial: Attribute) -> Model {
        let pages = PAGES as usize;
        Model {
            attrs: vec![initial; pages],
            bytes: vec![0; SIZE as usize],
            pinned: vec![0; pages],
            pins: Vec::new(),
            maybe_parked: vec![false; pages],
            allocated: vec![false; pages],
            touched: vec![false; pages],
            listeners: Vec::new(),
            to_private: 0,
            to_shared: 0,
            eagain: 0,
            refused: 0,
            drains: 0,
        }
    }

    fn first_pinned(&self, pages: Range<usize>) -> Option<usize> {
        pages.into_iter().find(|&p| self.pinned[p] > 0)
    }

    fn first_private(&self, pages: Range<usize>) -> Option<usize> {
        pages
            .into_iter()
            .find(|&p| self.attrs[p] == Attribute::Private)
    }

    fn allocate(&mut self, pages: Range<usize>) {
        for p in pages {
            self.allocated[p] = true;
            self.touched[p] = true;
        }
    }

    fn touch(&mut self, pages: Range<usize>) {
        for p in pages {
            self.touched[p] = true;
        }
    }

    /// The commit phase of a conversion of `pages` to `to` that goes
    /// through: every live probe pins and reads its page, which fails in the
    /// range in flight and on a private page; a pin kept holds its page.
    /// Called before the model stores the new state.
    fn hear_commit(&mut self, pages: Range<usize>, to: Attribute) {
        let (offset, len) = (pages.start as u64 * P, pages.len() as u64 * P);
        for index in 0..self.listeners.len() {
            let l = &self.listeners[index];
            let Some(probe) = l.recorder.probe.as_ref().filter(|_| l.live) else {
                continue;
            };
            let (page, keep) = (probe.page as usize, probe.keep);
            // To private the range is in flight; to shared its changing
            // pages are private until stored.
            let in_flight = to == Attribute::Private && pages.contains(&page);
            let hidden = in_flight || self.attrs[page] == Attribute::Private;
            let errno = if hidden { libc::EFAULT } else { 0 };
            self.listeners[index]
                .expected
                .push(Heard::Committed(offset, len, to, errno, errno));
            if !hidden {
                self.allocate(page..page + 1);
                if keep {
                    self.pinned[page] += 1;
                    self.listeners[index].kept += 1;
                } else {
                    self.maybe_parked[page] = true;
                }
            }
        }
    }

    /// Drops the pins a probing listener kept, on this thread.
    fn release_kept(&mut self, index: usize) {
        let l = &mut self.listeners[index];
        let Some(probe) = &l.recorder.probe else {
            return;
        };
        probe.kept.lock().unwrap().clear();
        probe.map.lock().unwrap().take();
        let page = probe.page as usize;
        self.pinned[page] -= std::mem::take(&mut l.kept) as u32;
        self.maybe_parked[page] = true;
    }

    /// Every live listener hears `what`.
    fn hear(&mut self, what: Heard) {
        for l in self.listeners.iter_mut().filter(|l| l.live) {
            l.expected.push(what.clone());
        }
    }

    /// The drain a conversion to private or a punch of `pages` does: exactly
    /// one if a live pin is in the range, none if no pin touched it since the
    /// last drain, else zero or one.
    fn check_drain(&mut self, pages: Range<usize>, observed: u64) -> Result<(), String> {
        let grew = observed - self.drains;
        if self.first_pinned(pages.clone()).is_some() {
            ensure_eq!(
                grew,
                1,
                "a live pin in the range must cause exactly one drain"
            );
        } else if pages.clone().any(|p| self.maybe_parked[p]) {
            ensure!(grew <= 1, "at most one drain per request, saw {grew}");
        } else {
            ensure_eq!(grew, 0, "drain without any reference in the range");
        }
        if grew == 1 {
            self.maybe_parked.fill(false);
        } else {
            for p in pages {
                self.maybe_parked[p] = false;
            }
        }
        self.drains = observed;
        Ok(())
    }
}

/// The bytes of `map` the checked accessors may reach.
fn reach(map: &HostMapping) -> u64 {
    map.len().min(SIZE)
}

/// Checks every observable of `mem` against the model.
fn check_all(
    mem: &GuestMemfd,
    maps: &[HostMapping],
    model: &mut Model,
    pins: &[Pin<'_>],
) -> Result<(), String> {
    for page in 0..PAGES {
        let want = model.attrs[page as usize];
        ensure_eq!(mem.attribute(page * P).unwrap(), want, "page {page}");
        ensure_eq!(
            mem.attribute(page * P + P - 1).unwrap(),
            want,
            "page {page} end"
        );
    }
    ensure_eq!(
        mem.attribute(SIZE).unwrap_err().errno(),
        libc::EINVAL,
        "attribute past the end"
    );
    let stats = mem.stats();
    let private = model
        .attrs
        .iter()
        .filter(|a| **a == Attribute::Private)
        .count() as u64;
    ensure_eq!(stats.pages_private, private, "pages_private");
    ensure_eq!(stats.pages_shared, PAGES - private, "pages_shared");
    let kept: u64 = model.listeners.iter().map(|l| l.kept).sum();
    ensure_eq!(stats.pins_live, model.pins.len() as u64 + kept, "pins_live");
    ensure_eq!(stats.eagain, model.eagain, "eagain");
    ensure_eq!(stats.refused, model.refused, "refused");
    ensure_eq!(stats.conversions_to_private, model.to_private, "to_private");
    ensure_eq!(stats.conversions_to_shared, model.to_shared, "to_shared");
    ensure_eq!(stats.drains, model.drains, "drains");
    if let Some(allocated) = stats.pages_allocated {
        let lower = model.allocated.iter().filter(|a| **a).count() as u64;
        let upper = model.touched.iter().filter(|a| **a).count() as u64;
        ensure!(
            (lower..=upper).contains(&allocated),
            "pages_allocated {allocated} not in {lower}..={upper}"
        );
    }
    ensure_eq!(pins.len(), model.pins.len(), "pins held");
    for (pin, &(offset, len)) in pins.iter().zip(&model.pins) {
        ensure_eq!((pin.offset(), pin.len()), (offset, len), "pin range");
        for page in pages_of(offset, offset + len) {
            ensure_eq!(
                model.attrs[page],
                Attribute::Shared,
                "pinned page {page} is private"
            );
        }
    }
    for l in &mut model.listeners {
        let heard = std::mem::take(&mut *l.recorder.log.lock().unwrap());
        let expected = std::mem::take(&mut l.expected);
        ensure_eq!(heard, expected, "what listener {:?} heard", l.id);
    }
    // The contents of every page, through every mapping.
    let mut buf = vec![0u8; P as usize];
    for (index, map) in maps.iter().enumerate() {
        for page in 0..(reach(map) / P) as usize {
            let at = page as u64 * P;
            match model.attrs[page] {
                Attribute::Shared => {
                    map.read(at, &mut buf).unwrap();
                    model.touched[page] = true;
                    ensure!(
                        buf == model.bytes[page * P as usize..(page + 1) * P as usize],
                        "contents of shared page {page} differ in mapping {index}"
                    );
                }
                Attribute::Private => {
                    let err = map.read(at, &mut buf).unwrap_err();
                    ensure_eq!(err.errno(), libc::EFAULT, "read of private page {page}");
                    ensure_eq!(fault_offset(&err), Some(at), "fault offset");
                }
            }
        }
        let err = map.read(reach(map), &mut buf[..1]).unwrap_err();
        ensure_eq!(err.errno(), libc::EINVAL, "read past the mapping {index}");
    }
    Ok(())
}

/// Checks a copy through `map` (read or write) against the model; returns
/// whether it succeeded.
fn check_copy(
    model: &Model,
    map: &HostMapping,
    offset: u64,
    len: usize,
    result: Result<(), Error>,
    desc: &str,
) -> Result<Option<u64>, String> {
    match offset
        .checked_add(len as u64)
        .filter(|end| *end <= reach(map))
    {
        None => {
            ensure_eq!(
                result.map_err(|e| e.errno()),
                Err(libc::EINVAL),
                "{desc}: out of range"
            );
            Ok(None)
        }
        Some(end) => match model.first_private(pages_of(offset, end)) {
            Some(page) if len > 0 => {
                let err = result.expect_err(desc);
                ensure_eq!(err.errno(), libc::EFAULT, "{desc}");
                ensure_eq!(fault_offset(&err), Some(page as u64 * P), "{desc}");
                Ok(None)
            }
            _ => {
                ensure!(result.is_ok(), "{desc}: {result:?}");
                Ok(Some(end))
            }
        },
    }
}

/// Runs `case` on a new file and checks it against the model after every
/// operation. The error says which step failed and how.
pub fn run(case: &Case) -> Result<(), String> {
    let flags = if case.init_shared {
        Flags::MMAP | Flags::INIT_SHARED
    } else {
        Flags::MMAP
    };
    // In an `Arc`: probing listeners pin it owned.
    let mem = Arc::new(GuestMemfd::new(SIZE, flags).unwrap());
    let mut maps = vec![mem.mmap().unwrap()];
    let mut model = Model::new(if case.init_shared {
        Attribute::Shared
    } else {
        Attribute::Private
    });
    let mut pins: Vec<Pin<'_>> = Vec::new();
    check_all(&mem, &maps, &mut model, &pins)?;
    for (step, op) in case.ops.iter().enumerate() {
        let desc = format!("step {step}: {op:?}");
        step_once(&mem, &mut maps, &mut model, &mut pins, op, &desc)?;
        check_all(&mem, &maps, &mut model, &pins).map_err(|e| format!("after {desc}: {e}"))?;
    }

    // Every pin dropped and every listener gone: the whole file converts to
    // private at once, and back, with its contents.
    pins.clear();
    for index in 0..model.listeners.len() {
        mem.remove_listener(model.listeners[index].id);
        model.release_kept(index);
    }
    ensure_eq!(mem.stats().pins_live, 0, "pins_live at the end");
    mem.set_attributes(0, SIZE, Attribute::Private)
        .map_err(|e| format!("whole file to private at the end: {e}"))?;
    mem.set_attributes(0, SIZE, Attribute::Shared)
        .map_err(|e| format!("whole file to shared at the end: {e}"))?;
    let mut all = vec![0u8; SIZE as usize];
    let map = mem.mmap().unwrap();
    map.read(0, &mut all).unwrap();
    ensure!(all == model.bytes, "contents after a full round trip");
    Ok(())
}

/// Registers a recorder (probing if `probe`) and tells the model.
fn add_listener(
    mem: &GuestMemfd,
    model: &mut Model,
    refuse: bool,
    probe: Option<Probe>,
    desc: &str,
) -> Result<(), String> {
    let recorder = Arc::new(Recorder {
        refuse,
        log: Mutex::new(Vec::new()),
        probe,
    });
    let id = mem.add_listener(recorder.clone());
    ensure!(
        model.listeners.iter().all(|l| l.id != id),
        "{desc}: listener id {id:?} reused"
    );
    model.listeners.push(Listening {
        id,
        recorder,
        live: true,
        expected: Vec::new(),
        kept: 0,
    });
    Ok(())
}

fn step_once<'m>(
    mem: &'m Arc<GuestMemfd>,
    maps: &mut Vec<HostMapping>,
    model: &mut Model,
    pins: &mut Vec<Pin<'m>>,
    op: &Op,
    desc: &str,
) -> Result<(), String> {
    match *op {
        Op::Convert { offset, len, to } => {
            let result = mem.set_attributes(offset, len, to);
            let valid = len != 0
                && offset % P == 0
                && len % P == 0
                && offset.checked_add(len).is_some_and(|end| end <= SIZE);
            if !valid {
                let err = result.expect_err(desc);
                ensure_eq!(err.errno(), libc::EINVAL, "{desc}");
                ensure_eq!(err.error_offset(), offset, "{desc}");
                ensure!(matches!(err, ConversionError::Invalid { .. }), "{desc}");
                return Ok(());
            }
            let pages = pages_of(offset, offset + len);
            let observed = mem.stats().drains;
            if pages.clone().all(|p| model.attrs[p] == to) {
                ensure!(result.is_ok(), "{desc}: {result:?}");
                ensure_eq!(observed, model.drains, "{desc}: no-op drained");
            } else if to == Attribute::Shared {
                ensure!(result.is_ok(), "{desc}: {result:?}");
                ensure_eq!(observed, model.drains, "{desc}: to shared drained");
                model.hear_commit(pages.clone(), to);
                model.attrs[pages].fill(to);
                model.to_shared += 1;
                model.hear(Heard::Converted(offset, len, to));
            } else {
                // The listeners are asked in order; the first refusal wins.
                let mut refused = false;
                for l in model.listeners.iter_mut().filter(|l| l.live) {
                    l.expected.push(Heard::BeforePrivate(offset, len));
                    if l.recorder.refuse {
                        refused = true;
                        break;
                    }
                }
                if refused {
                    let err = result.expect_err(desc);
                    ensure_eq!(err.errno(), libc::EBUSY, "{desc}");
                    ensure_eq!(err.error_offset(), offset, "{desc}");
                    ensure_eq!(observed, model.drains, "{desc}: refusal drained");
                    model.refused += 1;
                    return Ok(());
                }
                // The check and its drain come before the commit phase.
                let pinned = model.first_pinned(pages.clone());
                model.check_drain(pages.clone(), observed)?;
                match pinned {
                    Some(page) => {
                        let err = result.expect_err(desc);
                        ensure_eq!(err.errno(), libc::EAGAIN, "{desc}");
                        ensure_eq!(err.error_offset(), page as u64 * P, "{desc}");
                        model.eagain += 1;
                    }
                    None => {
                        ensure!(result.is_ok(), "{desc}: {result:?}");
                        model.hear_commit(pages.clone(), to);
                        model.attrs[pages.clone()].fill(to);
                        model.to_private += 1;
                        model.hear(Heard::Converted(offset, len, to));
                    }
                }
            }
        }
        Op::Pin { offset, len } => {
            let result = mem.pin(offset, len);
            match offset.checked_add(len).filter(|end| *end <= SIZE) {
                Some(end) if len > 0 => {
                    let pages = pages_of(offset, end);
                    match model.first_private(pages.clone()) {
                        Some(page) => {
                            let err = result.map(|_| ()).expect_err(desc);
                            ensure_eq!(err.errno(), libc::EFAULT, "{desc}");
                            ensure_eq!(fault_offset(&err), Some(page as u64 * P), "{desc}");
                        }
                        None => {
                            let pin = result.map_err(|e| format!("{desc}: {e}"))?;
                            for p in pages.clone() {
                                model.pinned[p] += 1;
                            }
                            model.allocate(pages);
                            model.pins.push((offset, len));
                            pins.push(pin);
                        }
                    }
                }
                _ => ensure_eq!(
                    result.map(|_| ()).map_err(|e| e.errno()),
                    Err(libc::EINVAL),
                    "{desc}"
                ),
            }
        }
        Op::Unpin { index } => {
            if !pins.is_empty() {
                let index = index % pins.len();
                drop(pins.remove(index));
                let (offset, len) = model.pins.remove(index);
                for p in pages_of(offset, offset + len) {
                    model.pinned[p] -= 1;
                    model.maybe_parked[p] = true;
                }
            }
        }
        Op::Punch { offset, len } => {
            let result = mem.punch_hole(offset, len);
            let errno = result.as_ref().map_err(Error::errno).err();
            if len == 0 || offset > i64::MAX as u64 || len > i64::MAX as u64 {
                ensure_eq!(errno, Some(libc::EINVAL), "{desc}");
                return Ok(());
            }
            let Some(end) = offset
                .checked_add(len)
                .filter(|end| *end <= i64::MAX as u64)
            else {
                ensure_eq!(errno, Some(libc::EFBIG), "{desc}");
                return Ok(());
            };
            if offset % P != 0 || len % P != 0 {
                ensure_eq!(errno, Some(libc::EINVAL), "{desc}");
                return Ok(());
            }
            let end = end.min(SIZE);
            let observed = mem.stats().drains;
            if offset >= end {
                ensure!(result.is_ok(), "{desc}: {result:?}");
                ensure_eq!(observed, model.drains, "{desc}: no-op punch drained");
                return Ok(());
            }
            let pages = pages_of(offset, end);
            match model.first_pinned(pages.clone()) {
                Some(page) => {
                    let err = result.expect_err(desc);
                    ensure_eq!(err.errno(), libc::EBUSY, "{desc}");
                    ensure_eq!(fault_offset(&err), Some(page as u64 * P), "{desc}");
                }
                None => {
                    ensure!(result.is_ok(), "{desc}: {result:?}");
                    model.bytes[offset as usize..end as usize].fill(0);
                    for p in pages.clone() {
                        model.allocated[p] = false;
                        model.touched[p] = false;
                    }
                }
            }
            model.check_drain(pages, observed)?;
        }
        Op::Allocate { offset, len } => {
            let result = mem.allocate(offset, len);
            let errno = result.as_ref().map_err(Error::errno).err();
            let end = offset.checked_add(len);
            let want = if len == 0 || offset > i64::MAX as u64 || len > i64::MAX as u64 {
                Some(libc::EINVAL)
            } else if end.is_none_or(|end| end > i64::MAX as u64) {
                Some(libc::EFBIG)
            } else if offset % P != 0 || len % P != 0 || end.is_some_and(|end| end > SIZE) {
                Some(libc::EINVAL)
            } else {
                None
            };
            ensure_eq!(errno, want, "{desc}");
            if want.is_none() {
                model.allocate(pages_of(offset, offset + len));
            }
        }
        Op::Read { map, offset, len } => {
            if maps.is_empty() {
                return Ok(());
            }
            let map = &maps[map % maps.len()];
            let mut buf = vec![0xEEu8; len];
            let result = map.read(offset, &mut buf);
            if let Some(end) = check_copy(model, map, offset, len, result, desc)? {
                ensure!(
                    buf == model.bytes[offset as usize..end as usize],
                    "{desc}: contents"
                );
                model.touch(pages_of(offset, end));
            }
        }
        Op::Write {
            map,
            offset,
            len,
            seed,
        } => {
            if maps.is_empty() {
                return Ok(());
            }
            let map = &maps[map % maps.len()];
            let data = pattern(len, seed);
            let result = map.write(offset, &data);
            if let Some(end) = check_copy(model, map, offset, len, result, desc)? {
                model.bytes[offset as usize..end as usize].copy_from_slice(&data);
                model.allocate(pages_of(offset, end));
            }
        }
        Op::PinRead { index, offset, len } => {
            if !pins.is_empty() {
                let index = index % pins.len();
                let mut buf = vec![0xEEu8; len];
                let result = pins[index].read(offset, &mut buf);
                match in_pin(model.pins[index], offset, len) {
                    None => {
                        ensure_eq!(result.map_err(|e| e.errno()), Err(libc::EINVAL), "{desc}")
                    }
                    Some(at) => {
                        ensure!(result.is_ok(), "{desc}: {result:?}");
                        ensure!(buf == model.bytes[at..at + len], "{desc}: contents");
                    }
                }
            }
        }
        Op::PinWrite {
            index,
            offset,
            len,
            seed,
        } => {
            if !pins.is_empty() {
                let index = index % pins.len();
                let data = pattern(len, seed);
                let result = pins[index].write(offset, &data);
                match in_pin(model.pins[index], offset, len) {
                    None => {
                        ensure_eq!(result.map_err(|e| e.errno()), Err(libc::EINVAL), "{desc}")
                    }
                    Some(at) => {
                        ensure!(result.is_ok(), "{desc}: {result:?}");
                        model.bytes[at..at + len].copy_from_slice(&data);
                    }
                }
            }
        }
        Op::Drain => {
            mem.drain_pin_batches();
            model.drains += 1;
            model.maybe_parked.fill(false);
        }
        Op::Map { len } => {
            let result = if len == u64::MAX {
                mem.mmap()
            } else {
                mem.mmap_len(len)
            };
            let want = match len {
                u64::MAX => Some(SIZE),
                0 => None,
                len => len
                    .checked_next_multiple_of(P)
                    .filter(|len| *len <= isize::MAX as u64),
            };
            match want {
                Some(want) => {
                    let map = result.map_err(|e| format!("{desc}: {e}"))?;
                    ensure_eq!(map.len(), want, "{desc}: length");
                    if maps.len() == MAX_MAPPINGS {
                        maps.remove(0);
                    }
                    maps.push(map);
                }
                None => ensure_eq!(
                    result.map_err(|e| e.errno()).err(),
                    Some(libc::EINVAL),
                    "{desc}"
                ),
            }
        }
        Op::Unmap { index } => {
            if !maps.is_empty() {
                let index = index % maps.len();
                maps.remove(index);
            }
        }
        Op::AddListener { refuse } => add_listener(mem, model, refuse, None, desc)?,
        Op::AddProbe { page, keep } => {
            let probe = Probe {
                page: page % PAGES,
                keep,
                file: Arc::downgrade(mem),
                map: Mutex::new(Some(mem.mmap().unwrap())),
                kept: Mutex::new(Vec::new()),
            };
            add_listener(mem, model, false, Some(probe), desc)?;
        }
        Op::RemoveListener { index } => {
            if !model.listeners.is_empty() {
                let index = index % model.listeners.len();
                let l = &mut model.listeners[index];
                ensure_eq!(mem.remove_listener(l.id), l.live, "{desc}");
                l.live = false;
                model.release_kept(index);
            }
        }
        Op::Create {
            size,
            flags,
            huge_folios,
        } => {
            let options = Options::new().huge_folios(huge_folios);
            let valid_size = size != 0 && size % P == 0 && size <= isize::MAX as u64;
            if valid_size && size > 1 << 30 && flags & !Flags::all().bits() == 0 {
                // Valid, but too large to make here: whether the host can map
                // it is the host's business.
                return Ok(());
            }
            let result = GuestMemfd::with_options(size, Flags::from_bits_retain(flags), options);
            if flags & !Flags::all().bits() != 0
                || size == 0
                || size % P != 0
                || size > isize::MAX as u64
            {
                ensure_eq!(
                    result.map_err(|e| e.errno()).err(),
                    Some(libc::EINVAL),
                    "{desc}"
                );
                return Ok(());
            }
            let other = result.map_err(|e| format!("{desc}: {e}"))?;
            let flags = Flags::from_bits_retain(flags);
            let initial = if flags.contains(Flags::INIT_SHARED) {
                Attribute::Shared
            } else {
                Attribute::Private
            };
            let stats = other.stats();
            let pages = size / P;
            ensure_eq!(
                (stats.pages_shared, stats.pages_private),
                if initial == Attribute::Shared {
                    (pages, 0)
                } else {
                    (0, pages)
                },
                "{desc}: initial state"
            );
            ensure_eq!(other.attribute(size - 1).ok(), Some(initial), "{desc}");
            let mapped = other.mmap();
            if flags.contains(Flags::MMAP) {
                let map = mapped.map_err(|e| format!("{desc}: mmap: {e}"))?;
                let mut byte = [0xEE];
                let read = map.read(size - 1, &mut byte);
                match initial {
                    Attribute::Shared => ensure!(read.is_ok() && byte == [0], "{desc}: {read:?}"),
                    Attribute::Private => {
                        ensure_eq!(read.map_err(|e| e.errno()), Err(libc::EFAULT), "{desc}")
                    }
                }
            } else {
                ensure_eq!(
                    mapped.map_err(|e| e.errno()).err(),
                    Some(libc::ENODEV),
                    "{desc}"
                );
            }
        }
    }
    Ok(())
}

#[cfg(feature = "arbitrary")]
mod arbitrary_ops {
    //! `Arbitrary` for the operations, with the same mix of valid and
    //! malformed arguments as the proptest's strategies.

    use arbitrary::{Arbitrary, Result, Unstructured};

    use super::{Case, Op, P, PAGES, SIZE};
    use crate::Attribute;

    /// Ranges for conversions, punches and allocations.
    fn file_range(u: &mut Unstructured<'_>) -> Result<(u64, u64)> {
        Ok(match u.int_in_range(0..=13u8)? {
            0..=9 => {
                let page = u.int_in_range(0..=PAGES - 1)?;
                (page * P, u.int_in_range(1..=4u64)? * P)
            }
            10 | 11 => (
                u.int_in_range(0..=PAGES + 2)? * P,
                u.int_in_range(0..=PAGES + 2)? * P,
            ),
            12 => (
                u.int_in_range(0..=SIZE + 2 * P)?,
                u.int_in_range(0..=3 * P)?,
            ),
            _ => (u64::arbitrary(u)?, u64::arbitrary(u)?),
        })
    }

    fn byte_offset(u: &mut Unstructured<'_>) -> Result<u64> {
        Ok(match u.int_in_range(0..=8u8)? {
            0..=3 => u.int_in_range(0..=SIZE - 1)?,
            4..=7 => (u.int_in_range(0..=PAGES)? * P).saturating_sub(8) + u.int_in_range(0..=15)?,
            _ => u64::arbitrary(u)?,
        })
    }

    fn byte_len(u: &mut Unstructured<'_>) -> Result<usize> {
        Ok(match u.int_in_range(0..=6u8)? {
            0..=5 => u.int_in_range(0..=63)?,
            _ => u.int_in_range(0..=P as usize + 200)?,
        })
    }

    fn pin_range(u: &mut Unstructured<'_>) -> Result<(u64, u64)> {
        Ok(match u.int_in_range(0..=10u8)? {
            0..=5 => {
                let page = u.int_in_range(0..=PAGES - 1)?;
                (page * P, u.int_in_range(1..=3u64)? * P)
            }
            6..=8 => (u.int_in_range(0..=SIZE - 1)?, u.int_in_range(0..=2 * P)?),
            9 => (
                u.int_in_range(SIZE - 2 * P..=SIZE + P)?,
                u.int_in_range(0..=3 * P)?,
            ),
            _ => (u64::arbitrary(u)?, u64::arbitrary(u)?),
        })
    }

    fn map_len(u: &mut Unstructured<'_>) -> Result<u64> {
        Ok(match u.int_in_range(0..=5u8)? {
            0 => u64::MAX,
            1 => 0,
            2 => u64::MAX - u.int_in_range(1..=P)?,
            3 => isize::MAX as u64 - u.int_in_range(0..=2)?,
            _ => u.int_in_range(1..=SIZE + 3 * P)?,
        })
    }

    impl<'a> Arbitrary<'a> for Op {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Op> {
            Ok(match u.int_in_range(0..=42u8)? {
                0..=7 => {
                    let (offset, len) = file_range(u)?;
                    let to = if bool::arbitrary(u)? {
                        Attribute::Private
                    } else {
                        Attribute::Shared
                    };
                    Op::Convert { offset, len, to }
                }
                8..=12 => {
                    let (offset, len) = pin_range(u)?;
                    Op::Pin { offset, len }
                }
                13..=16 => Op::Unpin {
                    index: usize::arbitrary(u)?,
                },
                17 | 18 => {
                    let (offset, len) = file_range(u)?;
                    Op::Punch { offset, len }
                }
                19 => {
                    let (offset, len) = file_range(u)?;
                    Op::Allocate { offset, len }
                }
                20..=23 => Op::Read {
                    map: usize::arbitrary(u)?,
                    offset: byte_offset(u)?,
                    len: byte_len(u)?,
                },
                24..=27 => Op::Write {
                    map: usize::arbitrary(u)?,
                    offset: byte_offset(u)?,
                    len: byte_len(u)?,
                    seed: u8::arbitrary(u)?,
                },
                28 | 29 => Op::PinRead {
                    index: usize::arbitrary(u)?,
                    offset: u.int_in_range(0..=2 * P)?,
                    len: u.int_in_range(0..=80)?,
                },
                30..=32 => Op::PinWrite {
                    index: usize::arbitrary(u)?,
                    offset: u.int_in_range(0..=2 * P)?,
                    len: u.int_in_range(0..=80)?,
                    seed: u8::arbitrary(u)?,
                },
                33 => Op::Drain,
                34 | 35 => Op::Map { len: map_len(u)? },
                36 => Op::Unmap {
                    index: usize::arbitrary(u)?,
                },
                37 | 38 => Op::AddListener {
                    refuse: u.ratio(1, 3)?,
                },
                39 => Op::AddProbe {
                    page: u.int_in_range(0..=PAGES - 1)?,
                    keep: bool::arbitrary(u)?,
                },
                40 => Op::RemoveListener {
                    index: usize::arbitrary(u)?,
                },
                _ => Op::Create {
                    size: match u.int_in_range(0..=3u8)? {
                        0 => u64::arbitrary(u)? | 1,
                        1 => u.int_in_range(0..=64 * P)?,
                        _ => u.int_in_range(1..=64u64)? * P,
                    },
                    flags: if u.ratio(1, 4)? {
                        u64::arbitrary(u)?
                    } else {
                        u.int_in_range(0..=3)?
                    },
                    huge_folios: bool::arbitrary(u)?,
                },
            })
        }
    }

    impl<'a> Arbitrary<'a> for Case {
        fn arbitrary(u: &mut Unstructured<'a>) -> Result<Case> {
            let init_shared = bool::arbitrary(u)?;
            let mut ops = Vec::new();
            // A cap keeps each run short.
            while ops.len() < 200 && !u.is_empty() {
                ops.push(Op::arbitrary(u)?);
            }
            Ok(Case { init_shared, ops })
        }
    }
}

/// Where `len` bytes at `offset` within a pin of `(start, pin_len)` begin in
/// the file, or `None` if they are not inside the pin (`EINVAL`).
fn in_pin((start, pin_len): (u64, u64), offset: u64, len: usize) -> Option<usize> {
    let inside = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= pin_len);
    inside.then_some((start + offset) as usize)
}
