//! Kernel flags that gmem passes through without managing them: extra
//! guest_memfd creation flags and memslot flags.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};

use super::uapi::{GUEST_MEMFD_FLAG_NO_DIRECT_MAP, GUEST_MEMFD_FLAG_WRITE};

bitflags::bitflags! {
    /// Kernel guest_memfd flags beyond the `MMAP | INIT_SHARED` that gmem
    /// always asks for, passed to `KVM_CREATE_GUEST_MEMFD` as they are where
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` reports them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct KernelFlags: u64 {
        /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`: the kernel removes the pages
        /// from its direct map (unmerged series).
        const NO_DIRECT_MAP = GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        /// `GUEST_MEMFD_FLAG_WRITE`: the file takes `write(2)` (unmerged
        /// series).
        const WRITE = GUEST_MEMFD_FLAG_WRITE;
    }
}

bitflags::bitflags! {
    /// Memslot flags of `KVM_SET_USER_MEMORY_REGION2`; gmem always adds
    /// `KVM_MEM_GUEST_MEMFD`. The kernel decides which it takes with a
    /// guest_memfd (Linux 6.18 refuses both with `EINVAL`: dirty logging of
    /// private memory and read-only guest_memfd slots are not supported).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MemslotFlags: u32 {
        /// `KVM_MEM_LOG_DIRTY_PAGES`: track dirty pages for migration.
        const LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;
        /// `KVM_MEM_READONLY`: guest writes exit as MMIO.
        const READONLY = KVM_MEM_READONLY;
    }
}
