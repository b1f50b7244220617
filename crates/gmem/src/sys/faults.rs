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
