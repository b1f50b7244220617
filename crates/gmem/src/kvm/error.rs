//! Errors of the KVM layer.

use rustix::io::Errno;

use crate::ConversionError;

/// An error opening `/dev/kvm` or of a VM-level ioctl.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {errno} (is KVM enabled, the kvm module loaded, and are you in the kvm group?)"
    )]
    Open {
        /// What `open` returned.
        errno: Errno,
    },
    /// An ioctl failed.
    #[error("{call} failed: {errno}")]
    Ioctl {
        /// The ioctl.
        call: &'static str,
        /// What it returned.
        errno: Errno,
    },
    /// The host lacks something gmem needs (`EOPNOTSUPP`).
    #[error("the host does not support {what}")]
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
}

impl KvmError {
    /// The errno of the failure.
    pub fn errno(&self) -> i32 {
        match self {
            KvmError::Open { errno } | KvmError::Ioctl { errno, .. } => errno.raw_os_error(),
            KvmError::Unsupported { .. } => Errno::OPNOTSUPP.raw_os_error(),
        }
    }

    pub(crate) fn ioctl(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |e| KvmError::Ioctl {
            call,
            errno: Errno::from_raw_os_error(e.errno()),
        }
    }
}

/// An error binding a file range to guest-physical memory, with the kernel's
/// checks of `KVM_SET_USER_MEMORY_REGION2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemslotError {
    /// The guest address, file offset or size is not page-aligned (`EINVAL`).
    #[error(
        "guest address {gpa:#x}, file offset {offset:#x} and size {len:#x} must be page-aligned"
    )]
    Unaligned {
        /// The guest-physical address.
        gpa: u64,
        /// The file offset.
        offset: u64,
        /// The size.
        len: u64,
    },
    /// A zero size (`EINVAL`: a zero size deletes a slot in KVM).
    #[error("a memslot cannot be empty")]
    Empty,
    /// The range is not inside the file (`EINVAL`).
    #[error("file range {offset:#x}+{len:#x} is not inside the file of size {size:#x}")]
    OutsideFile {
        /// The file offset.
        offset: u64,
        /// The size.
        len: u64,
        /// The file size.
        size: u64,
    },
    /// The file range overlaps another binding of the same file (`EINVAL`).
    #[error("file range {offset:#x}+{len:#x} overlaps the binding of slot {slot}")]
    FileRangeBound {
        /// The file offset.
        offset: u64,
        /// The size.
        len: u64,
        /// The slot that binds it already.
        slot: u32,
    },
    /// The guest-physical range overlaps another slot (`EEXIST`).
    #[error("guest range {gpa:#x}+{len:#x} overlaps slot {slot}")]
    GuestRangeInUse {
        /// The guest-physical address.
        gpa: u64,
        /// The size.
        len: u64,
        /// The slot there.
        slot: u32,
    },
    /// The slot number is taken (`EEXIST`; KVM slots are immutable).
    #[error("slot {slot} is in use")]
    SlotInUse {
        /// The slot.
        slot: u32,
    },
    /// The file is a kernel guest_memfd that gmem made on another VM
    /// (`EINVAL`).
    #[error("the file is not a guest_memfd of this VM")]
    ForeignFile,
    /// The kernel refused the binding (`KVM_SET_USER_MEMORY_REGION2`, or
    /// `KVM_SET_USER_MEMORY_REGION` for a memfd slot on a host without 2).
    #[error("KVM_SET_USER_MEMORY_REGION(2) failed: {errno}")]
    Kernel {
        /// What it returned.
        errno: Errno,
    },
    /// Setting KVM's memory attributes of the new slot to gmem's state
    /// failed; the slot was deleted again.
    #[error("setting KVM's memory attributes for the new slot failed: {errno}")]
    Attributes {
        /// What the kernel returned.
        errno: Errno,
    },
}

impl MemslotError {
    /// The errno the kernel gives for the same failure.
    pub fn errno(&self) -> i32 {
        match self {
            MemslotError::GuestRangeInUse { .. } | MemslotError::SlotInUse { .. } => Errno::EXIST,
            MemslotError::Kernel { errno } | MemslotError::Attributes { errno } => *errno,
            _ => Errno::INVAL,
        }
        .raw_os_error()
    }
}

/// Why a vCPU stopped with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuError {
    /// An ioctl on the vCPU failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The guest shut down (a triple fault).
    #[error("the guest shut down at rip {rip:#x}")]
    Shutdown {
        /// Where.
        rip: u64,
    },
    /// KVM could not emulate or enter the guest.
    #[error("KVM internal error {suberror} at rip {rip:#x}")]
    Internal {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// Where.
        rip: u64,
    },
    /// An exit that gmem's loop does not serve.
    #[error("unexpected exit {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The exit, as `kvm-ioctls` names it.
        exit: String,
        /// Where.
        rip: u64,
    },
    /// A memory-fault exit whose conversion failed.
    #[error("memory fault at {gpa:#x}+{len:#x}: {source}")]
    MemoryFault {
        /// The faulting guest-physical range.
        gpa: u64,
        /// Its size.
        len: u64,
        /// Why it could not be converted.
        source: ConversionError,
    },
    /// The run was stopped from outside (`immediate_exit` or a signal).
    #[error("the vCPU was interrupted")]
    Interrupted,
}
