//! Memslot bindings: a range of a gmem file as guest-physical memory.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{KVM_MEM_GUEST_MEMFD, kvm_userspace_memory_region2};

use super::vm::VmShared;
use super::{MemslotError, Vm, ioctl};
use crate::{GuestMemfd, PAGE_SIZE};

/// A bound range, as the VM's table keeps it. Holding the file keeps its fd
/// and gmem's own mapping (the one KVM was given) alive.
pub(super) struct SlotEntry {
    pub(super) slot: u32,
    pub(super) gpa: u64,
    pub(super) len: u64,
    pub(super) offset: u64,
    pub(super) mem: Arc<GuestMemfd>,
}

/// A memslot: `[gpa, gpa + len)` of the guest is `[offset, offset + len)` of
/// a gmem file. Dropping it deletes the slot, then releases the file.
pub struct Memslot {
    vm: Arc<VmShared>,
    slot: u32,
    gpa: u64,
    len: u64,
}

impl std::fmt::Debug for Memslot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memslot")
            .field("slot", &self.slot)
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("len", &format_args!("{:#x}", self.len))
            .finish()
    }
}

impl Memslot {
    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The guest-physical address of the slot.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The size of the slot.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the slot is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Vm {
    /// Binds `[offset, offset + len)` of `mem` at guest-physical `gpa` as
    /// slot `slot` (`KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`).
    ///
    /// Every guest access to the range is served from the file, shared or
    /// private. Errors mirror the kernel's checks: alignment, a range inside
    /// the file, no overlap with another binding of the file (`EINVAL`), a
    /// free slot and guest range (`EEXIST`), and a file of this VM.
    pub fn bind(
        &self,
        slot: u32,
        gpa: u64,
        mem: &Arc<GuestMemfd>,
        offset: u64,
        len: u64,
    ) -> Result<Memslot, MemslotError> {
        if gpa % PAGE_SIZE != 0 || offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(MemslotError::Unaligned { gpa, offset, len });
        }
        if len == 0 {
            return Err(MemslotError::Empty);
        }
        if mem.owner_vm() != Some(self.shared.id()) {
            return Err(MemslotError::ForeignFile);
        }
        let size = mem.size();
        if offset.checked_add(len).is_none_or(|end| end > size) || gpa.checked_add(len).is_none() {
            return Err(MemslotError::OutsideFile { offset, len, size });
        }
        let mut slots = self.shared.slots();
        check_free(&slots, slot, gpa, mem, offset, len)?;
        let region = kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: mem.direct_map_ptr() as u64 + offset,
            guest_memfd_offset: offset,
            guest_memfd: mem.as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // `userspace_addr` is gmem's own mapping of the whole file, never
        // changed by conversions; `mem`'s fd is a guest_memfd of this VM
        // (checked above). The table entry pushed below holds `mem`, and
        // `Memslot::drop` deletes the slot before dropping the entry.
        // SAFETY: the mapping and the fd outlive the slot (see above).
        unsafe { ioctl::set_memslot(&self.shared.fd, region) }
            .map_err(|errno| MemslotError::Kernel { errno })?;
        slots.push(SlotEntry {
            slot,
            gpa,
            len,
            offset,
            mem: mem.clone(),
        });
        Ok(Memslot {
            vm: self.shared.clone(),
            slot,
            gpa,
            len,
        })
    }
}

fn check_free(
    slots: &[SlotEntry],
    slot: u32,
    gpa: u64,
    mem: &Arc<GuestMemfd>,
    offset: u64,
    len: u64,
) -> Result<(), MemslotError> {
    for other in slots {
        if other.slot == slot {
            return Err(MemslotError::SlotInUse { slot });
        }
        if gpa < other.gpa + other.len && other.gpa < gpa + len {
            return Err(MemslotError::GuestRangeInUse {
                gpa,
                len,
                slot: other.slot,
            });
        }
        if other.mem.file_id() == mem.file_id()
            && offset < other.offset + other.len
            && other.offset < offset + len
        {
            return Err(MemslotError::FileRangeBound {
                offset,
                len,
                slot: other.slot,
            });
        }
    }
    Ok(())
}

impl Drop for Memslot {
    fn drop(&mut self) {
        let delete = kvm_userspace_memory_region2 {
            slot: self.slot,
            ..Default::default()
        };
        let mut slots = self.vm.slots();
        // SAFETY: a size of zero deletes the slot; the kernel keeps no pointer.
        if let Err(errno) = unsafe { ioctl::set_memslot(&self.vm.fd, delete) } {
            // KVM still uses the mapping: keep the file (and mapping) alive
            // for the life of the VM rather than free it under the guest.
            tracing::error!(slot = self.slot, %errno, "deleting a memslot failed; keeping its memory");
            return;
        }
        slots.retain(|entry| entry.slot != self.slot);
    }
}
