//! Unit tests of the guest-physical map on memfd-backed files (no KVM): the
//! serialization of requests spanning slots against a model of serial
//! orders, and the rollback's snapshot of only the request's runs.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::{ConversionListener, Flags, Refusal};

const P: u64 = PAGE_SIZE;
/// Pages of each of the two slots of [`two_slots`].
const SLOT_PAGES: u64 = 4;
const PAGES: u64 = 2 * SLOT_PAGES;
/// The page pinned by the serialization test: the second of the second slot.
const PINNED: u64 = SLOT_PAGES + 1;

/// A map with two memfd files of [`SLOT_PAGES`] shared pages, back to back
/// at guest-physical 0 (slots 0 and 1), failing `EAGAIN` at once.
fn two_slots() -> (GpaMap, [Arc<GuestMemfd>; 2]) {
    let map = GpaMap::new(AttributeSync::GmemOnly);
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    let files = [0, 1].map(|_| Arc::new(GuestMemfd::new(SLOT_PAGES * P, flags).unwrap()));
    for (slot, mem) in files.iter().enumerate() {
        map.table().entries.push(SlotEntry {
            slot: slot as u32,
            gpa: slot as u64 * SLOT_PAGES * P,
            len: SLOT_PAGES * P,
            offset: 0,
            mem: mem.clone(),
        });
    }
    map.set_policy(ConversionPolicy {
        max_attempts: 1,
        first_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    });
    (map, files)
}

/// One request as a thread saw it: the pages, the target, and when it was
/// made and returned on a clock shared by all threads.
#[derive(Debug, Clone, Copy)]
struct Request {
    pages: (u64, u64),
    to: Attribute,
    invoked: u64,
    returned: u64,
    succeeded: bool,
}

impl Request {
    fn covers(&self, page: u64) -> bool {
        (self.pages.0..self.pages.1).contains(&page)
    }
}

/// Whether `now`, the state of `page` after the requests of `log` that
/// found it `before`, is what a serial order of the successful requests
/// (one respecting real time) leaves: the target of a successful request
/// covering the page that no other covering one started after it returned
/// (so it may come last), or `before` where none covered it. Failed
/// requests change nothing.
fn explained(log: &[Request], page: u64, before: Attribute, now: Attribute) -> bool {
    let covering: Vec<_> = log
        .iter()
        .filter(|r| r.succeeded && r.covers(page))
        .collect();
    if covering.is_empty() {
        return now == before;
    }
    let may_be_last = |w: &Request| !covering.iter().any(|r| r.invoked > w.returned);
    covering.iter().any(|w| w.to == now && may_be_last(w))
}

/// `count` random requests inside the two slots, stamped on `clock`.
fn hammer(map: &GpaMap, clock: &AtomicU64, seed: u64, count: usize) -> Vec<Request> {
    let mut rng = crate::testing::Rng::new(seed);
    (0..count)
        .map(|_| {
            // Half of them to private from the first slot over the pinned
            // page: they fail after converting their first part, which is
            // where a rollback can race the others.
            let (first, end, to) = if rng.below(2) == 0 {
                let first = rng.below(SLOT_PAGES);
                (
                    first,
                    PINNED + 1 + rng.below(PAGES - PINNED),
                    Attribute::Private,
                )
            } else {
                let first = rng.below(PAGES);
                let to = [Attribute::Private, Attribute::Shared][rng.below(2) as usize];
                (first, first + 1 + rng.below(PAGES - first), to)
            };
            // SeqCst: one order of every thread's stamps, which the calls
            // between them respect.
            let invoked = clock.fetch_add(1, Ordering::SeqCst);
            let outcome = map.convert(first * P, end - first, to);
            let returned = clock.fetch_add(1, Ordering::SeqCst);
            if let Err(error) = &outcome.result {
                assert_eq!(error.errno(), libc::EAGAIN, "{outcome:?}");
            }
            assert!(outcome.rollback_failures.is_empty(), "{outcome:?}");
            let succeeded = outcome.result.is_ok();
            Request {
                pages: (first, end),
                to,
                invoked,
                returned,
                succeeded,
            }
        })
        .collect()
}

fn states(files: &[Arc<GuestMemfd>; 2]) -> Vec<Attribute> {
    (0..PAGES)
        .map(|page| {
            let file = &files[(page / SLOT_PAGES) as usize];
            file.attribute((page % SLOT_PAGES) * P).unwrap()
        })
        .collect()
}

/// Threads converting overlapping ranges over both slots; a pin on the
/// second page of the second slot makes requests to private over it fail
/// after their first part converted. After each round every page must be
/// as some serial order of the round's successful requests leaves it.
#[test]
fn overlapping_requests_spanning_slots_are_serializable() {
    let (map, files) = two_slots();
    let _pin = files[1].pin((PINNED - SLOT_PAGES) * P, 1).unwrap();
    let clock = AtomicU64::new(0);
    let (threads, rounds, per_round) = (3, 300, 24);
    let mut before = states(&files);
    let mut failed = 0;
    for round in 0..rounds {
        let log: Vec<Request> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (map, clock) = (&map, &clock);
                    let seed = round * threads + t + 1;
                    scope.spawn(move || hammer(map, clock, seed, per_round))
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        failed += log.iter().filter(|r| !r.succeeded).count();
        let now = states(&files);
        for page in 0..PAGES {
            let (was, is) = (before[page as usize], now[page as usize]);
            let covering: Vec<_> = log.iter().filter(|r| r.covers(page)).collect();
            assert!(
                explained(&log, page, was, is),
                "round {round}: page {page} is {is:?} (was {was:?}), which no serial order of the successful requests leaves; requests covering it: {covering:#?}",
            );
        }
        before = now;
    }
    assert!(failed > 0, "no request failed: no rollback was exercised");
    assert_eq!(before[PINNED as usize], Attribute::Shared);
}

/// The model itself: a rollback that undoes a later success is caught.
#[test]
fn the_model_refuses_a_state_no_serial_order_leaves() {
    let request = |to, invoked, returned, succeeded| Request {
        pages: (0, 8),
        to,
        invoked,
        returned,
        succeeded,
    };
    let (s, x) = (Attribute::Shared, Attribute::Private);
    // A fails (rolled back to shared) around B, which made page 0 private.
    let log = [request(x, 0, 3, false), request(x, 1, 2, true)];
    assert!(!explained(&log, 0, s, s));
    assert!(explained(&log, 0, s, x));
    // Overlapping successes: either may be last.
    let log = [request(x, 0, 3, true), request(s, 1, 2, true)];
    assert!(explained(&log, 0, s, s) && explained(&log, 0, s, x));
    // One after the other: only the later.
    let log = [request(x, 0, 1, true), request(s, 2, 3, true)];
    assert!(explained(&log, 0, x, s) && !explained(&log, 0, x, x));
    assert!(explained(&[], 0, x, x) && !explained(&[], 0, x, s));
}

/// On a fragmented file (every other page private), the snapshot of a part
/// holds the part's runs only, however many the file has.
#[test]
fn the_rollback_snapshot_holds_only_the_request_runs() {
    let pages = 4096;
    let mem = Arc::new(GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).unwrap());
    for page in (1..pages).step_by(2) {
        mem.set_attributes(page * P, P, Attribute::Private).unwrap();
    }
    assert_eq!(mem.shared_runs().len(), 2048);
    let part = Part {
        gpa: 1 << 30,
        offset: 100 * P,
        len: 5 * P,
        mem: mem.clone(),
    };
    let range = part.offset..part.offset + part.len;
    let own = mem.shared_runs_in(range.clone());
    assert_eq!(own, [100 * P..101 * P, 102 * P..103 * P, 104 * P..105 * P]);
    // The same runs a walk of the whole file would give, clipped.
    let whole = changing_runs(&mem.shared_runs(), range, Attribute::Private);
    assert_eq!(rollback_runs(&part, Attribute::Private), whole);
    let gaps = rollback_runs(&part, Attribute::Shared);
    assert_eq!(gaps, [101 * P..102 * P, 103 * P..104 * P]);
    // A run reaching past either end is clipped to the range.
    mem.set_attributes(98 * P, 8 * P, Attribute::Shared)
        .unwrap();
    assert_eq!(
        mem.shared_runs_in(101 * P..103 * P),
        vec![(101 * P)..(103 * P)]
    );
}

/// Records what `shared_runs_in` gives in the commit phase.
struct SeesRuns {
    mem: std::sync::OnceLock<Arc<GuestMemfd>>,
    seen: Mutex<Vec<Vec<Range<u64>>>>,
}

impl ConversionListener for SeesRuns {
    fn commit(&self, offset: u64, len: u64, _: Attribute) -> Result<(), Refusal> {
        let mem = self.mem.get().expect("set before converting");
        lock(&self.seen).push(mem.shared_runs_in(offset..offset + len));
        Ok(())
    }
}

/// In a listener's commit (as KVM's attribute listener calls it), the
/// runs come from the map the conversion holds: the state before it.
#[test]
fn a_commit_reads_the_request_runs_from_the_held_map() {
    let mem = Arc::new(GuestMemfd::new(16 * P, Flags::MMAP | Flags::INIT_SHARED).unwrap());
    mem.set_attributes(4 * P, P, Attribute::Private).unwrap();
    let listener = Arc::new(SeesRuns {
        mem: std::sync::OnceLock::new(),
        seen: Mutex::new(Vec::new()),
    });
    let _ = listener.mem.set(mem.clone());
    mem.add_listener(listener.clone());
    mem.set_attributes(2 * P, 6 * P, Attribute::Private)
        .unwrap();
    let seen = lock(&listener.seen).clone();
    assert_eq!(seen, [vec![2 * P..4 * P, 5 * P..8 * P]]);
}

#[test]
fn guest_ret_is_the_negative_errno() {
    let outcome = ConversionOutcome::failed(ConversionError::Again { error_offset: 0 }, 1, 0);
    assert_eq!(outcome.guest_ret() as i64, -11);
    let ok = ConversionOutcome {
        result: Ok(()),
        attempts: 1,
        failed_gpa: None,
        rollback_failures: Vec::new(),
    };
    assert_eq!(ok.guest_ret(), 0);
}

/// Panics in its commit phase.
struct PanicsInCommit;

impl ConversionListener for PanicsInCommit {
    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        panic!("a listener of the second slot panics");
    }
}

/// A panic in a later part of a request spanning slots reaches the caller
/// with the parts before it put back: nothing changed.
#[test]
fn a_panic_in_a_later_part_rolls_the_earlier_ones_back() {
    let (map, files) = two_slots();
    files[1].add_listener(Arc::new(PanicsInCommit));
    let before = states(&files);
    let request = || map.convert(2 * P, SLOT_PAGES, Attribute::Private);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(request));
    assert!(panicked.is_err(), "the panic reached the caller");
    assert_eq!(states(&files), before, "the first slot's part was put back");
    // The map serves requests again.
    let outcome = map.convert(0, 2, Attribute::Private);
    assert_eq!(outcome.result, Ok(()));
}
