//! The guest memory file: creation, allocation, punching holes and mapping.
//! Conversion lives in `conversion.rs`, pins in `pin.rs`.

use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::attributes::{Attribute, AttributeMap};
use crate::backing::{Backing, BackingKind};
use crate::budget::VmaBudget;
use crate::held::{self, View};
use crate::listener::{ConversionListener, ListenerId, Listeners};
use crate::mapping::{Hiding, HostMapping, Mappings};
use crate::refs::References;
use crate::remote::Backends;
use crate::stats::{Counters, Stats};
use crate::sys::MappedRegion;
use crate::{Error, PAGE_SHIFT, PAGE_SIZE};

bitflags::bitflags! {
    /// Creation flags, with the kernel's `GUEST_MEMFD_FLAG_*` values.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Flags: u64 {
        /// The file may be mapped into the host (`GUEST_MEMFD_FLAG_MMAP`).
        const MMAP = 1 << 0;
        /// Every page starts shared (`GUEST_MEMFD_FLAG_INIT_SHARED`).
        const INIT_SHARED = 1 << 1;
    }
}

/// Options of a file beyond the kernel's flags.
///
/// Made with [`Options::new`] (the same as `Default`) and its builder
/// methods; the fields can be read. New options may be added, so the struct
/// cannot be written as a literal outside gmem.
///
/// ```
/// use gmem::{Hiding, Options};
///
/// let options = Options::new().huge_folios(true).hiding(Hiding::EmptyFileRemap);
/// assert!(options.huge_folios);
/// assert_eq!(options.hiding, Some(Hiding::EmptyFileRemap));
/// assert_eq!(options.vma_budget, None);
/// // `None` gives the choice back to the kernel; `new` is the default.
/// assert_eq!(options.hiding(None).huge_folios(false), Options::default());
/// ```
///
/// ```compile_fail,E0639
/// // A literal would break with every new option: it does not compile.
/// let options = gmem::Options { huge_folios: true, hiding: None, vma_budget: None };
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// Count references per 2 MiB huge folio wherever a naturally aligned
    /// 2 MiB range has one state: a pin takes one reference for all its pages
    /// in the folio and a conversion checks one count instead of 512. Folios
    /// are split before part of them changes state and merged back when
    /// uniform again (section 6 of the specification).
    pub huge_folios: bool,
    /// How host mappings hide private pages. `None` (the default): guard
    /// markers wherever the kernel allows them on the mapping, else the
    /// remap fallback. `Some(GuardMarkers)`: a mapping where the kernel
    /// refuses guards fails. `Some(EmptyFileRemap)`: always the fallback.
    pub hiding: Option<Hiding>,
    /// The VMAs this file's fallback mappings may spend (`None`: an eighth
    /// of `vm.max_map_count`). All files together never spend more than a
    /// quarter of it. A conversion or mapping that would exceed either
    /// fails with `ENOMEM`.
    pub vma_budget: Option<u64>,
    /// How long a conversion waits for each backend process
    /// ([`GuestMemfd::add_backend`]) to answer before it fails with
    /// `ETIMEDOUT` (default 250 ms); on a backend's replica, how long its
    /// attachment waits for the VMM (plus 5 s for the state).
    pub backend_timeout: Duration,
}

impl Options {
    /// The defaults: small folios only, the hiding the kernel allows, and
    /// the default VMA budget.
    pub const fn new() -> Options {
        Options {
            huge_folios: false,
            hiding: None,
            vma_budget: None,
            backend_timeout: Duration::from_millis(250),
        }
    }

    /// Sets [`huge_folios`](Self::huge_folios): references counted per
    /// 2 MiB where a range is uniform.
    #[must_use]
    pub const fn huge_folios(mut self, huge_folios: bool) -> Options {
        self.huge_folios = huge_folios;
        self
    }

    /// Sets [`hiding`](Self::hiding): a mechanism to force, or `None` for
    /// the one the kernel allows.
    #[must_use]
    pub fn hiding(mut self, hiding: impl Into<Option<Hiding>>) -> Options {
        self.hiding = hiding.into();
        self
    }

    /// Sets [`vma_budget`](Self::vma_budget): the VMAs this file's fallback
    /// mappings may spend, or `None` for the default.
    #[must_use]
    pub fn vma_budget(mut self, vma_budget: impl Into<Option<u64>>) -> Options {
        self.vma_budget = vma_budget.into();
        self
    }
}

impl Options {
    /// Sets [`backend_timeout`](Self::backend_timeout): how long a
    /// conversion waits for a backend's answer.
    #[must_use]
    pub const fn backend_timeout(mut self, timeout: Duration) -> Options {
        self.backend_timeout = timeout;
        self
    }
}

impl Default for Options {
    fn default() -> Options {
        Options::new()
    }
}

/// `fallocate` mode bits, as `linux/falloc.h`.
pub mod falloc {
    /// `FALLOC_FL_KEEP_SIZE`: required by guest_memfd.
    pub const KEEP_SIZE: u32 = 0x01;
    /// `FALLOC_FL_PUNCH_HOLE`: free the range.
    pub const PUNCH_HOLE: u32 = 0x02;
}

/// Guest memory: a fixed-size file whose every page is shared or private.
///
/// `GuestMemfd` is `Send + Sync`; share it between vCPU and device threads in
/// an `Arc`. See the crate documentation for an example.
#[derive(Debug)]
pub struct GuestMemfd {
    pub(crate) state: Arc<FileState>,
}

/// Everything one file owns. Host mappings keep it alive.
#[derive(Debug)]
pub(crate) struct FileState {
    pub(crate) size: u64,
    pub(crate) flags: Flags,
    pub(crate) backing: Backing,
    /// An empty file, mapped over private pages by the remap fallback so
    /// that they `SIGBUS`.
    pub(crate) hole: OwnedFd,
    /// The hiding mechanism the options ask for (`None`: the best allowed).
    pub(crate) hiding: Option<Hiding>,
    /// The VMAs the remap fallback may spend on this file's mappings.
    pub(crate) vma_budget: VmaBudget,
    /// gmem's own mapping of the whole file (the kernel's direct map), for
    /// copies through pins. Never changed by conversions.
    pub(crate) direct: MappedRegion,
    /// The invalidate lock, and the state it guards. Conversions and punches
    /// take it exclusively; faults (new mappings, slow-path pins, copies
    /// through host mappings) take it shared.
    pub(crate) attrs: RwLock<AttributeMap>,
    pub(crate) refs: Arc<References>,
    pub(crate) mappings: Mappings,
    pub(crate) listeners: Listeners,
    pub(crate) counters: Counters,
    /// The backend processes that hold replicas of the file.
    pub(crate) backends: Backends,
    /// How long a conversion waits for a backend.
    pub(crate) backend_timeout: Duration,
    /// This is a backend's replica: its conversions are the VMM's.
    pub(crate) attached: bool,
}

impl GuestMemfd {
    /// A new memfd-backed file of `size` bytes.
    ///
    /// Errors: `EINVAL` for a size that is zero or not page-aligned, or for an
    /// unknown flag bit.
    pub fn new(size: u64, flags: Flags) -> Result<GuestMemfd, Error> {
        Self::with_options(size, flags, Options::default())
    }

    /// A new memfd-backed file with `options`; errors as [`new`](Self::new).
    pub fn with_options(size: u64, flags: Flags, options: Options) -> Result<GuestMemfd, Error> {
        Self::validate(size, flags)?;
        Self::with_backing(Backing::memfd(size)?, size, flags, options)
    }

    pub(crate) fn validate(size: u64, flags: Flags) -> Result<(), Error> {
        let unknown = flags.bits() & !Flags::all().bits();
        if unknown != 0 {
            return Err(Error::UnknownFlags { bits: unknown });
        }
        if size == 0 || size % PAGE_SIZE != 0 || size > isize::MAX as u64 {
            return Err(Error::InvalidSize { size });
        }
        Ok(())
    }

    /// Adopts a kernel guest_memfd the VMM made with `KVM_CREATE_GUEST_MEMFD`
    /// (for example with `kvm-ioctls`), as a file of `size` bytes with gmem's
    /// `flags` and `options`.
    ///
    /// The guest_memfd must have been created with `GUEST_MEMFD_FLAG_MMAP |
    /// GUEST_MEMFD_FLAG_INIT_SHARED`: gmem maps it whole and decides itself
    /// which pages the host may touch. What can be verified is: that it is a
    /// kvm guest_memfd, that its size is `size` (both `EINVAL`,
    /// [`Error::NotAdoptable`]), that it maps (else the `mmap` error,
    /// `ENODEV` without `MMAP`), and that the host can fault in its page 0
    /// (`EINVAL`, [`Error::NotAdoptable`], where it was made without
    /// `INIT_SHARED`: the first copy through a pin would raise `SIGBUS`);
    /// that probe allocates page 0. gmem does not know its VM:
    /// [`Vm::bind`](crate::kvm::Vm::bind) lets the kernel judge it.
    #[cfg(feature = "kvm")]
    pub fn from_kernel_guest_memfd(
        fd: OwnedFd,
        size: u64,
        flags: Flags,
        options: Options,
    ) -> Result<GuestMemfd, Error> {
        Self::validate(size, flags)?;
        Backing::check_kernel_guest_memfd(fd.as_fd(), size)?;
        let backing = Backing::from_fd(fd, BackingKind::KernelGuestMemfd, None);
        let file = Self::with_backing(backing, size, flags, options)?;
        Backing::check_host_faults(&file.state.direct)?;
        Ok(file)
    }

    /// A file over a backing of `size` bytes that the host may map in full;
    /// `size` and `flags` were checked with [`validate`](Self::validate).
    pub(crate) fn with_backing(
        backing: Backing,
        size: u64,
        flags: Flags,
        options: Options,
    ) -> Result<GuestMemfd, Error> {
        Self::with_backing_as(backing, size, flags, options, false)
    }

    /// [`with_backing`](Self::with_backing), as a backend's replica
    /// (`attached`) or not.
    pub(crate) fn with_backing_as(
        backing: Backing,
        size: u64,
        flags: Flags,
        options: Options,
        attached: bool,
    ) -> Result<GuestMemfd, Error> {
        debug_assert!(Self::validate(size, flags).is_ok());
        let initial = if flags.contains(Flags::INIT_SHARED) {
            Attribute::Shared
        } else {
            Attribute::Private
        };
        let pages = size >> PAGE_SHIFT;
        let direct =
            MappedRegion::map_shared(backing.as_fd(), size as usize).map_err(Error::os("mmap"))?;
        let refs = References::new(pages, options.huge_folios).ok_or(Error::Os {
            call: "allocating the reference table",
            errno: rustix::io::Errno::NOMEM,
        })?;
        Ok(GuestMemfd {
            state: Arc::new(FileState {
                size,
                flags,
                hole: Backing::empty()?,
                hiding: options.hiding,
                vma_budget: VmaBudget::new(
                    options
                        .vma_budget
                        .unwrap_or_else(crate::budget::default_file_budget),
                ),
                direct,
                backing,
                attrs: RwLock::new(AttributeMap::new(pages, initial)),
                refs: Arc::new(refs),
                mappings: Mappings::default(),
                listeners: Listeners::default(),
                counters: Counters::default(),
                backends: Backends::default(),
                backend_timeout: options.backend_timeout,
                attached,
            }),
        })
    }

    /// The size of the file in bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.state.size
    }

    /// The creation flags.
    pub fn flags(&self) -> Flags {
        self.state.flags
    }

    /// The file's options (with the VMA budget in force).
    pub fn options(&self) -> Options {
        Options {
            huge_folios: self.state.refs.has_huge_folios(),
            hiding: self.state.hiding,
            vma_budget: Some(self.state.vma_budget.limit()),
            backend_timeout: self.state.backend_timeout,
        }
    }

    /// What backs the file.
    pub fn backing_kind(&self) -> BackingKind {
        self.state.backing.kind()
    }

    /// The backing file, for binding it to a KVM memslot.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.state.backing.as_fd()
    }

    /// The KVM VM whose guest_memfd backs the file, if any.
    #[cfg_attr(not(feature = "kvm"), allow(dead_code))]
    pub(crate) fn owner_vm(&self) -> Option<u64> {
        self.state.backing.owner_vm()
    }

    /// gmem's own mapping of the whole file, which conversions never change:
    /// what a memslot gives KVM as `userspace_addr`.
    #[cfg_attr(not(feature = "kvm"), allow(dead_code))]
    pub(crate) fn direct_map_ptr(&self) -> *mut u8 {
        self.state.direct.as_ptr()
    }

    /// The byte range of the folio holding `offset`: its 2 MiB huge folio
    /// while there is one, else its page. A reference anywhere in it blocks
    /// a conversion of any part of it. The range always lies inside the file
    /// (a huge folio never reaches past its end).
    ///
    /// Errors: `EINVAL` ([`Error::OutOfRange`]) if `offset` is not inside the
    /// file.
    pub fn folio_range(&self, offset: u64) -> Result<Range<u64>, Error> {
        if offset >= self.size() {
            return Err(Error::OutOfRange {
                offset,
                len: 1,
                limit: self.size(),
            });
        }
        let pages = self.state.refs.folio_of(offset >> PAGE_SHIFT);
        Ok((pages.start << PAGE_SHIFT)..(pages.end << PAGE_SHIFT))
    }

    /// A number naming the file uniquely in this process.
    #[cfg(feature = "kvm")]
    pub(crate) fn file_id(&self) -> u64 {
        self.state.refs.id()
    }

    /// The state of the page holding `offset`.
    ///
    /// Errors: `EINVAL` if `offset` is not inside the file.
    pub fn attribute(&self, offset: u64) -> Result<Attribute, Error> {
        if offset >= self.size() {
            return Err(Error::OutOfRange {
                offset,
                len: 1,
                limit: self.size(),
            });
        }
        Ok(self
            .state
            .with_attrs(|attrs| attrs.get(offset >> PAGE_SHIFT)))
    }

    /// Maps the whole file into the host.
    ///
    /// Errors: `ENODEV` if the file was created without [`Flags::MMAP`].
    pub fn mmap(&self) -> Result<HostMapping, Error> {
        self.mmap_len(self.size())
    }

    /// Maps `len` bytes of the file from offset 0, rounded up to pages.
    /// `len` may exceed the file: pages past its end raise `SIGBUS`.
    ///
    /// Errors: `ENODEV` without [`Flags::MMAP`]; `EINVAL` for a zero length.
    pub fn mmap_len(&self, len: u64) -> Result<HostMapping, Error> {
        if !self.flags().contains(Flags::MMAP) {
            return Err(Error::MmapNotSupported);
        }
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .filter(|len| *len <= isize::MAX as u64)
            .ok_or(Error::OutOfRange {
                offset: 0,
                len,
                limit: isize::MAX as u64,
            })?;
        HostMapping::new(&self.state, len)
    }

    /// `fallocate(2)` with the kernel's guest_memfd rules: `mode` must hold
    /// `KEEP_SIZE` and may add only `PUNCH_HOLE` (else `EOPNOTSUPP`); offset
    /// and length must be page-aligned and the length non-zero (`EINVAL`);
    /// an offset or length above `i64::MAX` is `EINVAL`, and `offset + len`
    /// above it `EFBIG` ([`Error::FileTooBig`]), as `vfs_fallocate` checks.
    pub fn fallocate(&self, mode: u32, offset: u64, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        // First `vfs_fallocate`'s checks: a negative offset or length is
        // `EINVAL`, an end past the largest file offset `EFBIG`.
        if offset > i64::MAX as u64 || len > i64::MAX as u64 {
            return Err(Error::OutOfRange {
                offset,
                len,
                limit: i64::MAX as u64,
            });
        }
        let Some(end) = offset
            .checked_add(len)
            .filter(|end| *end <= i64::MAX as u64)
        else {
            return Err(Error::FileTooBig { offset, len });
        };
        // Then guest_memfd's own checks.
        if mode & falloc::KEEP_SIZE == 0 || mode & !(falloc::KEEP_SIZE | falloc::PUNCH_HOLE) != 0 {
            return Err(Error::UnsupportedMode { mode });
        }
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Error::Unaligned { offset, len });
        }
        if mode & falloc::PUNCH_HOLE != 0 {
            self.state.punch_hole(offset, end.min(self.size()))
        } else if end > self.size() {
            Err(Error::OutOfRange {
                offset,
                len,
                limit: self.size(),
            })
        } else {
            // A fault: under the invalidate lock, apart from punches.
            self.state
                .with_attrs(|_| self.state.backing.allocate(offset, len))
        }
    }

    /// Allocates the pages of `[offset, offset + len)`.
    ///
    /// Errors: `EINVAL` for an unaligned or empty range or one reaching past
    /// the end of the file; `EFBIG` if `offset + len` passes `i64::MAX`.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.fallocate(falloc::KEEP_SIZE, offset, len)
    }

    /// Frees the pages of `[offset, offset + len)`: the next access sees a
    /// zeroed page. Page state does not change. The part past the end of the
    /// file is ignored.
    ///
    /// Errors: `EINVAL` for an unaligned or empty range; `EFBIG` if `offset +
    /// len` passes `i64::MAX`; `EBUSY` with the offset of the first pinned
    /// page of the request (where the kernel would detach it; a pinned huge
    /// folio that begins before the request reports the request's start),
    /// here or in a backend process, which holds its replica still until the
    /// punch is done; a backend's fault ([`Error::Backend`]); `EPERM` on a
    /// backend's replica.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.fallocate(falloc::KEEP_SIZE | falloc::PUNCH_HOLE, offset, len)
    }

    /// Registers a listener of conversions.
    pub fn add_listener(&self, listener: Arc<dyn ConversionListener>) -> ListenerId {
        self.state.listeners.add(listener)
    }

    /// Registers a listener and, before any conversion can run, tells it of
    /// every shared run as if just converted to shared: what a listener
    /// added to a running VM (an IOMMU mapping shared memory) needs.
    pub fn add_listener_replaying(&self, listener: Arc<dyn ConversionListener>) -> ListenerId {
        let state = &self.state;
        state.with_attrs(|attrs| {
            let id = state.listeners.add(listener.clone());
            let shared = || shared_runs(attrs, state.size);
            held::with_held(state.refs.id(), &View::new(attrs), || {
                Listeners::replay(&*listener, shared());
            });
            id
        })
    }

    /// The shared runs of the file, as byte ranges in order.
    pub fn shared_runs(&self) -> Vec<Range<u64>> {
        let state = &self.state;
        state.with_attrs(|attrs| shared_runs(attrs, state.size).collect())
    }

    /// The shared runs within the byte range `range` (page-aligned, inside
    /// the file), clipped to it, in order: a walk of the range's runs only.
    /// Under the invalidate lock held shared, or, in a conversion listener's
    /// callback, from the map the conversion holds.
    #[cfg(feature = "kvm")]
    pub(crate) fn shared_runs_in(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let pages = page_range(range.start, range.end);
        self.state.with_attrs(|attrs| {
            let runs = attrs.runs_in(pages);
            runs.filter(|run| run.attr == Attribute::Shared)
                .map(|run| (run.pages.0 << PAGE_SHIFT)..(run.pages.1 << PAGE_SHIFT))
                .collect()
        })
    }

    /// Runs `f` on the shared runs of the file (byte ranges, in order)
    /// under the invalidate lock held shared, so that no conversion runs
    /// meanwhile.
    #[cfg(feature = "kvm")]
    pub(crate) fn with_shared_runs<R>(&self, f: impl FnOnce(&[Range<u64>]) -> R) -> R {
        let state = &self.state;
        state.with_attrs(|attrs| f(&shared_runs(attrs, state.size).collect::<Vec<_>>()))
    }

    /// Removes a listener; false if it was not registered. Once this
    /// returns, the listener is never called again: calls under way on other
    /// threads are waited for (a listener may remove itself from its own
    /// callback).
    pub fn remove_listener(&self, id: ListenerId) -> bool {
        self.state.listeners.remove(self.state.refs.id(), id)
    }

    /// Flushes every thread's batch of released pins, as a conversion's drain
    /// does.
    pub fn drain_pin_batches(&self) {
        self.state.refs.drain_all();
    }

    /// A snapshot of the file's counters and state.
    pub fn stats(&self) -> Stats {
        let state = &self.state;
        let (pages_private, pages_shared) = state.with_attrs(|attrs| {
            (
                attrs.count(Attribute::Private),
                attrs.count(Attribute::Shared),
            )
        });
        let (huge_folios, folio_splits, folio_merges) = state.refs.folio_counts();
        let (mappings_guarded, mappings_remapped) = state.mappings.counts();
        Stats {
            conversions_to_private: Counters::get(&state.counters.to_private),
            conversions_to_shared: Counters::get(&state.counters.to_shared),
            eagain: Counters::get(&state.counters.eagain),
            refused: Counters::get(&state.counters.refused),
            drains: state.refs.drains(),
            pins_live: state.refs.pins_live(),
            pages_allocated: state.backing.allocated_bytes().map(|b| b >> PAGE_SHIFT),
            pages_private,
            pages_shared,
            metadata_bytes: state.refs.footprint(),
            huge_folios,
            folio_splits,
            folio_merges,
            mappings_guarded,
            mappings_remapped,
            vma_budget: state.vma_budget.limit(),
            vmas_spent: state.vma_budget.spent(),
        }
    }
}

impl FileState {
    /// Runs `f` on the attribute map under the invalidate lock held shared
    /// (a fault), or, in a conversion listener's callback on this thread,
    /// on the map its conversion holds.
    pub(crate) fn with_attrs<R>(&self, f: impl FnOnce(&AttributeMap) -> R) -> R {
        self.with_view(|view| f(view.attrs()))
    }

    /// Runs `f` on the state as this thread's accesses see it: under the
    /// invalidate lock held shared, or in a listener's callback on the map
    /// its conversion holds, with the range in flight in a commit phase.
    pub(crate) fn with_view<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        match held::held(self.refs.id(), f) {
            Ok(result) => result,
            Err(f) => f(&View::new(&self.read_attrs())),
        }
    }

    /// The backing file.
    pub(crate) fn backing_fd(&self) -> BorrowedFd<'_> {
        self.backing.as_fd()
    }

    /// Takes the invalidate lock shared (a fault).
    pub(crate) fn read_attrs(&self) -> RwLockReadGuard<'_, AttributeMap> {
        // A panic while holding the lock cannot leave the map half-updated
        // (`set` does not allocate or fail), so poisoning is ignored.
        self.attrs.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the invalidate lock exclusively (a conversion or punch).
    pub(crate) fn write_attrs(&self) -> RwLockWriteGuard<'_, AttributeMap> {
        self.attrs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Punches `[offset, end)`, both page-aligned; empty is a no-op.
    fn punch_hole(&self, offset: u64, end: u64) -> Result<(), Error> {
        if self.attached {
            return Err(Error::Attached);
        }
        if offset >= end {
            return Ok(());
        }
        if held::is_held(self.refs.id()) {
            return Err(Error::WouldDeadlock);
        }
        let pages = page_range(offset, end);
        let attrs = self.write_attrs();
        self.refs.unmap(pages.clone());
        if let Err(page) = self.refs.check_unreferenced(pages.clone()) {
            // Clamped to the start of the request, as conversions do: a huge
            // folio may begin before it.
            return Err(Error::Pinned {
                offset: (page << PAGE_SHIFT).max(offset),
            });
        }
        if self.backends.any() {
            let timeout = self.backend_timeout;
            self.backends
                .prepare_punch(pages.clone(), offset, timeout)?;
            let punched = self.backing.punch_hole(offset, end - offset);
            self.backends.end_punch(punched.is_ok(), timeout);
            punched?;
        } else {
            self.backing.punch_hole(offset, end - offset)?;
        }
        self.refs.mark_unallocated(pages.clone());
        self.refs.reshape(pages, |range| attrs.is_uniform(range));
        Ok(())
    }
}

/// The shared runs of a file of `size` bytes, as byte ranges.
fn shared_runs(attrs: &AttributeMap, size: u64) -> impl Iterator<Item = Range<u64>> + '_ {
    let runs = attrs.runs_in(0..size >> PAGE_SHIFT);
    runs.filter(|run| run.attr == Attribute::Shared)
        .map(|run| (run.pages.0 << PAGE_SHIFT)..(run.pages.1 << PAGE_SHIFT))
}

/// The pages covering bytes `[offset, end)`.
#[inline(always)]
pub(crate) fn page_range(offset: u64, end: u64) -> Range<u64> {
    (offset >> PAGE_SHIFT)..end.div_ceil(PAGE_SIZE)
}
