//! Pins, pin batches and conversions across threads (sections 4 and 5 of
//! `guest_memfd.md`): a conversion to private never succeeds over a live
//! pin, a pin never sees a private page, and released pins parked in the
//! batches of other (idle, live or exited) threads never cause a false
//! `EAGAIN`.
//!
//! Iteration counts are bounded; no assertion depends on timing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;

use gmem::testing::Rng;
use gmem::{Attribute, Error, Flags, GuestMemfd, PAGE_SIZE, Pin};

const P: u64 = PAGE_SIZE;

fn shared(pages: u64) -> GuestMemfd {
    GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).unwrap()
}

fn fault_offset(err: &Error) -> Option<u64> {
    match err {
        Error::Private { offset } | Error::Pinned { offset } => Some(*offset),
        _ => None,
    }
}

/// A barrier that fails instead of hanging when a party panicked.
struct Barrier {
    parties: usize,
    state: Mutex<(usize, u64, bool)>,
    changed: Condvar,
}

impl Barrier {
    fn new(parties: usize) -> Barrier {
        Barrier {
            parties,
            state: Mutex::new((0, 0, false)),
            changed: Condvar::new(),
        }
    }

    fn wait(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        assert!(!state.2, "another thread panicked");
        let generation = state.1;
        state.0 += 1;
        if state.0 == self.parties {
            *state = (0, generation + 1, false);
            self.changed.notify_all();
            return;
        }
        while state.1 == generation {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            assert!(!state.2, "another thread panicked");
        }
    }

    /// Wakes every waiter with a failure if the calling thread is panicking.
    fn guard(&self) -> impl Drop + '_ {
        struct Guard<'a>(&'a Barrier);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if thread::panicking() {
                    self.0.state.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
                    self.0.changed.notify_all();
                }
            }
        }
        Guard(self)
    }
}

const FILE_PAGES: u64 = 64;
/// Pinners pin pages in `0..HOT_PAGES`; the converter converts ranges in
/// `0..HOT_PAGES + 4` (the same pages and their neighbours).
const HOT_PAGES: u64 = 12;
const PINNERS: u64 = 3;
const ROUNDS: usize = 4;
const PIN_ITERATIONS: u64 = 2500;
const CONVERSIONS: u64 = 700;
/// Bytes of one pattern. Each pinner owns `MAX_HELD` slots in every page,
/// one per pin it holds, so its own overlapping pins do not clash.
const SLOT: u64 = 64;
const MAX_HELD: usize = 3;

/// One pin held by a pinner thread, with the pattern it wrote.
struct Held<'a> {
    pin: Pin<'a>,
    first: u64,
    pages: u64,
    stamp: u8,
    /// Where the pattern goes in each page.
    at: u64,
}

/// A pinner's pattern for one page: distinct per thread, pin and page.
fn stamp_bytes(thread: u64, stamp: u8, page: u64) -> [u8; SLOT as usize] {
    let mut bytes = [0u8; SLOT as usize];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (thread as u8).wrapping_mul(71) ^ stamp ^ (page as u8).wrapping_mul(13) ^ (i as u8);
    }
    bytes
}

/// Checks a held pin: every page is shared, and the pattern reads back
/// through the pin and through the host mapping.
fn check_held(mem: &GuestMemfd, map: &gmem::HostMapping, thread: u64, held: &Held<'_>) {
    for i in 0..held.pages {
        let page = held.first + i;
        assert_eq!(
            mem.attribute(page * P).unwrap(),
            Attribute::Shared,
            "thread {thread}: page {page} is private under a live pin"
        );
        let want = stamp_bytes(thread, held.stamp, page);
        let mut got = [0u8; SLOT as usize];
        held.pin.read(i * P + held.at, &mut got).unwrap();
        assert_eq!(got, want, "thread {thread}: page {page}: pin read-back");
        map.read(page * P + held.at, &mut got)
            .unwrap_or_else(|e| panic!("thread {thread}: host read of pinned page {page}: {e}"));
        assert_eq!(got, want, "thread {thread}: page {page}: host read-back");
    }
}

fn pinner(mem: &GuestMemfd, live: &[AtomicU32], barrier: &Barrier, thread: u64) -> u64 {
    let _guard = barrier.guard();
    let map = mem.mmap().unwrap();
    let mut rng = Rng::new(thread + 1);
    let mut held: Vec<Held<'_>> = Vec::new();
    let mut pinned = 0;
    let mut stamp = 0u8;
    for _round in 0..ROUNDS {
        for _ in 0..PIN_ITERATIONS {
            for h in &held {
                check_held(mem, &map, thread, h);
            }
            if held.len() >= MAX_HELD || (!held.is_empty() && rng.below(3) == 0) {
                let h = held.swap_remove(rng.below(held.len() as u64) as usize);
                check_held(mem, &map, thread, &h);
                for page in h.first..h.first + h.pages {
                    live[page as usize].fetch_sub(1, Ordering::SeqCst);
                }
                drop(h);
                continue;
            }
            let first = rng.below(HOT_PAGES);
            let pages = 1 + rng.below(3).min(HOT_PAGES - 1 - first);
            match mem.pin(first * P, pages * P) {
                Ok(pin) => {
                    for page in first..first + pages {
                        live[page as usize].fetch_add(1, Ordering::SeqCst);
                    }
                    stamp = stamp.wrapping_add(1);
                    let slot = (0..MAX_HELD as u64)
                        .find(|slot| {
                            held.iter()
                                .all(|h| h.at != (thread * MAX_HELD as u64 + slot) * SLOT)
                        })
                        .unwrap();
                    let at = (thread * MAX_HELD as u64 + slot) * SLOT;
                    for i in 0..pages {
                        pin.write(i * P + at, &stamp_bytes(thread, stamp, first + i))
                            .unwrap();
                    }
                    let h = Held {
                        pin,
                        first,
                        pages,
                        stamp,
                        at,
                    };
                    check_held(mem, &map, thread, &h);
                    held.push(h);
                    pinned += 1;
                }
                Err(err) => {
                    assert_eq!(
                        err.errno(),
                        libc::EFAULT,
                        "thread {thread}: pin failed: {err}"
                    );
                    let at = fault_offset(&err).unwrap();
                    assert!(
                        (first * P..(first + pages) * P).contains(&at) && at % P == 0,
                        "thread {thread}: EFAULT offset {at:#x} outside the pin"
                    );
                }
            }
            thread::yield_now();
        }
        for h in held.drain(..) {
            for page in h.first..h.first + h.pages {
                live[page as usize].fetch_sub(1, Ordering::SeqCst);
            }
        }
        // Every pin is dropped (parked in this thread's batch). Wait for the
        // converter to stop, then park one more release so that the batch
        // certainly holds one when the whole-file conversion runs.
        barrier.wait();
        drop(mem.pin(thread * P, P).unwrap());
        barrier.wait();
        // The main thread converts the whole file while we stay alive.
        barrier.wait();
    }
    pinned
}

fn converter(mem: &GuestMemfd, live: &[AtomicU32], seed: u64) -> (u64, u64) {
    let map = mem.mmap().unwrap();
    let mut rng = Rng::new(seed);
    let (mut converted, mut eagain) = (0, 0);
    for _ in 0..CONVERSIONS {
        let first = rng.below(HOT_PAGES + 4);
        let pages = 1 + rng.below(4).min(HOT_PAGES + 3 - first);
        let (offset, len) = (first * P, pages * P);
        match mem.set_attributes(offset, len, Attribute::Private) {
            Ok(()) => {
                converted += 1;
                // Only this thread converts, so the range stays private
                // until we convert it back: a live pin on it is a bug. Look
                // a few times, letting the pinners run in between, so that a
                // pin that slipped through is seen by us or by its holder.
                for _ in 0..3 {
                    for page in first..first + pages {
                        assert_eq!(
                            live[page as usize].load(Ordering::SeqCst),
                            0,
                            "page {page} converted to private under a live pin"
                        );
                        assert_eq!(mem.attribute(page * P).unwrap(), Attribute::Private);
                    }
                    let err = mem.pin(offset + 1, 1).map(|_| ()).unwrap_err();
                    assert_eq!(err.errno(), libc::EFAULT, "pin of a private page: {err}");
                    assert_eq!(fault_offset(&err), Some(offset));
                    let err = map.read(offset, &mut [0u8; 8]).unwrap_err();
                    assert_eq!(err.errno(), libc::EFAULT);
                    thread::yield_now();
                }
            }
            Err(err) => {
                assert_eq!(err.errno(), libc::EAGAIN, "conversion failed: {err}");
                let at = err.error_offset();
                assert!(
                    (offset..offset + len).contains(&at) && at % P == 0,
                    "EAGAIN offset {at:#x} outside {offset:#x}+{len:#x}"
                );
                assert_eq!(mem.attribute(at).unwrap(), Attribute::Shared);
                eagain += 1;
            }
        }
        mem.set_attributes(offset, len, Attribute::Shared).unwrap();
    }
    (converted, eagain)
}

/// (a) Pinners and a converter on the same pages; then, with every pin
/// dropped and every pinner alive, the whole file converts at once.
#[test]
fn pins_and_conversions_race() {
    let mem = shared(FILE_PAGES);
    let live: Vec<AtomicU32> = (0..FILE_PAGES).map(|_| AtomicU32::new(0)).collect();
    // The pinners and the main thread.
    let barrier = Barrier::new(PINNERS as usize + 1);
    let (mut converted, mut eagain) = (0, 0);
    let pinned: u64 = thread::scope(|s| {
        let _guard = barrier.guard();
        let pinners: Vec<_> = (0..PINNERS)
            .map(|t| {
                let (mem, live, barrier) = (&mem, &live[..], &barrier);
                s.spawn(move || pinner(mem, live, barrier, t))
            })
            .collect();
        for round in 0..ROUNDS {
            let (c, e) = converter(&mem, &live, 1000 + round as u64);
            converted += c;
            eagain += e;
            // The pinners finish their iterations and drop their pins.
            barrier.wait();
            // They park one more release each.
            barrier.wait();
            let before = mem.stats();
            assert_eq!(before.pins_live, 0, "round {round}: pins left");
            mem.set_attributes(0, FILE_PAGES * P, Attribute::Private)
                .unwrap_or_else(|e| {
                    panic!("round {round}: false EAGAIN after every pin was dropped: {e}")
                });
            let after = mem.stats();
            assert!(
                after.drains > before.drains,
                "round {round}: parked releases were not drained"
            );
            assert_eq!(after.pages_private, FILE_PAGES);
            mem.set_attributes(0, FILE_PAGES * P, Attribute::Shared)
                .unwrap();
            barrier.wait();
        }
        pinners.into_iter().map(|h| h.join().unwrap()).sum()
    });
    // The race was real: both outcomes of a conversion happened.
    assert!(
        pinned > 0 && converted > 0,
        "pinned {pinned}, converted {converted}"
    );
    assert!(eagain > 0, "no conversion ever met a live pin");
    assert_eq!(mem.stats().eagain, eagain);
    assert_eq!(mem.stats().pins_live, 0);
}

/// (b) A pin dropped on a thread that is idle but alive: its release sits in
/// that thread's batch, and the conversion's one drain clears it.
#[test]
fn release_parked_on_an_idle_thread_is_drained() {
    let mem = shared(8);
    thread::scope(|s| {
        // The channels live in the scope: if an assertion fails, dropping
        // them wakes the other thread instead of hanging the scope.
        let (dropped_tx, dropped_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        let mem = &mem;
        let a = s.spawn(move || {
            let pin = mem.pin(3 * P, P).unwrap();
            pin.write(0, b"idle").unwrap();
            drop(pin);
            dropped_tx.send(()).unwrap();
            exit_rx.recv().unwrap();
        });
        dropped_rx.recv().unwrap();
        let before = mem.stats();
        assert_eq!(before.pins_live, 0);
        mem.set_attributes(3 * P, P, Attribute::Private)
            .expect("a released pin parked on an idle thread must not cause EAGAIN");
        assert_eq!(mem.attribute(3 * P).unwrap(), Attribute::Private);
        // The release really was parked: the conversion had to drain.
        assert_eq!(mem.stats().drains, before.drains + 1);
        exit_tx.send(()).unwrap();
        a.join().unwrap();
    });
    mem.set_attributes(3 * P, P, Attribute::Shared).unwrap();
    let mut buf = [0u8; 4];
    mem.mmap().unwrap().read(3 * P, &mut buf).unwrap();
    assert_eq!(&buf, b"idle");
}

/// (c) A thread's exit flushes its batch: no drain is needed afterwards.
#[test]
fn thread_exit_flushes_its_batch() {
    let mem = Arc::new(shared(16));
    let a = {
        let mem = mem.clone();
        thread::spawn(move || {
            // Fewer releases than a batch holds, so none is flushed early.
            for page in 0..10 {
                let pin = mem.pin(page * P, P).unwrap();
                pin.write(0, &[page as u8 + 1]).unwrap();
            }
            let two_pages = mem.pin(12 * P + 7, P).unwrap();
            drop(two_pages);
            assert_eq!(mem.stats().pins_live, 0);
        })
    };
    a.join().unwrap();
    let before = mem.stats();
    assert_eq!(before.pins_live, 0);
    mem.set_attributes(0, 16 * P, Attribute::Private).unwrap();
    assert_eq!(
        mem.stats().drains,
        before.drains,
        "the exited thread's releases were still parked"
    );
    assert_eq!(mem.stats().pages_private, 16);
    mem.set_attributes(0, 16 * P, Attribute::Shared).unwrap();
    let mut byte = [0u8];
    mem.mmap().unwrap().read(9 * P, &mut byte).unwrap();
    assert_eq!(byte, [10]);
}

/// (d) `EAGAIN` while a pin is live: the offset is the pinned page's,
/// clamped to the request; nothing changed; after the pin is dropped the
/// retry succeeds.
#[test]
fn eagain_while_pinned_then_retry_succeeds() {
    let mem = shared(16);
    let map = mem.mmap().unwrap();
    map.write(4 * P, b"before").unwrap();
    // Pages 4, 5 and 6, by an unaligned range.
    let pin = mem.pin(4 * P + 100, 2 * P).unwrap();
    let stats = mem.stats();
    for (offset, len, want) in [
        (0, 16 * P, 4 * P),
        (2 * P, 4 * P, 4 * P),
        // Starts inside the pin: clamped to the request.
        (5 * P, 4 * P, 5 * P),
        (6 * P, P, 6 * P),
    ] {
        let err = mem
            .set_attributes(offset, len, Attribute::Private)
            .expect_err("conversion over a live pin");
        assert_eq!(err.errno(), libc::EAGAIN);
        assert_eq!(err.error_offset(), want, "request {offset:#x}+{len:#x}");
    }
    assert_eq!(mem.stats().eagain, stats.eagain + 4);
    assert_eq!(
        mem.stats().pages_private,
        0,
        "a failed conversion changed state"
    );
    // The host mapping was restored, and the pin still works.
    let mut buf = [0u8; 6];
    map.read(4 * P, &mut buf).unwrap();
    assert_eq!(&buf, b"before");
    pin.write(0, b"pinned").unwrap();
    // Page 7 is not pinned: a conversion there succeeds.
    mem.set_attributes(7 * P, P, Attribute::Private).unwrap();
    drop(pin);
    mem.set_attributes(0, 16 * P, Attribute::Private).unwrap();
    assert_eq!(mem.stats().pages_private, 16);
    mem.set_attributes(0, 16 * P, Attribute::Shared).unwrap();
    map.read(4 * P + 100, &mut buf).unwrap();
    assert_eq!(&buf, b"pinned");
}

/// (d) The same with the pin live on another thread, which drops it and
/// stays alive: the retry succeeds through the drain.
#[test]
fn eagain_while_pinned_by_another_thread() {
    let mem = shared(8);
    thread::scope(|s| {
        // The channels live in the scope: if an assertion fails, dropping
        // them wakes the other thread instead of hanging the scope.
        let (pinned_tx, pinned_rx) = mpsc::channel();
        let (unpin_tx, unpin_rx) = mpsc::channel::<()>();
        let (dropped_tx, dropped_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        let mem = &mem;
        s.spawn(move || {
            let pin = mem.pin(2 * P, 3 * P).unwrap();
            pinned_tx.send(()).unwrap();
            unpin_rx.recv().unwrap();
            drop(pin);
            dropped_tx.send(()).unwrap();
            exit_rx.recv().unwrap();
        });
        pinned_rx.recv().unwrap();
        let err = mem
            .set_attributes(3 * P, 4 * P, Attribute::Private)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EAGAIN);
        assert_eq!(err.error_offset(), 3 * P);
        let err = mem
            .set_attributes(0, 8 * P, Attribute::Private)
            .unwrap_err();
        assert_eq!(err.error_offset(), 2 * P);
        assert_eq!(mem.stats().pins_live, 1);
        unpin_tx.send(()).unwrap();
        dropped_rx.recv().unwrap();
        mem.set_attributes(0, 8 * P, Attribute::Private)
            .expect("retry after the pin was dropped");
        exit_tx.send(()).unwrap();
    });
    assert_eq!(mem.stats().pages_private, 8);
}
