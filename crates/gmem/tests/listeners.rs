//! Conversion listeners that are safe to write: callbacks may query and pin
//! without deadlocking (what would deadlock fails with `EDEADLK`), a commit
//! phase may still refuse and undo a conversion, a removed listener is never
//! called again, and a late listener can replay the shared runs.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use common::reads_ok;
use gmem::{
    Attribute, ConversionError, ConversionListener, Flags, GuestMemfd, ListenerId, PAGE_SIZE,
    Refusal,
};

const P: u64 = PAGE_SIZE;

fn shared(pages: u64) -> Arc<GuestMemfd> {
    Arc::new(GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).unwrap())
}

/// Queries its own file from every callback and records what it saw.
struct Querying {
    mem: OnceLock<Arc<GuestMemfd>>,
    seen: Mutex<Vec<String>>,
}

impl Querying {
    fn look(&self, phase: &str, offset: u64) {
        let mem = self.mem.get().unwrap();
        let state = mem.attribute(offset).unwrap();
        let pages_private = mem.stats().pages_private;
        // A slow-path pin of another page (never pinned before), dropped.
        let pin = mem.pin(8 * P, P).map(drop);
        let runs = mem.shared_runs().len();
        let converted = mem.set_attributes(9 * P, P, Attribute::Private);
        let punched = mem.punch_hole(9 * P, P);
        let mapped = mem.mmap().map(drop);
        self.seen.lock().unwrap().push(format!(
            "{phase} {state:?} private={pages_private} pin={pin:?} runs={runs} convert={} punch={} mmap={}",
            errno(converted.map_err(|e| e.errno())),
            errno(punched.map_err(|e| e.errno())),
            errno(mapped.map_err(|e| e.errno())),
        ));
    }
}

fn errno(result: Result<(), i32>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(errno) => format!("errno {errno}"),
    }
}

impl ConversionListener for Querying {
    fn before_private(&self, offset: u64, _: u64) -> Result<(), Refusal> {
        self.look("before", offset);
        Ok(())
    }

    fn commit(&self, offset: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        self.look("commit", offset);
        Ok(())
    }

    fn converted(&self, offset: u64, _: u64, _: Attribute) {
        self.look("converted", offset);
    }
}

#[test]
fn callbacks_may_query_and_pin_and_get_edeadlk_for_the_rest() {
    let mem = shared(16);
    let listener = Arc::new(Querying {
        mem: OnceLock::new(),
        seen: Mutex::new(Vec::new()),
    });
    listener.mem.set(mem.clone()).ok().unwrap();
    mem.add_listener(listener.clone());
    mem.set_attributes(P, P, Attribute::Private).unwrap();
    let seen = listener.seen.lock().unwrap().clone();
    let edeadlk = format!("errno {}", libc::EDEADLK);
    let rest = format!("convert={edeadlk} punch={edeadlk} mmap={edeadlk}");
    assert_eq!(
        seen,
        [
            format!("before Shared private=0 pin=Ok(()) runs=1 {rest}"),
            format!("commit Shared private=0 pin=Ok(()) runs=1 {rest}"),
            format!("converted Private private=1 pin=Ok(()) runs=2 {rest}"),
        ]
    );
    // Nothing was left locked.
    assert_eq!(mem.attribute(9 * P).unwrap(), Attribute::Shared);
    mem.set_attributes(9 * P, P, Attribute::Private).unwrap();
}

/// Refuses in the commit phase when told to.
struct Committing {
    refuse: AtomicBool,
    converted: AtomicU64,
}

impl ConversionListener for Committing {
    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        match self.refuse.load(Ordering::Relaxed) {
            true => Err(Refusal::new("the IOMMU unmap failed")),
            false => Ok(()),
        }
    }

    fn converted(&self, _: u64, _: u64, _: Attribute) {
        self.converted.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_refused_commit_undoes_the_conversion_both_ways() {
    let mem = shared(8);
    let map = mem.mmap().unwrap();
    let listener = Arc::new(Committing {
        refuse: AtomicBool::new(true),
        converted: AtomicU64::new(0),
    });
    mem.add_listener(listener.clone());
    let err = mem
        .set_attributes(P, 2 * P, Attribute::Private)
        .unwrap_err();
    assert!(matches!(err, ConversionError::Refused { .. }), "{err}");
    assert_eq!(err.errno(), libc::EBUSY);
    assert_eq!(mem.attribute(P).unwrap(), Attribute::Shared);
    assert!(
        reads_ok(&map, P) && reads_ok(&map, 2 * P),
        "hidden pages shown again"
    );

    listener.refuse.store(false, Ordering::Relaxed);
    mem.set_attributes(P, 2 * P, Attribute::Private).unwrap();
    listener.refuse.store(true, Ordering::Relaxed);
    let err = mem.set_attributes(P, 2 * P, Attribute::Shared).unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY);
    assert_eq!(mem.attribute(P).unwrap(), Attribute::Private);
    assert!(
        !reads_ok(&map, P) && !reads_ok(&map, 2 * P),
        "shown pages hidden again"
    );
    assert_eq!(listener.converted.load(Ordering::Relaxed), 1);
    let stats = mem.stats();
    assert_eq!((stats.refused, stats.pages_private), (2, 2));
}

/// Counts its calls, and fails the test if called once `gone` is set.
struct Counted {
    gone: AtomicBool,
    calls: AtomicU64,
}

impl ConversionListener for Counted {
    fn converted(&self, _: u64, _: u64, _: Attribute) {
        // Stay a while in the callback, so that removals meet calls.
        thread::yield_now();
        assert!(!self.gone.load(Ordering::SeqCst), "called after removal");
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_removed_listener_is_never_called_again() {
    let mem = shared(4);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let mut to = Attribute::Private;
            while !stop.load(Ordering::Relaxed) {
                mem.set_attributes(0, P, to).unwrap();
                to = to.other_state();
            }
        });
        for _ in 0..200 {
            let listener = Arc::new(Counted {
                gone: AtomicBool::new(false),
                calls: AtomicU64::new(0),
            });
            let id = mem.add_listener(listener.clone());
            // Bounded: if the converting thread died (a call after removal
            // panics there), fail instead of waiting for calls forever.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while listener.calls.load(Ordering::Relaxed) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the converting thread stopped"
                );
                thread::yield_now();
            }
            assert!(mem.remove_listener(id));
            listener.gone.store(true, Ordering::SeqCst);
        }
        stop.store(true, Ordering::Relaxed);
    });
}

/// Removes itself from its first callback.
struct Once {
    mem: OnceLock<Arc<GuestMemfd>>,
    id: OnceLock<ListenerId>,
    calls: AtomicU64,
}

impl ConversionListener for Once {
    fn converted(&self, _: u64, _: u64, _: Attribute) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let removed = self
            .mem
            .get()
            .unwrap()
            .remove_listener(*self.id.get().unwrap());
        assert!(removed);
    }
}

#[test]
fn a_listener_may_remove_itself() {
    let mem = shared(4);
    let listener = Arc::new(Once {
        mem: OnceLock::new(),
        id: OnceLock::new(),
        calls: AtomicU64::new(0),
    });
    listener.mem.set(mem.clone()).ok().unwrap();
    let id = mem.add_listener(listener.clone());
    listener.id.set(id).unwrap();
    mem.set_attributes(0, P, Attribute::Private).unwrap();
    mem.set_attributes(0, P, Attribute::Shared).unwrap();
    assert_eq!(listener.calls.load(Ordering::Relaxed), 1);
    assert!(!mem.remove_listener(id));
}

/// Records what it hears.
#[derive(Default)]
struct Recording(Mutex<Vec<(u64, u64, Attribute)>>);

impl ConversionListener for Recording {
    fn converted(&self, offset: u64, len: u64, to: Attribute) {
        self.0.lock().unwrap().push((offset, len, to));
    }
}

#[test]
fn a_late_listener_replays_the_shared_runs() {
    let mem = shared(16);
    mem.set_attributes(2 * P, 3 * P, Attribute::Private)
        .unwrap();
    mem.set_attributes(10 * P, 6 * P, Attribute::Private)
        .unwrap();
    assert_eq!(mem.shared_runs(), [0..2 * P, 5 * P..10 * P]);
    let listener = Arc::new(Recording::default());
    mem.add_listener_replaying(listener.clone());
    mem.set_attributes(0, P, Attribute::Private).unwrap();
    assert_eq!(
        *listener.0.lock().unwrap(),
        [
            (0, 2 * P, Attribute::Shared),
            (5 * P, 5 * P, Attribute::Shared),
            (0, P, Attribute::Private),
        ]
    );
}

trait Other {
    fn other_state(self) -> Self;
}

impl Other for Attribute {
    fn other_state(self) -> Attribute {
        match self {
            Attribute::Shared => Attribute::Private,
            Attribute::Private => Attribute::Shared,
        }
    }
}
