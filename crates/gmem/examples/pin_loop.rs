//! Pins and unpins one page in a loop: a target for profilers
//! (`valgrind --tool=callgrind target/release/examples/pin_loop`).

use gmem::{Flags, GuestMemfd, PAGE_SIZE};

fn main() -> Result<(), gmem::Error> {
    let mem = GuestMemfd::new(512 * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED)?;
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    for _ in 0..rounds {
        drop(std::hint::black_box(mem.pin(0, 1)?));
    }
    println!("{} pins, {:?}", rounds, mem.stats().pins_live);
    Ok(())
}
