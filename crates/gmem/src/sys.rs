//! The leaf of system calls that need `unsafe`: shared mappings of a file,
//! the two ways of hiding part of one (guard markers, or an empty file mapped
//! over it), and raw copies through them. Nothing above this module
//! dereferences a pointer into guest memory.
//!
//! Every call that hides or shows a range goes through [`faults::injected`],
//! which in unit tests can make the nth such call fail, so that each undo
//! path is exercised.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::Errno;
use rustix::mm::{MapFlags, MremapFlags, ProtFlags};

pub(crate) mod faults;
pub(crate) mod uffd;

/// An owned `MAP_SHARED` mapping of a file; `Drop` unmaps it.
///
/// The mapping may be longer than the file (pages past the end raise
/// `SIGBUS`). Parts of it can be replaced in place by [`remap`](Self::remap),
/// which keeps the address range owned by this value throughout.
#[derive(Debug)]
pub(crate) struct MappedRegion {
    addr: NonNull<u8>,
    len: usize,
    /// Set when a failed `MAP_FIXED` may have left part of the range
    /// unmapped (and so possibly reused by someone else): `Drop` then leaves
    /// the range alone rather than unmap what may no longer be ours.
    forsaken: AtomicBool,
}

// The region is plain memory owned by this value; every access goes through
// raw copies whose bounds are checked, and remaps are serialised by the owner
// (the conversion holds the mapping registry's lock).
// SAFETY: nothing in the region is tied to the creating thread.
unsafe impl Send for MappedRegion {}
// SAFETY: as for Send; `&MappedRegion` only allows bounded raw copies.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Maps `len` bytes (page-aligned, non-zero) of `fd` from offset 0, shared.
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize) -> Result<MappedRegion, Errno> {
        Self::map_shared_at(fd, len, 0)
    }

    /// Maps `len` bytes (page-aligned, non-zero) of `fd` from `offset`
    /// (page-aligned), shared, where the kernel picks.
    fn map_shared_at(fd: BorrowedFd<'_>, len: usize, offset: u64) -> Result<MappedRegion, Errno> {
        // SAFETY: a new mapping at an address the kernel picks overlaps nothing we own.
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                fd,
                offset,
            )?
        };
        let addr = NonNull::new(addr.cast::<u8>()).ok_or(Errno::NOMEM)?;
        Ok(MappedRegion {
            addr,
            len,
            forsaken: AtomicBool::new(false),
        })
    }

    /// Gives up the address range: it will not be unmapped on drop (after a
    /// remap whose undo failed, the range may hold a gap).
    pub(crate) fn forsake(&self) {
        // Relaxed: read only by `Drop`, which runs after every other use.
        self.forsaken.store(true, Ordering::Relaxed);
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Installs guard markers on page 0 and removes them again: whether the
    /// kernel allows guards on this mapping (Linux 6.15+ for shared file
    /// mappings; never on mlocked or hugetlb ones). Called before anyone else
    /// can reach the region, so the brief guard is seen by no one.
    pub(crate) fn supports_guards(&self) -> bool {
        let page = std::iter::once(0..crate::PAGE_SIZE);
        let installed = self.advise(page.clone(), MADV_GUARD_INSTALL, false);
        installed.is_ok() && self.advise(page, MADV_GUARD_REMOVE, false).is_ok()
    }

    /// Hides (`install`) or shows the byte ranges `ranges` of this region with
    /// guard markers: `MADV_GUARD_INSTALL` zaps the pages and makes any access
    /// fault (`SIGSEGV`) without splitting the VMA; `MADV_GUARD_REMOVE` lets
    /// them fault in from the file again. Contents stay in the file. Ranges
    /// go to the kernel 1024 at a time through `process_madvise`, a lone
    /// range through `madvise`. On error, some ranges may have been advised.
    #[inline]
    pub(crate) fn set_guards(
        &self,
        ranges: impl Iterator<Item = Range<u64>>,
        install: bool,
    ) -> Result<(), Errno> {
        let advice = if install {
            MADV_GUARD_INSTALL
        } else {
            MADV_GUARD_REMOVE
        };
        self.advise(ranges, advice, true)
    }

    /// Faults `range` (page-aligned, inside the region) in as a read would,
    /// with `MADV_POPULATE_READ` (Linux 5.14): `EFAULT` where a read would
    /// raise a signal (a page of a kernel guest_memfd the kernel holds
    /// private, a page past the end of the file); `EINVAL` before 5.14.
    pub(crate) fn populate_read(&self, range: Range<u64>) -> Result<(), Errno> {
        self.advise(std::iter::once(range), MADV_POPULATE_READ, false)
    }

    /// Gives `advice` to every range (page-aligned, inside the region), in
    /// batches of up to `IOV_MAX` ranges; a lone range with `madvise`.
    #[inline]
    fn advise(
        &self,
        ranges: impl Iterator<Item = Range<u64>>,
        advice: i32,
        counted: bool,
    ) -> Result<(), Errno> {
        let mut ranges = ranges.map(|range| self.iovec(range));
        let Some(first) = ranges.next() else {
            return Ok(());
        };
        match ranges.next() {
            None => advise_batch(&[MaybeUninit::new(first)], advice, counted),
            Some(second) => advise_many([first, second], ranges, advice, counted),
        }
    }

    /// The iovec of a byte range of the region (page-aligned, inside it).
    fn iovec(&self, range: Range<u64>) -> libc::iovec {
        assert!(
            range.start < range.end && range.end <= self.len as u64,
            "advice for {range:#x?} outside a region of {:#x}",
            self.len
        );
        libc::iovec {
            // In bounds (asserted): the pointer stays inside the region.
            iov_base: self.as_ptr().wrapping_add(range.start as usize).cast(),
            iov_len: (range.end - range.start) as usize,
        }
    }

    /// Replaces `[start, start + len)` of this region with a shared mapping
    /// of `fd` at file offset `start`. Mapping the real file there makes the
    /// pages accessible; mapping an empty file makes every access `SIGBUS`
    /// (the offset is past its end), and keeps offsets contiguous so that the
    /// kernel merges neighbouring pieces into one VMA.
    ///
    /// A failed `MAP_FIXED` may have unmapped the range before it failed,
    /// and someone else may map there: the region is then forsaken (never
    /// unmapped), whatever the caller does next.
    pub(crate) fn remap(&self, start: u64, len: u64, fd: impl AsFd) -> Result<(), Errno> {
        let end = start.checked_add(len).ok_or(Errno::INVAL)?;
        if end > self.len as u64 || len == 0 {
            return Err(Errno::INVAL);
        }
        let mapped = faults::injected().and_then(|()| {
            // Nobody holds a Rust reference into the region (raw copies only).
            // SAFETY: the range lies inside this region, so MAP_FIXED replaces only our own pages.
            unsafe {
                rustix::mm::mmap(
                    self.as_ptr().add(start as usize).cast(),
                    len as usize,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::FIXED | MapFlags::NORESERVE,
                    fd.as_fd(),
                    start,
                )
            }
        });
        if let Err(errno) = mapped {
            self.forsake();
            return Err(errno);
        }
        Ok(())
    }

    /// Whether the region was forsaken: it will never be unmapped, so its
    /// VMAs stay in the process for good.
    pub(crate) fn is_forsaken(&self) -> bool {
        // Relaxed: set and read under the owner's registry lock, or by the
        // last user.
        self.forsaken.load(Ordering::Relaxed)
    }

    /// Replaces `[start, start + len)` of this region with `fd` at file
    /// offset `start`, as [`remap`](Self::remap) does, but with guard markers
    /// already on the byte ranges `guarded` (inside the range): the file is
    /// mapped elsewhere, guarded there, and moved over the range by
    /// `mremap`, which keeps guard markers. So no page of `guarded` is
    /// reachable at any moment, and the range ends as one VMA with its
    /// neighbours where offsets meet. A failure after the move began may
    /// leave a gap: the region is then forsaken, as after a failed remap.
    pub(crate) fn remap_guarded(
        &self,
        start: u64,
        len: u64,
        fd: impl AsFd,
        guarded: impl Iterator<Item = Range<u64>>,
    ) -> Result<(), Errno> {
        let end = start.checked_add(len).ok_or(Errno::INVAL)?;
        if end > self.len as u64 || len == 0 {
            return Err(Errno::INVAL);
        }
        faults::injected()?;
        let staging = MappedRegion::map_shared_at(fd.as_fd(), len as usize, start)?;
        let within = guarded.map(|range| (range.start - start)..(range.end - start));
        staging.set_guards(within, true)?;
        // Nobody holds a Rust reference into either region (raw copies only).
        // `staging` is our own mapping of `len` bytes, and the destination
        // lies inside this region.
        // SAFETY: MREMAP_FIXED moves our own mapping over our own pages only.
        let moved = unsafe {
            rustix::mm::mremap_fixed(
                staging.as_ptr().cast(),
                len as usize,
                len as usize,
                MremapFlags::MAYMOVE,
                self.as_ptr().add(start as usize).cast(),
            )
        };
        match moved {
            Ok(_) => {
                // The staging range is gone: moved here, owned by this region.
                std::mem::forget(staging);
                Ok(())
            }
            Err(errno) => {
                self.forsake();
                staging.forsake();
                Err(errno)
            }
        }
    }

    /// Copies `buf.len()` bytes from `offset` of the region into `buf`, with
    /// volatile loads (the guest may write the memory meanwhile).
    ///
    /// The caller has checked that the pages are mapped to the file (shared
    /// and inside it); a page that is not raises `SIGBUS`, as a raw access
    /// would. Panics if the range is outside the region.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) {
        let offset = self.check(offset, buf.len());
        // SAFETY: the source is inside the region (checked) and readable; `buf` is distinct.
        unsafe { copy_from_guest(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len()) }
    }

    /// Copies `data` to `offset` of the region with volatile stores; as
    /// [`read`](Self::read).
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        let offset = self.check(offset, data.len());
        // SAFETY: the destination is inside the region (checked) and writable; `data` is distinct.
        unsafe { copy_to_guest(data.as_ptr(), self.as_ptr().add(offset), data.len()) }
    }

    /// `read(2)` of up to `len` bytes from `fd` straight into `offset` of the
    /// region, retried on `EINTR`: the bytes read. As [`read`](Self::read),
    /// the caller has checked the pages; panics if the range is outside.
    pub(crate) fn read_from_fd(
        &self,
        offset: u64,
        len: usize,
        fd: BorrowedFd<'_>,
    ) -> Result<usize, Errno> {
        let offset = self.check(offset, len);
        loop {
            // The kernel writes guest memory as the guest's own DMA would; no
            // Rust reference to it is formed.
            // SAFETY: the destination is inside the region (checked) and writable.
            let done = unsafe { libc::read(fd.as_raw_fd(), self.as_ptr().add(offset).cast(), len) };
            if let Ok(done) = usize::try_from(done) {
                return Ok(done);
            }
            let errno = last_errno();
            if errno != Errno::INTR {
                return Err(errno);
            }
        }
    }

    /// `write(2)` of up to `len` bytes from `offset` of the region to `fd`,
    /// retried on `EINTR`: the bytes written. As
    /// [`read_from_fd`](Self::read_from_fd).
    pub(crate) fn write_to_fd(
        &self,
        offset: u64,
        len: usize,
        fd: BorrowedFd<'_>,
    ) -> Result<usize, Errno> {
        let offset = self.check(offset, len);
        loop {
            let source = self.as_ptr().wrapping_add(offset).cast();
            // SAFETY: the source is inside the region (checked) and readable; the kernel only reads it.
            let done = unsafe { libc::write(fd.as_raw_fd(), source, len) };
            if let Ok(done) = usize::try_from(done) {
                return Ok(done);
            }
            let errno = last_errno();
            if errno != Errno::INTR {
                return Err(errno);
            }
        }
    }

    /// A vm-memory `VolatileSlice` of `[offset, offset + len)` of the region
    /// that carries `bitmap` (a pin, for the vm-memory view). The caller has
    /// checked that the pages stay shared for as long as the slice or any of
    /// its copies lives (the pin it carries, or a borrow of one). Panics if
    /// the range is outside the region.
    #[cfg(feature = "vm-memory")]
    pub(crate) fn volatile_slice<B: vm_memory::bitmap::BitmapSlice>(
        &self,
        offset: u64,
        len: usize,
        bitmap: B,
    ) -> vm_memory::VolatileSlice<'_, B> {
        let offset = self.check(offset, len);
        // The region outlives the slice (the borrow), every access through a
        // VolatileSlice is volatile, and the guest's are its own.
        // SAFETY: `len` bytes at the pointer lie inside the region (checked) and stay mapped while it lives.
        unsafe {
            vm_memory::VolatileSlice::with_bitmap(self.as_ptr().add(offset), len, bitmap, None)
        }
    }

    fn check(&self, offset: u64, len: usize) -> usize {
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|end| end <= self.len as u64),
            "copy of {len} bytes at {offset:#x} outside a region of {:#x}",
            self.len
        );
        offset as usize
    }
}

/// Copies `len` bytes from guest memory at `src` to `dst`, with accesses the
/// compiler cannot elide, repeat, merge or tear into a plain `memcpy`: short
/// copies in volatile loads (aligned `u64`s, bytes at the edges), long ones
/// on x86-64 in one `rep movsb` (opaque to the compiler, as volatile is;
/// what the kernel's `copy_to_user` runs, at `memcpy`'s speed). Each byte is
/// read once, as a guest racing the copy would see it.
///
/// # Safety
///
/// `src` is readable and `dst` writable for `len` bytes, and they do not
/// overlap.
#[inline]
unsafe fn copy_from_guest(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= STRING_COPY_MIN {
        // SAFETY: the caller's duties pass on.
        return unsafe { string_copy(src, dst, len) };
    }
    // SAFETY: the caller's duties pass on.
    unsafe { words_from_guest(src, dst, len) }
}

/// Copies `len` bytes from `src` to guest memory at `dst`; as
/// [`copy_from_guest`], with volatile stores.
///
/// # Safety
///
/// As [`copy_from_guest`].
#[inline]
unsafe fn copy_to_guest(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= STRING_COPY_MIN {
        // SAFETY: the caller's duties pass on.
        return unsafe { string_copy(src, dst, len) };
    }
    // SAFETY: the caller's duties pass on.
    unsafe { words_to_guest(src, dst, len) }
}

/// The shortest copy that `rep movsb` serves: below it, its start-up costs
/// more than a word loop.
#[cfg(target_arch = "x86_64")]
const STRING_COPY_MIN: usize = 256;

/// `rep movsb` of `len` bytes from `src` to `dst`.
///
/// # Safety
///
/// As [`copy_from_guest`].
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn string_copy(src: *const u8, dst: *mut u8, len: usize) {
    // The direction flag is clear on entry to inline assembly (the ABI's
    // rule, which Rust guarantees), so the copy runs upwards; `rep movsb`
    // changes no flag and touches no stack.
    // SAFETY: `len` bytes at `src` are readable and at `dst` writable, and they do not overlap.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags),
        );
    }
}

/// The bytes of one `u64` access.
const WORD: usize = std::mem::size_of::<u64>();

/// Copies `len` bytes from guest memory with volatile loads: bytes up to an
/// aligned guest address, then aligned `u64`s, then bytes.
///
/// # Safety
///
/// As [`copy_from_guest`].
#[inline]
unsafe fn words_from_guest(src: *const u8, dst: *mut u8, len: usize) {
    by_words(
        src,
        len,
        // SAFETY: the byte at `at < len` is inside both buffers.
        |at| unsafe { dst.add(at).write(src.add(at).read_volatile()) },
        // SAFETY: 8 bytes at `at` lie inside both buffers; `src + at` is aligned.
        |at| unsafe {
            let word = src.add(at).cast::<u64>().read_volatile();
            dst.add(at).cast::<u64>().write_unaligned(word);
        },
    );
}

/// Copies `len` bytes to guest memory with volatile stores; as
/// [`words_from_guest`].
///
/// # Safety
///
/// As [`copy_from_guest`].
#[inline]
unsafe fn words_to_guest(src: *const u8, dst: *mut u8, len: usize) {
    by_words(
        dst,
        len,
        // SAFETY: the byte at `at < len` is inside both buffers.
        |at| unsafe { dst.add(at).write_volatile(src.add(at).read()) },
        // SAFETY: 8 bytes at `at` lie inside both buffers; `dst + at` is aligned.
        |at| unsafe {
            let word = src.add(at).cast::<u64>().read_unaligned();
            dst.add(at).cast::<u64>().write_volatile(word);
        },
    );
}

/// Walks `len` bytes from `guest` as a copy to or from it does: `byte(at)`
/// for the bytes before the first `u64`-aligned guest address and after the
/// last whole word, `word(at)` for each aligned word between.
#[inline(always)]
fn by_words(guest: *const u8, len: usize, byte: impl Fn(usize), word: impl Fn(usize)) {
    let head = ((guest as usize).wrapping_neg() % WORD).min(len);
    let tail = head + (len - head) / WORD * WORD;
    (0..head).chain(tail..len).for_each(&byte);
    (head..tail).step_by(WORD).for_each(word);
}

/// `MADV_POPULATE_READ` (`linux/mman.h`, Linux 5.14+).
const MADV_POPULATE_READ: i32 = 22;
/// `MADV_GUARD_INSTALL` (`linux/mman.h`, Linux 6.13+).
const MADV_GUARD_INSTALL: i32 = 102;
/// `MADV_GUARD_REMOVE`.
const MADV_GUARD_REMOVE: i32 = 103;
/// The most ranges one `process_madvise` call takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// [`MappedRegion::advise`] of more than one range (the first two given,
/// then `rest`) in batches of up to `IOV_MAX`: apart, so that the common
/// lone range needs no room for a batch on the stack.
#[inline(never)]
fn advise_many(
    first: [libc::iovec; 2],
    rest: impl Iterator<Item = libc::iovec>,
    advice: i32,
    counted: bool,
) -> Result<(), Errno> {
    let mut batch = [const { MaybeUninit::<libc::iovec>::uninit() }; IOV_MAX];
    batch[0].write(first[0]);
    batch[1].write(first[1]);
    let mut filled = 2;
    for iovec in rest {
        if filled == IOV_MAX {
            advise_batch(&batch[..filled], advice, counted)?;
            filled = 0;
        }
        batch[filled].write(iovec);
        filled += 1;
    }
    advise_batch(&batch[..filled], advice, counted)
}

/// Advises the initialised ranges `batch` (inside one region); `counted`
/// calls go through fault injection.
#[inline]
fn advise_batch(
    batch: &[MaybeUninit<libc::iovec>],
    advice: i32,
    counted: bool,
) -> Result<(), Errno> {
    if counted {
        faults::injected()?;
    }
    let initialised = batch as *const [MaybeUninit<libc::iovec>] as *const [libc::iovec];
    // SAFETY: the caller initialised every element of `batch`.
    let batch: &[libc::iovec] = unsafe { &*initialised };
    match batch {
        [one] => madvise(one, advice),
        _ => process_madvise_all(batch, advice),
    }
}

/// One `madvise(2)` call (rustix's `Advice` has no guard advices).
#[inline]
fn madvise(range: &libc::iovec, advice: i32) -> Result<(), Errno> {
    loop {
        // Guard markers and populating change no byte of the file, and no
        // Rust reference into the region exists (raw copies only).
        // SAFETY: the range lies inside a region this process owns.
        if unsafe { libc::madvise(range.iov_base, range.iov_len, advice) } == 0 {
            return Ok(());
        }
        let errno = last_errno();
        if errno != Errno::INTR && errno != Errno::AGAIN {
            return Err(errno);
        }
    }
}

/// Set once `pidfd_open` or `process_madvise` answered `ENOSYS` (a seccomp
/// filter that hides them, or valgrind, which knows neither): every batch
/// then goes one `madvise` a range. Relaxed: a hint that only picks between
/// two correct ways; no data is handed over through it.
static NO_PROCESS_MADVISE: AtomicBool = AtomicBool::new(false);

/// Goes back to `process_madvise` after a test hid it (other threads meanwhile
/// took the fallback, which is as correct).
#[cfg(test)]
pub(crate) fn use_process_madvise_again() {
    NO_PROCESS_MADVISE.store(false, Ordering::Relaxed);
}

/// `process_madvise` on this process until every range is advised: the call
/// may stop part-way and report the bytes it advised. Where the system call
/// is missing, one `madvise` a range.
fn process_madvise_all(mut rest: &[libc::iovec], advice: i32) -> Result<(), Errno> {
    let mut skip = 0usize; // bytes of `rest[0]` already advised
    let mut first = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    while !rest.is_empty() {
        first[0] = libc::iovec {
            iov_base: rest[0].iov_base.wrapping_byte_add(skip),
            iov_len: rest[0].iov_len - skip,
        };
        if NO_PROCESS_MADVISE.load(Ordering::Relaxed) {
            return first
                .iter()
                .chain(&rest[1..])
                .try_for_each(|iov| madvise(iov, advice));
        }
        let call =
            |iov: &[libc::iovec]| with_own_pidfd(|pidfd| process_madvise(pidfd, iov, advice));
        // The first range goes alone while part of it was advised.
        let advised = match if skip > 0 { call(&first) } else { call(rest) } {
            Err(Errno::NOSYS) => {
                NO_PROCESS_MADVISE.store(true, Ordering::Relaxed);
                continue;
            }
            advised => advised?,
        };
        if advised == 0 {
            return Err(Errno::IO);
        }
        let mut advised = advised + skip;
        skip = 0;
        while let Some(iov) = rest.first() {
            if advised < iov.iov_len {
                skip = advised;
                break;
            }
            advised -= iov.iov_len;
            rest = &rest[1..];
        }
    }
    Ok(())
}

/// One `process_madvise(2)` call: the bytes it advised.
fn process_madvise(
    pidfd: BorrowedFd<'_>,
    iov: &[libc::iovec],
    advice: i32,
) -> Result<usize, Errno> {
    faults::process_madvise_hidden()?;
    loop {
        // Every iovec lies inside a mapping this process owns, and guard
        // advice changes no byte: the kernel only reads the array.
        // SAFETY: `iov` is a valid array of `iov.len()` iovecs.
        let advised = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                advice,
                0,
            )
        };
        if advised >= 0 {
            return Ok(advised as usize);
        }
        let errno = last_errno();
        if errno != Errno::INTR && errno != Errno::AGAIN {
            return Err(errno);
        }
    }
}

/// Runs `f` with a pidfd of this process, opened once and kept; a forked
/// child (another pid) opens its own for the call.
fn with_own_pidfd<R>(f: impl FnOnce(BorrowedFd<'_>) -> Result<R, Errno>) -> Result<R, Errno> {
    static OWN: OnceLock<(rustix::process::Pid, OwnedFd)> = OnceLock::new();
    let pid = rustix::process::getpid();
    let open = || rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty());
    if let Some((owner, fd)) = OWN.get() {
        if *owner == pid {
            return f(fd.as_fd());
        }
        return f(open()?.as_fd());
    }
    let fd = open()?;
    let (owner, fd) = OWN.get_or_init(|| (pid, fd));
    if *owner == pid {
        f(fd.as_fd())
    } else {
        f(open()?.as_fd())
    }
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// How a raw access made by [`HostMapping::probe`](crate::HostMapping::probe) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The access completed.
    Completed,
    /// The child died of this signal: `SIGSEGV` (11) for a private page
    /// hidden by guard markers, `SIGBUS` (7) for one hidden by the remap
    /// fallback or for a page past the end of the file.
    Signal(i32),
}

/// The exit status of a probe's child whose kernel lacks
/// `MADV_POPULATE_WRITE` (Linux 5.14).
const PROBE_UNSUPPORTED: i32 = 3;

/// Touches the byte at `ptr` in a forked child and reports how the child
/// ended. The child touches nothing else and exits at once, so forking a
/// multi-threaded process is sound.
///
/// A read is a volatile load. A write stores nothing: the child faults the
/// page in writable with `MADV_POPULATE_WRITE` (allocating it, as a store
/// would), so no byte of the shared file ever changes and a concurrent write
/// of the parent cannot be lost. Where that fails the child reads the byte,
/// which raises the signal a store would (`SIGSEGV` on a guard marker,
/// `SIGBUS` under the remap fallback or past the end of the file); a page
/// that reads but refuses the write ends the child with `SIGSEGV`, as a
/// store would. Errors: `EOPNOTSUPP` for a write probe on a kernel without
/// `MADV_POPULATE_WRITE`; the errno of `fork` or `waitpid`.
pub(crate) fn probe_in_child(ptr: *mut u8, write: bool) -> Result<ProbeOutcome, Errno> {
    let page = (ptr as usize & !(crate::PAGE_SIZE as usize - 1)) as *mut libc::c_void;
    // SAFETY: the child only makes system calls and one access, then `_exit`s: no allocation, no locks.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_errno());
    }
    if pid == 0 {
        // `madvise` only faults the page in; `raise` after resetting the
        // disposition ends the child.
        // SAFETY: a fault is what is being observed; the child exits right after either way.
        unsafe {
            if write {
                let populated =
                    libc::madvise(page, crate::PAGE_SIZE as usize, libc::MADV_POPULATE_WRITE);
                if populated == 0 {
                    libc::_exit(0);
                }
                if *libc::__errno_location() == libc::EINVAL {
                    libc::_exit(PROBE_UNSUPPORTED);
                }
            }
            std::ptr::read_volatile(ptr);
            if write {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        if waited == pid {
            break;
        }
        let errno = last_errno();
        if errno != Errno::INTR {
            return Err(errno);
        }
    }
    if libc::WIFSIGNALED(status) {
        Ok(ProbeOutcome::Signal(libc::WTERMSIG(status)))
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == PROBE_UNSUPPORTED {
        Err(Errno::OPNOTSUPP)
    } else {
        Ok(ProbeOutcome::Completed)
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        if *self.forsaken.get_mut() {
            tracing::error!(
                len = self.len,
                "leaving a broken guest memory mapping mapped: part of it may no longer be ours"
            );
            return;
        }
        // SAFETY: this value owns the mapping; after drop no copy can reach it.
        if let Err(errno) = unsafe { rustix::mm::munmap(self.as_ptr().cast(), self.len) } {
            tracing::error!(%errno, len = self.len, "munmap of a guest memory mapping failed");
        }
    }
}
