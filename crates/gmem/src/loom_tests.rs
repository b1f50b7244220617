//! `loom` models of the pin / convert / drain protocol, on the real
//! [`PageRef`] and [`PinBatch`] with loom's atomics.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p gmem --lib --release loom`.

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

use crate::batch::{BATCH_SLOTS, PinBatch};
use crate::refs::{PageRef, TryGet, try_get_run};

/// A mapped page with no references.
fn mapped_page() -> Arc<PageRef> {
    let page = Arc::new(PageRef::new());
    assert!(page.get_mapped());
    page.put(1);
    page
}

/// A mapped page holding `pins` fast-path references.
fn page_with_pins(pins: u64) -> Arc<PageRef> {
    let page = mapped_page();
    for _ in 0..pins {
        assert_eq!(page.try_get(), TryGet::Got);
    }
    page
}

/// The conversion's step 4 on one page: unmap, check, one drain, check.
fn convert(page: &PageRef, batch: &PinBatch) -> bool {
    page.unmap();
    if page.count() == 0 {
        return true;
    }
    batch.drain(|pages, times| page.put((pages.end - pages.start) * times));
    page.count() == 0
}

/// A pin that succeeded is never live while a conversion succeeds.
#[test]
fn loom_no_conversion_over_a_live_pin() {
    loom::model(|| {
        let page = mapped_page();
        let batch = Arc::new(PinBatch::new());
        let converted = Arc::new(AtomicBool::new(false));
        let pinner = {
            let (page, batch, converted) = (page.clone(), batch.clone(), converted.clone());
            thread::spawn(move || {
                if page.try_get() == TryGet::Got {
                    // Under the pin the page must still be shared.
                    assert!(
                        !converted.load(Ordering::Acquire),
                        "pin live over a conversion"
                    );
                    batch.push(0..1, |pages, times| {
                        page.put((pages.end - pages.start) * times)
                    });
                }
            })
        };
        if convert(&page, &batch) {
            converted.store(true, Ordering::Release);
        }
        pinner.join().unwrap();
    });
}

/// A release parked before the conversion starts never causes EAGAIN.
#[test]
fn loom_a_parked_release_is_drained() {
    loom::model(|| {
        let page = mapped_page();
        let batch = Arc::new(PinBatch::new());
        let parked = Arc::new(AtomicBool::new(false));
        let owner = {
            let (page, batch, parked) = (page.clone(), batch.clone(), parked.clone());
            thread::spawn(move || {
                assert_eq!(page.try_get(), TryGet::Got);
                batch.push(0..1, |pages, times| {
                    page.put((pages.end - pages.start) * times)
                });
                parked.store(true, Ordering::Release);
            })
        };
        while !parked.load(Ordering::Acquire) {
            thread::yield_now();
        }
        assert!(convert(&page, &batch), "false EAGAIN after the drain");
        owner.join().unwrap();
    });
}

/// The owner's flush of a full batch and another thread's drain release
/// every parked reference exactly once.
#[test]
fn loom_flush_and_drain_release_once() {
    loom::model(|| {
        let pins = BATCH_SLOTS as u64 + 1;
        let page = page_with_pins(pins);
        let batch = Arc::new(PinBatch::new());
        let owner = {
            let (page, batch) = (page.clone(), batch.clone());
            thread::spawn(move || {
                for _ in 0..pins {
                    batch.push(0..1, |pages, times| {
                        page.put((pages.end - pages.start) * times)
                    });
                }
            })
        };
        batch.drain(|pages, times| page.put((pages.end - pages.start) * times));
        owner.join().unwrap();
        batch.drain(|pages, times| page.put((pages.end - pages.start) * times));
        assert_eq!(page.count(), 0);
    });
}

/// A huge folio is split only with no reference: a fast-path pin on the folio
/// word either is seen by the split's check or sees the split and backs off.
#[test]
fn loom_no_split_under_a_huge_pin() {
    loom::model(|| {
        let folio = Arc::new(PageRef::new());
        folio.set_huge(true);
        assert!(folio.get_mapped());
        folio.put(1);
        let split = Arc::new(AtomicBool::new(false));
        let pinner = {
            let (folio, split) = (folio.clone(), split.clone());
            thread::spawn(move || {
                if folio.try_get_huge() == TryGet::Got {
                    assert!(!split.load(Ordering::Acquire), "huge pin live over a split");
                    folio.put(1);
                }
            })
        };
        folio.unmap();
        if folio.count() == 0 {
            folio.set_huge(false);
            split.store(true, Ordering::Release);
        }
        pinner.join().unwrap();
        assert_eq!(folio.count(), 0);
    });
}

/// A thread's exit racing a conversion's drain: the exit flushes its batch,
/// retires it from the file's registry (under the registry lock the drain
/// holds) and makes it spare; the batch's next owner parks a release of
/// another file's page in it. The drain releases the first page's parked
/// reference exactly once and never the other file's.
#[test]
fn loom_exit_retire_and_reuse_race_a_drain() {
    loom::model(|| {
        let (first, other) = (mapped_page(), mapped_page());
        assert_eq!(first.try_get(), TryGet::Got);
        let batch = Arc::new(PinBatch::new());
        batch.push(0..1, |_, _| unreachable!("not full"));
        // The first file's registry of batches.
        let registry = Arc::new(loom::sync::Mutex::new(vec![batch.clone()]));
        let exiting = {
            let (first, other, batch, registry) = (
                first.clone(),
                other.clone(),
                batch.clone(),
                registry.clone(),
            );
            thread::spawn(move || {
                // `LocalBatches::drop`: flush, retire, make spare.
                batch.drain(|pages, times| first.put((pages.end - pages.start) * times));
                registry.lock().unwrap().retain(|b| !Arc::ptr_eq(b, &batch));
                batch.drain(|_, _| {});
                batch.reset();
                // The next owner, pinning the other file.
                assert_eq!(other.try_get(), TryGet::Got);
                batch.push(0..1, |_, _| unreachable!("not full"));
            })
        };
        // A conversion of the first file: unmap, check, drain once.
        first.unmap();
        for b in registry.lock().unwrap().iter() {
            b.drain(|pages, times| first.put((pages.end - pages.start) * times));
        }
        exiting.join().unwrap();
        assert_eq!(first.count(), 0, "released exactly once");
        assert_eq!(other.count(), 1, "the other file's release is still parked");
    });
}

/// A fast pin of two pages (the real per-page loop of `try_pin_fast`, and its
/// back-off) racing a conversion's unmap and check of both: either the pin
/// holds both pages and the check sees it, or the pin backs off holding
/// nothing. A conversion that passes its check never has a pin live.
#[test]
fn loom_two_page_fast_pin_races_a_conversion() {
    loom::model(|| {
        let pages = Arc::new([PageRef::new(), PageRef::new()]);
        for page in pages.iter() {
            assert!(page.get_mapped());
            page.put(1);
        }
        let converted = Arc::new(AtomicBool::new(false));
        let pinner = {
            let (pages, converted) = (pages.clone(), converted.clone());
            thread::spawn(move || match try_get_run(&pages[..]) {
                Ok(()) => {
                    assert!(
                        !converted.load(Ordering::Acquire),
                        "two-page pin live over a conversion"
                    );
                    pages.iter().for_each(|page| page.put(1));
                }
                Err((taken, outcome)) => {
                    assert_eq!(outcome, TryGet::NotMapped);
                    // `undo_fast`: drop what was taken.
                    pages[..taken].iter().for_each(|page| page.put(1));
                }
            })
        };
        // The conversion's step 4: unmap every page, then check each.
        pages.iter().for_each(PageRef::unmap);
        if pages.iter().all(|page| page.count() == 0) {
            converted.store(true, Ordering::Release);
        }
        pinner.join().unwrap();
        for page in pages.iter() {
            assert_eq!(page.count(), 0, "a reference left behind");
        }
    });
}

/// A thread's last releases (the third one flushes its full batch) and its
/// exit (flush, retire from the registry, make spare) racing another
/// thread's drain of every registered batch: each parked release is
/// released exactly once, and the spare batch starts empty.
#[test]
fn loom_exit_flush_and_retire_race_a_drain() {
    loom::model(|| {
        let pins = BATCH_SLOTS as u64 + 1;
        let page = page_with_pins(pins);
        let batch = Arc::new(PinBatch::new());
        let registry = Arc::new(loom::sync::Mutex::new(vec![batch.clone()]));
        let owner = {
            let (page, batch, registry) = (page.clone(), batch.clone(), registry.clone());
            thread::spawn(move || {
                let put = |pages: std::ops::Range<u64>, times: u64| {
                    page.put((pages.end - pages.start) * times)
                };
                for _ in 0..pins {
                    batch.push(0..1, put);
                }
                // `LocalBatches::drop`: flush, retire, make spare.
                batch.drain(put);
                registry.lock().unwrap().retain(|b| !Arc::ptr_eq(b, &batch));
                batch.drain(|_, _| panic!("a retired batch held a release"));
                batch.reset();
            })
        };
        // `References::drain_all`: every registered batch, under the lock.
        for b in registry.lock().unwrap().iter() {
            b.drain(|pages, times| page.put((pages.end - pages.start) * times));
        }
        owner.join().unwrap();
        assert_eq!(page.count(), 0, "released exactly once");
        batch.drain(|_, _| panic!("the spare batch is not empty"));
    });
}
