//! Huge folios (section 6 of the specification): references counted per
//! 2 MiB folio where a range is uniform, split before a partial conversion,
//! merged back when uniform again or punched.

use Attribute::{Private, Shared};
use gmem::{Attribute, Flags, GuestMemfd, Options, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
const HUGE: u64 = 2 << 20;

fn huge_file(size: u64) -> GuestMemfd {
    let options = Options::new().huge_folios(true);
    GuestMemfd::with_options(size, Flags::MMAP | Flags::INIT_SHARED, options).unwrap()
}

#[test]
fn a_pin_in_a_uniform_range_takes_a_huge_folio() {
    let mem = huge_file(2 * HUGE);
    let pin = mem.pin(100 * P, 3 * P).unwrap();
    assert_eq!(mem.stats().huge_folios, 1);
    // Pinning allocates the whole folio.
    assert_eq!(mem.stats().pages_allocated, Some(512));
    drop(pin);
    let plain = GuestMemfd::new(2 * HUGE, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    drop(plain.pin(100 * P, 3 * P).unwrap());
    assert_eq!(plain.stats().huge_folios, 0);
}

#[test]
fn a_reference_on_any_page_counts_for_the_whole_folio() {
    let mem = huge_file(2 * HUGE);
    let pin = mem.pin(300 * P, P).unwrap();
    // A partial conversion elsewhere in the folio: EAGAIN at once, no drain,
    // the offset being the folio's start clamped to the request.
    let err = mem.set_attributes(4 * P, 2 * P, Private).unwrap_err();
    assert_eq!((err.errno(), err.error_offset()), (libc::EAGAIN, 4 * P));
    let err = mem.set_attributes(0, HUGE, Private).unwrap_err();
    assert_eq!(err.error_offset(), 0);
    assert_eq!(mem.stats().drains, 0, "a huge folio is never in a batch");
    assert_eq!(
        mem.stats().huge_folios,
        1,
        "a failed conversion splits nothing"
    );
    // The next folio is unaffected.
    mem.set_attributes(HUGE, HUGE, Private).unwrap();
    drop(pin);
    // Released at once, not parked: no drain needed.
    mem.set_attributes(0, HUGE, Private).unwrap();
    assert_eq!(mem.stats().drains, 0);
}

#[test]
fn a_partial_conversion_splits_and_uniformity_merges() {
    let mem = huge_file(HUGE);
    let map = mem.mmap().unwrap();
    map.write(0, &[9u8; 64]).unwrap();
    drop(mem.pin(0, P).unwrap());
    assert_eq!(mem.stats().huge_folios, 1);
    mem.set_attributes(8 * P, 8 * P, Private).unwrap();
    let stats = mem.stats();
    assert_eq!((stats.huge_folios, stats.folio_splits), (0, 1));
    // Split to small folios: a pin on page 2 no longer blocks page 3.
    let pin = mem.pin(2 * P, P).unwrap();
    mem.set_attributes(3 * P, P, Private).unwrap();
    let err = mem.set_attributes(2 * P, P, Private).unwrap_err();
    assert_eq!(err.error_offset(), 2 * P);
    drop(pin);
    // Uniform again once the parked release of page 2 is flushed: merged.
    mem.drain_pin_batches();
    mem.set_attributes(0, HUGE, Shared).unwrap();
    let stats = mem.stats();
    assert_eq!((stats.huge_folios, stats.folio_merges), (1, 1));
    let mut buf = [0u8; 64];
    map.read(0, &mut buf).unwrap();
    assert_eq!(buf, [9u8; 64], "contents survive split and merge");
}

#[test]
fn a_punch_merges_once_the_parked_releases_are_drained() {
    let mem = huge_file(HUGE);
    drop(mem.pin(0, P).unwrap());
    mem.set_attributes(HUGE - P, P, Private).unwrap();
    assert_eq!(mem.stats().huge_folios, 0);
    // Uniform again, but page 5's release is parked: the merge waits.
    drop(mem.pin(5 * P, P).unwrap());
    mem.set_attributes(HUGE - P, P, Shared).unwrap();
    assert_eq!(mem.stats().huge_folios, 0);
    // A punch of the whole folio drains in its check and merges.
    mem.punch_hole(0, HUGE).unwrap();
    let stats = mem.stats();
    assert_eq!((stats.huge_folios, stats.folio_merges), (1, 1));
    assert_eq!(stats.pages_allocated, Some(0));
}

#[test]
fn a_pin_blocks_a_punch_anywhere_in_its_huge_folio() {
    let mem = huge_file(HUGE);
    let pin = mem.pin(10 * P, P).unwrap();
    let err = mem.punch_hole(0, P).unwrap_err();
    assert_eq!((err.errno(), mem.stats().huge_folios), (libc::EBUSY, 1));
    drop(pin);
    // A punch changes no state: the folio stays whole and huge.
    mem.punch_hole(0, P).unwrap();
    let stats = mem.stats();
    assert_eq!((stats.huge_folios, stats.folio_splits), (1, 0));
}

#[test]
fn a_punch_blocked_by_a_huge_folio_reports_an_offset_inside_the_request() {
    let mem = huge_file(HUGE);
    let _pin = mem.pin(0, P).unwrap();
    // The folio begins at 0, before the request: clamped, as conversions.
    let err = mem.punch_hole(5 * P, P).unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY);
    assert_eq!(err, gmem::Error::Pinned { offset: 5 * P });
    let err = mem.set_attributes(5 * P, P, Private).unwrap_err();
    assert_eq!(err.error_offset(), 5 * P);
}

#[test]
fn folio_range_stays_inside_the_file() {
    // A file whose last chunk is partial: 2 MiB + 3 pages.
    let mem = huge_file(HUGE + 3 * P);
    let _pin = mem.pin(0, P).unwrap();
    assert_eq!(mem.folio_range(7 * P), Ok(0..HUGE));
    assert_eq!(
        mem.folio_range(HUGE + 2 * P),
        Ok(HUGE + 2 * P..HUGE + 3 * P)
    );
    // Past the end, inside the last chunk and past it: errors, no panic.
    for offset in [HUGE + 3 * P, HUGE + 5 * P, 2 * HUGE, 100 * HUGE, u64::MAX] {
        let err = mem.folio_range(offset).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{offset:#x}");
    }
}

#[test]
fn the_last_partial_chunk_is_never_huge() {
    let mem = huge_file(HUGE + 16 * P);
    drop(mem.pin(HUGE + P, P).unwrap());
    drop(mem.pin(0, P).unwrap());
    assert_eq!(mem.stats().huge_folios, 1);
}

#[test]
fn pins_across_huge_and_small_folios_release_each_their_way() {
    let mem = huge_file(2 * HUGE);
    // Make the second folio small by a partial conversion.
    mem.set_attributes(HUGE + HUGE / 2, HUGE / 2, Private)
        .unwrap();
    let pin = mem.pin(HUGE - 2 * P, 4 * P).unwrap();
    let stats = mem.stats();
    assert_eq!((stats.huge_folios, stats.pins_live), (1, 1));
    assert_eq!(
        mem.set_attributes(0, P, Private).unwrap_err().errno(),
        libc::EAGAIN
    );
    assert_eq!(
        mem.set_attributes(HUGE + P, P, Private)
            .unwrap_err()
            .errno(),
        libc::EAGAIN
    );
    pin.write(0, &[1u8; 4 * P as usize]).unwrap();
    drop(pin);
    assert_eq!(mem.stats().pins_live, 0);
    mem.set_attributes(0, HUGE + HUGE / 2, Private).unwrap();
}

#[test]
fn concurrent_pins_never_see_a_huge_folio_turn_private() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mem = huge_file(2 * HUGE);
    let stop = AtomicBool::new(false);
    let (pinned, refused) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (mem, stop, pinned) = (&mem, &stop, &pinned);
            s.spawn(move || {
                let mut page = t * 7;
                while !stop.load(Ordering::Relaxed) {
                    page = (page * 13 + 5) % 1024;
                    if let Ok(pin) = mem.pin(page * P, 2 * P) {
                        for offset in [page * P, page * P + P] {
                            assert_eq!(
                                mem.attribute(offset).unwrap(),
                                Shared,
                                "pinned page went private"
                            );
                        }
                        drop(pin);
                        pinned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        // Run until every path was taken (bounded, so a broken build fails
        // rather than hangs): pins made, conversions refused, folios split.
        let progressed = || {
            let stats = mem.stats();
            pinned.load(Ordering::Relaxed) > 100
                && refused.load(Ordering::Relaxed) > 0
                && stats.folio_splits > 0
                && stats.folio_merges > 0
        };
        for round in 0..1_000_000u64 {
            if round >= 3000 && progressed() {
                break;
            }
            let (offset, len) = match round % 3 {
                0 => (0, HUGE),
                1 => ((round % 512) * P, 3 * P),
                _ => (HUGE, HUGE),
            };
            match mem.set_attributes(offset, len, Private) {
                Ok(()) => mem.set_attributes(offset, len, Shared).unwrap(),
                Err(e) => {
                    assert_eq!(e.errno(), libc::EAGAIN);
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(
        pinned.into_inner() > 100,
        "the pinners made too little progress"
    );
    assert!(refused.into_inner() > 0, "no conversion ever met a pin");
    let stats = mem.stats();
    assert!(
        stats.folio_splits > 0 && stats.folio_merges > 0,
        "{stats:?}"
    );
    assert_eq!(stats.pins_live, 0);
    mem.set_attributes(0, 2 * HUGE, Private).unwrap();
}

mod model {
    //! Random operations on a file with huge folios, against a model of page
    //! states and live pins.
    use super::*;
    use proptest::prelude::*;

    const PAGES: u64 = 2 * 512 + 64; // two huge folios and a small tail
    const FOLIO: u64 = 512;

    #[derive(Debug, Clone)]
    enum Op {
        Convert {
            first: u64,
            pages: u64,
            private: bool,
        },
        Pin {
            first: u64,
            pages: u64,
        },
        Unpin {
            index: usize,
        },
        Punch {
            first: u64,
            pages: u64,
        },
    }

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..PAGES, 1..600u64).prop_map(|(first, pages)| (first, pages.min(PAGES - first)))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (range(), any::<bool>()).prop_map(|((first, pages), private)| Op::Convert {
                first,
                pages,
                private
            }),
            range().prop_map(|(first, pages)| Op::Pin {
                first,
                pages: pages.min(8)
            }),
            (0..8usize).prop_map(|index| Op::Unpin { index }),
            range().prop_map(|(first, pages)| Op::Punch { first, pages }),
        ]
    }

    /// The pages whose folio overlaps `[first, end)`: whole huge-folio ranges
    /// (outside the small tail), else the pages themselves.
    fn folio_span(first: u64, end: u64) -> (u64, u64) {
        let widen = |page: u64| page < 2 * FOLIO;
        let start = if widen(first) {
            first / FOLIO * FOLIO
        } else {
            first
        };
        let stop = if widen(end - 1) {
            (end - 1) / FOLIO * FOLIO + FOLIO
        } else {
            end
        };
        (start, stop)
    }

    proptest! {
        // Failures print their minimal input; no regression files are kept.
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]
        #[test]
        fn conversions_respect_live_pins(ops in prop::collection::vec(op(), 1..40)) {
            let mem = huge_file(PAGES * P);
            let mut state = vec![Shared; PAGES as usize];
            let mut pins: Vec<(u64, u64, gmem::Pin<'_>)> = Vec::new();
            for op in ops {
                let pinned = |pins: &[(u64, u64, gmem::Pin<'_>)], start: u64, stop: u64| {
                    pins.iter().any(|(f, e, _)| *f < stop && start < *e)
                };
                match op {
                    Op::Convert { first, pages, private } => {
                        let end = first + pages;
                        let to = if private { Private } else { Shared };
                        let changes = state[first as usize..end as usize].iter().any(|s| *s != to);
                        match mem.set_attributes(first * P, pages * P, to) {
                            Ok(()) => {
                                prop_assert!(!(private && changes && pinned(&pins, first, end)), "converted over a pin");
                                state[first as usize..end as usize].fill(to);
                            }
                            Err(e) => {
                                prop_assert_eq!(e.errno(), libc::EAGAIN);
                                prop_assert!(private && changes);
                                let (start, stop) = folio_span(first, end);
                                prop_assert!(pinned(&pins, start, stop), "EAGAIN with no live pin in the folios");
                                let at = e.error_offset() / P;
                                prop_assert!((first..end).contains(&at), "error offset outside the request");
                            }
                        }
                    }
                    Op::Pin { first, pages } => {
                        let end = first + pages;
                        let shared = state[first as usize..end as usize].iter().all(|s| *s == Shared);
                        match mem.pin(first * P, pages * P) {
                            Ok(pin) => {
                                prop_assert!(shared, "pinned a private page");
                                if pins.len() < 8 { pins.push((first, end, pin)); }
                            }
                            Err(e) => {
                                prop_assert_eq!(e.errno(), libc::EFAULT);
                                prop_assert!(!shared);
                            }
                        }
                    }
                    Op::Unpin { index } => {
                        if index < pins.len() { pins.swap_remove(index); }
                    }
                    Op::Punch { first, pages } => {
                        let end = first + pages;
                        let (start, stop) = folio_span(first, end);
                        match mem.punch_hole(first * P, pages * P) {
                            Ok(()) => prop_assert!(!pinned(&pins, first, end), "punched a pinned page"),
                            Err(e) => {
                                prop_assert_eq!(e.errno(), libc::EBUSY);
                                prop_assert!(pinned(&pins, start, stop), "EBUSY with no live pin in the folios");
                            }
                        }
                    }
                }
                for (page, want) in state.iter().enumerate().step_by(37) {
                    prop_assert_eq!(mem.attribute(page as u64 * P).unwrap(), *want);
                }
                for (first, end, _) in &pins {
                    for page in *first..*end {
                        prop_assert_eq!(mem.attribute(page * P).unwrap(), Shared, "a pinned page is not shared");
                    }
                }
            }
            drop(pins);
            prop_assert_eq!(mem.stats().pins_live, 0);
            mem.set_attributes(0, PAGES * P, Private).unwrap();
            mem.set_attributes(0, PAGES * P, Shared).unwrap();
            // Uniform again: both folios are (or become) huge.
            let pins = (mem.pin(0, P).unwrap(), mem.pin(FOLIO * P, P).unwrap());
            prop_assert_eq!(mem.stats().huge_folios, 2, "uniform again, yet not huge");
            drop(pins);
        }
    }
}
