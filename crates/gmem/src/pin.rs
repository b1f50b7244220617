//! Pins: the references that device I/O holds on shared pages (the analogue
//! of GUP), and copies through them. [`Pin`] borrows its file, [`OwnedPin`]
//! holds it by `Arc` (for another thread or a queue); both wrap one
//! [`PinnedRange`], which takes and releases the references and serves every
//! accessor.

use std::ops::{Deref, Range};
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::file::{GuestMemfd, page_range};
use crate::held::View;
use crate::refs::PinMiss;
use crate::{Error, PAGE_SHIFT};

/// A pin of `[offset, offset + len)` of a file: while it lives, every page it
/// covers is shared and allocated, and a conversion of any of them to private
/// fails with `EAGAIN`. Dropping it releases the pages through the dropping
/// thread's batch.
#[derive(Debug)]
pub struct Pin<'a> {
    range: PinnedRange<&'a GuestMemfd>,
}

/// A [`Pin`] that holds its file by `Arc`: `Send + Sync + 'static`, for a
/// request handed to another thread or kept in a queue. Same guarantees and
/// accessors as `Pin`.
#[derive(Debug)]
pub struct OwnedPin {
    range: PinnedRange<Arc<GuestMemfd>>,
}

/// The pinned range both pin types wrap: the references on the pages of
/// `[offset, offset + len)` of `file`, released on drop.
#[derive(Debug)]
struct PinnedRange<F: Deref<Target = GuestMemfd>> {
    file: F,
    offset: u64,
    len: u64,
}

impl GuestMemfd {
    /// Pins the pages covering `[offset, offset + len)` for device I/O,
    /// allocating missing ones. Lock-free unless a page was never pinned or
    /// was converted or punched since.
    ///
    /// Errors: `EINVAL` for an empty range or one not inside the file;
    /// `EFAULT` with the offset of the first private page; `ENOMEM` if a
    /// page's reference count is full.
    #[inline(always)]
    pub fn pin(&self, offset: u64, len: u64) -> Result<Pin<'_>, Error> {
        self.take_pin(offset, len)?;
        Ok(Pin {
            range: PinnedRange {
                file: self,
                offset,
                len,
            },
        })
    }

    /// As [`pin`](Self::pin), but the pin holds the file by `Arc` and so
    /// may outlive the borrow (`'static`, sent to another thread).
    #[inline(always)]
    pub fn pin_owned(self: &Arc<Self>, offset: u64, len: u64) -> Result<OwnedPin, Error> {
        self.take_pin(offset, len)?;
        Ok(OwnedPin {
            range: PinnedRange {
                file: Arc::clone(self),
                offset,
                len,
            },
        })
    }

    /// Checks `[offset, offset + len)` and takes a reference on each of its
    /// pages (lock-free on the fast path); the caller owns them.
    ///
    /// Inlined always, with `pin` and `pin_owned`: a `Result<Pin>` returned
    /// through memory costs a store-forwarding stall on this path (measured:
    /// 16.4 ns a pin and unpin, against 9.5 ns inlined). Every way off the
    /// fast path is a cold call, so what is inlined is small.
    #[inline(always)]
    pub(crate) fn take_pin(&self, offset: u64, len: u64) -> Result<(), Error> {
        let size = self.size();
        // One test for all three conditions: `len - 1 < size` says
        // `1 <= len <= size`, so `size - len` does not wrap, and then
        // `offset <= size - len` says `offset + len <= size` without overflow.
        if len.wrapping_sub(1) >= size || offset > size - len {
            return Err(range_error(offset, len, size));
        }
        if !self.try_pin_counted(page_range(offset, offset + len)) {
            return self.take_pin_general(offset, len);
        }
        Ok(())
    }

    /// The fast path of a pin of `pages` (a few small folios of one chunk):
    /// a reference on each, counted in the thread's batch. `false`, holding
    /// nothing, when the pin is not of that kind or a page is not mapped for
    /// it; the caller then takes the general path.
    #[inline(always)]
    fn try_pin_counted(&self, pages: Range<u64>) -> bool {
        if !self.state.refs.try_pin_small(pages) {
            return false;
        }
        if !crate::batch::count_taken_cached(&self.state.refs) {
            self.count_pin_slowly();
        }
        true
    }

    /// A pin the small-run fast path did not take: any range, fast or slow.
    #[cold]
    #[inline(never)]
    fn take_pin_general(&self, offset: u64, len: u64) -> Result<(), Error> {
        let pages = page_range(offset, offset + len);
        match self.state.refs.try_pin_fast(pages.clone()) {
            Ok(()) => Ok(()),
            Err(miss) => self.pin_missed(pages, miss),
        }
    }

    /// Counts a pin taken on the fast path when the thread's cached batch is
    /// another file's: through the batch lookup.
    #[cold]
    #[inline(never)]
    fn count_pin_slowly(&self) {
        self.state.refs.count_pin();
    }

    /// A pin the fast path did not take.
    #[cold]
    #[inline(never)]
    fn pin_missed(&self, pages: Range<u64>, miss: PinMiss) -> Result<(), Error> {
        match miss {
            PinMiss::NotMapped => self.pin_slow(pages),
            PinMiss::Overflow(page) => Err(Error::TooManyPins {
                offset: page << PAGE_SHIFT,
            }),
        }
    }

    /// The slow path: a fault. Under the invalidate lock (shared), check the
    /// state, allocate, and map the pages for the fast path.
    fn pin_slow(&self, pages: Range<u64>) -> Result<(), Error> {
        let state = &self.state;
        state.with_view(|view| self.pin_mapped(pages, view))
    }

    /// The slow path's work, under the invalidate lock (or in a listener's
    /// callback, on its conversion's view: the range in flight is refused).
    fn pin_mapped(&self, pages: Range<u64>, view: &View<'_>) -> Result<(), Error> {
        let state = &self.state;
        if let Some(page) = view.first_unpinnable(pages.clone()) {
            return Err(Error::Private {
                offset: page << PAGE_SHIFT,
            });
        }
        let missing = state
            .refs
            .to_allocate(pages.clone(), |range| view.is_uniform(range));
        if !missing.is_empty() {
            let (start, end) = (missing.start << PAGE_SHIFT, missing.end << PAGE_SHIFT);
            state.backing.allocate(start, end - start)?;
        }
        state
            .refs
            .pin_mapped(pages, |range| view.is_uniform(range))
            .map_err(|page| Error::TooManyPins {
                offset: page << PAGE_SHIFT,
            })
    }
}

/// Why `[offset, offset + len)` cannot be pinned in a file of `size` bytes.
#[cold]
#[inline(never)]
fn range_error(offset: u64, len: u64, size: u64) -> Error {
    if len == 0 {
        return Error::ZeroLength;
    }
    Error::OutOfRange {
        offset,
        len,
        limit: size,
    }
}

impl<F: Deref<Target = GuestMemfd>> PinnedRange<F> {
    fn as_ptr(&self) -> *mut u8 {
        // Inside the file (checked when pinned): the pointer stays inside
        // the direct mapping.
        self.file
            .state
            .direct
            .as_ptr()
            .wrapping_add(self.offset as usize)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let at = self.check(offset, buf.len() as u64)?;
        self.file.state.direct.read(at, buf);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let at = self.check(offset, data.len() as u64)?;
        self.file.state.direct.write(at, data);
        Ok(())
    }

    fn read_from(&self, fd: impl AsFd, offset: u64, len: u64) -> Result<usize, Error> {
        let at = self.check(offset, len)?;
        let direct = &self.file.state.direct;
        direct
            .read_from_fd(at, len as usize, fd.as_fd())
            .map_err(Error::os("read"))
    }

    fn write_to(&self, fd: impl AsFd, offset: u64, len: u64) -> Result<usize, Error> {
        let at = self.check(offset, len)?;
        let direct = &self.file.state.direct;
        direct
            .write_to_fd(at, len as usize, fd.as_fd())
            .map_err(Error::os("write"))
    }

    #[cfg(feature = "vm-memory")]
    fn as_volatile_slice(&self) -> vm_memory::VolatileSlice<'_> {
        // The borrow of the pin keeps its pages shared while the slice lives.
        let direct = &self.file.state.direct;
        direct.volatile_slice(self.offset, self.len as usize, ())
    }

    /// The file offset of `[offset, offset + len)` within the pin.
    fn check(&self, offset: u64, len: u64) -> Result<u64, Error> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::OutOfRange {
                offset,
                len,
                limit: self.len,
            });
        }
        Ok(self.offset + offset)
    }
}

impl<F: Deref<Target = GuestMemfd>> Drop for PinnedRange<F> {
    #[inline]
    fn drop(&mut self) {
        let pages = page_range(self.offset, self.offset + self.len);
        self.file.state.refs.unpin(pages);
    }
}

/// The accessors of a pin type, served by its `range`.
macro_rules! pin_accessors {
    ($pin:ty) => {
        impl $pin {
            /// The file offset the pin starts at.
            pub fn offset(&self) -> u64 {
                self.range.offset
            }

            /// The length of the pin in bytes.
            pub fn len(&self) -> u64 {
                self.range.len
            }

            /// Whether the pin is empty (it never is).
            pub fn is_empty(&self) -> bool {
                self.range.len == 0
            }

            /// The first pinned byte in gmem's own mapping of the whole file;
            /// [`len`](Self::len) bytes from it stay shared and mapped while
            /// the pin lives. Raw: access it only with volatile or atomic
            /// operations (the guest may write it concurrently), never
            /// through a reference, and not after the pin is dropped.
            pub fn as_ptr(&self) -> *mut u8 {
                self.range.as_ptr()
            }

            /// Copies from `offset` within the pin into `buf` (volatile loads).
            ///
            /// Errors: `EINVAL` if the range is not inside the pin.
            pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
                self.range.read(offset, buf)
            }

            /// Copies `data` to `offset` within the pin (volatile stores);
            /// errors as [`read`](Self::read).
            pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
                self.range.write(offset, data)
            }

            /// Reads up to `len` bytes from `fd` (`read(2)`, retried on
            /// `EINTR`) straight into the pinned pages at `offset` within the
            /// pin: the bytes read, 0 at end of file.
            ///
            /// Errors: `EINVAL` if the range is not inside the pin; the
            /// errno of `read(2)`.
            pub fn read_from(&self, fd: impl AsFd, offset: u64, len: u64) -> Result<usize, Error> {
                self.range.read_from(fd, offset, len)
            }

            /// Writes up to `len` bytes from `offset` within the pin to `fd`
            /// (`write(2)`, retried on `EINTR`): the bytes written. Errors as
            /// [`read_from`](Self::read_from), with `write(2)`'s errno.
            pub fn write_to(&self, fd: impl AsFd, offset: u64, len: u64) -> Result<usize, Error> {
                self.range.write_to(fd, offset, len)
            }

            /// The pinned bytes as a vm-memory `VolatileSlice`, which
            /// borrows the pin: its pages stay shared while the slice lives.
            #[cfg(feature = "vm-memory")]
            pub fn as_volatile_slice(&self) -> vm_memory::VolatileSlice<'_> {
                self.range.as_volatile_slice()
            }
        }
    };
}

pin_accessors!(Pin<'_>);
pin_accessors!(OwnedPin);

impl<'a> Pin<'a> {
    /// Another pin of the same range: one more reference on each page,
    /// taken without fail because this pin already holds one. For the
    /// vm-memory view's slices, whose clones must each hold the pages (a
    /// clone borrows the view, not the slice it came from, so it may
    /// outlive it).
    ///
    /// Inlined, with the pin's own fast path: a locked add a page (of a few
    /// small folios of one chunk) and a count in the cached batch. It is
    /// sound for the same reason as a first pin: the add and the `MAPPED`
    /// test are one atomic operation. While this pin lives no conversion of
    /// its pages can succeed, so they are shared; a miss (a failed
    /// conversion cleared `MAPPED`, a huge folio, a range over chunks) takes
    /// the general path, which maps them back.
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))]
    #[inline]
    pub(crate) fn repin(&self) -> Pin<'a> {
        let range = &self.range;
        let file: &'a GuestMemfd = range.file;
        if !file.try_pin_counted(page_range(range.offset, range.offset + range.len)) {
            file.repin_general(range.offset, range.len);
        }
        Pin {
            range: PinnedRange {
                file,
                offset: range.offset,
                len: range.len,
            },
        }
    }
}

impl GuestMemfd {
    /// [`Pin::repin`] off its fast path: any range, fast or slow; the pages
    /// are pinned already, so it cannot fail but at a full count.
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))]
    #[cold]
    #[inline(never)]
    fn repin_general(&self, offset: u64, len: u64) {
        // The fast path misses only after a conversion cleared MAPPED (it
        // then failed: the pin being copied blocks it) or at a full count;
        // the slow path maps the pages back, and they are shared and
        // allocated.
        if let Err(err) = self.take_pin_general(offset, len) {
            // As `Arc` does on a count overflow: 2^31 live references.
            tracing::error!(%err, "a pinned range cannot take another reference");
            std::process::abort();
        }
    }
}
