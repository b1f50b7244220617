//! The atomics of the reference protocol, through a shim so that `loom` can
//! replace them (`RUSTFLAGS="--cfg loom"`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Lets another thread run while we wait for a flag.
#[cfg(not(loom))]
pub(crate) fn yield_now() {
    std::hint::spin_loop();
    std::thread::yield_now();
}
