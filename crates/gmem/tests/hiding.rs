//! How host mappings hide private pages (section 4 of `guest_memfd.md` and
//! its **gmem:** notes): guard markers by default, the remap fallback under
//! a VMA budget, mappings shorter or longer than the file, and failed
//! conversions that no raw access can see.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use common::{private_fault, read_fault, reads_ok};
use gmem::{Attribute, ConversionError, Flags, GuestMemfd, Hiding, Options, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn file(pages: u64, flags: Flags, hiding: Option<Hiding>, vma_budget: Option<u64>) -> GuestMemfd {
    let options = Options::new().hiding(hiding).vma_budget(vma_budget);
    GuestMemfd::with_options(pages * P, flags, options).unwrap()
}

fn shared(pages: u64) -> GuestMemfd {
    file(pages, Flags::MMAP | Flags::INIT_SHARED, None, None)
}

#[test]
fn guard_markers_are_the_default_and_fault_with_sigsegv() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    assert_eq!(map.hiding(), Hiding::GuardMarkers);
    mem.set_attributes(P, P, Attribute::Private).unwrap();
    assert_eq!(read_fault(&map, P), Some(libc::SIGSEGV));
    assert_eq!(read_fault(&map, 0), None);
    let stats = mem.stats();
    assert_eq!((stats.mappings_guarded, stats.mappings_remapped), (1, 0));
    assert_eq!(stats.vmas_spent, 0, "guard markers spend no VMA");
}

#[test]
fn the_fallback_faults_with_sigbus_and_is_charged() {
    let mem = file(
        8,
        Flags::MMAP | Flags::INIT_SHARED,
        Some(Hiding::EmptyFileRemap),
        None,
    );
    let map = mem.mmap().unwrap();
    assert_eq!(map.hiding(), Hiding::EmptyFileRemap);
    mem.set_attributes(P, P, Attribute::Private).unwrap();
    mem.set_attributes(4 * P, P, Attribute::Private).unwrap();
    assert_eq!(read_fault(&map, P), Some(libc::SIGBUS));
    let stats = mem.stats();
    assert_eq!((stats.mappings_guarded, stats.mappings_remapped), (0, 1));
    assert_eq!(stats.vmas_spent, 5, "two private runs: at most 5 VMAs");
    drop(map);
    assert_eq!(mem.stats().vmas_spent, 0);
}

/// A mapping shorter than the file takes part in conversions beyond its end
/// (which it does not cover), for files created shared or private.
#[test]
fn mappings_shorter_than_the_file_follow_conversions() {
    for hiding in [Hiding::GuardMarkers, Hiding::EmptyFileRemap] {
        let mem = file(16, Flags::MMAP | Flags::INIT_SHARED, Some(hiding), None);
        let short = mem.mmap_len(4096).unwrap();
        mem.set_attributes(8 * P, P, Attribute::Private).unwrap();
        mem.set_attributes(0, 16 * P, Attribute::Private).unwrap();
        assert!(!reads_ok(&short, 0));
        mem.set_attributes(0, 16 * P, Attribute::Shared).unwrap();
        assert!(reads_ok(&short, 0));

        let private = file(16, Flags::MMAP, Some(hiding), None);
        let short = private.mmap_len(4 * P).unwrap();
        assert_eq!(read_fault(&short, 3 * P), Some(private_fault(&short)));
        private
            .set_attributes(2 * P, 8 * P, Attribute::Shared)
            .unwrap();
        assert!(reads_ok(&short, 3 * P) && !reads_ok(&short, P));
    }
}

/// A mapping longer than the file: pages inside follow their state, pages
/// past the end raise SIGBUS whatever the mechanism.
#[test]
fn mappings_longer_than_the_file_keep_sigbus_past_the_end() {
    for hiding in [Hiding::GuardMarkers, Hiding::EmptyFileRemap] {
        let mem = file(2, Flags::MMAP | Flags::INIT_SHARED, Some(hiding), None);
        let long = mem.mmap_len(4 * P).unwrap();
        mem.set_attributes(P, P, Attribute::Private).unwrap();
        assert_eq!(read_fault(&long, P), Some(private_fault(&long)));
        assert_eq!(read_fault(&long, 2 * P), Some(libc::SIGBUS));
        assert_eq!(read_fault(&long, 4 * P - 1), Some(libc::SIGBUS));
        assert!(reads_ok(&long, 0));
    }
}

/// A pinned page read with raw loads through a host mapping while two
/// threads keep failing to convert it never faults: a failed conversion
/// leaves no trace a raw access can see.
#[test]
fn failed_conversions_never_fault_a_page_that_stays_shared() {
    const ATTEMPTS: u64 = 2_000;
    for hiding in [Hiding::GuardMarkers, Hiding::EmptyFileRemap] {
        let mem = file(4, Flags::MMAP | Flags::INIT_SHARED, Some(hiding), None);
        let map = mem.mmap().unwrap();
        map.write(P, &[0x5a; 8]).unwrap();
        let pin = mem.pin(P, P).unwrap();
        let done = AtomicBool::new(false);
        let eagain = AtomicU64::new(0);
        thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..ATTEMPTS {
                        let err = mem.set_attributes(P, P, Attribute::Private).unwrap_err();
                        assert!(matches!(err, ConversionError::Again { error_offset: P }));
                        eagain.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            s.spawn(|| {
                let mut loads = 0u64;
                while !done.load(Ordering::Relaxed) || loads == 0 {
                    // A fault here kills the test process: that is the failure.
                    // SAFETY: page 1 is inside the mapping, and pinned shared.
                    let byte = unsafe { std::ptr::read_volatile(map.as_ptr().add(P as usize)) };
                    assert_eq!(byte, 0x5a);
                    loads += 1;
                }
            });
            while eagain.load(Ordering::Relaxed) < 2 * ATTEMPTS {
                thread::yield_now();
            }
            done.store(true, Ordering::Relaxed);
        });
        drop(pin);
        mem.set_attributes(P, P, Attribute::Private).unwrap();
    }
}

/// The fallback forced on, and a guest that fragments the file page by
/// page: the budget stops it with a typed ENOMEM before anything changed,
/// and the process stays healthy.
#[test]
fn the_vma_budget_stops_a_fragmenting_guest() {
    const BUDGET: u64 = 402;
    let mem = file(
        1024,
        Flags::MMAP | Flags::INIT_SHARED,
        Some(Hiding::EmptyFileRemap),
        Some(BUDGET),
    );
    let maps = [mem.mmap().unwrap(), mem.mmap().unwrap()];
    let mut page = 1;
    let err = loop {
        match mem.set_attributes(page * P, P, Attribute::Private) {
            Ok(()) => page += 2,
            Err(err) => break err,
        }
    };
    // Two mappings at 2 * runs + 1 VMAs each: 100 runs fit in 402.
    assert_eq!(page, 201, "stopped at the 101st private run");
    assert_eq!(err.errno(), libc::ENOMEM);
    assert_eq!(err.error_offset(), page * P);
    assert!(
        matches!(
            err,
            ConversionError::VmaBudget {
                needed: 406,
                budget: BUDGET,
                ..
            }
        ),
        "{err}"
    );
    // Nothing changed: the page is shared, readable in both mappings.
    assert_eq!(mem.attribute(page * P).unwrap(), Attribute::Shared);
    assert!(maps.iter().all(|map| reads_ok(map, page * P)));
    let stats = mem.stats();
    assert_eq!((stats.pages_private, stats.vmas_spent), (100, 402));
    // Counted in the mappings' own ranges: other tests map meanwhile.
    assert!(maps.iter().map(vmas_in).sum::<usize>() <= 2 * (2 * 100 + 1));
    // A conversion that merges runs needs less and still goes through.
    mem.set_attributes(2 * P, P, Attribute::Private).unwrap();
    // A third fallback mapping would not fit either.
    assert_eq!(mem.mmap().unwrap_err().errno(), libc::ENOMEM);
    // The process is healthy: a thread, memory, another file and mapping.
    let other = thread::spawn(|| shared(4).mmap().map(|m| m.len()))
        .join()
        .unwrap();
    assert_eq!(other.unwrap(), 4 * P);
    assert_eq!(
        vec![1u8; 64 << 20].iter().map(|b| *b as u64).sum::<u64>(),
        64 << 20
    );
}

/// A guard-marker mapping that the VMM mlocks afterwards: the kernel
/// refuses new guards, so conversions fail with EINVAL and change nothing;
/// after munlock they go through.
#[test]
fn an_mlocked_guard_mapping_refuses_conversions_cleanly() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    assert_eq!(map.hiding(), Hiding::GuardMarkers);
    // SAFETY: locking and unlocking pages of our own mapping changes no byte.
    let locked = unsafe { libc::mlock(map.as_ptr().cast(), map.len() as usize) };
    if locked != 0 {
        // No CAP_IPC_LOCK and a small RLIMIT_MEMLOCK: nothing to test.
        eprintln!(
            "skipped: mlock refused ({})",
            std::io::Error::last_os_error()
        );
        return;
    }
    let err = mem.set_attributes(P, P, Attribute::Private).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    assert!(matches!(err, ConversionError::Os { .. }), "{err}");
    assert_eq!(mem.attribute(P).unwrap(), Attribute::Shared);
    assert!(reads_ok(&map, P));
    // SAFETY: as above.
    let unlocked = unsafe { libc::munlock(map.as_ptr().cast(), map.len() as usize) };
    assert_eq!(unlocked, 0);
    mem.set_attributes(P, P, Attribute::Private).unwrap();
    assert!(!reads_ok(&map, P));
}

/// Punching a hole frees pages but keeps their state: a private page stays
/// hidden in every mapping, by either mechanism, and reads zero once shared.
#[test]
fn a_punched_private_page_stays_hidden() {
    for hiding in [Hiding::GuardMarkers, Hiding::EmptyFileRemap] {
        let mem = file(4, Flags::MMAP | Flags::INIT_SHARED, Some(hiding), None);
        let map = mem.mmap().unwrap();
        map.write(P, b"secret").unwrap();
        mem.set_attributes(P, P, Attribute::Private).unwrap();
        mem.punch_hole(0, 4 * P).unwrap();
        assert_eq!(read_fault(&map, P), Some(private_fault(&map)), "{hiding:?}");
        assert!(reads_ok(&map, 0));
        mem.set_attributes(P, P, Attribute::Shared).unwrap();
        let mut buf = [1u8; 6];
        map.read(P, &mut buf).unwrap();
        assert_eq!(buf, [0; 6]);
    }
}

/// The VMAs inside `map`'s address range.
fn vmas_in(map: &gmem::HostMapping) -> usize {
    let (start, end) = (map.as_ptr() as u64, map.as_ptr() as u64 + map.len());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let range = |line: &str| {
        let (from, to) = line.split_whitespace().next()?.split_once('-')?;
        Some((
            u64::from_str_radix(from, 16).ok()?,
            u64::from_str_radix(to, 16).ok()?,
        ))
    };
    let inside = |(from, to): (u64, u64)| from >= start && to <= end;
    maps.lines()
        .filter_map(range)
        .filter(|r| inside(*r))
        .count()
}

/// A large file created private (as a confidential guest's memory starts):
/// mapping it hides the one run with a remap (no page table per page), and
/// the guest sharing a page inside cuts that run in two, charged 2 VMAs more.
#[test]
fn a_large_private_file_is_hidden_by_one_remap_and_cut_by_shares() {
    const GIB: u64 = 1 << 30;
    let mem = GuestMemfd::new(GIB, Flags::MMAP).unwrap();
    let map = mem.mmap().unwrap();
    assert_eq!(map.hiding(), Hiding::GuardMarkers);
    assert_eq!(mem.stats().vmas_spent, 2, "one remapped run");
    assert_eq!(vmas_in(&map), 1, "one VMA for the whole file");
    assert_eq!(read_fault(&map, GIB / 2), Some(libc::SIGBUS));

    let page = GIB / 2;
    mem.set_attributes(page, P, Attribute::Shared).unwrap();
    assert_eq!(mem.stats().vmas_spent, 4, "the run cut in two");
    assert_eq!(vmas_in(&map), 3);
    map.write(page, b"shared").unwrap();
    assert!(reads_ok(&map, page));
    assert!(!reads_ok(&map, page - P) && !reads_ok(&map, page + P));
    assert!(!reads_ok(&map, 0) && !reads_ok(&map, GIB - P));

    mem.set_attributes(page, P, Attribute::Private).unwrap();
    assert_eq!(
        read_fault(&map, page),
        Some(libc::SIGSEGV),
        "a small run: guards"
    );
    mem.set_attributes(0, GIB, Attribute::Shared).unwrap();
    assert_eq!(mem.stats().vmas_spent, 0);
    let mut buf = [0u8; 6];
    map.read(page, &mut buf).unwrap();
    assert_eq!(&buf, b"shared");
    assert!(reads_ok(&map, 0) && reads_ok(&map, GIB - P));
}

/// A guard-marker mapping whose VMA budget is spent hides further large runs
/// with guards instead, and a share that would cut a remapped run in two
/// puts the run back to the file with guards on its remnants: no VMA more,
/// no refusal.
#[test]
fn a_guard_mapping_out_of_budget_falls_back_to_guards() {
    const RUN: u64 = 600;
    let mem = file(4 * RUN, Flags::MMAP | Flags::INIT_SHARED, None, Some(4));
    let map = mem.mmap().unwrap();
    for run in [0, 2] {
        mem.set_attributes(run * RUN * P, RUN * P, Attribute::Private)
            .unwrap();
    }
    assert_eq!(mem.stats().vmas_spent, 4, "two remapped runs: the budget");
    mem.set_attributes(RUN * P + P, RUN * P - 2 * P, Attribute::Private)
        .unwrap();
    assert_eq!(mem.stats().vmas_spent, 4, "the third large run has guards");
    assert_eq!(read_fault(&map, RUN * P + 2 * P), Some(libc::SIGSEGV));
    assert_eq!(read_fault(&map, 10 * P), Some(libc::SIGBUS));

    let vmas = vmas_in(&map);
    mem.set_attributes(10 * P, P, Attribute::Shared).unwrap();
    assert!(reads_ok(&map, 10 * P));
    for page in [0, 9, 11, RUN - 1] {
        assert_eq!(
            read_fault(&map, page * P),
            Some(libc::SIGSEGV),
            "page {page}"
        );
    }
    assert_eq!(mem.stats().vmas_spent, 2, "one remapped run left");
    assert!(vmas_in(&map) <= vmas, "no VMA more");
    // Sharing the end of the other remapped run needs no new VMA.
    mem.set_attributes(2 * RUN * P, P, Attribute::Shared)
        .unwrap();
    assert!(reads_ok(&map, 2 * RUN * P) && !reads_ok(&map, (2 * RUN + 1) * P));
    assert_eq!(mem.stats().vmas_spent, 2);
}

/// A confidential guest's memory starts private; the guest then shares one
/// page in every 2 MiB, scattered. Every share succeeds, in two mappings,
/// with VMAs never over the budget: once it is spent, a cut run goes back to
/// the file with guards on its remnants.
#[test]
fn scattered_shares_of_a_large_private_file_never_fail_for_vmas() {
    const CHUNK: u64 = 512;
    const CHUNKS: u64 = 512;
    const BUDGET: u64 = 41;
    let mem = file(CHUNK * CHUNKS, Flags::MMAP, None, Some(BUDGET));
    let maps = [mem.mmap().unwrap(), mem.mmap().unwrap()];
    // Scattered: every other chunk in one pass, then the rest.
    let order = (0..CHUNKS).step_by(2).chain((1..CHUNKS).step_by(2));
    for chunk in order {
        let page = chunk * CHUNK + 7 + chunk % 300;
        mem.set_attributes(page * P, P, Attribute::Shared)
            .unwrap_or_else(|err| panic!("share of page {page}: {err}"));
        assert!(mem.stats().vmas_spent <= BUDGET);
    }
    assert_eq!(mem.stats().pages_shared, CHUNKS);
    let vmas: usize = maps.iter().map(vmas_in).sum();
    assert!(
        vmas as u64 <= BUDGET + 2,
        "{vmas} VMAs on a budget of {BUDGET}"
    );
    for map in &maps {
        for chunk in [0, 1, 255, 511] {
            let page = chunk * CHUNK + 7 + chunk % 300;
            assert!(reads_ok(map, page * P), "shared page {page}");
            assert!(!reads_ok(map, (page + 1) * P), "private page {}", page + 1);
            assert!(!reads_ok(map, (page - 1) * P), "private page {}", page - 1);
        }
    }
}

/// Refuses every conversion in its commit phase.
struct RefusingCommits;

impl gmem::ConversionListener for RefusingCommits {
    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), gmem::Refusal> {
        Err(gmem::Refusal::new("refused"))
    }
}

/// Shares refused in the commit phase would merge runs: each is undone,
/// and the charge never drops below the VMAs the fallback mappings really
/// have (counted in `/proc/self/maps`), so they never pass the budget.
#[test]
fn refused_shares_keep_the_vma_charge_true() {
    const BUDGET: u64 = 41;
    let mem = file(
        256,
        Flags::MMAP | Flags::INIT_SHARED,
        Some(Hiding::EmptyFileRemap),
        Some(BUDGET),
    );
    let map = mem.mmap().unwrap();
    // 20 private runs: 41 VMAs, the whole budget.
    for run in 0..20 {
        mem.set_attributes((2 * run + 1) * P, P, Attribute::Private)
            .unwrap();
    }
    assert_eq!(vmas_in(&map), 41);
    mem.add_listener(std::sync::Arc::new(RefusingCommits));
    for round in 0..10 {
        // Sharing pages 1..39 would leave one run: refused, undone.
        let err = mem
            .set_attributes(P, 38 * P, Attribute::Shared)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EBUSY, "round {round}: {err}");
        let real = vmas_in(&map) as u64;
        let charged = mem.stats().vmas_spent;
        assert!(
            real <= charged && charged <= BUDGET,
            "round {round}: {real} VMAs, charged {charged}"
        );
    }
    // The budget still stops a further run.
    let err = mem
        .set_attributes(100 * P, P, Attribute::Private)
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOMEM);
    assert!(vmas_in(&map) as u64 <= BUDGET);
}
