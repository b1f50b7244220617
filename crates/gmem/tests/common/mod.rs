//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test binary uses a different subset.

/// How a raw access in a child process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// The access completed.
    Ok,
    /// The child died of this signal.
    Signal(i32),
}

/// Reads (or writes, if `write`) one byte at `ptr` in a forked child and
/// reports whether it survived. The parent's memory is untouched by a read;
/// a write in the child reaches the parent only through a shared mapping.
pub fn access_in_child(ptr: *mut u8, write: bool) -> Access {
    // SAFETY: the child only touches `ptr` and calls `_exit`: no allocation,
    // no locks, so forking a multi-threaded test process is sound.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: the access may fault; that is what is being tested. The
        // child exits at once either way.
        unsafe {
            if write {
                std::ptr::write_volatile(ptr, 0x5a);
            } else {
                std::ptr::read_volatile(ptr);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid failed");
    if libc::WIFSIGNALED(status) {
        Access::Signal(libc::WTERMSIG(status))
    } else {
        assert_eq!(libc::WEXITSTATUS(status), 0);
        Access::Ok
    }
}

/// The byte at `offset` of a mapping, read in a child.
pub fn reads_ok(mapping: &gmem::HostMapping, offset: u64) -> bool {
    // SAFETY: only the address is computed here; the access is in the child.
    let ptr = unsafe { mapping.as_ptr().add(offset as usize) };
    match access_in_child(ptr, false) {
        Access::Ok => true,
        Access::Signal(libc::SIGBUS) => false,
        other => panic!("unexpected end of child: {other:?}"),
    }
}
