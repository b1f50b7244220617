//! Guest memory as vm-memory's `GuestMemory`, for rust-vmm devices (feature
//! `vm-memory`).
//!
//! For `virtio-queue` and the like, [`GuestMemoryGmem`] is a [`GuestMemory`]
//! that maps guest-physical ranges onto ranges of [`GuestMemfd`]s, and every
//! slice it hands out pins its pages for as long as the slice, or any copy of
//! it, lives.
//!
//! # How a slice pins
//!
//! vm-memory 0.18's `GuestMemory` serves every access through
//! [`get_slices`](https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/trait.GuestMemory.html#tymethod.get_slices), and `Bytes<GuestAddress>` (`read_obj`,
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
//! both lock-free and inlined (a locked add and a count in the thread's
//! batch each).
//!
//! Slices wholly inside a *resident range*
//! ([`from_regions_with_resident`](GuestMemoryGmem::from_regions_with_resident))
//! hold no pin (`PinnedSlice::pin` is `None`) and their clones cost nothing:
//! the view holds one pin of the range for its whole life, and every slice
//! borrows the view.
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
//! * A device's rings (descriptor table, available and used ring) are
//!   device-owned shared memory that the guest must not convert while the
//!   device runs: build the device's view with them as resident ranges
//!   ([`GuestMemoryGmem::from_regions_with_resident`]) once the driver has
//!   set the queue up, and ring accesses take no pin. A conversion of a
//!   resident page fails with `EAGAIN` for as long as the view or any clone
//!   of it lives, and the let-go cannot help: drop the view and build a new
//!   one at device reset (or when the driver moves the rings).
//! * A device's request loop takes slices for one request at a time (pop the
//!   chain, copy the buffers, add the used entry) and drops them before the
//!   next: a slice is short-lived, like a kernel GUP pin for one I/O. Or it
//!   pins the chain's buffers once ([`GuestMemoryGmem::pin_ranges`], a
//!   [`PinnedChain`]) and copies through them with no pin per access.
//! * A device that holds slices (or `Pin`s) across a guest's conversion of
//!   their pages makes that conversion fail with `EAGAIN`; the VMM's let-go
//!   (`Vm::set_let_go`) then asks the device to finish or abandon the
//!   request and drop them, and the conversion is retried.
//! * [`check_range`](https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/trait.GuestMemory.html#tymethod.check_range) is advisory only: it tells
//!   whether the range was mapped and shared when asked, but the guest may
//!   convert it right after. Only a slice's pin holds the state.
//! * [`physical_memory`](https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/trait.GuestMemory.html#method.physical_memory) returns `None`: a
//!   region-based view would hand out pages without pins, and so has no
//!   sound owner here.
//!
//! [`GuestMemory`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/trait.GuestMemory.html
//! [`GuestMemoryError::HostAddressNotAvailable`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.HostAddressNotAvailable
//! [`GuestMemoryError::InvalidGuestAddress`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.InvalidGuestAddress

// vm-memory's items are linked on docs.rs: a `--no-deps` build makes no
// pages for them, and an intra-doc link to one renders as plain brackets.

use std::iter::FusedIterator;
use std::sync::Arc;

use ::vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use ::vm_memory::guest_memory::GuestMemorySliceIterator;
use ::vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

use crate::file::{GuestMemfd, page_range};
use crate::{Error, OwnedPin, Pin};

mod chain;
pub use chain::{ChainError, PinnedChain};

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

/// A guest range pinned for a view's life (a virtio ring), inside one
/// region.
#[derive(Debug)]
struct Resident {
    guest_addr: u64,
    end: u64,
    /// Held until the last clone of the view drops. Never read: it is the
    /// reference that keeps the pages shared.
    _pin: OwnedPin,
}

/// Guest memory as vm-memory's [`GuestMemory`]: guest-physical regions, each
/// a range of a [`GuestMemfd`], whose slices pin their pages, and resident
/// ranges pinned for the view's life. See the [module documentation](self)
/// for the lifecycle.
///
/// [`GuestMemory`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/trait.GuestMemory.html
#[derive(Debug, Clone)]
pub struct GuestMemoryGmem {
    /// Sorted by guest address, disjoint.
    regions: Vec<Region>,
    /// Sorted by guest address, disjoint and not adjacent within a region;
    /// shared by the view's clones, so the pins drop with the last of them.
    resident: Arc<[Resident]>,
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
    /// A resident range that is empty, or has a byte in no region
    /// (`EINVAL`).
    #[error(
        "the resident range at guest address {guest_addr:#x} of {len:#x} bytes is empty or not inside the regions"
    )]
    ResidentOutside {
        /// The range's guest address.
        guest_addr: u64,
        /// Its length.
        len: u64,
    },
    /// A resident range over a private page (`EFAULT`, as a pin of it gives).
    #[error("the resident range holds the private page at guest address {guest_addr:#x}")]
    ResidentPrivate {
        /// The guest address of the first private page (or of the range,
        /// where the page starts before it).
        guest_addr: u64,
    },
    /// A resident range whose pages could not be pinned otherwise: a full
    /// reference count (`ENOMEM`) or a failed allocation.
    #[error("the resident range at guest address {guest_addr:#x} cannot be pinned (errno {errno})")]
    ResidentPin {
        /// The guest address of the part of the range that failed.
        guest_addr: u64,
        /// The errno of the pin.
        errno: i32,
    },
}

impl ViewError {
    /// The errno of the same failure.
    pub fn errno(&self) -> i32 {
        match self {
            ViewError::Overlap { .. } => libc::EEXIST,
            ViewError::ResidentPrivate { .. } => libc::EFAULT,
            ViewError::ResidentPin { errno, .. } => *errno,
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
        Self::from_regions_with_resident(regions, [])
    }

    /// As [`from_regions`](Self::from_regions), with `(guest address,
    /// length)` ranges that stay pinned for the view's life: a virtio
    /// device's descriptor table, available and used rings. Accesses wholly
    /// inside one take no pin of their own; a conversion of their pages
    /// fails with `EAGAIN` until the view and every clone of it drop (the
    /// [module documentation](self) says when to rebuild it). Ranges may
    /// overlap each other and span regions.
    ///
    /// Errors: as `from_regions`; [`ViewError::ResidentOutside`] for an
    /// empty range or one with a byte in no region,
    /// [`ViewError::ResidentPrivate`] for one over a private page,
    /// [`ViewError::ResidentPin`] if its pages cannot be pinned. Nothing
    /// stays pinned after an error.
    pub fn from_regions_with_resident(
        regions: impl IntoIterator<Item = (GuestAddress, Arc<GuestMemfd>, u64, u64)>,
        resident: impl IntoIterator<Item = (GuestAddress, u64)>,
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
        let mut view = GuestMemoryGmem {
            regions: checked,
            resident: Arc::new([]),
        };
        view.resident = view.pin_resident(resident)?.into();
        Ok(view)
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

    /// Pins the resident ranges, cut at region ends and merged where they
    /// overlap or touch within a region; every pin is dropped on an error.
    fn pin_resident(
        &self,
        ranges: impl IntoIterator<Item = (GuestAddress, u64)>,
    ) -> Result<Vec<Resident>, ViewError> {
        let mut pieces = Vec::new();
        for (GuestAddress(guest_addr), len) in ranges {
            self.cut_at_regions(guest_addr, len, &mut pieces)?;
        }
        pieces.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(pieces.len());
        for (start, end) in pieces {
            match merged.last_mut() {
                // Touching pieces merge only inside one region.
                Some(last) if start < last.1 || (start == last.1 && !self.starts_region(start)) => {
                    last.1 = last.1.max(end);
                }
                _ => merged.push((start, end)),
            }
        }
        merged
            .into_iter()
            .map(|(start, end)| self.pin_piece(start, end))
            .collect()
    }

    /// Appends the pieces of `[guest_addr, guest_addr + len)` in each
    /// region it crosses.
    fn cut_at_regions(
        &self,
        guest_addr: u64,
        len: u64,
        pieces: &mut Vec<(u64, u64)>,
    ) -> Result<(), ViewError> {
        let outside = ViewError::ResidentOutside { guest_addr, len };
        let end = guest_addr.checked_add(len).ok_or(outside.clone())?;
        if len == 0 {
            return Err(outside);
        }
        let mut at = guest_addr;
        while at < end {
            let region = self.find(at).ok_or(outside.clone())?;
            let piece_end = region.end().min(end);
            pieces.push((at, piece_end));
            at = piece_end;
        }
        Ok(())
    }

    /// Whether a region starts at guest address `addr`.
    fn starts_region(&self, addr: u64) -> bool {
        self.find(addr).is_some_and(|r| r.guest_addr == addr)
    }

    /// Pins `[start, end)`, which lies inside one region.
    fn pin_piece(&self, start: u64, end: u64) -> Result<Resident, ViewError> {
        let region = self.find(start).expect("a piece lies inside a region");
        let offset = region.file_offset + (start - region.guest_addr);
        let pin = region
            .file
            .pin_owned(offset, end - start)
            .map_err(|err| match err {
                Error::Private { offset: page } => ViewError::ResidentPrivate {
                    guest_addr: start + page.saturating_sub(offset),
                },
                other => ViewError::ResidentPin {
                    guest_addr: start,
                    errno: other.errno(),
                },
            })?;
        Ok(Resident {
            guest_addr: start,
            end,
            _pin: pin,
        })
    }

    /// The number of regions.
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// Whether every byte of `[addr, addr + len)` is in one resident range
    /// (a range merged from those given, cut at region ends).
    pub fn is_resident(&self, addr: GuestAddress, len: u64) -> bool {
        self.resident_holds(addr.0, len)
    }

    #[inline]
    fn resident_holds(&self, addr: u64, len: u64) -> bool {
        let after = self.resident.partition_point(|r| r.guest_addr <= addr);
        after
            .checked_sub(1)
            .and_then(|i| self.resident.get(i))
            .is_some_and(|r| addr.checked_add(len).is_some_and(|end| end <= r.end))
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
        // A slice inside a resident range takes no pin: the view's resident
        // pin keeps its pages shared, and is dropped only with the last clone
        // of the view, which cannot happen while the slice (or any copy of
        // it) borrows the view for `'a`.
        let pin = if self.resident_holds(addr, len) {
            None
        } else {
            let pin = region.file.pin(offset, len);
            Some(pin.map_err(|err| access_error(addr, err))?)
        };
        let bitmap = PinnedSlice { pin };
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
            if state.with_view(|view| view.first_hidden(pages).is_some()) {
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

impl<'a> GuestMemorySliceIterator<'a, PinnedSlice<'a>> for PinnedSlices<'a> {
    /// As the trait's default (the first slice's error is returned, a later
    /// one ends the slices), without its `Peekable`: every `Bytes` access
    /// goes through here, and the default's bookkeeping cost more than a
    /// pin.
    #[inline]
    fn stop_on_error(
        mut self,
    ) -> Result<impl Iterator<Item = VolatileSlice<'a, PinnedSlice<'a>>>, GuestMemoryError> {
        let first = self.next().transpose()?;
        Ok(UntilError { first, rest: self })
    }
}

/// The slices of [`PinnedSlices::stop_on_error`]: the first one, produced
/// already, then the rest up to the first error.
struct UntilError<'a> {
    first: Option<VolatileSlice<'a, PinnedSlice<'a>>>,
    rest: PinnedSlices<'a>,
}

impl<'a> Iterator for UntilError<'a> {
    type Item = VolatileSlice<'a, PinnedSlice<'a>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self.first.take() {
            Some(slice) => Some(slice),
            // `rest` produces nothing after its first error.
            None => self.rest.next()?.ok(),
        }
    }
}

/// The bitmap of a [`GuestMemoryGmem`] slice: the [`Pin`] of its pages.
/// Tracks no dirty pages. A clone pins the same pages once more (it cannot
/// fail: they are pinned already); a drop releases one reference. So the
/// pages stay shared while any copy of a slice lives.
// The release is the pin's own drop, inlined at each of vm-memory's drop
// sites. Measured on a 16-byte `read_obj`: a `Drop` on this type, or a release
// out of line (a call on every drop path), cost 6 to 8 ns more per access
// than this, resident slices included.
#[derive(Debug)]
pub struct PinnedSlice<'a> {
    /// `None` for a slice inside a resident range (the view's pin holds its
    /// pages) and for the slices of [`PinBitmap`], which no view hands out.
    pin: Option<Pin<'a>>,
}

impl<'a> PinnedSlice<'a> {
    /// The pin the slice holds; `None` inside a resident range.
    pub fn pin(&self) -> Option<&Pin<'a>> {
        self.pin.as_ref()
    }
}

impl Clone for PinnedSlice<'_> {
    /// A clone holds its own reference: it borrows the view, not this
    /// slice, so it may outlive it (vm-memory's `offset` and `subslice`
    /// return such clones). `Pin::repin` takes it inlined on the pin's fast
    /// path; a resident slice's clone holds none, as the slice does not.
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
///
/// [`GuestMemory::Bitmap`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/trait.GuestMemory.html#associatedtype.Bitmap
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
