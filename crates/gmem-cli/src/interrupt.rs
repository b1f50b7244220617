//! Ctrl-C for the long commands (`gmem run`, `gmem stress`): the first
//! `SIGINT` sets a flag that their loops poll, so they stop cleanly and
//! report what they did; a second ends the process at once. Other commands
//! keep the default, ending at the first.

use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status of a command stopped by Ctrl-C, as shells report a
/// process killed by `SIGINT` (128 + 2).
pub const EXIT_STATUS: u8 = 130;

/// Set by the first `SIGINT` once [`install`] has run; never cleared.
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Handles `SIGINT` from now on (on a thread of its own): the first sets
/// [`flag`], a second exits with [`EXIT_STATUS`].
pub fn install() -> Result<(), ctrlc::Error> {
    ctrlc::set_handler(|| {
        // Relaxed: the flag is a request, read by pollers that need no
        // other memory from this thread.
        if REQUESTED.swap(true, Ordering::Relaxed) {
            std::process::exit(i32::from(EXIT_STATUS));
        }
    })
}

/// The flag the first `SIGINT` sets, for loops to poll.
pub fn flag() -> &'static AtomicBool {
    &REQUESTED
}
