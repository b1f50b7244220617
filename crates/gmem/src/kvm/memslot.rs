//! Memslot bindings: a range of a gmem file as guest-physical memory, with
//! the kernel's checks, an entry in the VM's [`GpaMap`], and the listener
//! that keeps KVM's own memory attributes for the file in step.
//!
//! Two kinds of slot, one table and one conversion service:
//!
//! * **guest_memfd slots** (a kernel guest_memfd of the VM): bound with
//!   `KVM_MEM_GUEST_MEMFD`; where the host has memory attributes, KVM's are
//!   kept in step with gmem's map, and the guest's private accesses are
//!   served from the guest_memfd.
//! * **memfd slots** (a memfd-backed [`GuestMemfd`], for hosts without
//!   guest_memfd): bound as an ordinary user memory region over gmem's own
//!   mapping of the file. The guest reaches every page, shared or private,
//!   as it does on a software-protected VM's guest_memfd; gmem's attribute
//!   map decides what the *host* may touch (pins, checked copies, host
//!   mappings). KVM knows nothing of the pages' states, so no attributes are
//!   kept in step for such a file, and the guest asks for conversions by
//!   port I/O or by `KVM_HC_MAP_GPA_RANGE` exits, served by the same
//!   [`GpaMap`].

use std::ops::Range;
use std::sync::{Arc, Weak};

use kvm_ioctls::VmFd;
use rustix::io::Errno;

use super::attributes::{
    AttributeRequest, AttributeSync, SlotRange, apply_all, changing_runs, in_place_requests,
    vm_requests,
};
use super::gpa_map::{GpaMap, SlotEntry, SlotTable};
use super::ioctl::{self, BoundRegion, RegionSpec};
use super::{MemslotError, MemslotFlags};
use crate::{
    Attribute, BackingKind, ConversionListener, GuestMemfd, ListenerId, PAGE_SIZE, Refusal,
};

/// A memslot: `[gpa, gpa + len)` of the guest is `[offset, offset + len)` of
/// a gmem file. Dropping it deletes the slot, then releases the file.
pub struct Memslot {
    map: Arc<GpaMap>,
    region: Option<BoundRegion>,
    slot: u32,
    gpa: u64,
    len: u64,
    flags: MemslotFlags,
}

impl std::fmt::Debug for Memslot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memslot")
            .field("slot", &self.slot)
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("len", &format_args!("{:#x}", self.len))
            .field("flags", &self.flags)
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

    /// The memslot flags it was bound with (`KVM_MEM_GUEST_MEMFD` aside).
    pub fn flags(&self) -> MemslotFlags {
        self.flags
    }

    /// Checks and binds (see [`Vm::bind`](super::Vm::bind)); `vm_id` is
    /// gmem's number of the VM, for telling its own guest_memfds.
    pub(super) fn bind(
        vm: &Arc<VmFd>,
        vm_id: u64,
        map: &Arc<GpaMap>,
        mem: &Arc<GuestMemfd>,
        spec: RegionSpec,
    ) -> Result<Memslot, MemslotError> {
        check_request(vm_id, mem, spec)?;
        let mut table = map.table();
        check_free(&table, mem, spec)?;
        let region =
            BoundRegion::bind(vm, mem, spec).map_err(|errno| MemslotError::Kernel { errno })?;
        table.entries.push(SlotEntry {
            slot: spec.slot,
            gpa: spec.gpa,
            len: spec.len,
            offset: spec.offset,
            mem: mem.clone(),
        });
        // KVM's attributes speak of guest_memfd slots only: a memfd slot's
        // pages are all the guest's, whatever gmem's map says.
        let syncing = !matches!(map.sync(), AttributeSync::GmemOnly)
            && mem.backing_kind() == BackingKind::KernelGuestMemfd;
        if syncing && !table.syncing.iter().any(|(id, _)| *id == mem.file_id()) {
            let listener = KvmAttributeListener {
                file: Arc::downgrade(mem),
                file_id: mem.file_id(),
                map: Arc::downgrade(map),
            };
            let id = mem.add_listener(Arc::new(listener));
            table.syncing.push((mem.file_id(), id));
        }
        drop(table);
        let slot = Memslot {
            map: map.clone(),
            region: Some(region),
            slot: spec.slot,
            gpa: spec.gpa,
            len: spec.len,
            flags: MemslotFlags::from_bits_retain(spec.flags),
        };
        if syncing {
            // If this fails, dropping `slot` deletes it again.
            slot.sync_attributes(mem, spec)?;
        }
        Ok(slot)
    }

    /// Sets KVM's attributes for the slot's range to gmem's state, under the
    /// file's invalidate lock (shared), so that no conversion interleaves.
    /// The listener added at bind keeps them in step from here.
    fn sync_attributes(&self, mem: &GuestMemfd, spec: RegionSpec) -> Result<(), MemslotError> {
        let listener = KvmAttributeListener {
            file: Weak::new(),
            file_id: mem.file_id(),
            map: Arc::downgrade(&self.map),
        };
        let range = spec.offset..spec.offset + spec.len;
        mem.with_shared_runs(|shared| {
            let mut requests = Vec::new();
            for to in [Attribute::Private, Attribute::Shared] {
                // The runs not in `to.other()` are those in state `to`.
                let runs = changing_runs(shared, range.clone(), to.other());
                // Other slots of the file are in step already.
                let only_this = |r: &AttributeRequest| match r {
                    AttributeRequest::Vm(a) => (spec.gpa..spec.gpa + spec.len).contains(&a.address),
                    AttributeRequest::InPlace(_) => true,
                };
                let all = listener.requests(mem, &runs, to);
                requests.extend(all.into_iter().filter(only_this));
            }
            listener
                .apply(mem, &requests)
                .map_err(|(_, errno, _)| MemslotError::Attributes { errno })
        })
    }
}

/// The kernel's checks of the request itself.
fn check_request(vm_id: u64, mem: &GuestMemfd, spec: RegionSpec) -> Result<(), MemslotError> {
    let RegionSpec {
        gpa, offset, len, ..
    } = spec;
    if gpa % PAGE_SIZE != 0 || offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(MemslotError::Unaligned { gpa, offset, len });
    }
    if len == 0 {
        return Err(MemslotError::Empty);
    }
    // An adopted guest_memfd has no known owner: the kernel judges it. A
    // memfd-backed file belongs to no VM and binds anywhere.
    let foreign = match (mem.backing_kind(), mem.owner_vm()) {
        (BackingKind::Memfd, _) => false,
        (BackingKind::KernelGuestMemfd, owner) => owner.is_some_and(|id| id != vm_id),
    };
    if foreign {
        return Err(MemslotError::ForeignFile);
    }
    let size = mem.size();
    if offset.checked_add(len).is_none_or(|end| end > size) || gpa.checked_add(len).is_none() {
        return Err(MemslotError::OutsideFile { offset, len, size });
    }
    Ok(())
}

/// The checks against the slots already bound.
fn check_free(table: &SlotTable, mem: &GuestMemfd, spec: RegionSpec) -> Result<(), MemslotError> {
    let RegionSpec {
        slot,
        gpa,
        offset,
        len,
        ..
    } = spec;
    for other in &table.entries {
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
        let Some(region) = self.region.take() else {
            return;
        };
        let mut table = self.map.table();
        if let Err(errno) = region.delete() {
            // KVM still uses the mapping: the region leaked the file; the
            // entry stays so that the slot number and range stay taken.
            tracing::error!(slot = self.slot, %errno, "deleting a memslot failed; keeping its memory");
            return;
        }
        let Some(index) = table.entries.iter().position(|e| e.slot == self.slot) else {
            return;
        };
        let entry = table.entries.swap_remove(index);
        let file = entry.mem.file_id();
        let listener = if table.entries.iter().any(|e| e.mem.file_id() == file) {
            None
        } else {
            take_listener(&mut table, file)
        };
        drop(table);
        // Outside the table lock: removal waits for calls under way, which
        // take it.
        if let Some(id) = listener {
            entry.mem.remove_listener(id);
        }
    }
}

fn take_listener(table: &mut SlotTable, file: u64) -> Option<ListenerId> {
    let index = table.syncing.iter().position(|(id, _)| *id == file)?;
    Some(table.syncing.swap_remove(index).1)
}

/// Keeps KVM's attributes for one file in step (see the module doc).
struct KvmAttributeListener {
    file: Weak<GuestMemfd>,
    file_id: u64,
    map: Weak<GpaMap>,
}

impl KvmAttributeListener {
    /// The requests that set the file ranges `runs` to `to`, for `mem`.
    fn requests(
        &self,
        mem: &GuestMemfd,
        runs: &[Range<u64>],
        to: Attribute,
    ) -> Vec<AttributeRequest> {
        let Some(map) = self.map.upgrade() else {
            return Vec::new();
        };
        match map.sync() {
            AttributeSync::GmemOnly => Vec::new(),
            AttributeSync::InPlaceAttributes => in_place_requests(runs, to)
                .into_iter()
                .map(AttributeRequest::InPlace)
                .collect(),
            AttributeSync::VmAttributes(_) => {
                let table = map.table();
                let slots: Vec<_> = table
                    .entries
                    .iter()
                    .filter(|e| e.mem.file_id() == mem.file_id())
                    .map(|e| SlotRange {
                        gpa: e.gpa,
                        offset: e.offset,
                        len: e.len,
                    })
                    .collect();
                let requests = vm_requests(&slots, runs, to);
                requests.into_iter().map(AttributeRequest::Vm).collect()
            }
        }
    }

    /// Makes `requests` on the VM or on `mem`'s guest_memfd.
    fn apply(
        &self,
        mem: &GuestMemfd,
        requests: &[AttributeRequest],
    ) -> Result<(), (usize, Errno, Option<Errno>)> {
        let Some(map) = self.map.upgrade() else {
            return Ok(());
        };
        apply_all(requests, |request| match (request, map.sync()) {
            (AttributeRequest::Vm(r), AttributeSync::VmAttributes(vm)) => vm
                .set_memory_attributes(*r)
                .map_err(|e| Errno::from_raw_os_error(e.errno())),
            (AttributeRequest::InPlace(r), _) => ioctl::set_memory_attributes2(mem.as_fd(), *r),
            _ => Ok(()),
        })
    }
}

impl ConversionListener for KvmAttributeListener {
    fn commit(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Refusal> {
        let Some(mem) = self.file.upgrade() else {
            return Ok(());
        };
        debug_assert_eq!(mem.file_id(), self.file_id);
        // Served from the map the conversion holds: the state before it.
        // Only the request's runs: a commit costs its range, not the file.
        let range = offset..offset + len;
        let runs = changing_runs(&mem.shared_runs_in(range.clone()), range, to);
        let requests = self.requests(&mem, &runs, to);
        self.apply(&mem, &requests).map_err(|(index, errno, undo)| {
            Refusal::new(match undo {
                None => format!("KVM refused memory attribute request {index}: {errno}"),
                Some(undo) => format!(
                    "KVM refused memory attribute request {index}: {errno}; undoing the earlier ones failed too ({undo}): KVM's attributes may differ from gmem's"
                ),
            })
        })
    }
}
