//! Kernel interface constants that `kvm-bindings` 0.14 lacks, each with the
//! header it comes from.

/// `GUEST_MEMFD_FLAG_MMAP` (`include/uapi/linux/kvm.h`, Linux 6.18): the
/// guest_memfd may be mapped by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (`include/uapi/linux/kvm.h`, Linux 6.18):
/// every page starts shared.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` (an unmerged series proposed for
/// `include/uapi/linux/kvm.h` after Linux 6.18):
/// the kernel removes the file's folios from its direct map.
pub const GUEST_MEMFD_FLAG_NO_DIRECT_MAP: u64 = 1 << 2;
/// `GUEST_MEMFD_FLAG_WRITE` (an unmerged series proposed for
/// `include/uapi/linux/kvm.h` after Linux 6.18): the file takes
/// `write(2)`, for populating it without a mapping.
pub const GUEST_MEMFD_FLAG_WRITE: u64 = 1 << 3;
/// `KVM_CAP_GUEST_MEMFD_FLAGS` (`include/uapi/linux/kvm.h`, Linux 6.18):
/// returns the supported guest_memfd flags.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `KVM_HC_MAP_GPA_RANGE` (`include/uapi/linux/kvm_para.h`): the guest asks
/// for a range to become private or shared.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED` (`include/uapi/linux/kvm_para.h`): the
/// attribute bit meaning private.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// The page-size bits of `KVM_MAP_GPA_RANGE` attributes
/// (`KVM_MAP_GPA_RANGE_PAGE_SZ_*`, `include/uapi/linux/kvm_para.h`).
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_MASK: u64 = 0x3;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_1G` (`include/uapi/linux/kvm_para.h`): the
/// largest page-size value; the page-size field's value 3 is undefined.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_1G: u64 = 1 << 1;
/// The capability announcing `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd
/// in earlier revisions of the unmerged in-place conversion series.
pub const KVM_CAP_MEMORY_ATTRIBUTES2_EARLY: u32 = 249;
/// The same capability in later revisions of the series (renumbered).
pub const KVM_CAP_MEMORY_ATTRIBUTES2: u32 = 250;
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE` (`include/uapi/linux/kvm.h`).
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

/// `struct kvm_memory_attributes2` of the unmerged in-place conversion
/// series (v6/v7): `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd fd.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KvmMemoryAttributes2 {
    /// File offset of the range.
    pub offset: u64,
    /// Size of the range.
    pub size: u64,
    /// `KVM_MEMORY_ATTRIBUTE_PRIVATE` or 0.
    pub attributes: u64,
    /// Must be zero.
    pub flags: u64,
    /// Set by the kernel on `EAGAIN`.
    pub error_offset: u64,
    /// Must be zero.
    pub reserved: [u64; 11],
}

/// `KVM_SET_MEMORY_ATTRIBUTES2` = `_IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2)`.
pub const KVM_SET_MEMORY_ATTRIBUTES2: u64 =
    ioc_readwrite(0xae, 0xd2, std::mem::size_of::<KvmMemoryAttributes2>());

const fn ioc_readwrite(kind: u64, nr: u64, size: usize) -> u64 {
    // _IOC(_IOC_READ | _IOC_WRITE, type, nr, size) on x86 and arm64.
    (3 << 30) | ((size as u64) << 16) | (kind << 8) | nr
}
