//! Fault injection on every system call that hides or shows pages: whichever
//! call fails, in a conversion or in its undo, the state and the error stay
//! true, and a mapping that could not be put back is poisoned.

use rustix::io::Errno;

use crate::sys::faults;
use crate::{
    Attribute, ConversionError, Error, Flags, GuestMemfd, Hiding, HostMapping, Options, PAGE_SIZE,
    ProbeOutcome,
};

const P: u64 = PAGE_SIZE;

/// A file, its private runs, the conversion under test and the pages whose
/// raw accesses are checked.
struct Layout {
    pages: u64,
    private: &'static [std::ops::Range<u64>],
    convert: std::ops::Range<u64>,
    probes: &'static [u64],
}

/// Pages 1, 3 and 5 of 16 private; pages 0..8 converted.
const SMALL: Layout = Layout {
    pages: 16,
    private: &[1..2, 3..4, 5..6],
    convert: 0..8,
    probes: &[0, 1, 2, 3, 4, 5, 6, 7],
};

/// With a run of 2 MiB and more, which guard-marker mappings remap: pages 1
/// and 600..1200 of 2048 private; pages 0..1300 converted (to private: the
/// 598 pages 2..600 and 1200..1300; to shared: 1 and 600..1200).
const LARGE: Layout = Layout {
    pages: 2048,
    private: &[1..2, 600..1200],
    convert: 0..1300,
    probes: &[0, 1, 2, 599, 600, 900, 1199, 1200, 1299, 1300],
};

/// The layout's file, with two mappings hiding by `hiding` (the second one
/// shorter than the file).
fn fragmented(layout: &Layout, hiding: Hiding) -> (GuestMemfd, [HostMapping; 2]) {
    let options = Options::new().hiding(hiding);
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    let mem = GuestMemfd::with_options(layout.pages * P, flags, options).unwrap();
    for run in layout.private {
        let (offset, len) = (run.start * P, (run.end - run.start) * P);
        mem.set_attributes(offset, len, Attribute::Private).unwrap();
    }
    let short = (layout.pages / 2 + 1) * P;
    let maps = [mem.mmap().unwrap(), mem.mmap_len(short).unwrap()];
    assert!(maps.iter().all(|map| map.hiding() == hiding));
    (mem, maps)
}

fn states(mem: &GuestMemfd, layout: &Layout) -> Vec<Attribute> {
    let page = |p: &u64| mem.attribute(p * P).unwrap();
    layout.probes.iter().map(page).collect()
}

/// Every probed page a mapping covers faults on a raw access exactly when
/// private (`SIGSEGV` for guards, `SIGBUS` for a remapped run).
fn assert_mapping_follows_state(mem: &GuestMemfd, map: &HostMapping, layout: &Layout) {
    for &page in layout.probes.iter().filter(|p| **p < map.len() / P) {
        let outcome = map.probe(page * P, false).unwrap();
        let faulted = matches!(outcome, ProbeOutcome::Signal(libc::SIGSEGV | libc::SIGBUS));
        let private = mem.attribute(page * P).unwrap() == Attribute::Private;
        assert!(
            faulted == private && (faulted || outcome == ProbeOutcome::Completed),
            "page {page}: {outcome:?}"
        );
    }
}

/// Fails the nth hide/show call of the layout's conversion to `to`, for
/// every n until the conversion makes fewer calls than n: only that call
/// (the undo then succeeds), or every call from it on (an undo fails too).
fn fail_each_call(layout: &Layout, hiding: Hiding, to: Attribute) {
    let (mut undone, mut poisoned_seen) = (0, 0);
    let (offset, len) = (
        layout.convert.start * P,
        (layout.convert.end - layout.convert.start) * P,
    );
    for (nth, persistent) in (0..).flat_map(|nth| [(nth, false), (nth, true)]) {
        let (mem, maps) = fragmented(layout, hiding);
        let before = states(&mem, layout);
        let spent = mem.stats().vmas_spent;
        faults::fail_nth(nth, Errno::NOMEM, persistent);
        let result = mem.set_attributes(offset, len, to);
        let calls = faults::stop();
        let Err(err) = result else {
            assert!(calls <= nth, "call {nth} of {calls} failed unnoticed");
            // Both kinds of failure were met: a forward call (undone) and
            // an undo call (poisoned).
            assert!(undone > 0 && poisoned_seen > 0, "{undone} {poisoned_seen}");
            let converted = |p: &&u64| layout.convert.contains(*p);
            let probes = layout.probes.iter().filter(converted);
            assert!(
                probes
                    .map(|p| mem.attribute(p * P).unwrap())
                    .all(|s| s == to)
            );
            maps.iter()
                .for_each(|map| assert_mapping_follows_state(&mem, map, layout));
            return;
        };
        assert_eq!(err.errno(), libc::ENOMEM, "{err}");
        assert_eq!(
            states(&mem, layout),
            before,
            "failure at call {nth} changed the state"
        );
        let poisoned: Vec<_> = maps.iter().filter(|map| map.is_poisoned()).collect();
        match err {
            ConversionError::Os { .. } => {
                assert!(poisoned.is_empty());
                undone += 1;
            }
            ConversionError::MappingPoisoned { .. } => {
                assert!(!poisoned.is_empty());
                poisoned_seen += 1;
            }
            other => panic!("unexpected error {other}"),
        }
        let stats = mem.stats();
        assert_eq!(
            stats.mappings_guarded + stats.mappings_remapped,
            2 - poisoned.len() as u64,
            "a poisoned mapping stays unregistered"
        );
        if poisoned.is_empty() {
            assert_eq!(
                mem.stats().vmas_spent,
                spent,
                "an undone change is charged as before"
            );
        }
        for map in &maps {
            if map.is_poisoned() {
                let err = map.read(0, &mut [0u8; 1]).unwrap_err();
                assert_eq!(err, Error::MappingPoisoned);
                assert_eq!(err.errno(), libc::EIO);
            } else {
                assert_mapping_follows_state(&mem, map, layout);
            }
        }
        // Nothing is left half-done: the same conversion now succeeds.
        mem.set_attributes(offset, len, to).unwrap();
        maps.iter()
            .filter(|map| !map.is_poisoned())
            .for_each(|map| assert_mapping_follows_state(&mem, map, layout));
    }
}

#[test]
fn guard_markers_to_private() {
    fail_each_call(&SMALL, Hiding::GuardMarkers, Attribute::Private);
}

#[test]
fn guard_markers_to_shared() {
    fail_each_call(&SMALL, Hiding::GuardMarkers, Attribute::Shared);
}

#[test]
fn guard_markers_with_large_runs_to_private() {
    fail_each_call(&LARGE, Hiding::GuardMarkers, Attribute::Private);
}

#[test]
fn guard_markers_with_large_runs_to_shared() {
    fail_each_call(&LARGE, Hiding::GuardMarkers, Attribute::Shared);
}

#[test]
fn remap_fallback_to_private() {
    fail_each_call(&SMALL, Hiding::EmptyFileRemap, Attribute::Private);
}

#[test]
fn remap_fallback_to_shared() {
    fail_each_call(&SMALL, Hiding::EmptyFileRemap, Attribute::Shared);
}

/// A new mapping whose private runs cannot be hidden is not made and
/// leaves nothing registered. A failed remap (the fallback's first call)
/// may have left a gap, so that region is never unmapped and its VMAs stay
/// charged: `2 * 3 runs + 1`; a failed guard batch leaves nothing charged.
#[test]
fn a_mapping_that_cannot_hide_is_not_made() {
    for (hiding, leaked) in [(Hiding::GuardMarkers, 0), (Hiding::EmptyFileRemap, 7)] {
        let (mem, maps) = fragmented(&SMALL, hiding);
        let spent = mem.stats().vmas_spent;
        faults::fail_nth(0, Errno::NOMEM, false);
        let err = mem.mmap().unwrap_err();
        faults::stop();
        assert_eq!(err.errno(), libc::ENOMEM, "{err}");
        let stats = mem.stats();
        assert_eq!(stats.mappings_guarded + stats.mappings_remapped, 2);
        assert_eq!(stats.vmas_spent, spent + leaked);
        drop(maps);
        assert_eq!(mem.stats().vmas_spent, leaked);
    }
}

/// The first large-run remap of a new guard-marker mapping fails: the
/// region is forsaken (a failed `MAP_FIXED` may have unmapped part of it,
/// which someone else may map), and its VMAs stay charged.
#[test]
fn a_failed_first_remap_forsakes_the_region_and_stays_charged() {
    let (mem, maps) = fragmented(&LARGE, Hiding::GuardMarkers);
    drop(maps);
    assert_eq!(mem.stats().vmas_spent, 0);
    // Call 0 guards the small run, call 1 remaps the large one.
    faults::fail_nth(1, Errno::NOMEM, false);
    let err = mem.mmap().unwrap_err();
    faults::stop();
    assert_eq!(err.errno(), libc::ENOMEM, "{err}");
    assert_eq!(mem.stats().vmas_spent, 3, "the region and a possible gap");
    let map = mem.mmap().unwrap();
    assert_mapping_follows_state(&mem, &map, &LARGE);
    drop(map);
    assert_eq!(mem.stats().vmas_spent, 3);
}

/// Refuses every conversion in the commit phase.
struct RefusingCommits;

impl crate::ConversionListener for RefusingCommits {
    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), crate::Refusal> {
        Err(crate::Refusal::new("refused"))
    }
}

/// A commit refused by a listener undoes the host mappings' change; if that
/// undo fails, the mapping is poisoned and the error says so.
#[test]
fn a_refused_commit_whose_undo_fails_poisons() {
    for to in [Attribute::Private, Attribute::Shared] {
        let (mem, maps) = fragmented(&SMALL, Hiding::GuardMarkers);
        mem.add_listener(std::sync::Arc::new(RefusingCommits));
        let before = states(&mem, &SMALL);
        // The change: one batch a mapping; then the undo fails.
        faults::fail_nth(2, Errno::NOMEM, true);
        let err = mem.set_attributes(0, 8 * P, to).unwrap_err();
        faults::stop();
        assert!(
            matches!(err, ConversionError::MappingPoisoned { .. }),
            "{err}"
        );
        assert_eq!(states(&mem, &SMALL), before);
        assert!(maps.iter().all(HostMapping::is_poisoned));
        let stats = mem.stats();
        assert_eq!(stats.mappings_guarded + stats.mappings_remapped, 0);
        assert_eq!(stats.refused, 0, "not counted as a refusal: it failed");
    }
}

/// Where `process_madvise` is missing (`ENOSYS`: a seccomp filter that
/// hides it, valgrind), a conversion of several runs advises them one
/// `madvise` each, both ways: the state and both mappings agree.
#[test]
fn a_missing_process_madvise_falls_back_to_madvise() {
    let (mem, maps) = fragmented(&SMALL, Hiding::GuardMarkers);
    faults::hide_process_madvise(true);
    // Pages 0..8, with 1, 3 and 5 private: the runs 0, 2, 4 and 6..8.
    let converted = mem.set_attributes(0, 8 * P, Attribute::Private);
    let refused = faults::hide_process_madvise(false);
    converted.unwrap();
    assert!(refused >= 1, "process_madvise was never called");
    maps.iter()
        .for_each(|map| assert_mapping_follows_state(&mem, map, &SMALL));
    // The fallback stays: the way back (the runs 0..2 and 3..8, page 2
    // shared first) makes no process_madvise call.
    mem.set_attributes(2 * P, P, Attribute::Shared).unwrap();
    faults::hide_process_madvise(true);
    let converted = mem.set_attributes(0, 8 * P, Attribute::Shared);
    let refused = faults::hide_process_madvise(false);
    crate::sys::use_process_madvise_again();
    converted.unwrap();
    assert_eq!(refused, 0, "the fallback was not kept");
    assert_eq!(mem.attribute(3 * P).unwrap(), Attribute::Shared);
    maps.iter()
        .for_each(|map| assert_mapping_follows_state(&mem, map, &SMALL));
}
