//! Lazy restore: whether this host could fill a restored file's pages on
//! first touch, by [`probe_lazy_restore`]. gmem does not restore lazily
//! yet; this module owns the probe and the design below.
//!
//! # The design, and why it is not built
//!
//! A lazy restore would return a [`GuestMemfd`](crate::GuestMemfd) as soon
//! as the header and runs are read (the states are needed at once: a
//! conversion or a fault consults them), register every host mapping of
//! the new memfd with a userfaultfd in *missing* mode, and serve each fault
//! on a page of a saved extent with `UFFDIO_COPY` of its contents from a
//! mapping of the snapshot (a page in no extent with `UFFDIO_ZEROPAGE`),
//! while a background thread copies the rest in the kernel, extent by
//! extent, and a fault on a page already copied finds it in the page cache
//! and does not reach the handler. *Minor* mode (`UFFDIO_CONTINUE`) is for
//! pages already in the page cache, mapped by another VMA first: it fits a
//! design where the background copy runs ahead and faults only wait for
//! it, but a page not yet copied is still a missing fault, so missing mode
//! is needed either way.
//!
//! What stops it being a small change, and why a half-built one would be
//! worse than none:
//!
//! * **Every path to the pages must wait for the fill, not only faults.**
//!   gmem reads and writes the backing by file descriptor: a snapshot's
//!   `pread` and `copy_file_range`, `punch_hole`, device copies through
//!   `read_from_fd`/`write_to_fd`. None of those fault through a
//!   userfaultfd: on a page not yet filled a read returns zeros and a write
//!   is overwritten by the fill later. Each would need to fill (or mark as
//!   dead, for a punch) its range first, under the invalidate lock.
//! * **Every mapping must be registered**, including those made after the
//!   restore (`mmap`, pins' chunks, remaps that hide private pages); the
//!   guard markers that hide private pages are themselves PTE markers, and
//!   how they interact with missing-mode registration needs its own tests.
//! * **KVM's view.** With a memfd backing, KVM reaches guest memory
//!   through a memslot's host address: a fault there is a
//!   `get_user_pages` fault, which a userfaultfd does serve. With a kernel
//!   guest_memfd (not on this host), private memory is not reached through
//!   any host mapping, so no userfaultfd sees its first touch: lazy restore
//!   of private pages would need the kernel's own support.
//! * **A verified checksum per extent** means an extent is known good only
//!   once all of it has been read: a fault served from an extent not yet
//!   verified would hand the guest unverified bytes. Serving faults would
//!   need to verify the faulting extent first (fine for 2 MiB extents, not
//!   for a 1 GiB one) or a finer-grained checksum (a new format version).
//!
//! The probe tells whether the mechanism is there: both modes work on
//! this project's development host (root, Linux 6.18, `/dev/userfaultfd`).

use rustix::io::Errno;

use crate::sys::uffd::{self, FaultMode};

/// What [`probe_lazy_restore`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LazyRestoreProbe {
    /// Missing faults on a shared memfd mapping reach a handler and are
    /// resolved by `UFFDIO_COPY` (`UFFD_FEATURE_MISSING_SHMEM`): what a lazy
    /// restore into a memfd needs.
    pub missing_faults: Result<(), FaultsUnavailable>,
    /// Minor faults on shmem reach a handler and are resolved by
    /// `UFFDIO_CONTINUE` (`UFFD_FEATURE_MINOR_SHMEM`).
    pub minor_faults: Result<(), FaultsUnavailable>,
}

/// Why a kind of userfaultfd fault is unavailable: the step that failed
/// (the system call, the feature, the registration, the fault itself) and
/// its errno (`EPERM` for an unprivileged process where
/// `vm.unprivileged_userfaultfd` is 0 and `/dev/userfaultfd` is closed to
/// it, `EINVAL` for a feature the kernel lacks, `ETIMEDOUT` for a fault that
/// never arrived).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step} failed: {errno}")]
#[non_exhaustive]
pub struct FaultsUnavailable {
    /// What was being done.
    pub step: &'static str,
    /// Its errno.
    pub errno: Errno,
}

impl FaultsUnavailable {
    /// The errno, as a raw number.
    pub fn errno(&self) -> i32 {
        self.errno.raw_os_error()
    }
}

/// Probes whether this host can fill pages of a memfd mapping on first
/// touch: for each kind of fault, a one-page memfd is mapped and
/// registered with a new userfaultfd, a thread touches the page, and the
/// fault must arrive and be resolved with the page's contents read. Takes
/// a few milliseconds; leaves nothing behind.
pub fn probe_lazy_restore() -> LazyRestoreProbe {
    let run = |mode| uffd::probe(mode).map_err(|(step, errno)| FaultsUnavailable { step, errno });
    LazyRestoreProbe {
        missing_faults: run(FaultMode::Missing),
        minor_faults: run(FaultMode::Minor),
    }
}
