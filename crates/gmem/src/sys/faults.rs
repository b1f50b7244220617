//! Fault injection for the calls that hide and show ranges: a unit test
//! makes the nth such call of its thread fail, to test every undo path.

use rustix::io::Errno;

/// The plan of a test thread: which call fails first, with which errno,
/// whether every later call fails too; and the calls made so far.
#[cfg(test)]
#[derive(Clone, Copy)]
struct Plan {
    fail_in: Option<u32>,
    errno: Errno,
    persistent: bool,
    calls: u32,
}

#[cfg(test)]
thread_local! {
    static PLAN: std::cell::Cell<Plan> = const {
        std::cell::Cell::new(Plan { fail_in: None, errno: Errno::IO, persistent: false, calls: 0 })
    };
}

/// Makes the `nth` hide/show call of this thread from now fail with
/// `errno` (0: the next one), and every later one too if `persistent`;
/// restarts the count of calls.
#[cfg(test)]
pub(crate) fn fail_nth(nth: u32, errno: Errno, persistent: bool) {
    PLAN.set(Plan {
        fail_in: Some(nth),
        errno,
        persistent,
        calls: 0,
    });
}

/// Stops injecting; returns the calls made since `fail_nth`.
#[cfg(test)]
pub(crate) fn stop() -> u32 {
    let plan = PLAN.get();
    PLAN.set(Plan {
        fail_in: None,
        calls: 0,
        ..plan
    });
    plan.calls
}

/// Called before each hide/show system call.
#[cfg(test)]
pub(crate) fn injected() -> Result<(), Errno> {
    let mut plan = PLAN.get();
    plan.calls += 1;
    let result = match plan.fail_in {
        Some(0) => {
            plan.fail_in = plan.persistent.then_some(0);
            Err(plan.errno)
        }
        Some(n) => {
            plan.fail_in = Some(n - 1);
            Ok(())
        }
        None => Ok(()),
    };
    PLAN.set(plan);
    result
}

/// Called before each hide/show system call (never fails outside tests).
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn injected() -> Result<(), Errno> {
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Whether this thread's `process_madvise` calls answer `ENOSYS`, and
    /// how many have.
    static NO_PROCESS_MADVISE: std::cell::Cell<(bool, u32)> = const { std::cell::Cell::new((false, 0)) };
}

/// Makes this thread's `process_madvise` calls answer `ENOSYS` (as under a
/// seccomp filter that hides it, or valgrind), or not; returns how many
/// answered so since the last call.
#[cfg(test)]
pub(crate) fn hide_process_madvise(hidden: bool) -> u32 {
    NO_PROCESS_MADVISE.replace((hidden, 0)).1
}

/// Called before each `process_madvise`: `ENOSYS` where a test hid it.
#[cfg(test)]
pub(crate) fn process_madvise_hidden() -> Result<(), Errno> {
    let (hidden, refused) = NO_PROCESS_MADVISE.get();
    if !hidden {
        return Ok(());
    }
    NO_PROCESS_MADVISE.set((hidden, refused + 1));
    Err(Errno::NOSYS)
}

/// Called before each `process_madvise` (never fails outside tests).
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn process_madvise_hidden() -> Result<(), Errno> {
    Ok(())
}
