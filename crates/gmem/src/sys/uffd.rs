//! The leaf of `userfaultfd(2)`: a probe of whether this host delivers a
//! page fault on a shared memfd mapping to a handler, and lets it resolve
//! the fault. Missing faults, resolved by `UFFDIO_COPY`, are what a lazy
//! restore into a memfd needs; minor faults on shmem, resolved by
//! `UFFDIO_CONTINUE`, are the other mode a design could use.
//!
//! The probe makes its own one-page memfd, mapping and userfaultfd, and
//! leaves nothing behind.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::MappedRegion;
use crate::PAGE_SIZE;

/// Which kind of fault the probe takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultMode {
    /// A page not in the file (`UFFD_FEATURE_MISSING_SHMEM`,
    /// `UFFDIO_REGISTER_MODE_MISSING`), filled by `UFFDIO_COPY`.
    Missing,
    /// A page in the file's page cache but not mapped
    /// (`UFFD_FEATURE_MINOR_SHMEM`, `UFFDIO_REGISTER_MODE_MINOR`), mapped by
    /// `UFFDIO_CONTINUE`.
    Minor,
}

/// The step of the probe that failed, and its errno.
pub(crate) type Failure = (&'static str, Errno);

const UFFD_API: u64 = 0xaa;
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_MINOR: u64 = 1 << 2;
const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
/// The bits of `UFFDIO_COPY` and `UFFDIO_CONTINUE` in a registration's
/// ioctls.
const IOCTL_COPY: u64 = 1 << 3;
const IOCTL_CONTINUE: u64 = 1 << 7;
/// The byte the probe's page holds, and the faulting thread must read.
const MARK: u8 = 0x5a;
/// How long the probe waits for the fault.
const WAIT: Duration = Duration::from_secs(2);

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Continue {
    range: Range,
    mode: u64,
    mapped: i64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFDIO_API: libc::Ioctl = libc::_IOWR::<Api>(0xaa, 0x3f);
const UFFDIO_REGISTER: libc::Ioctl = libc::_IOWR::<Register>(0xaa, 0x00);
const UFFDIO_COPY: libc::Ioctl = libc::_IOWR::<Copy>(0xaa, 0x03);
const UFFDIO_CONTINUE: libc::Ioctl = libc::_IOWR::<Continue>(0xaa, 0x07);
const USERFAULTFD_IOC_NEW: libc::Ioctl = libc::_IO(0xaa, 0x00);

/// `ioctl(fd, request, arg)`.
fn ioctl<T>(fd: BorrowedFd<'_>, request: libc::Ioctl, arg: &mut T) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    // Every request used here takes a pointer to the `repr(C)` struct of
    // its definition, which `arg` is.
    // SAFETY: the kernel writes only inside `*arg`, which we own mutably.
    let done = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if done < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    Ok(())
}

/// A new userfaultfd, non-blocking: by the system call, or else (when it is
/// refused, as to an unprivileged process) from `/dev/userfaultfd`.
fn open() -> Result<OwnedFd, Failure> {
    use rustix::mm::UserfaultfdFlags;
    let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    // SAFETY: the descriptor only handles faults of the probe's own mapping.
    let by_call = unsafe { rustix::mm::userfaultfd(flags) };
    let errno = match by_call {
        Ok(fd) => return Ok(fd),
        Err(errno) => errno,
    };
    let flags = rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC;
    let Ok(dev) = rustix::fs::open("/dev/userfaultfd", flags, rustix::fs::Mode::empty()) else {
        return Err(("userfaultfd(2), and opening /dev/userfaultfd", errno));
    };
    use std::os::fd::{AsRawFd, FromRawFd};
    let new_flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // USERFAULTFD_IOC_NEW takes its flags by value.
    // SAFETY: no memory is passed; the new descriptor is owned by nothing else.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, new_flags) };
    if fd < 0 {
        return Err(("USERFAULTFD_IOC_NEW on /dev/userfaultfd", last_errno()));
    }
    // SAFETY: `fd` was just returned to this process, open, and unowned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Whether a fault of `mode` on a shared memfd mapping reaches a handler
/// and is resolved: the faulting thread must read the page's contents.
pub(crate) fn probe(mode: FaultMode) -> Result<(), Failure> {
    let (feature, register_mode, needed) = match mode {
        FaultMode::Missing => (FEATURE_MISSING_SHMEM, REGISTER_MODE_MISSING, IOCTL_COPY),
        FaultMode::Minor => (FEATURE_MINOR_SHMEM, REGISTER_MODE_MINOR, IOCTL_CONTINUE),
    };
    let uffd = open()?;
    let mut api = Api {
        api: UFFD_API,
        features: feature,
        ioctls: 0,
    };
    ioctl(uffd.as_fd(), UFFDIO_API, &mut api).map_err(|e| ("UFFDIO_API with the feature", e))?;
    let page = PAGE_SIZE as usize;
    let memfd = rustix::fs::memfd_create("gmem-uffd-probe", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| ("memfd_create", e))?;
    rustix::fs::ftruncate(&memfd, PAGE_SIZE).map_err(|e| ("ftruncate", e))?;
    if mode == FaultMode::Minor {
        // Minor faults are for pages already in the page cache.
        rustix::io::pwrite(&memfd, &[MARK], 0).map_err(|e| ("pwrite", e))?;
    }
    let region = MappedRegion::map_shared(memfd.as_fd(), page).map_err(|e| ("mmap", e))?;
    let addr = region.as_ptr() as u64;
    let range = Range {
        start: addr,
        len: PAGE_SIZE,
    };
    let mut register = Register {
        range,
        mode: register_mode,
        ioctls: 0,
    };
    ioctl(uffd.as_fd(), UFFDIO_REGISTER, &mut register).map_err(|e| ("UFFDIO_REGISTER", e))?;
    if register.ioctls & needed == 0 {
        return Err(("the registration's ioctls", Errno::OPNOTSUPP));
    }
    let mut uffd = Some(uffd);
    let (resolved, read) = std::thread::scope(|scope| {
        let toucher = scope.spawn(move || {
            // `region` is joined before it is dropped.
            // SAFETY: `addr` is the start of `region`, a live one-page mapping.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        let resolved = resolve(uffd.as_ref().expect("open").as_fd(), mode, addr);
        // Closing the userfaultfd wakes the thread if the fault was not
        // resolved: it then faults as if nothing were registered.
        drop(uffd.take());
        (resolved, toucher.join())
    });
    drop(region);
    resolved?;
    match read {
        Ok(MARK) => Ok(()),
        Ok(_) => Err(("reading the page after the fault", Errno::IO)),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Waits for the fault on the page at `addr` and resolves it.
fn resolve(uffd: BorrowedFd<'_>, mode: FaultMode, addr: u64) -> Result<(), Failure> {
    let mut msg = [0u8; 32];
    let started = Instant::now();
    loop {
        match rustix::io::read(uffd, &mut msg) {
            Ok(32) => break,
            Ok(_) => return Err(("reading the fault message", Errno::IO)),
            Err(Errno::AGAIN | Errno::INTR) if started.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(Errno::AGAIN) => return Err(("waiting for the fault", Errno::TIMEDOUT)),
            Err(errno) => return Err(("reading the fault message", errno)),
        }
    }
    let flags = u64::from_ne_bytes(msg[8..16].try_into().expect("8 bytes"));
    let at = u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes"));
    let minor = flags & PAGEFAULT_FLAG_MINOR != 0;
    if msg[0] != EVENT_PAGEFAULT
        || at & !(PAGE_SIZE - 1) != addr
        || minor != (mode == FaultMode::Minor)
    {
        return Err(("the fault message", Errno::PROTO));
    }
    let range = Range {
        start: addr,
        len: PAGE_SIZE,
    };
    match mode {
        FaultMode::Minor => {
            let mut cont = Continue {
                range,
                mode: 0,
                mapped: 0,
            };
            ioctl(uffd, UFFDIO_CONTINUE, &mut cont).map_err(|e| ("UFFDIO_CONTINUE", e))
        }
        FaultMode::Missing => {
            let contents = vec![MARK; PAGE_SIZE as usize];
            let src = contents.as_ptr() as u64;
            let mut copy = Copy {
                dst: addr,
                src,
                len: PAGE_SIZE,
                mode: 0,
                copy: 0,
            };
            ioctl(uffd, UFFDIO_COPY, &mut copy).map_err(|e| ("UFFDIO_COPY", e))
        }
    }
}

#[cfg(test)]
/// The features this host's userfaultfd offers (`UFFDIO_API` asking for
/// none lists them).
pub(crate) fn features() -> Result<u64, Failure> {
    let uffd = open()?;
    let mut api = Api {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    ioctl(uffd.as_fd(), UFFDIO_API, &mut api).map_err(|e| ("UFFDIO_API", e))?;
    Ok(api.features)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe passes exactly when the host lists its feature; each one
    /// answers without hanging or leaving a thread blocked.
    #[test]
    fn a_probe_passes_where_the_host_lists_its_feature() {
        let Ok(features) = features() else {
            // No userfaultfd at all: every probe says so at its first step.
            for mode in [FaultMode::Missing, FaultMode::Minor] {
                assert!(probe(mode).unwrap_err().0.contains("userfaultfd"));
            }
            return;
        };
        for (mode, feature) in [
            (FaultMode::Missing, FEATURE_MISSING_SHMEM),
            (FaultMode::Minor, FEATURE_MINOR_SHMEM),
        ] {
            let probed = probe(mode);
            assert_eq!(
                probed.is_ok(),
                features & feature != 0,
                "{mode:?}: {probed:?}"
            );
        }
    }
}
