//! The fragmentation attack: a guest converts every other page of a large
//! file, one request at a time. With one VMA per private run this exhausted
//! `vm.max_map_count` and then the VMM (no thread, no mapping, no memory);
//! with guard markers every conversion succeeds and the VMA count stays flat.
//!
//! The only test of its binary: it forks, and a forked child of a process
//! with other busy test threads could inherit a held allocator lock.

use gmem::{Attribute, Flags, GuestMemfd, Hiding, PAGE_SIZE};

const GIB: u64 = 1 << 30;

/// (the process's VMAs, those mapping gmem's memfds).
fn vma_counts() -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let gmem = maps
        .lines()
        .filter(|line| line.contains("memfd:gmem"))
        .count();
    (maps.lines().count(), gmem)
}

/// In a forked child: 64 MiB of memory, a thread, another file and its
/// mapping. Returns whether the child managed all of it.
fn process_is_healthy() -> bool {
    // This binary runs one test, so no other thread holds a lock the child
    // needs; the child exits without returning.
    // SAFETY: fork in a process whose other threads hold no lock (above).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let healthy = std::panic::catch_unwind(|| {
            let memory = vec![1u8; 64 << 20];
            let thread = std::thread::spawn(move || memory.iter().map(|b| u64::from(*b)).sum());
            let sum: u64 = thread.join().unwrap();
            let other = GuestMemfd::new(16 * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED).unwrap();
            let map = other.mmap().unwrap();
            map.write(0, b"alive").unwrap();
            sum == 64 << 20
        });
        let code = if matches!(healthy, Ok(true)) { 0 } else { 1 };
        // SAFETY: leaving the child at once, without the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

#[test]
fn every_other_page_of_4_gib_private_in_two_mappings() {
    let size = 4 * GIB;
    let mem = GuestMemfd::new(size, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let maps = [mem.mmap().unwrap(), mem.mmap().unwrap()];
    if maps.iter().any(|map| map.hiding() != Hiding::GuardMarkers) {
        // Guards are refused here (a kernel before 6.15): the fallback's
        // budget stops the attack instead, as `hiding.rs` tests.
        assert!(
            std::env::var_os("GMEM_REQUIRE_GUARDS").is_none(),
            "guard markers required but refused by the kernel"
        );
        eprintln!("skipped: the kernel refuses guard markers on a shared memfd mapping");
        return;
    }
    maps[0].write(0, b"first").unwrap();
    let (before, file_before) = vma_counts();
    assert!(
        file_before >= 3,
        "two mappings and gmem's own: {file_before}"
    );
    let pages = size / PAGE_SIZE;
    for page in (1..pages).step_by(2) {
        mem.set_attributes(page * PAGE_SIZE, PAGE_SIZE, Attribute::Private)
            .unwrap_or_else(|err| panic!("conversion of page {page}: {err}"));
    }
    assert_eq!(mem.stats().pages_private, pages / 2);
    let (after, file_after) = vma_counts();
    assert_eq!(
        file_after, file_before,
        "the file's mappings were not split"
    );
    // The attribute map's 2 MiB of nodes may take an allocator region.
    assert!(after <= before + 4, "{before} VMAs became {after}");
    assert!(
        process_is_healthy(),
        "the fragmented process can still work"
    );
    let mut first = [0u8; 5];
    maps[1].read(0, &mut first).unwrap();
    assert_eq!(&first, b"first");
}
