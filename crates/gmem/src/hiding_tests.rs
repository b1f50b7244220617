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
const PAGES: u64 = 8;

/// A 16-page file whose pages 1, 3 and 5 are private, with two mappings
/// hiding by `hiding` (the second one shorter than the file).
fn fragmented(hiding: Hiding) -> (GuestMemfd, [HostMapping; 2]) {
    let options = Options {
        hiding: Some(hiding),
        ..Default::default()
    };
    let mem = GuestMemfd::with_options(16 * P, Flags::MMAP | Flags::INIT_SHARED, options).unwrap();
    for page in [1, 3, 5] {
        mem.set_attributes(page * P, P, Attribute::Private).unwrap();
    }
    let maps = [mem.mmap().unwrap(), mem.mmap_len(6 * P).unwrap()];
    assert!(maps.iter().all(|map| map.hiding() == hiding));
    (mem, maps)
}

fn states(mem: &GuestMemfd) -> Vec<Attribute> {
    (0..PAGES).map(|p| mem.attribute(p * P).unwrap()).collect()
}

/// Every page a mapping covers faults on a raw access exactly when private.
fn assert_mapping_follows_state(mem: &GuestMemfd, map: &HostMapping) {
    let fault = match map.hiding() {
        Hiding::GuardMarkers => libc::SIGSEGV,
        Hiding::EmptyFileRemap => libc::SIGBUS,
    };
    for page in 0..PAGES.min(map.len() / P) {
        let want = match mem.attribute(page * P).unwrap() {
            Attribute::Shared => ProbeOutcome::Completed,
            Attribute::Private => ProbeOutcome::Signal(fault),
        };
        assert_eq!(map.probe(page * P, false).unwrap(), want, "page {page}");
    }
}

/// Fails the nth hide/show call of a conversion of pages 0..8 to `to`, for
/// every n until the conversion makes fewer calls than n: only that call
/// (the undo then succeeds), or every call from it on (an undo fails too).
fn fail_each_call(hiding: Hiding, to: Attribute) {
    let (mut undone, mut poisoned_seen) = (0, 0);
    for (nth, persistent) in (0..).flat_map(|nth| [(nth, false), (nth, true)]) {
        let (mem, maps) = fragmented(hiding);
        let before = states(&mem);
        faults::fail_nth(nth, Errno::NOMEM, persistent);
        let result = mem.set_attributes(0, PAGES * P, to);
        let calls = faults::stop();
        let Err(err) = result else {
            assert!(calls <= nth, "call {nth} of {calls} failed unnoticed");
            // Both kinds of failure were met: a forward call (undone) and
            // an undo call (poisoned).
            assert!(undone > 0 && poisoned_seen > 0, "{undone} {poisoned_seen}");
            assert!(states(&mem).iter().all(|s| *s == to));
            maps.iter()
                .for_each(|map| assert_mapping_follows_state(&mem, map));
            return;
        };
        assert_eq!(err.errno(), libc::ENOMEM, "{err}");
        assert_eq!(
            states(&mem),
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
        for map in &maps {
            if map.is_poisoned() {
                let err = map.read(0, &mut [0u8; 1]).unwrap_err();
                assert_eq!(err, Error::MappingPoisoned);
                assert_eq!(err.errno(), libc::EIO);
            } else {
                assert_mapping_follows_state(&mem, map);
            }
        }
        // Nothing is left half-done: the same conversion now succeeds.
        mem.set_attributes(0, PAGES * P, to).unwrap();
        maps.iter()
            .filter(|map| !map.is_poisoned())
            .for_each(|map| assert_mapping_follows_state(&mem, map));
    }
}

#[test]
fn guard_markers_to_private() {
    fail_each_call(Hiding::GuardMarkers, Attribute::Private);
}

#[test]
fn guard_markers_to_shared() {
    fail_each_call(Hiding::GuardMarkers, Attribute::Shared);
}

#[test]
fn remap_fallback_to_private() {
    fail_each_call(Hiding::EmptyFileRemap, Attribute::Private);
}

#[test]
fn remap_fallback_to_shared() {
    fail_each_call(Hiding::EmptyFileRemap, Attribute::Shared);
}

/// A new mapping whose private runs cannot be hidden is not made, and
/// leaves nothing registered or charged.
#[test]
fn a_mapping_that_cannot_hide_is_not_made() {
    for hiding in [Hiding::GuardMarkers, Hiding::EmptyFileRemap] {
        let (mem, maps) = fragmented(hiding);
        let spent = mem.stats().vmas_spent;
        faults::fail_nth(0, Errno::NOMEM, false);
        let err = mem.mmap().unwrap_err();
        faults::stop();
        assert_eq!(err.errno(), libc::ENOMEM, "{err}");
        let stats = mem.stats();
        assert_eq!(stats.mappings_guarded + stats.mappings_remapped, 2);
        assert_eq!(stats.vmas_spent, spent);
        drop(maps);
        assert_eq!(mem.stats().vmas_spent, 0);
    }
}
