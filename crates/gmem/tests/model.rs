//! Model-based test of a `GuestMemfd` (sections 3 to 5 of `guest_memfd.md`):
//! random sequences of conversions, pins, unpins, punches, allocations and
//! copies through the host mapping and through pins, checked after every
//! operation against a plain reference model (one state, one pin count and
//! 4096 bytes per page).

use gmem::{Attribute, ConversionError, Error, Flags, GuestMemfd, HostMapping, PAGE_SIZE, Pin};
use proptest::prelude::*;

const PAGES: u64 = 16;
const SIZE: u64 = PAGES * PAGE_SIZE;
const P: u64 = PAGE_SIZE;

#[derive(Debug, Clone)]
enum Op {
    Convert {
        offset: u64,
        len: u64,
        to: Attribute,
    },
    Pin {
        offset: u64,
        len: u64,
    },
    Unpin {
        index: usize,
    },
    Punch {
        offset: u64,
        len: u64,
    },
    Allocate {
        offset: u64,
        len: u64,
    },
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        len: usize,
        seed: u8,
    },
    PinRead {
        index: usize,
        offset: u64,
        len: usize,
    },
    PinWrite {
        index: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Drain,
    NewMapping,
}

/// Ranges for conversions, punches and allocations: mostly page-aligned and
/// inside the file, sometimes empty, past the end, unaligned or wrapping.
fn file_range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        10 => (0..PAGES, 1..=4u64).prop_map(|(p, n)| (p * P, n * P)),
        2 => (0..=PAGES + 2, 0..=PAGES + 2).prop_map(|(p, n)| (p * P, n * P)),
        1 => (0..SIZE + 2 * P, 0..3 * P),
        1 => (0..=2u64).prop_map(|n| (u64::MAX - P + 1 - n * P, 2 * P)),
    ]
}

/// Byte offsets for copies: anywhere, near page boundaries, near the end,
/// or absurdly large.
fn byte_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..SIZE,
        4 => (0..=PAGES, 0..16u64).prop_map(|(p, d)| (p * P).saturating_sub(8) + d),
        1 => Just(u64::MAX - 3),
    ]
}

fn byte_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0..64usize,
        1 => 0..(P as usize + 200),
    ]
}

/// Pin ranges: unaligned ones are allowed (they cover whole pages).
fn pin_range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        6 => (0..PAGES, 1..=3u64).prop_map(|(p, n)| (p * P, n * P)),
        3 => (0..SIZE, 0..2 * P),
        1 => (SIZE - 2 * P..SIZE + P, 0..3 * P),
        1 => Just((u64::MAX - 1, 4)),
    ]
}

fn attribute() -> impl Strategy<Value = Attribute> {
    prop_oneof![Just(Attribute::Shared), Just(Attribute::Private)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (file_range(), attribute()).prop_map(|((offset, len), to)| Op::Convert { offset, len, to }),
        5 => pin_range().prop_map(|(offset, len)| Op::Pin { offset, len }),
        4 => any::<usize>().prop_map(|index| Op::Unpin { index }),
        2 => file_range().prop_map(|(offset, len)| Op::Punch { offset, len }),
        1 => file_range().prop_map(|(offset, len)| Op::Allocate { offset, len }),
        4 => (byte_offset(), byte_len()).prop_map(|(offset, len)| Op::Read { offset, len }),
        4 => (byte_offset(), byte_len(), any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (any::<usize>(), 0..2 * P, 0..80usize).prop_map(|(index, offset, len)| Op::PinRead { index, offset, len }),
        3 => (any::<usize>(), 0..2 * P, 0..80usize, any::<u8>())
            .prop_map(|(index, offset, len, seed)| Op::PinWrite { index, offset, len, seed }),
        1 => Just(Op::Drain),
        1 => Just(Op::NewMapping),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) | 1)
        .collect()
}

/// The offset an `EFAULT`/`EBUSY` error reports.
fn fault_offset(err: &Error) -> Option<u64> {
    match err {
        Error::Private { offset } | Error::Pinned { offset } => Some(*offset),
        _ => None,
    }
}

/// The pages covering bytes `[offset, end)` (none if it is empty).
fn pages_of(offset: u64, end: u64) -> std::ops::Range<usize> {
    if end <= offset {
        return 0..0;
    }
    (offset / P) as usize..end.div_ceil(P) as usize
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
    /// may still be parked in this thread's batch (or was flushed because
    /// the batch filled up; the model does not know the batch's size).
    maybe_parked: Vec<bool>,
    /// Pages that must be allocated (allocated, pinned or written, and not
    /// punched since).
    allocated: Vec<bool>,
    /// Pages that may be allocated (touched in any way since the last punch).
    touched: Vec<bool>,
    to_private: u64,
    to_shared: u64,
    eagain: u64,
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
            to_private: 0,
            to_shared: 0,
            eagain: 0,
            drains: 0,
        }
    }

    fn first_pinned(&self, pages: std::ops::Range<usize>) -> Option<usize> {
        pages.into_iter().find(|&p| self.pinned[p] > 0)
    }

    fn first_private(&self, pages: std::ops::Range<usize>) -> Option<usize> {
        pages
            .into_iter()
            .find(|&p| self.attrs[p] == Attribute::Private)
    }

    fn allocate(&mut self, pages: std::ops::Range<usize>) {
        for p in pages {
            self.allocated[p] = true;
            self.touched[p] = true;
        }
    }

    fn touch(&mut self, pages: std::ops::Range<usize>) {
        for p in pages {
            self.touched[p] = true;
        }
    }

    /// The drain that a conversion to private or a punch of `pages` does:
    /// exactly one if a live pin is in the range, none if no pin ever
    /// touched it since the last drain, else zero or one. Updates the
    /// model's drain count from the observed one.
    fn check_drain(
        &mut self,
        pages: std::ops::Range<usize>,
        observed: u64,
    ) -> Result<(), TestCaseError> {
        let grew = observed - self.drains;
        if self.first_pinned(pages.clone()).is_some() {
            prop_assert_eq!(
                grew,
                1,
                "a live pin in the range must cause exactly one drain"
            );
        } else if pages.clone().any(|p| self.maybe_parked[p]) {
            prop_assert!(grew <= 1, "at most one drain per request, saw {}", grew);
        } else {
            prop_assert_eq!(grew, 0, "drain without any reference in the range");
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

/// Checks every observable of `mem` against the model.
fn check_all(
    mem: &GuestMemfd,
    map: &HostMapping,
    model: &mut Model,
    pins: &[Pin<'_>],
) -> Result<(), TestCaseError> {
    for page in 0..PAGES {
        let want = model.attrs[page as usize];
        prop_assert_eq!(mem.attribute(page * P).unwrap(), want, "page {}", page);
        prop_assert_eq!(
            mem.attribute(page * P + P - 1).unwrap(),
            want,
            "page {} end",
            page
        );
    }
    prop_assert_eq!(mem.attribute(SIZE).unwrap_err().errno(), libc::EINVAL);
    let stats = mem.stats();
    let private = model
        .attrs
        .iter()
        .filter(|a| **a == Attribute::Private)
        .count() as u64;
    prop_assert_eq!(stats.pages_private, private);
    prop_assert_eq!(stats.pages_shared, PAGES - private);
    prop_assert_eq!(stats.pins_live, model.pins.len() as u64);
    prop_assert_eq!(stats.eagain, model.eagain);
    prop_assert_eq!(stats.conversions_to_private, model.to_private);
    prop_assert_eq!(stats.conversions_to_shared, model.to_shared);
    prop_assert_eq!(stats.drains, model.drains);
    if let Some(allocated) = stats.pages_allocated {
        let lower = model.allocated.iter().filter(|a| **a).count() as u64;
        let upper = model.touched.iter().filter(|a| **a).count() as u64;
        prop_assert!(
            (lower..=upper).contains(&allocated),
            "pages_allocated {} not in {}..={}",
            allocated,
            lower,
            upper
        );
    }
    prop_assert_eq!(pins.len(), model.pins.len());
    for (pin, &(offset, len)) in pins.iter().zip(&model.pins) {
        prop_assert_eq!((pin.offset(), pin.len()), (offset, len));
        for page in pages_of(offset, offset + len) {
            prop_assert_eq!(
                model.attrs[page],
                Attribute::Shared,
                "pinned page {} is private",
                page
            );
        }
    }
    // The contents of every shared page, through the host mapping.
    let mut buf = vec![0u8; P as usize];
    for page in 0..PAGES as usize {
        let at = page as u64 * P;
        match model.attrs[page] {
            Attribute::Shared => {
                map.read(at, &mut buf).unwrap();
                model.touched[page] = true;
                prop_assert!(
                    buf == model.bytes[page * P as usize..(page + 1) * P as usize],
                    "contents of shared page {} differ",
                    page
                );
            }
            Attribute::Private => {
                let err = map.read(at, &mut buf).unwrap_err();
                prop_assert_eq!(err.errno(), libc::EFAULT);
                prop_assert_eq!(fault_offset(&err), Some(at));
            }
        }
    }
    Ok(())
}

fn run(init_shared: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let flags = if init_shared {
        Flags::MMAP | Flags::INIT_SHARED
    } else {
        Flags::MMAP
    };
    let mem = GuestMemfd::new(SIZE, flags).unwrap();
    let mut map = mem.mmap().unwrap();
    let mut model = Model::new(if init_shared {
        Attribute::Shared
    } else {
        Attribute::Private
    });
    let mut pins: Vec<Pin<'_>> = Vec::new();
    check_all(&mem, &map, &mut model, &pins)?;

    for (step, op) in ops.into_iter().enumerate() {
        let desc = format!("step {step}: {op:?}");
        match op {
            Op::Convert { offset, len, to } => {
                let result = mem.set_attributes(offset, len, to);
                let valid = len != 0
                    && offset % P == 0
                    && len % P == 0
                    && offset.checked_add(len).is_some_and(|end| end <= SIZE);
                if !valid {
                    let err = result.expect_err(&desc);
                    prop_assert_eq!(err.errno(), libc::EINVAL, "{}", desc);
                    prop_assert_eq!(err.error_offset(), offset, "{}", desc);
                    prop_assert!(matches!(err, ConversionError::Invalid { .. }), "{}", desc);
                } else {
                    let pages = pages_of(offset, offset + len);
                    let noop = pages.clone().all(|p| model.attrs[p] == to);
                    if noop {
                        prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                        prop_assert_eq!(
                            mem.stats().drains,
                            model.drains,
                            "{}: no-op drained",
                            desc
                        );
                    } else if to == Attribute::Shared {
                        prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                        prop_assert_eq!(
                            mem.stats().drains,
                            model.drains,
                            "{}: to shared drained",
                            desc
                        );
                        model.attrs[pages].fill(to);
                        model.to_shared += 1;
                    } else {
                        let observed = mem.stats().drains;
                        match model.first_pinned(pages.clone()) {
                            Some(page) => {
                                let err = result.expect_err(&desc);
                                prop_assert_eq!(err.errno(), libc::EAGAIN, "{}", desc);
                                prop_assert_eq!(err.error_offset(), page as u64 * P, "{}", desc);
                                model.eagain += 1;
                            }
                            None => {
                                prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                                model.attrs[pages.clone()].fill(to);
                                model.to_private += 1;
                            }
                        }
                        model.check_drain(pages, observed)?;
                    }
                }
            }
            Op::Pin { offset, len } => {
                let result = mem.pin(offset, len);
                let end = offset.checked_add(len).filter(|end| *end <= SIZE);
                match end {
                    _ if len == 0 => {
                        prop_assert_eq!(
                            result.map(|_| ()).unwrap_err().errno(),
                            libc::EINVAL,
                            "{}",
                            desc
                        )
                    }
                    None => prop_assert_eq!(
                        result.map(|_| ()).unwrap_err().errno(),
                        libc::EINVAL,
                        "{}",
                        desc
                    ),
                    Some(end) => {
                        let pages = pages_of(offset, end);
                        match model.first_private(pages.clone()) {
                            Some(page) => {
                                let err = result.map(|_| ()).unwrap_err();
                                prop_assert_eq!(err.errno(), libc::EFAULT, "{}", desc);
                                prop_assert_eq!(
                                    fault_offset(&err),
                                    Some(page as u64 * P),
                                    "{}",
                                    desc
                                );
                            }
                            None => {
                                let pin = result.expect(&desc);
                                for p in pages.clone() {
                                    model.pinned[p] += 1;
                                }
                                model.allocate(pages);
                                model.pins.push((offset, len));
                                pins.push(pin);
                            }
                        }
                    }
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
                let end = offset
                    .checked_add(len)
                    .filter(|end| *end <= i64::MAX as u64);
                let end = end.filter(|_| len != 0 && offset % P == 0 && len % P == 0);
                if let Some(end) = end {
                    let end = end.min(SIZE);
                    if offset >= end {
                        prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                        prop_assert_eq!(
                            mem.stats().drains,
                            model.drains,
                            "{}: no-op punch drained",
                            desc
                        );
                    } else {
                        let pages = pages_of(offset, end);
                        let observed = mem.stats().drains;
                        match model.first_pinned(pages.clone()) {
                            Some(page) => {
                                let err = result.unwrap_err();
                                prop_assert_eq!(err.errno(), libc::EBUSY, "{}", desc);
                                prop_assert_eq!(
                                    fault_offset(&err),
                                    Some(page as u64 * P),
                                    "{}",
                                    desc
                                );
                            }
                            None => {
                                prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                                model.bytes[offset as usize..end as usize].fill(0);
                                for p in pages.clone() {
                                    model.allocated[p] = false;
                                    model.touched[p] = false;
                                }
                            }
                        }
                        model.check_drain(pages, observed)?;
                    }
                } else {
                    prop_assert_eq!(result.unwrap_err().errno(), libc::EINVAL, "{}", desc);
                }
            }
            Op::Allocate { offset, len } => {
                let result = mem.allocate(offset, len);
                let valid = len != 0
                    && offset % P == 0
                    && len % P == 0
                    && offset.checked_add(len).is_some_and(|end| end <= SIZE);
                if valid {
                    prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                    model.allocate(pages_of(offset, offset + len));
                } else {
                    prop_assert_eq!(result.unwrap_err().errno(), libc::EINVAL, "{}", desc);
                }
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0xEEu8; len];
                let result = map.read(offset, &mut buf);
                match offset.checked_add(len as u64).filter(|end| *end <= SIZE) {
                    None => prop_assert_eq!(result.unwrap_err().errno(), libc::EINVAL, "{}", desc),
                    Some(end) => match model.first_private(pages_of(offset, end)) {
                        Some(page) if len > 0 => {
                            let err = result.unwrap_err();
                            prop_assert_eq!(err.errno(), libc::EFAULT, "{}", desc);
                            prop_assert_eq!(fault_offset(&err), Some(page as u64 * P), "{}", desc);
                        }
                        _ => {
                            prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                            prop_assert!(
                                buf == model.bytes[offset as usize..end as usize],
                                "{}: contents",
                                desc
                            );
                            model.touch(pages_of(offset, end));
                        }
                    },
                }
            }
            Op::Write { offset, len, seed } => {
                let data = pattern(len, seed);
                let result = map.write(offset, &data);
                match offset.checked_add(len as u64).filter(|end| *end <= SIZE) {
                    None => prop_assert_eq!(result.unwrap_err().errno(), libc::EINVAL, "{}", desc),
                    Some(end) => match model.first_private(pages_of(offset, end)) {
                        Some(page) if len > 0 => {
                            let err = result.unwrap_err();
                            prop_assert_eq!(err.errno(), libc::EFAULT, "{}", desc);
                            prop_assert_eq!(fault_offset(&err), Some(page as u64 * P), "{}", desc);
                        }
                        _ => {
                            prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                            model.bytes[offset as usize..end as usize].copy_from_slice(&data);
                            model.allocate(pages_of(offset, end));
                        }
                    },
                }
            }
            Op::PinRead { index, offset, len } => {
                if !pins.is_empty() {
                    let index = index % pins.len();
                    let (start, pin_len) = model.pins[index];
                    let mut buf = vec![0xEEu8; len];
                    let result = pins[index].read(offset, &mut buf);
                    if offset + len as u64 > pin_len {
                        prop_assert_eq!(result.unwrap_err().errno(), libc::EINVAL, "{}", desc);
                    } else {
                        prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                        let at = (start + offset) as usize;
                        prop_assert!(buf == model.bytes[at..at + len], "{}: contents", desc);
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
                    let (start, pin_len) = model.pins[index];
                    let data = pattern(len, seed);
                    let result = pins[index].write(offset, &data);
                    if offset + len as u64 > pin_len {
                        prop_assert_eq!(result.unwrap_err().errno(), libc::EINVAL, "{}", desc);
                    } else {
                        prop_assert!(result.is_ok(), "{}: {:?}", desc, result);
                        let at = (start + offset) as usize;
                        model.bytes[at..at + len].copy_from_slice(&data);
                    }
                }
            }
            Op::Drain => {
                mem.drain_pin_batches();
                model.drains += 1;
                model.maybe_parked.fill(false);
            }
            Op::NewMapping => {
                // A new mapping starts from the current state.
                map = mem.mmap().unwrap();
                prop_assert_eq!(map.len(), SIZE);
            }
        }
        check_all(&mem, &map, &mut model, &pins)
            .map_err(|e| TestCaseError::fail(format!("after {desc}: {e}")))?;
    }

    // Every pin dropped: the whole file converts to private at once, and
    // back, with its contents.
    let live = pins.len();
    pins.clear();
    prop_assert_eq!(mem.stats().pins_live, 0);
    if live > 0 || model.attrs.contains(&Attribute::Shared) {
        mem.set_attributes(0, SIZE, Attribute::Private).unwrap();
    }
    mem.set_attributes(0, SIZE, Attribute::Shared).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    map.read(0, &mut all).unwrap();
    prop_assert!(all == model.bytes, "contents after a full round trip");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn gmem_follows_the_model(init_shared in any::<bool>(), ops in prop::collection::vec(op(), 1..60)) {
        run(init_shared, ops)?;
    }
}
