//! Guest memory as vm-memory's [`GuestMemory`] (feature `vm-memory`), for
//! rust-vmm devices (`virtio-queue` and the like): [`GuestMemoryGmem`] maps
//! guest-physical ranges onto ranges of [`GuestMemfd`]s, and every slice it
//! hands out pins its pages for as long as the slice, or any copy of it,
//! lives.
//!
//! # How a slice pins
//!
//! vm-memory 0.18's `GuestMemory` serves every access through
//! [`get_slices`](GuestMemory::get_slices), and `Bytes<GuestAddress>` (`read_obj`,
//! `write_slice`, `load`, `store`, ...) is implemented for every
//! `GuestMemory` on top of it. Each slice is a
//! `VolatileSlice<'a, PinnedSlice<'a>>`: its bitmap, [`PinnedSlice`], owns a
//! [`Pin`] of the pages under the slice. Cloning it (vm-memory does, for each
//! subslice or offset) takes another reference on the same pages, without
//! fail since the pages are already pinned; dropping it releases one. So no
//! copy of a slice outlives its pin, and a conversion of its pages to
//! private fails with `EAGAIN` while any copy lives. A `read_obj` of a
//! 16-byte descriptor pins the one page it touches, not the region: the
//! slice's pin, and one more reference for the offset vm-memory takes of it,
//! both lock-free.
//!
//! Access to a private page fails before anything is copied, with
//! [`GuestMemoryError::HostAddressNotAvailable`] (the guest address exists,
//! but the host may not touch it: gmem's `EFAULT`); an address outside every
//! region gives [`GuestMemoryError::InvalidGuestAddress`]. An access that
//! spans regions yields one slice per region, each pinned on its own.
//!
//! # Lifecycle in a virtio device
//!
//! * The VMM builds one view with [`GuestMemoryGmem::from_regions`] and
//!   shares it by `Arc` among its device threads. Its regions are fixed for
//!   its life (a different memory layout is a new view).
//! * A device's request loop takes slices for one request at a time (pop the
//!   chain, copy the buffers, add the used entry) and drops them before the
//!   next: a slice is short-lived, like a kernel GUP pin for one I/O.
//! * A device that holds slices (or `Pin`s) across a guest's conversion of
//!   their pages makes that conversion fail with `EAGAIN`; the VMM's let-go
//!   (`Vm::set_let_go`) then asks the device to finish or abandon the
//!   request and drop them, and the conversion is retried.
//! * [`check_range`](GuestMemory::check_range) is advisory only: it tells
//!   whether the range was mapped and shared when asked, but the guest may
//!   convert it right after. Only a slice's pin holds the state.
//! * [`physical_memory`](GuestMemory::physical_memory) returns `None`: a
//!   region-based view would hand out pages without pins, and so has no
//!   sound owner here.

use std::iter::FusedIterator;
use std::sync::Arc;

use ::vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use ::vm_memory::guest_memory::GuestMemorySliceIterator;
use ::vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

use crate::attributes::Attribute;
use crate::file::{GuestMemfd, page_range};
use crate::{Error, Pin};

/// One guest-physical range of a view: `len` bytes at `guest_addr`, backed
/// by `[file_offset, file_offset + len)` of `file`.
#[derive(Debug, Clone)]
struct Region {
    guest_addr: u64,
    file: Arc<GuestMemfd>,
    file_offset: u64,
    len: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.guest_addr + self.len
    }
}

/// Guest memory as vm-memory's [`GuestMemory`]: guest-physical regions, each
/// a range of a [`GuestMemfd`], whose slices pin their pages. See the
/// [module documentation](self) for the lifecycle.
#[derive(Debug, Clone)]
pub struct GuestMemoryGmem {
    /// Sorted by guest address, disjoint.
    regions: Vec<Region>,
}

/// Why a [`GuestMemoryGmem`] cannot be built from the regions given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// A region of zero bytes (`EINVAL`).
    #[error("the region at guest address {guest_addr:#x} is empty")]
    EmptyRegion {
        /// Its guest address.
        guest_addr: u64,
    },
    /// A region whose guest range ends past the largest address (`EINVAL`).
    #[error(
        "the region at guest address {guest_addr:#x} of {len:#x} bytes wraps the address space"
    )]
    AddressOverflow {
        /// Its guest address.
        guest_addr: u64,
        /// Its length.
        len: u64,
    },
    /// A region whose file range is not inside its file (`EINVAL`).
    #[error(
        "the region at guest address {guest_addr:#x} maps file range {file_offset:#x}+{len:#x}, outside a file of {file_size:#x} bytes"
    )]
    OutsideFile {
        /// Its guest address.
        guest_addr: u64,
        /// The file offset given.
        file_offset: u64,
        /// The length given.
        len: u64,
        /// The size of the file.
        file_size: u64,
    },
    /// Two regions share guest addresses (`EEXIST`, as KVM gives for
    /// overlapping memslots).
    #[error("the regions at guest addresses {first:#x} and {second:#x} overlap")]
    Overlap {
        /// The lower region's guest address.
        first: u64,
        /// The higher region's guest address.
        second: u64,
    },
}

impl ViewError {
    /// The errno of the same failure.
    pub fn errno(&self) -> i32 {
        match self {
            ViewError::Overlap { .. } => libc::EEXIST,
            _ => libc::EINVAL,
        }
    }
}

impl GuestMemoryGmem {
    /// A view of `(guest address, file, file offset, length)` regions, in
    /// any order; files may repeat.
    ///
    /// Errors: [`ViewError`] for an empty region, one that wraps the guest
    /// address space or reaches outside its file, or two that overlap.
    pub fn from_regions(
        regions: impl IntoIterator<Item = (GuestAddress, Arc<GuestMemfd>, u64, u64)>,
    ) -> Result<GuestMemoryGmem, ViewError> {
        let mut checked = Vec::new();
        for (guest_addr, file, file_offset, len) in regions {
            checked.push(Self::region(guest_addr.0, file, file_offset, len)?);
        }
        checked.sort_by_key(|region| region.guest_addr);
        if let Some(pair) = checked.windows(2).find(|p| p[0].end() > p[1].guest_addr) {
            return Err(ViewError::Overlap {
                first: pair[0].guest_addr,
                second: pair[1].guest_addr,
            });
        }
        Ok(GuestMemoryGmem { regions: checked })
    }

    /// One region, checked on its own.
    fn region(
        guest_addr: u64,
        file: Arc<GuestMemfd>,
        file_offset: u64,
        len: u64,
    ) -> Result<Region, ViewError> {
        if len == 0 {
            return Err(ViewError::EmptyRegion { guest_addr });
        }
        if guest_addr.checked_add(len).is_none() {
            return Err(ViewError::AddressOverflow { guest_addr, len });
        }
        let file_size = file.size();
        if file_offset
            .checked_add(len)
            .is_none_or(|end| end > file_size)
        {
            return Err(ViewError::OutsideFile {
                guest_addr,
                file_offset,
                len,
                file_size,
            });
        }
        Ok(Region {
            guest_addr,
            file,
            file_offset,
            len,
        })
    }

    /// The number of regions.
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// The file and file offset behind guest address `addr`, if a region
    /// holds it.
    pub fn translate(&self, addr: GuestAddress) -> Option<(&Arc<GuestMemfd>, u64)> {
        let region = self.find(addr.0)?;
        Some((
            &region.file,
            region.file_offset + (addr.0 - region.guest_addr),
        ))
    }

    /// The region holding guest address `addr`.
    #[inline]
    fn find(&self, addr: u64) -> Option<&Region> {
        let after = self.regions.partition_point(|r| r.guest_addr <= addr);
        let region = self.regions.get(after.checked_sub(1)?)?;
        (addr < region.end()).then_some(region)
    }

    /// A pinned slice from `addr` to at most `count` bytes, up to the end
    /// of its region.
    #[inline]
    fn pinned_slice(
        &self,
        addr: u64,
        count: usize,
    ) -> Result<VolatileSlice<'_, PinnedSlice<'_>>, GuestMemoryError> {
        let region = self
            .find(addr)
            .ok_or(GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)))?;
        let within = addr - region.guest_addr;
        let len = (region.len - within).min(count as u64);
        let offset = region.file_offset + within;
        let pin = region
            .file
            .pin(offset, len)
            .map_err(|err| access_error(addr, err))?;
        let bitmap = PinnedSlice { pin: Some(pin) };
        let direct = &region.file.state.direct;
        Ok(direct.volatile_slice(offset, len as usize, bitmap))
    }

    /// Whether every page of `[addr, addr + count)` was in a region and
    /// shared when looked at.
    fn all_shared(&self, mut addr: u64, mut count: u64) -> bool {
        while count > 0 {
            let Some(region) = self.find(addr) else {
                return false;
            };
            let within = addr - region.guest_addr;
            let len = (region.len - within).min(count);
            let offset = region.file_offset + within;
            let pages = page_range(offset, offset + len);
            let state = &region.file.state;
            if state.with_attrs(|attrs| attrs.first_not(pages, Attribute::Shared).is_some()) {
                return false;
            }
            (addr, count) = (addr + len, count - len);
        }
        true
    }
}

/// The vm-memory error for a pin that failed at guest address `addr`.
#[cold]
fn access_error(addr: u64, err: Error) -> GuestMemoryError {
    match err {
        Error::Private { offset } => {
            tracing::debug!(addr, offset, "guest memory access to a private page");
            GuestMemoryError::HostAddressNotAvailable
        }
        Error::OutOfRange { .. } => GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)),
        other => {
            let kind = std::io::Error::from_raw_os_error(other.errno()).kind();
            GuestMemoryError::IOError(std::io::Error::new(kind, other))
        }
    }
}

impl GuestMemory for GuestMemoryGmem {
    /// Named because the trait requires a type: [`physical_memory`](Self::physical_memory)
    /// always returns `None`.
    type PhysicalMemory = ::vm_memory::GuestMemoryMmap<()>;
    type Bitmap = PinBitmap;

    /// Advisory: whether every page of the range was in a region and shared
    /// when looked at (it may be converted right after). `access` is not
    /// consulted: shared pages are readable and writable.
    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        self.all_shared(addr.0, count as u64)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, PinnedSlice<'a>>, GuestMemoryError> {
        Ok(PinnedSlices {
            view: self,
            addr: addr.0,
            remaining: count,
        })
    }

    /// `None`: there is no region-based view whose slices would pin.
    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        None
    }
}

/// The slices of one access, one per region it touches, each pinned when
/// produced. Ends after the first error.
#[derive(Debug)]
struct PinnedSlices<'a> {
    view: &'a GuestMemoryGmem,
    addr: u64,
    remaining: usize,
}

impl<'a> Iterator for PinnedSlices<'a> {
    type Item = Result<VolatileSlice<'a, PinnedSlice<'a>>, GuestMemoryError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let slice = self.view.pinned_slice(self.addr, self.remaining);
        match &slice {
            // The slice lies inside a region, whose end does not wrap.
            Ok(slice) => {
                self.remaining -= slice.len();
                self.addr += slice.len() as u64;
            }
            Err(_) => self.remaining = 0,
        }
        Some(slice)
    }
}

impl FusedIterator for PinnedSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, PinnedSlice<'a>> for PinnedSlices<'a> {}

/// The bitmap of a [`GuestMemoryGmem`] slice: the [`Pin`] of its pages.
/// Tracks no dirty pages. A clone pins the same pages once more (it cannot
/// fail: they are pinned already); a drop releases one reference. So the
/// pages stay shared while any copy of a slice lives.
#[derive(Debug)]
pub struct PinnedSlice<'a> {
    /// `None` only for the slices of [`PinBitmap`], which no view hands out.
    pin: Option<Pin<'a>>,
}

impl<'a> PinnedSlice<'a> {
    /// The pin the slice holds.
    pub fn pin(&self) -> Option<&Pin<'a>> {
        self.pin.as_ref()
    }
}

impl Clone for PinnedSlice<'_> {
    #[inline]
    fn clone(&self) -> Self {
        PinnedSlice {
            pin: self.pin.as_ref().map(Pin::repin),
        }
    }
}

impl<'a> WithBitmapSlice<'_> for PinnedSlice<'a> {
    type S = PinnedSlice<'a>;
}

impl BitmapSlice for PinnedSlice<'_> {}

impl Bitmap for PinnedSlice<'_> {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    /// Another reference on the whole pin (a subslice's pages are among
    /// them).
    #[inline]
    fn slice_at(&self, _offset: usize) -> Self {
        self.clone()
    }
}

/// The [`GuestMemory::Bitmap`] of [`GuestMemoryGmem`]: names its slices'
/// bitmap type, [`PinnedSlice`]. The view never hands out a value of it; the
/// slices of one made by hand pin nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct PinBitmap;

impl<'a> WithBitmapSlice<'a> for PinBitmap {
    type S = PinnedSlice<'a>;
}

impl Bitmap for PinBitmap {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) -> PinnedSlice<'_> {
        PinnedSlice { pin: None }
    }
}
