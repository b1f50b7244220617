//! A descriptor chain's buffers pinned once: [`PinnedChain`], made by
//! [`GuestMemoryGmem::pin_ranges`].
//!
//! Through the view's `Bytes` accessors every access pins its pages and
//! releases them (and pins again for each clone vm-memory makes of a
//! slice). A device that serves a chain (a header, a few data buffers, a
//! status) can instead pin all of its buffers in one call, copy through the
//! pinned set as often as it likes with no further pin, and release them all
//! at once by dropping the set.

use ::vm_memory::{ByteValued, GuestAddress, GuestMemoryError, VolatileSlice};

use super::{GuestMemoryGmem, access_error};
use crate::Pin;

/// The buffers of a descriptor chain, pinned once: each buffer's pages stay
/// shared until the set drops, and the set serves copies into and out of
/// them with no further pin. Made by [`GuestMemoryGmem::pin_ranges`].
///
/// # Lifecycle
///
/// * Pop the chain, collect its descriptors' `(address, length)`, and call
///   [`GuestMemoryGmem::pin_ranges`]. Either every page of every buffer is
///   pinned, or nothing is: a private page anywhere is
///   [`GuestMemoryError::HostAddressNotAvailable`], an address in no region
///   [`GuestMemoryError::InvalidGuestAddress`], and the pins taken before
///   the failure are released before it returns.
/// * Serve the request through the set, buffer by buffer in the order
///   given: [`read`](PinnedChain::read), [`write`](PinnedChain::write),
///   [`read_obj`](PinnedChain::read_obj), [`write_obj`](PinnedChain::write_obj),
///   or `VolatileSlice`s ([`slice`](PinnedChain::slice),
///   [`slices`](PinnedChain::slices)) for vm-memory's own copies and
///   `read_volatile_from`/`write_volatile_to`. Every access is checked
///   against its buffer's bounds ([`ChainError`]); none can reach a page
///   outside the set.
/// * While the set lives, a conversion of any of its pages to private fails
///   with `EAGAIN`. The VMM's let-go (`Vm::set_let_go`) is the device's cue
///   to drop the set (finish or abandon the request); the conversion is
///   retried and succeeds.
/// * Drop the set, and every pin is released (through the dropping thread's
///   batch). A set borrows the view: a device that keeps one between
///   requests (as a device keeps a DMA mapping) holds it where the view
///   outlives it.
///
/// A buffer that crosses regions is pinned as one piece per region; its
/// [`read`](PinnedChain::read) and [`write`](PinnedChain::write) cross the
/// pieces, and [`slices`](PinnedChain::slices) yields one slice each.
///
/// [`GuestMemoryError::HostAddressNotAvailable`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.HostAddressNotAvailable
/// [`GuestMemoryError::InvalidGuestAddress`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.InvalidGuestAddress
#[derive(Debug)]
pub struct PinnedChain<'a> {
    /// The ranges given, in order: guest address and length.
    buffers: Vec<(u64, u64)>,
    /// The pins: the buffers cut at region ends and merged where they
    /// overlap or touch within a region, one pin each (a chain of adjacent
    /// 4 KiB buffers is one pin, one entry in the thread's batch). Sorted
    /// by guest address, disjoint; every byte of every buffer is in one.
    spans: Vec<Span<'a>>,
}

/// A guest range inside one region and the pin of its pages.
#[derive(Debug)]
struct Span<'a> {
    guest_addr: u64,
    pin: Pin<'a>,
}

impl Span<'_> {
    fn end(&self) -> u64 {
        self.guest_addr + self.pin.len()
    }
}

/// Why an access through a [`PinnedChain`] was refused. Nothing was copied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// No buffer has this index (`EINVAL`).
    #[error("the chain has {buffers} buffers, not one with index {index}")]
    NoBuffer {
        /// The index asked for.
        index: usize,
        /// The buffers in the chain.
        buffers: usize,
    },
    /// The bytes asked for are not inside the buffer (`EINVAL`).
    #[error(
        "bytes {offset:#x}+{len:#x} are outside buffer {index} of the chain ({buffer_len:#x} bytes)"
    )]
    OutOfBounds {
        /// The buffer's index.
        index: usize,
        /// The offset asked for, from the buffer's start.
        offset: u64,
        /// The length asked for.
        len: u64,
        /// The buffer's length.
        buffer_len: u64,
    },
    /// The buffer is not one slice: it is empty, or crosses regions
    /// (`EINVAL`); [`PinnedChain::slices`] gives its slices.
    #[error("buffer {index} of the chain is {pieces} slices, not one")]
    NotOneSlice {
        /// The buffer's index.
        index: usize,
        /// Its slices: 0 when empty, one per region crossed.
        pieces: usize,
    },
}

impl ChainError {
    /// The errno of the same failure.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

impl From<ChainError> for GuestMemoryError {
    /// vm-memory's error for an access outside a slice.
    fn from(_: ChainError) -> GuestMemoryError {
        GuestMemoryError::InvalidBackendAddress
    }
}

impl GuestMemoryGmem {
    /// Pins the `(guest address, length)` ranges of a descriptor chain, in
    /// one call, into a [`PinnedChain`] that serves copies into and out of
    /// them with no further pin until it drops. Ranges may cross regions,
    /// overlap each other, or be empty (an empty one pins nothing).
    ///
    /// Errors, with nothing held: [`GuestMemoryError::HostAddressNotAvailable`]
    /// if a page of a range is private; [`GuestMemoryError::InvalidGuestAddress`]
    /// for a byte in no region; [`GuestMemoryError::GuestAddressOverflow`] for
    /// a range that wraps the address space; `IOError` if a page cannot be
    /// pinned otherwise (a full reference count, a failed allocation).
    ///
    /// [`GuestMemoryError::HostAddressNotAvailable`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.HostAddressNotAvailable
    /// [`GuestMemoryError::InvalidGuestAddress`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.InvalidGuestAddress
    /// [`GuestMemoryError::GuestAddressOverflow`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.GuestAddressOverflow
    pub fn pin_ranges(
        &self,
        ranges: impl IntoIterator<Item = (GuestAddress, usize)>,
    ) -> Result<PinnedChain<'_>, GuestMemoryError> {
        let ranges = ranges.into_iter();
        let mut buffers = Vec::with_capacity(ranges.size_hint().0);
        let mut pieces = Vec::with_capacity(ranges.size_hint().0);
        for (GuestAddress(guest_addr), len) in ranges {
            let end = guest_addr
                .checked_add(len as u64)
                .ok_or(GuestMemoryError::GuestAddressOverflow)?;
            self.chain_pieces(guest_addr, end, &mut pieces)?;
            buffers.push((guest_addr, len as u64));
        }
        // A chain's buffers usually come in address order already.
        pieces.sort_unstable();
        let merged = self.merge_pieces(&mut pieces);
        // On an error the spans pinned so far drop, and with them their pins.
        let spans = pieces[..merged]
            .iter()
            .map(|&(start, end)| self.pin_span(start, end))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PinnedChain { buffers, spans })
    }

    /// Appends the pieces of `[start, end)` in each region it crosses.
    #[inline]
    fn chain_pieces(
        &self,
        start: u64,
        end: u64,
        pieces: &mut Vec<(u64, u64)>,
    ) -> Result<(), GuestMemoryError> {
        let mut at = start;
        while at < end {
            let region = self
                .find(at)
                .ok_or(GuestMemoryError::InvalidGuestAddress(GuestAddress(at)))?;
            let piece_end = region.end().min(end);
            pieces.push((at, piece_end));
            at = piece_end;
        }
        Ok(())
    }

    /// Merges sorted `pieces` in place where they overlap, or touch within
    /// a region; returns how many are left at the front.
    fn merge_pieces(&self, pieces: &mut [(u64, u64)]) -> usize {
        let mut merged = 0usize;
        for i in 0..pieces.len() {
            let (start, end) = pieces[i];
            let joins = merged.checked_sub(1).is_some_and(|last| {
                let last_end = pieces[last].1;
                start < last_end || (start == last_end && !self.starts_region(start))
            });
            if joins {
                let last = &mut pieces[merged - 1].1;
                *last = (*last).max(end);
            } else {
                pieces[merged] = (start, end);
                merged += 1;
            }
        }
        merged
    }

    /// Pins `[start, end)`, which lies inside one region.
    #[inline]
    fn pin_span(&self, start: u64, end: u64) -> Result<Span<'_>, GuestMemoryError> {
        let region = self
            .find(start)
            .ok_or(GuestMemoryError::InvalidGuestAddress(GuestAddress(start)))?;
        let offset = region.file_offset + (start - region.guest_addr);
        let pin = region.file.pin(offset, end - start);
        Ok(Span {
            guest_addr: start,
            pin: pin.map_err(|err| access_error(start, err))?,
        })
    }
}

impl<'a> PinnedChain<'a> {
    /// The number of buffers (the ranges given).
    pub fn len(&self) -> usize {
        self.buffers.len()
    }

    /// Whether the chain has no buffers.
    pub fn is_empty(&self) -> bool {
        self.buffers.is_empty()
    }

    /// Buffer `index`'s guest address and length, as given.
    pub fn range(&self, index: usize) -> Result<(GuestAddress, usize), ChainError> {
        let (guest_addr, len) = self.buffer(index)?;
        Ok((GuestAddress(guest_addr), len as usize))
    }

    /// Buffer `index` as one `VolatileSlice`, which borrows the set (its
    /// pages stay shared while the slice lives).
    ///
    /// Errors: [`ChainError::NoBuffer`]; [`ChainError::NotOneSlice`] for an
    /// empty buffer or one that crosses regions (use
    /// [`slices`](Self::slices)).
    pub fn slice(&self, index: usize) -> Result<VolatileSlice<'_>, ChainError> {
        let (guest_addr, len) = self.buffer(index)?;
        let mut slices = self.slices_of(guest_addr, len);
        match (slices.next(), slices.next()) {
            (Some(slice), None) => Ok(slice),
            _ => Err(ChainError::NotOneSlice {
                index,
                pieces: self.slices_of(guest_addr, len).count(),
            }),
        }
    }

    /// Buffer `index`'s slices, one per region it crosses (none for an
    /// empty buffer), in address order.
    ///
    /// Errors: [`ChainError::NoBuffer`].
    pub fn slices(
        &self,
        index: usize,
    ) -> Result<impl Iterator<Item = VolatileSlice<'_>>, ChainError> {
        let (guest_addr, len) = self.buffer(index)?;
        Ok(self.slices_of(guest_addr, len))
    }

    /// Copies from `offset` within buffer `index` into `buf` (volatile
    /// loads).
    ///
    /// Errors: [`ChainError::NoBuffer`]; [`ChainError::OutOfBounds`] unless
    /// `buf` fits in the buffer from `offset`.
    #[inline]
    pub fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), ChainError> {
        let at = self.checked(index, offset, buf.len())?;
        let mut done = 0;
        for (pin, within, len) in self.parts(at, buf.len() as u64) {
            let to = &mut buf[done..done + len];
            let copied = pin.read(within, to);
            copied.map_err(|_| self.out_of_bounds(index, offset, buf.len()))?;
            done += len;
        }
        Ok(())
    }

    /// Copies `data` to `offset` within buffer `index` (volatile stores);
    /// errors as [`read`](Self::read).
    #[inline]
    pub fn write(&self, index: usize, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let at = self.checked(index, offset, data.len())?;
        let mut done = 0;
        for (pin, within, len) in self.parts(at, data.len() as u64) {
            let copied = pin.write(within, &data[done..done + len]);
            copied.map_err(|_| self.out_of_bounds(index, offset, data.len()))?;
            done += len;
        }
        Ok(())
    }

    /// A `T` read from `offset` within buffer `index`; errors as
    /// [`read`](Self::read).
    pub fn read_obj<T: ByteValued>(&self, index: usize, offset: u64) -> Result<T, ChainError> {
        let mut value = T::zeroed();
        self.read(index, offset, value.as_mut_slice())?;
        Ok(value)
    }

    /// Writes `value` at `offset` within buffer `index`; errors as
    /// [`read`](Self::read).
    pub fn write_obj<T: ByteValued>(
        &self,
        index: usize,
        offset: u64,
        value: T,
    ) -> Result<(), ChainError> {
        self.write(index, offset, value.as_slice())
    }

    fn buffer(&self, index: usize) -> Result<(u64, u64), ChainError> {
        self.buffers
            .get(index)
            .copied()
            .ok_or(ChainError::NoBuffer {
                index,
                buffers: self.buffers.len(),
            })
    }

    /// The guest address of `offset` in buffer `index`, if `[offset, offset
    /// + len)` is inside the buffer.
    #[inline]
    fn checked(&self, index: usize, offset: u64, len: usize) -> Result<u64, ChainError> {
        let (guest_addr, buffer_len) = self.buffer(index)?;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > buffer_len)
        {
            return Err(self.out_of_bounds(index, offset, len));
        }
        Ok(guest_addr + offset)
    }

    /// The parts of guest `[at, at + len)` (inside a buffer) in each span:
    /// the span's pin, the offset within it, and the bytes.
    #[inline]
    fn parts(&self, at: u64, len: u64) -> impl Iterator<Item = (&Pin<'a>, u64, usize)> {
        let first = self.spans.partition_point(|s| s.end() <= at);
        let end = at + len;
        self.spans[first..]
            .iter()
            .take_while(move |span| span.guest_addr < end)
            .map(move |span| {
                let start = at.max(span.guest_addr);
                let part = span.end().min(end) - start;
                (&span.pin, start - span.guest_addr, part as usize)
            })
    }

    /// The slices of guest `[at, at + len)` (a buffer), one per span.
    fn slices_of(&self, at: u64, len: u64) -> impl Iterator<Item = VolatileSlice<'_>> {
        self.parts(at, len).filter_map(|(pin, within, part)| {
            // Inside the pin: `parts` cuts within its span.
            pin.as_volatile_slice().subslice(within as usize, part).ok()
        })
    }

    #[cold]
    fn out_of_bounds(&self, index: usize, offset: u64, len: usize) -> ChainError {
        ChainError::OutOfBounds {
            index,
            offset,
            len: len as u64,
            buffer_len: self.buffers.get(index).map_or(0, |b| b.1),
        }
    }
}
