//! Typed errors. Every variant that mirrors a kernel failure says which errno
//! the kernel gives for it, through `errno()`.

use rustix::io::Errno;

/// An error of a file, mapping or pin operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file size is zero or not a multiple of the page size (`EINVAL`).
    #[error("invalid size {size:#x}: must be a non-zero multiple of the page size")]
    InvalidSize {
        /// The size asked for.
        size: u64,
    },
    /// A creation flag bit that the kernel does not know (`EINVAL`).
    #[error("unknown flag bits {bits:#x}")]
    UnknownFlags {
        /// The unknown bits.
        bits: u64,
    },
    /// `mmap` of a file created without `MMAP` (`ENODEV`).
    #[error("the file was created without Flags::MMAP and cannot be mapped")]
    MmapNotSupported,
    /// An offset or length that must be page-aligned is not (`EINVAL`).
    #[error("offset {offset:#x} or length {len:#x} is not page-aligned")]
    Unaligned {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// A zero length where the kernel refuses one (`EINVAL`).
    #[error("length is zero")]
    ZeroLength,
    /// A range that is not inside the file or the mapping (`EINVAL`).
    #[error("range {offset:#x}+{len:#x} is outside the object of size {limit:#x}")]
    OutOfRange {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
        /// The size of the file, mapping or pin the range was checked against.
        limit: u64,
    },
    /// An `fallocate` range whose end, `offset + len`, passes the largest
    /// file offset, `i64::MAX` (`EFBIG`, as `vfs_fallocate` gives).
    #[error("range {offset:#x}+{len:#x} ends past the largest file offset")]
    FileTooBig {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// An `fallocate` mode other than `KEEP_SIZE`, optionally with
    /// `PUNCH_HOLE` (`EOPNOTSUPP`).
    #[error(
        "fallocate mode {mode:#x} is not supported: KEEP_SIZE is required, only PUNCH_HOLE may be added"
    )]
    UnsupportedMode {
        /// The mode given.
        mode: u32,
    },
    /// The host touched a private page (`EFAULT`).
    #[error("the page at offset {offset:#x} is private")]
    Private {
        /// The offset of the first private page in the range.
        offset: u64,
    },
    /// A punch hole over a pinned page (`EBUSY`; the kernel would detach it).
    #[error("the page at offset {offset:#x} is pinned")]
    Pinned {
        /// The offset of the first pinned page in the range.
        offset: u64,
    },
    /// A page's reference count would overflow (`ENOMEM`, as GUP gives).
    #[error("too many references on the page at offset {offset:#x}")]
    TooManyPins {
        /// The offset of the page.
        offset: u64,
    },
    /// Guard markers were required (`Options::hiding`) but the kernel
    /// refuses them on this mapping (`EINVAL`): an mlocked or hugetlb
    /// mapping, or a kernel before 6.15.
    #[error("the kernel refuses guard markers on this mapping")]
    GuardsRefused,
    /// The remap fallback would exceed the file's or the process's VMA
    /// budget (`ENOMEM`, as `mmap` gives at `vm.max_map_count`). Guard-marker
    /// mappings never fail for VMAs.
    #[error(
        "the empty-file remap (fallback) mapping would need {needed} VMAs, over the budget of {budget}"
    )]
    VmaBudget {
        /// The VMAs the file's fallback mappings would need.
        needed: u64,
        /// The budget that would be exceeded.
        budget: u64,
    },
    /// The mapping is poisoned (`EIO`): a conversion could not undo its
    /// change here, so it no longer follows the file's state.
    #[error("the host mapping is poisoned: a failed conversion could not restore it")]
    MappingPoisoned,
    /// Called from a conversion listener's callback on the file being
    /// converted, where it would deadlock (`EDEADLK`): punching or mapping.
    #[error("called from a conversion listener of the same file: it would deadlock")]
    WouldDeadlock,
    /// A file given to adopt as a kernel guest_memfd is not one, not of the
    /// size given, or one whose pages the host cannot fault in (made
    /// without `INIT_SHARED`) (`EINVAL`).
    #[error("cannot adopt the file as a kernel guest_memfd: {reason}")]
    NotAdoptable {
        /// What is wrong with it.
        reason: String,
    },
    /// A backend's replica ([`GuestMemfd::attach`](crate::GuestMemfd::attach))
    /// cannot be converted, punched or given backends by the backend
    /// (`EPERM`): its conversions are the VMM's.
    #[error("the file is a backend's replica: only the VMM converts it")]
    Attached,
    /// A backend process failed to attach, or a replica to attach (the
    /// fault's errno).
    #[error("backend: {0}")]
    Backend(crate::BackendFault),
    /// A system call failed.
    #[error("{call} failed: {errno}")]
    Os {
        /// The system call.
        call: &'static str,
        /// What it returned.
        errno: Errno,
    },
}

impl Error {
    /// The errno the kernel gives for the same failure.
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidSize { .. }
            | Error::UnknownFlags { .. }
            | Error::Unaligned { .. }
            | Error::ZeroLength
            | Error::OutOfRange { .. }
            | Error::NotAdoptable { .. }
            | Error::GuardsRefused => Errno::INVAL,
            Error::VmaBudget { .. } => Errno::NOMEM,
            Error::MappingPoisoned => Errno::IO,
            Error::WouldDeadlock => Errno::DEADLK,
            Error::MmapNotSupported => Errno::NODEV,
            Error::FileTooBig { .. } => Errno::FBIG,
            Error::UnsupportedMode { .. } => Errno::OPNOTSUPP,
            Error::Private { .. } => Errno::FAULT,
            Error::Pinned { .. } => Errno::BUSY,
            Error::TooManyPins { .. } => Errno::NOMEM,
            Error::Attached => Errno::PERM,
            Error::Backend(fault) => fault.errno(),
            Error::Os { errno, .. } => *errno,
        }
        .raw_os_error()
    }

    pub(crate) fn os(call: &'static str) -> impl FnOnce(Errno) -> Error {
        move |errno| Error::Os { call, errno }
    }
}

/// An error of [`GuestMemfd::set_attributes`](crate::GuestMemfd::set_attributes).
///
/// Whatever the error, no page changed state and no host mapping shows a
/// change; only [`MappingPoisoned`](Self::MappingPoisoned) also says that a
/// mapping could not be put back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConversionError {
    /// The request is malformed (`EINVAL`): zero size, a wrapping or
    /// unaligned range, or a range not inside the file.
    #[error("invalid conversion request {offset:#x}+{len:#x}: {reason}")]
    Invalid {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A folio still holds references after the one drain (`EAGAIN`): drop
    /// the references you know about (pins) and retry.
    #[error("page at offset {error_offset:#x} is still referenced")]
    Again {
        /// The first page of the referenced folio, clamped to the request.
        error_offset: u64,
    },
    /// Called from a conversion listener's callback on the same file, where
    /// it would deadlock (`EDEADLK`); nothing changed.
    #[error("conversion at {error_offset:#x} asked from a listener of the same file")]
    WouldDeadlock {
        /// The start of the request.
        error_offset: u64,
    },
    /// A conversion listener refused the conversion (`EBUSY`): before a
    /// shared to private one, or in the commit phase of either.
    #[error("a conversion listener refused the range starting at {error_offset:#x}: {reason}")]
    Refused {
        /// The start of the request.
        error_offset: u64,
        /// The listener's reason.
        reason: String,
    },
    /// The file is a backend's replica, whose conversions are the VMM's
    /// (`EPERM`); nothing changed.
    #[error("conversion at {error_offset:#x} of a backend's replica: only the VMM converts it")]
    Attached {
        /// The start of the request.
        error_offset: u64,
    },
    /// A backend process could not take part (its fault's errno:
    /// `ETIMEDOUT` for no answer in time, `EPROTO`, `EPIPE`, ...); nothing
    /// changed, and every backend shows the range again.
    #[error("backend {backend:?} failed the conversion at {error_offset:#x}: {fault}")]
    Backend {
        /// The start of the request.
        error_offset: u64,
        /// The backend.
        backend: crate::BackendId,
        /// What went wrong.
        fault: crate::BackendFault,
    },
    /// Memory for the attribute update could not be reserved (`ENOMEM`).
    #[error("no memory to prepare the attribute update at {error_offset:#x}")]
    NoMemory {
        /// The start of the request.
        error_offset: u64,
    },
    /// The empty-file remap fallback would spend more VMAs than the file's
    /// or the process's budget allows (`ENOMEM`). Only fallback mappings
    /// refuse a conversion for VMAs: guard-marker mappings hide and show
    /// without one when the budget is spent.
    #[error(
        "converting at {error_offset:#x} would need {needed} VMAs for the file's empty-file remap (fallback) mappings, over the budget of {budget}"
    )]
    VmaBudget {
        /// The start of the request.
        error_offset: u64,
        /// The VMAs the file's fallback mappings would need.
        needed: u64,
        /// The budget that would be exceeded.
        budget: u64,
    },
    /// Changing a host mapping failed; every mapping was put back.
    #[error("{call} failed at {error_offset:#x}: {errno}")]
    Os {
        /// The start of the request.
        error_offset: u64,
        /// The system call.
        call: &'static str,
        /// What it returned.
        errno: Errno,
    },
    /// Changing a host mapping failed, and putting one back failed too: no
    /// page changed state, but that mapping is poisoned (unregistered; its
    /// checked accessors fail with `EIO`). The errno is the first failure's.
    #[error(
        "{call} failed at {error_offset:#x}: {errno}; a host mapping could not be restored and is poisoned"
    )]
    MappingPoisoned {
        /// The start of the request.
        error_offset: u64,
        /// The system call that failed first.
        call: &'static str,
        /// What it returned.
        errno: Errno,
    },
}

impl ConversionError {
    /// The errno the kernel gives for the same failure.
    pub fn errno(&self) -> i32 {
        match self {
            ConversionError::Invalid { .. } => Errno::INVAL,
            ConversionError::Again { .. } => Errno::AGAIN,
            ConversionError::Refused { .. } => Errno::BUSY,
            ConversionError::WouldDeadlock { .. } => Errno::DEADLK,
            ConversionError::NoMemory { .. } | ConversionError::VmaBudget { .. } => Errno::NOMEM,
            ConversionError::Os { errno, .. } | ConversionError::MappingPoisoned { errno, .. } => {
                *errno
            }
            ConversionError::Attached { .. } => Errno::PERM,
            ConversionError::Backend { fault, .. } => fault.errno(),
        }
        .raw_os_error()
    }

    /// The offset the kernel reports in `error_offset`: for `EAGAIN` the first
    /// page of the offending folio (clamped to the request), else the start
    /// of the request.
    pub fn error_offset(&self) -> u64 {
        match self {
            ConversionError::Invalid { offset, .. } => *offset,
            ConversionError::Again { error_offset }
            | ConversionError::Refused { error_offset, .. }
            | ConversionError::NoMemory { error_offset }
            | ConversionError::Attached { error_offset }
            | ConversionError::Backend { error_offset, .. }
            | ConversionError::WouldDeadlock { error_offset }
            | ConversionError::VmaBudget { error_offset, .. }
            | ConversionError::Os { error_offset, .. }
            | ConversionError::MappingPoisoned { error_offset, .. } => *error_offset,
        }
    }
}
