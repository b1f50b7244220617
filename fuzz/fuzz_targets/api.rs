//! The API driven by arbitrary operation sequences against the reference
//! model of `gmem::testing` (the model proptest's driver): conversions both
//! ways, pins and unpins, punches, allocations, copies through host mappings
//! (full, short, long) and pins, mappings made and dropped, listeners that
//! record and refuse, and file creation. Any disagreement panics.

#![no_main]

use gmem::testing::{Case, run};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: Case| {
    if let Err(e) = run(&case) {
        panic!("gmem disagrees with the model: {e}");
    }
});
