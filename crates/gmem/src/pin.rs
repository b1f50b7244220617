//! Pins: the references that device I/O holds on shared pages (the analogue
//! of GUP), and copies through them.

use std::ops::Range;

use crate::attributes::Attribute;
use crate::file::{GuestMemfd, page_range};
use crate::refs::PinMiss;
use crate::{Error, PAGE_SHIFT};

/// A pin of `[offset, offset + len)` of a file: while it lives, every page it
/// covers is shared and allocated, and a conversion of any of them to private
/// fails with `EAGAIN`. Dropping it releases the pages through the dropping
/// thread's batch.
#[derive(Debug)]
pub struct Pin<'a> {
    file: &'a GuestMemfd,
    offset: u64,
    len: u64,
}

impl GuestMemfd {
    /// Pins the pages covering `[offset, offset + len)` for device I/O,
    /// allocating missing ones. Lock-free unless a page was never pinned or
    /// was converted or punched since.
    ///
    /// Errors: `EINVAL` for an empty range or one not inside the file;
    /// `EFAULT` with the offset of the first private page.
    #[inline(always)]
    pub fn pin(&self, offset: u64, len: u64) -> Result<Pin<'_>, Error> {
        let size = self.size();
        // One test for all three conditions: `len - 1 < size` says
        // `1 <= len <= size`, so `size - len` does not wrap, and then
        // `offset <= size - len` says `offset + len <= size` without overflow.
        if len.wrapping_sub(1) >= size || offset > size - len {
            return Err(range_error(offset, len, size));
        }
        // Inlined always: a `Result<Pin>` returned through memory costs a
        // store-forwarding stall on this path (measured: 16.4 ns a pin and
        // unpin, against 9.5 ns inlined). Every way off the fast path is a
        // cold call, so what is inlined is small.
        if !self.refs.try_pin_small(page_range(offset, offset + len)) {
            return self.pin_general(offset, len);
        }
        if !crate::batch::count_taken_cached(&self.refs) {
            return self.pin_counted_slowly(offset, len);
        }
        Ok(Pin {
            file: self,
            offset,
            len,
        })
    }

    /// A pin the small-run fast path did not take: any range, fast or slow.
    #[cold]
    #[inline(never)]
    fn pin_general(&self, offset: u64, len: u64) -> Result<Pin<'_>, Error> {
        let pages = page_range(offset, offset + len);
        match self.refs.try_pin_fast(pages.clone()) {
            Ok(()) => {}
            Err(miss) => self.pin_missed(pages, miss)?,
        }
        Ok(Pin {
            file: self,
            offset,
            len,
        })
    }

    /// A pin taken on the fast path whose thread's batch is not the cached
    /// one: count it through the batch lookup.
    #[cold]
    #[inline(never)]
    fn pin_counted_slowly(&self, offset: u64, len: u64) -> Result<Pin<'_>, Error> {
        self.refs.count_pin();
        Ok(Pin {
            file: self,
            offset,
            len,
        })
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
        state.with_attrs(|attrs| self.pin_mapped(pages, attrs))
    }

    /// The slow path's work, under the invalidate lock.
    fn pin_mapped(
        &self,
        pages: Range<u64>,
        attrs: &crate::attributes::AttributeMap,
    ) -> Result<(), Error> {
        let state = &self.state;
        if let Some(page) = attrs.first_not(pages.clone(), Attribute::Shared) {
            return Err(Error::Private {
                offset: page << PAGE_SHIFT,
            });
        }
        let missing = state
            .refs
            .to_allocate(pages.clone(), |range| attrs.is_uniform(range));
        if !missing.is_empty() {
            let (start, end) = (missing.start << PAGE_SHIFT, missing.end << PAGE_SHIFT);
            state.backing.allocate(start, end - start)?;
        }
        state
            .refs
            .pin_mapped(pages, |range| attrs.is_uniform(range))
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

impl Pin<'_> {
    /// The file offset the pin starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The length of the pin in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the pin is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies from `offset` within the pin into `buf`.
    ///
    /// Errors: `EINVAL` if the range is not inside the pin.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let at = self.check(offset, buf.len() as u64)?;
        self.file.state.direct.read(at, buf);
        Ok(())
    }

    /// Copies `data` to `offset` within the pin; errors as [`read`](Self::read).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let at = self.check(offset, data.len() as u64)?;
        self.file.state.direct.write(at, data);
        Ok(())
    }

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

impl Drop for Pin<'_> {
    #[inline]
    fn drop(&mut self) {
        let pages = page_range(self.offset, self.offset + self.len);
        self.file.refs.unpin(pages);
    }
}
