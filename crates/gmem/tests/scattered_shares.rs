//! A confidential guest at scale: a 16 GiB file created private, two host
//! mappings, and the guest sharing one page in every 2 MiB (8,192 shares,
//! as `set_memory_decrypted` does for small buffers). Each share cuts a
//! remapped run in two while the file's VMA budget gives 2 VMAs a mapping,
//! and dissolves it into guards after: none is refused, the charge stays
//! within the budget, and the mappings' real VMAs with it.

use gmem::{Attribute, Flags, GuestMemfd, HostMapping, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
const GIB: u64 = 1 << 30;
const CHUNK: u64 = 2 << 20;

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

#[test]
fn a_guest_sharing_one_page_in_every_2_mib_of_16_gib_is_always_served() {
    let mem = GuestMemfd::new(16 * GIB, Flags::MMAP).unwrap();
    let maps = [mem.mmap().unwrap(), mem.mmap().unwrap()];
    let budget = mem.options().vma_budget.expect("the budget in force");
    let chunks = 16 * GIB / CHUNK;
    for chunk in 0..chunks {
        // Scattered within the chunk, so that no two shares meet.
        let offset = chunk * CHUNK + (1 + chunk % 500) * P;
        if let Err(err) = mem.set_attributes(offset, P, Attribute::Shared) {
            panic!("share {chunk} of {chunks} at {offset:#x}: {err}");
        }
    }
    let stats = mem.stats();
    assert_eq!(stats.pages_shared, chunks);
    assert!(
        stats.vmas_spent <= budget,
        "{} over {budget}",
        stats.vmas_spent
    );
    let real: u64 = maps.iter().map(vmas_in).sum();
    assert!(real <= budget + 2, "{real} VMAs for a budget of {budget}");
    for map in &maps {
        for chunk in [0, 1, chunks / 2, chunks - 1] {
            let offset = chunk * CHUNK + (1 + chunk % 500) * P;
            let mut buf = [0u8; 8];
            map.read(offset, &mut buf).unwrap();
            assert!(map.read(offset + P, &mut buf).is_err());
        }
    }
}
