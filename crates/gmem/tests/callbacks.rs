//! The guarantee holds inside listeners' callbacks: a pin, a checked copy or
//! a vm-memory access made in a commit phase never reaches the range in
//! flight (nor, with huge folios, the folios around it); a panicking
//! listener leaves the thread and the file usable, with state and mappings
//! agreeing; and callbacks of two files may nest.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::reads_ok;
use gmem::vm_memory::GuestMemoryGmem;
use gmem::{
    Attribute, ConversionListener, Flags, GuestMemfd, HostMapping, ListenerId, Options, PAGE_SIZE,
    Refusal,
};
use vm_memory::{Bytes, GuestAddress};

const P: u64 = PAGE_SIZE;
const EFAULT: i32 = 14;

fn shared_with(pages: u64, options: Options) -> Arc<GuestMemfd> {
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    Arc::new(GuestMemfd::with_options(pages * P, flags, options).unwrap())
}

fn shared(pages: u64) -> Arc<GuestMemfd> {
    shared_with(pages, Options::default())
}

fn huge() -> Options {
    Options::new().huge_folios(true)
}

/// Runs `act` in the commit phase of every conversion of its file and
/// keeps what it returned.
struct InCommit<T: Send> {
    act: Box<dyn Fn() -> T + Send + Sync>,
    seen: Mutex<Vec<T>>,
    id: OnceLock<ListenerId>,
}

impl<T: Send + 'static> InCommit<T> {
    fn on(mem: &GuestMemfd, act: impl Fn() -> T + Send + Sync + 'static) -> Arc<InCommit<T>> {
        let listener = Arc::new(InCommit {
            act: Box::new(act),
            seen: Mutex::new(Vec::new()),
            id: OnceLock::new(),
        });
        let id = mem.add_listener(listener.clone());
        listener.id.set(id).unwrap();
        listener
    }

    fn seen(&self) -> Vec<T> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl<T: Send> ConversionListener for InCommit<T> {
    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        let result = (self.act)();
        self.seen.lock().unwrap().push(result);
        Ok(())
    }
}

fn errno_of<T>(result: Result<T, gmem::Error>) -> Option<i32> {
    result.err().map(|err| err.errno())
}

#[test]
fn a_commit_phase_pin_of_the_range_in_flight_is_refused_and_maps_nothing() {
    let mem = shared(16);
    let file = mem.clone();
    // Pinned once before, so that the page has a reference word to map.
    drop(mem.pin(0, P).unwrap());
    let listener = InCommit::on(&mem, move || {
        // A pin kept through the conversion would be a pin of a private page.
        let pin = file.pin(0, P);
        let refused = errno_of(pin.as_ref().map(drop).map_err(Clone::clone));
        let write = pin.map(|pin| pin.write(0, b"secret?").is_ok());
        (refused, write.ok())
    });
    mem.set_attributes(0, P, Attribute::Private).unwrap();
    assert_eq!(listener.seen(), vec![(Some(EFAULT), None)]);
    assert_eq!(mem.attribute(0).unwrap(), Attribute::Private);
    // Nothing left the page mapped for the fast path.
    assert_eq!(errno_of(mem.pin(0, P)), Some(EFAULT));
    assert_eq!(errno_of(mem.pin(0, 16 * P)), Some(EFAULT));
    // Pages outside the range pin as before, in the commit phase too.
    let file = mem.clone();
    let outside = InCommit::on(&mem, move || errno_of(file.pin(8 * P, P)));
    mem.set_attributes(P, P, Attribute::Private).unwrap();
    assert_eq!(outside.seen(), vec![None]);
}

#[test]
fn a_commit_phase_read_through_the_vm_memory_view_leaves_nothing_readable() {
    let mem = shared(16);
    let view = Arc::new(
        GuestMemoryGmem::from_regions([(GuestAddress(0), mem.clone(), 0, 16 * P)]).unwrap(),
    );
    let seen_by = view.clone();
    let listener = InCommit::on(&mem, move || {
        seen_by.read_obj::<u64>(GuestAddress(8)).is_ok()
    });
    mem.set_attributes(0, P, Attribute::Private).unwrap();
    assert_eq!(
        listener.seen(),
        vec![false],
        "the view read the page in flight"
    );
    assert!(
        view.read_obj::<u64>(GuestAddress(8)).is_err(),
        "a private page is readable through the view"
    );
    assert!(view.write_obj(7u64, GuestAddress(8)).is_err());
    assert!(view.read_obj::<u64>(GuestAddress(P + 8)).is_ok());
}

#[test]
fn a_checked_read_in_the_commit_phase_is_efault_not_a_fault() {
    let mem = shared(16);
    let map = Arc::new(mem.mmap().unwrap());
    map.write(0, b"guest secret").unwrap();
    let reader = map.clone();
    let listener = InCommit::on(&mem, move || {
        let mut buf = [0u8; 12];
        let read = reader.read(0, &mut buf).map_err(|e| e.errno());
        let neighbour = reader.read(P, &mut buf).map_err(|e| e.errno());
        (read, neighbour)
    });
    mem.set_attributes(0, P, Attribute::Private).unwrap();
    assert_eq!(listener.seen(), vec![(Err(EFAULT), Ok(()))]);
    // To shared: the page is private until the point of no return.
    mem.set_attributes(0, P, Attribute::Shared).unwrap();
    assert_eq!(listener.seen(), vec![(Err(EFAULT), Ok(()))]);
    let mut buf = [0u8; 12];
    map.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"guest secret");
}

#[test]
fn huge_folios_a_commit_phase_pin_of_a_neighbour_never_corrupts_its_count() {
    // Chunk 0 is made (and huge) by a pin; chunk 1 is not made yet.
    let mem = shared_with(1024, huge());
    drop(mem.pin(5 * P, P).unwrap());
    mem.drain_pin_batches();
    assert_eq!(mem.stats().huge_folios, 1);
    let file = mem.clone();
    let neighbour = Arc::new(Mutex::new(5 * P));
    let at = neighbour.clone();
    // Pins the neighbour and keeps the pin past the conversion.
    let kept = Arc::new(Mutex::new(Vec::new()));
    let keep = kept.clone();
    let listener = InCommit::on(&mem, move || {
        let offset = *at.lock().unwrap();
        match file.pin_owned(offset, P) {
            Ok(pin) => {
                keep.lock().unwrap().push(pin);
                None
            }
            Err(err) => Some(err.errno()),
        }
    });
    // A neighbour in the huge folio being split: refused.
    mem.set_attributes(0, P, Attribute::Private).unwrap();
    // A neighbour in a chunk not made yet: granted, on a small folio.
    *neighbour.lock().unwrap() = 700 * P;
    mem.set_attributes(600 * P, P, Attribute::Private).unwrap();
    assert_eq!(listener.seen(), vec![Some(EFAULT), None]);
    assert!(mem.remove_listener(*listener.id.get().unwrap()));
    // The kept pin blocks its page, and its release leaves a usable count.
    assert_eq!(
        mem.set_attributes(700 * P, P, Attribute::Private)
            .unwrap_err()
            .errno(),
        11
    );
    kept.lock().unwrap().clear();
    mem.drain_pin_batches();
    assert_eq!(mem.stats().pins_live, 0);
    for page in [5, 100, 700, 701] {
        drop(mem.pin(page * P, P).unwrap());
        mem.set_attributes(page * P, P, Attribute::Private).unwrap();
        mem.set_attributes(page * P, P, Attribute::Shared).unwrap();
        drop(mem.pin(page * P, P).unwrap());
    }
}

/// Panics in the phase it is told to, once.
#[derive(Default)]
struct Panicking {
    phase: Mutex<Option<&'static str>>,
}

impl Panicking {
    fn arm(&self, phase: &'static str) {
        *self.phase.lock().unwrap() = Some(phase);
    }

    fn maybe_panic(&self, phase: &'static str) {
        let mut armed = self.phase.lock().unwrap();
        if *armed == Some(phase) {
            *armed = None;
            drop(armed);
            panic!("listener panics in {phase}");
        }
    }
}

impl ConversionListener for Panicking {
    fn before_private(&self, _: u64, _: u64) -> Result<(), Refusal> {
        self.maybe_panic("before");
        Ok(())
    }

    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        self.maybe_panic("commit");
        Ok(())
    }

    fn converted(&self, _: u64, _: u64, _: Attribute) {
        self.maybe_panic("converted");
    }
}

/// Converts with `listener` armed to panic in `phase`; the panic must
/// reach the caller.
fn convert_panicking(
    mem: &GuestMemfd,
    listener: &Panicking,
    phase: &'static str,
    page: u64,
    to: Attribute,
) {
    listener.arm(phase);
    let result = catch_unwind(AssertUnwindSafe(|| mem.set_attributes(page * P, P, to)));
    assert!(
        result.is_err(),
        "the panic in {phase} did not reach the caller"
    );
}

fn state_and_mapping_agree(mem: &GuestMemfd, map: &HostMapping, page: u64) {
    let shared = mem.attribute(page * P).unwrap() == Attribute::Shared;
    let mut buf = [0u8; 8];
    assert_eq!(
        map.read(page * P, &mut buf).is_ok(),
        shared,
        "checked read of page {page}"
    );
    assert_eq!(reads_ok(map, page * P), shared, "raw read of page {page}");
}

#[test]
fn a_panicking_listener_leaves_the_thread_and_the_file_usable() {
    let mem = shared(16);
    let map = mem.mmap().unwrap();
    let listener = Arc::new(Panicking::default());
    mem.add_listener(listener.clone());
    // A panic before the check or in the commit phase undoes the conversion.
    for (page, phase) in [(1, "before"), (2, "commit")] {
        convert_panicking(&mem, &listener, phase, page, Attribute::Private);
        assert_eq!(mem.attribute(page * P).unwrap(), Attribute::Shared);
        state_and_mapping_agree(&mem, &map, page);
    }
    // After `converted` the conversion stands.
    convert_panicking(&mem, &listener, "converted", 3, Attribute::Private);
    assert_eq!(mem.attribute(3 * P).unwrap(), Attribute::Private);
    state_and_mapping_agree(&mem, &map, 3);
    // To shared, refused in the commit phase by a panic: still private.
    convert_panicking(&mem, &listener, "commit", 3, Attribute::Shared);
    assert_eq!(mem.attribute(3 * P).unwrap(), Attribute::Private);
    state_and_mapping_agree(&mem, &map, 3);
    // The thread converts, queries and pins as before.
    for page in 1..4 {
        mem.set_attributes(page * P, P, Attribute::Private).unwrap();
        state_and_mapping_agree(&mem, &map, page);
        mem.set_attributes(page * P, P, Attribute::Shared).unwrap();
        state_and_mapping_agree(&mem, &map, page);
        drop(mem.pin(page * P, P).unwrap());
    }
    assert_eq!(mem.stats().refused, 0);
}

/// In its commit phase converts another file; of that file's callbacks,
/// queries the first.
struct Nesting {
    other: OnceLock<Arc<GuestMemfd>>,
    first: OnceLock<Arc<GuestMemfd>>,
    saw: Mutex<Vec<Attribute>>,
    outer: AtomicBool,
}

impl ConversionListener for Nesting {
    fn commit(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Refusal> {
        if self.outer.swap(false, Ordering::Relaxed) {
            let other = self.other.get().unwrap();
            other
                .set_attributes(offset, len, to)
                .map_err(|e| Refusal::new(e.to_string()))?;
        } else {
            let first = self.first.get().unwrap();
            self.saw
                .lock()
                .unwrap()
                .push(first.attribute(offset).unwrap());
            drop(
                first
                    .pin(8 * P, P)
                    .map_err(|e| Refusal::new(e.to_string()))?,
            );
        }
        Ok(())
    }
}

#[test]
fn callbacks_of_two_files_nest() {
    let (first, other) = (shared(16), shared(16));
    let listener = Arc::new(Nesting {
        other: OnceLock::new(),
        first: OnceLock::new(),
        saw: Mutex::new(Vec::new()),
        outer: AtomicBool::new(true),
    });
    listener.other.set(other.clone()).ok().unwrap();
    listener.first.set(first.clone()).ok().unwrap();
    first.add_listener(listener.clone());
    other.add_listener(listener.clone());
    let (done, finished) = mpsc::channel();
    let converting = first.clone();
    std::thread::spawn(move || {
        let result = converting.set_attributes(0, P, Attribute::Private);
        let _ = done.send(result);
    });
    let result = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("nested callbacks of two files deadlocked");
    result.unwrap();
    assert_eq!(*listener.saw.lock().unwrap(), vec![Attribute::Shared]);
    assert_eq!(first.attribute(0).unwrap(), Attribute::Private);
    assert_eq!(other.attribute(0).unwrap(), Attribute::Private);
}
