//! Huge folios under random conversions, pins and a listener that pins in
//! every commit phase and keeps what it gets: whatever the folios' modes
//! (which follow the history), the invariants that do not depend on them
//! hold. A held pin's page is shared; a conversion fails only with `EAGAIN`
//! or a pin only with `EFAULT`; and once every pin is gone the counts are
//! clean: nothing is live, the whole file converts both ways, and every
//! folio pins again.
//!
//! `PROPTEST_CASES` sets the number of cases (128 by default).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use gmem::{
    Attribute, ConversionListener, Error, Flags, GuestMemfd, Options, OwnedPin, PAGE_SIZE, Refusal,
};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;
/// Four 2 MiB chunks.
const PAGES: u64 = 4 * 512;

#[derive(Debug, Clone)]
enum Op {
    Convert {
        page: u64,
        pages: u64,
        to: Attribute,
    },
    Pin {
        page: u64,
        pages: u64,
    },
    Unpin {
        index: usize,
    },
    /// The page the listener pins in the next commit phases.
    Probe {
        page: u64,
    },
    /// The listener lets go of what it kept.
    LetGo,
}

fn op() -> impl Strategy<Value = Op> {
    let page = || {
        prop_oneof![
            0..PAGES,
            (0..4u64).prop_map(|c| c * 512),
            (1..5u64).prop_map(|c| c * 512 - 1)
        ]
    };
    let to = prop_oneof![Just(Attribute::Private), Just(Attribute::Shared)];
    prop_oneof![
        6 => (page(), prop_oneof![1..4u64, Just(512u64)], to)
            .prop_map(|(page, pages, to)| Op::Convert { page, pages, to }),
        4 => (page(), 1..3u64).prop_map(|(page, pages)| Op::Pin { page, pages }),
        3 => any::<usize>().prop_map(|index| Op::Unpin { index }),
        2 => page().prop_map(|page| Op::Probe { page }),
        1 => Just(Op::LetGo),
    ]
}

/// Pins its page in every commit phase, keeping the pin.
struct KeepsPins {
    file: Weak<GuestMemfd>,
    page: AtomicU64,
    kept: Mutex<Vec<OwnedPin>>,
    wrong: Mutex<Vec<String>>,
}

impl ConversionListener for KeepsPins {
    fn commit(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Refusal> {
        let file = self.file.upgrade().unwrap();
        let page = self.page.load(Ordering::Relaxed);
        match file.pin_owned(page * P, P) {
            Ok(pin) => self.kept.lock().unwrap().push(pin),
            Err(Error::Private { .. }) => {}
            Err(err) => self.wrong.lock().unwrap().push(format!(
                "commit of {offset:#x}+{len:#x} to {to:?}: pin of page {page} failed with {err}"
            )),
        }
        Ok(())
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let options = Options::new().huge_folios(true);
    let mem = Arc::new(
        GuestMemfd::with_options(PAGES * P, Flags::MMAP | Flags::INIT_SHARED, options).unwrap(),
    );
    let listener = Arc::new(KeepsPins {
        file: Arc::downgrade(&mem),
        page: AtomicU64::new(0),
        kept: Mutex::new(Vec::new()),
        wrong: Mutex::new(Vec::new()),
    });
    let id = mem.add_listener(listener.clone());
    let mut pins: Vec<(u64, u64, OwnedPin)> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Convert { page, pages, to } => {
                let pages = pages.min(PAGES - page);
                match mem.set_attributes(page * P, pages * P, to) {
                    Ok(()) | Err(gmem::ConversionError::Again { .. }) => {}
                    Err(err) => prop_assert!(false, "step {step}: {op:?}: {err}"),
                }
            }
            Op::Pin { page, pages } => {
                let pages = pages.min(PAGES - page);
                match mem.pin_owned(page * P, pages * P) {
                    Ok(pin) => pins.push((page, pages, pin)),
                    Err(Error::Private { .. }) => {}
                    Err(err) => prop_assert!(false, "step {step}: {op:?}: {err}"),
                }
            }
            Op::Unpin { index } if !pins.is_empty() => drop(pins.remove(index % pins.len())),
            Op::Unpin { .. } => {}
            Op::Probe { page } => listener.page.store(page, Ordering::Relaxed),
            Op::LetGo => listener.kept.lock().unwrap().clear(),
        }
        let wrong = listener.wrong.lock().unwrap().clone();
        prop_assert!(wrong.is_empty(), "step {step}: {wrong:?}");
        let kept = listener.kept.lock().unwrap();
        let held = pins.iter().map(|(page, pages, _)| (*page, *pages));
        for (page, pages) in held.chain(kept.iter().map(|pin| (pin.offset() / P, 1))) {
            for p in page..page + pages {
                prop_assert_eq!(
                    mem.attribute(p * P).unwrap(),
                    Attribute::Shared,
                    "step {}: pinned page {}",
                    step,
                    p
                );
            }
        }
    }
    mem.remove_listener(id);
    pins.clear();
    listener.kept.lock().unwrap().clear();
    mem.drain_pin_batches();
    prop_assert_eq!(mem.stats().pins_live, 0);
    mem.set_attributes(0, PAGES * P, Attribute::Private)
        .map_err(|e| TestCaseError::fail(format!("all to private: {e}")))?;
    mem.set_attributes(0, PAGES * P, Attribute::Shared)
        .map_err(|e| TestCaseError::fail(format!("all to shared: {e}")))?;
    for page in (0..PAGES).step_by(97) {
        drop(
            mem.pin(page * P, P)
                .map_err(|e| TestCaseError::fail(format!("pin of page {page}: {e}")))?,
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(128),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn commit_phase_pins_never_corrupt_huge_folio_counts(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}
