//! The entry points this round added or changed, at their edges: called
//! from each phase of a listener, by two threads at once, and by a hostile
//! guest repeating itself 100,000 times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use gmem::vm_memory::GuestMemoryGmem;
use gmem::{
    Attribute, ConversionListener, Flags, GuestMemfd, HostMapping, Options, PAGE_SIZE, Refusal,
};
use vm_memory::GuestAddress;

const P: u64 = PAGE_SIZE;

fn shared(pages: u64) -> Arc<GuestMemfd> {
    Arc::new(GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).unwrap())
}

/// The VMAs inside `map`'s address range.
fn vmas_in(map: &HostMapping) -> u64 {
    let (start, end) = (map.as_ptr() as u64, map.as_ptr() as u64 + map.len());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let inside = |line: &&str| {
        let Some((from, to)) = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
        else {
            return false;
        };
        let parse = |hex| u64::from_str_radix(hex, 16).unwrap_or(0);
        parse(from) >= start && parse(to) <= end
    };
    maps.lines().filter(inside).count() as u64
}

/// In every phase, snapshots its file, restores it, and keeps the state of
/// page 0 the restored file has; and pins page 0 through a chain.
#[derive(Default)]
struct SnapshotsInEveryPhase {
    file: OnceLock<Arc<GuestMemfd>>,
    view: OnceLock<GuestMemoryGmem>,
    seen: Mutex<Vec<(&'static str, Attribute, bool)>>,
}

impl SnapshotsInEveryPhase {
    fn look(&self, phase: &'static str) {
        let file = self.file.get().unwrap();
        let mut bytes = Vec::new();
        file.snapshot(&mut bytes).unwrap();
        let restored = GuestMemfd::restore(&bytes[..], Options::new()).unwrap();
        let state = restored.attribute(0).unwrap();
        let chain = self.view.get().unwrap().pin_ranges([(GuestAddress(0), 8)]);
        self.seen
            .lock()
            .unwrap()
            .push((phase, state, chain.is_ok()));
    }
}

impl ConversionListener for SnapshotsInEveryPhase {
    fn before_private(&self, _: u64, _: u64) -> Result<(), Refusal> {
        self.look("before");
        Ok(())
    }

    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        self.look("commit");
        Ok(())
    }

    fn converted(&self, _: u64, _: u64, _: Attribute) {
        self.look("converted");
    }
}

/// A snapshot from a callback is served from the map the conversion holds
/// (no deadlock): the stored state before it is stored, the new one after.
/// A chain of the range in flight to private is refused in the commit phase.
#[test]
fn a_listener_snapshots_and_pins_chains_in_every_phase() {
    let mem = shared(8);
    let listener = Arc::new(SnapshotsInEveryPhase::default());
    listener.file.set(mem.clone()).ok().unwrap();
    let view = GuestMemoryGmem::from_regions([(GuestAddress(0), mem.clone(), 0, 8 * P)]).unwrap();
    listener.view.set(view).ok().unwrap();
    mem.add_listener(listener.clone());
    mem.set_attributes(0, P, Attribute::Private).unwrap();
    mem.set_attributes(0, P, Attribute::Shared).unwrap();
    use Attribute::{Private, Shared};
    assert_eq!(
        *listener.seen.lock().unwrap(),
        [
            ("before", Shared, true),
            ("commit", Shared, false),
            ("converted", Private, false),
            ("commit", Private, false),
            ("converted", Shared, true),
        ]
    );
}

/// Two threads convert the same 4 pages as one range while two more take
/// snapshots: every snapshot holds the range in one state (a conversion
/// never lands in the middle of one).
#[test]
fn snapshots_taken_by_two_threads_during_conversions_are_consistent() {
    let mem = shared(64);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for to in [Attribute::Private, Attribute::Shared] {
            let (mem, stop) = (&mem, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    mem.set_attributes(8 * P, 4 * P, to).unwrap();
                }
            });
        }
        let takers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    for _ in 0..200 {
                        let mut bytes = Vec::new();
                        mem.snapshot(&mut bytes).unwrap();
                        let restored = GuestMemfd::restore(&bytes[..], Options::new()).unwrap();
                        let states: Vec<_> = (8..12)
                            .map(|p| restored.attribute(p * P).unwrap())
                            .collect();
                        assert!(states.iter().all(|s| *s == states[0]), "{states:?}");
                    }
                })
            })
            .collect();
        for taker in takers {
            taker.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
}

/// A hostile guest toggles one page inside a large private run 100,000
/// times, under a budget of 5 VMAs: every conversion succeeds, and neither
/// the charge nor the mapping's real VMAs ever pass the budget.
#[test]
fn a_guest_toggling_a_page_of_a_large_run_100_000_times_stays_in_budget() {
    const BUDGET: u64 = 5;
    let options = Options::new().vma_budget(BUDGET);
    let mem = GuestMemfd::with_options(4096 * P, Flags::MMAP, options).unwrap();
    let map = mem.mmap().unwrap();
    for round in 0..100_000u64 {
        let page = 1000 + round % 7;
        let to = if round % 2 == 0 {
            Attribute::Shared
        } else {
            Attribute::Private
        };
        if let Err(err) = mem.set_attributes(page * P, P, to) {
            panic!("round {round}: {err}");
        }
        if round % 10_000 == 0 {
            assert!(mem.stats().vmas_spent <= BUDGET);
            assert!(
                vmas_in(&map) <= BUDGET + 1,
                "round {round}: {}",
                vmas_in(&map)
            );
        }
    }
    assert!(mem.stats().vmas_spent <= BUDGET);
    assert!(vmas_in(&map) <= BUDGET + 1);
}

/// Refuses every conversion in its commit phase.
struct RefusesCommits;

impl ConversionListener for RefusesCommits {
    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        Err(Refusal::new("refused"))
    }
}

/// A hostile guest asks 100,000 times for shares a listener refuses in the
/// commit phase: each is undone, and the fallback mapping's real VMAs never
/// pass the charge nor the charge the budget.
#[test]
fn a_guest_repeating_refused_shares_100_000_times_never_grows_the_vmas() {
    const BUDGET: u64 = 41;
    let options = Options::new()
        .hiding(gmem::Hiding::EmptyFileRemap)
        .vma_budget(BUDGET);
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    let mem = GuestMemfd::with_options(256 * P, flags, options).unwrap();
    let map = mem.mmap().unwrap();
    for run in 0..20 {
        mem.set_attributes((2 * run + 1) * P, P, Attribute::Private)
            .unwrap();
    }
    mem.add_listener(Arc::new(RefusesCommits));
    for round in 0..100_000u64 {
        let first = 1 + 2 * (round % 19);
        let err = mem
            .set_attributes(first * P, 2 * P, Attribute::Shared)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EBUSY, "round {round}: {err}");
        if round % 10_000 == 0 {
            let (real, charged) = (vmas_in(&map), mem.stats().vmas_spent);
            assert!(
                real <= charged && charged <= BUDGET,
                "round {round}: {real} > {charged}"
            );
        }
    }
    assert!(vmas_in(&map) <= mem.stats().vmas_spent);
}
