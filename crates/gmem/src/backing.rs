//! Backings: the file that holds the bytes of guest memory.
//!
//! A backing is a file with `mmap` and `fallocate` of a fixed size: a sealed
//! `memfd`, or a kernel `guest_memfd` (created `MMAP | INIT_SHARED`, so the
//! host may map every page and gmem's attribute map alone decides which it
//! may touch). Everything above this module treats the two alike.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
#[cfg(feature = "kvm")]
use rustix::io::Errno;

use crate::Error;
#[cfg(feature = "kvm")]
use crate::sys::MappedRegion;

/// What kind of file backs a [`GuestMemfd`](crate::GuestMemfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A sealed `memfd`: no KVM needed.
    Memfd,
    /// A kernel `guest_memfd` made by `KVM_CREATE_GUEST_MEMFD`.
    KernelGuestMemfd,
}

/// The owned file of guest memory.
#[derive(Debug)]
pub(crate) struct Backing {
    fd: OwnedFd,
    kind: BackingKind,
    /// The KVM VM a kernel guest_memfd belongs to.
    owner_vm: Option<u64>,
}

impl Backing {
    /// A new sealed memfd of `size` bytes: it can never grow or shrink.
    pub(crate) fn memfd(size: u64) -> Result<Backing, Error> {
        let fd = rustix::fs::memfd_create("gmem", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(Error::os("memfd_create"))?;
        rustix::fs::ftruncate(&fd, size).map_err(Error::os("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL)
            .map_err(Error::os("fcntl(F_ADD_SEALS)"))?;
        Ok(Backing {
            fd,
            kind: BackingKind::Memfd,
            owner_vm: None,
        })
    }

    /// A backing over a file the caller made, such as a kernel guest_memfd.
    #[cfg_attr(not(feature = "kvm"), allow(dead_code))]
    pub(crate) fn from_fd(fd: OwnedFd, kind: BackingKind, owner_vm: Option<u64>) -> Backing {
        Backing { fd, kind, owner_vm }
    }

    /// Checks that `fd` is a kernel guest_memfd of `size` bytes: its
    /// `/proc/self/fd` link names the `kvm-gmem` anonymous inode, and
    /// `fstat` gives the size.
    #[cfg(feature = "kvm")]
    pub(crate) fn check_kernel_guest_memfd(fd: BorrowedFd<'_>, size: u64) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        let not = |reason: String| Error::NotAdoptable { reason };
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| not(format!("cannot read its /proc/self/fd link: {e}")))?;
        if link.as_os_str() != "anon_inode:[kvm-gmem]" {
            return Err(not(format!(
                "it is {}, not a kvm guest_memfd (anon_inode:[kvm-gmem])",
                link.display()
            )));
        }
        let stat = rustix::fs::fstat(fd).map_err(Error::os("fstat"))?;
        if stat.st_size as u64 != size {
            return Err(not(format!(
                "its size is {:#x}, not the {size:#x} given",
                stat.st_size
            )));
        }
        Ok(())
    }

    /// Checks that the host may fault in page 0 of `direct`, gmem's own
    /// mapping of an adopted kernel guest_memfd (it allocates that page). A
    /// guest_memfd made without `GUEST_MEMFD_FLAG_INIT_SHARED` is private to
    /// the kernel throughout (Linux 6.18 has no in-place conversion): every
    /// host access to it raises `SIGBUS`, so the first copy through a pin
    /// would kill the VMM. `MADV_POPULATE_READ` finds it out as `EFAULT`.
    #[cfg(feature = "kvm")]
    pub(crate) fn check_host_faults(direct: &MappedRegion) -> Result<(), Error> {
        match direct.populate_read(0..crate::PAGE_SIZE) {
            Ok(()) => Ok(()),
            Err(Errno::FAULT) => Err(Error::NotAdoptable {
                reason: "the host cannot fault in its page 0 (MADV_POPULATE_READ: EFAULT): \
                         it was made without GUEST_MEMFD_FLAG_INIT_SHARED, or the kernel \
                         holds the page private"
                    .into(),
            }),
            Err(errno) => Err(Error::os("madvise(MADV_POPULATE_READ)")(errno)),
        }
    }

    /// The KVM VM that owns a kernel guest_memfd.
    pub(crate) fn owner_vm(&self) -> Option<u64> {
        self.owner_vm
    }

    /// An empty memfd: mapping it anywhere makes every access `SIGBUS`.
    pub(crate) fn empty() -> Result<OwnedFd, Error> {
        rustix::fs::memfd_create(
            "gmem-private",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .and_then(|fd| {
            rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SEAL)?;
            Ok(fd)
        })
        .map_err(Error::os("memfd_create"))
    }

    pub(crate) fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Allocates the pages of `[offset, offset + len)`.
    pub(crate) fn allocate(&self, offset: u64, len: u64) -> Result<(), Error> {
        rustix::fs::fallocate(&self.fd, FallocateFlags::KEEP_SIZE, offset, len)
            .map_err(Error::os("fallocate"))
    }

    /// Frees the pages of `[offset, offset + len)`; they read zero afterwards.
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Error> {
        rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::KEEP_SIZE | FallocateFlags::PUNCH_HOLE,
            offset,
            len,
        )
        .map_err(Error::os("fallocate(PUNCH_HOLE)"))
    }

    /// Bytes allocated to the file, where the kernel accounts them.
    pub(crate) fn allocated_bytes(&self) -> Option<u64> {
        let stat = rustix::fs::fstat(&self.fd).ok()?;
        match self.kind {
            BackingKind::Memfd => Some(stat.st_blocks as u64 * 512),
            // guest_memfd does not account blocks.
            BackingKind::KernelGuestMemfd => None,
        }
    }
}

impl AsFd for Backing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(all(test, feature = "kvm"))]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    /// A page past the end of the file raises `SIGBUS` as a private page of
    /// a guest_memfd does: the check refuses it without touching it.
    #[test]
    fn a_page_the_host_cannot_fault_in_is_not_adoptable() {
        let page = Backing::memfd(PAGE_SIZE).unwrap();
        let region = MappedRegion::map_shared(page.as_fd(), PAGE_SIZE as usize).unwrap();
        assert_eq!(Backing::check_host_faults(&region), Ok(()));
        let hole = Backing::empty().unwrap();
        let region = MappedRegion::map_shared(hole.as_fd(), PAGE_SIZE as usize).unwrap();
        let refused = Backing::check_host_faults(&region).unwrap_err();
        assert!(matches!(refused, Error::NotAdoptable { .. }), "{refused}");
        assert_eq!(refused.errno(), libc::EINVAL);
        assert!(refused.to_string().contains("INIT_SHARED"), "{refused}");
    }
}
