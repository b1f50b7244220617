//! `HostSupport::probe` leaves the process as it found it: the kick signal's
//! handler restored, no thread left behind. One test in its own binary, so
//! that no other test's threads or signals interfere.

#[path = "common/kvm.rs"]
mod kvm;

use gmem::kvm::HostSupport;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The handler of `signal` now.
fn handler(signal: i32) -> libc::sighandler_t {
    // SAFETY: `sigaction` is plain old data: all zeroes is a valid value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `action`.
    let ret = unsafe { libc::sigaction(signal, std::ptr::null(), &mut action) };
    assert_eq!(ret, 0);
    action.sa_sigaction
}

#[test]
fn the_probe_restores_the_kick_handler_and_joins_its_thread() {
    let signal = libc::SIGRTMIN() + 7;
    assert_eq!(signal, HostSupport::kick_signal());
    // The process ignores the signal before the probe.
    // SAFETY: SIG_IGN is a valid disposition for a real-time signal.
    let previous = unsafe { libc::signal(signal, libc::SIG_IGN) };
    assert_ne!(previous, libc::SIG_ERR);
    let before = threads();
    let Some(support) = kvm::host() else {
        return;
    };
    assert_eq!(handler(signal), libc::SIG_IGN, "{support:?}");
    assert_eq!(threads(), before, "the probe left a thread behind");
    // Later calls return the first result and change nothing.
    assert_eq!(HostSupport::probe().unwrap(), support);
    assert_eq!(handler(signal), libc::SIG_IGN);
}
