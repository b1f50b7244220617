//! A descriptor chain's buffers pinned once: [`PinnedChain`], made by
//! [`GuestMemoryGmem::pin_ranges`].
//!
//! Through the view's `Bytes` accessors every access pins its pages and
//! releases them (and pins again for each clone vm-memory makes of a
//! slice). A device that serves a chain (a header, a few data buffers, a
//! status) can instead pin all of its buffers in one call, copy through the
//! pinned set as often as it likes with no further pin, and release them all
//! at once by dropping the set.
//!
//! # Lifecycle
//!
//! * Pop the chain, collect its descriptors' `(address, length)`, and call
//!   [`GuestMemoryGmem::pin_ranges`]. Either every page of every buffer is
//!   pinned, or nothing is: a private page anywhere is
//!   [`GuestMemoryError::HostAddressNotAvailable`], an address in no region
//!   [`GuestMemoryError::InvalidGuestAddress`], and the pins taken before
//!   the failure are released before it returns.
//! * Serve the request through the set, buffer by buffer in the order
//!   given: [`read`](PinnedChain::read), [`write`](PinnedChain::write),
//!   [`read_obj`](PinnedChain::read_obj), [`write_obj`](PinnedChain::write_obj),
//!   or `VolatileSlice`s ([`slice`](PinnedChain::slice),
//!   [`slices`](PinnedChain::slices)) for vm-memory's own copies and
//!   `read_volatile_from`/`write_volatile_to`. Every access is checked
//!   against its buffer's bounds ([`ChainError`]); none can reach a page
//!   outside the set.
//! * While the set lives, a conversion of any of its pages to private fails
//!   with `EAGAIN`. The VMM's let-go (`Vm::set_let_go`) is the device's cue
//!   to drop the set (finish or abandon the request); the conversion is
//!   retried and succeeds.
//! * Drop the set, and every pin is released (through the dropping thread's
//!   batch). A set borrows the view: a device that keeps one between
//!   requests (as a device keeps a DMA mapping) holds it where the view
//!   outlives it.
//!
//! A buffer that crosses regions is pinned as one piece per region; its
//! [`read`](PinnedChain::read) and [`write`](PinnedChain::write) cross the
//! pieces, and [`slices`](PinnedChain::slices) yields one slice each.
//!
//! [`GuestMemoryError::HostAddressNotAvailable`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.HostAddressNotAvailable
//! [`GuestMemoryError::InvalidGuestAddress`]: https://docs.rs/vm-memory/0.18/vm_memory/guest_memory/enum.Error.html#variant.InvalidGuestAddress

use ::vm_memory::{ByteValued, GuestAddress, GuestMemoryError, VolatileSlice};

use super::{GuestMemoryGmem, access_error};
use crate::Pin;

/// The buffers of a descriptor chain, pinned once: each buffer's pages stay
/// shared until the set drops, and the set serves copies into and out of
/// them with no further pin. Made by [`GuestMemoryGmem::pin_ranges`]; see
/// the [module documentation](self) for the lifecycle.
#[derive(Debug)]
pub struct PinnedChain<'a> {
    /// One per range given, in order.
    buffers: Vec<Buffer<'a>>,
}

/// One buffer of a chain: its guest address and length, and the pins of
/// its pages (one per region it crosses, in address order).
#[derive(Debug)]
struct Buffer<'a> {
    guest_addr: u64,
    len: u64,
    /// The piece in the first region; `None` for an empty buffer.
    first: Option<Pin<'a>>,
    /// The pieces in the regions after it (empty, and unallocated, for a
    /// buffer inside one region).
    rest: Vec<Pin<'a>>,
}

impl<'a> Buffer<'a> {
    /// The buffer's pins, in address order.
    fn pieces(&self) -> impl Iterator<Item = &Pin<'a>> {
        self.first.iter().chain(&self.rest)
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
        for (GuestAddress(guest_addr), len) in ranges {
            // On an error `buffers` drops, and with it every pin taken.
            buffers.push(self.pin_buffer(guest_addr, len as u64)?);
        }
        Ok(PinnedChain { buffers })
    }

    /// Pins `[guest_addr, guest_addr + len)`, one piece per region.
    #[inline]
    fn pin_buffer(&self, guest_addr: u64, len: u64) -> Result<Buffer<'_>, GuestMemoryError> {
        let end = guest_addr
            .checked_add(len)
            .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        let mut buffer = Buffer {
            guest_addr,
            len,
            first: None,
            rest: Vec::new(),
        };
        let mut at = guest_addr;
        while at < end {
            let region = self
                .find(at)
                .ok_or(GuestMemoryError::InvalidGuestAddress(GuestAddress(at)))?;
            let within = at - region.guest_addr;
            let piece = (region.len - within).min(end - at);
            let pin = region.file.pin(region.file_offset + within, piece);
            let pin = pin.map_err(|err| access_error(at, err))?;
            match buffer.first {
                None => buffer.first = Some(pin),
                Some(_) => buffer.rest.push(pin),
            }
            at += piece;
        }
        Ok(buffer)
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
        let buffer = self.buffer(index)?;
        Ok((GuestAddress(buffer.guest_addr), buffer.len as usize))
    }

    /// Buffer `index` as one `VolatileSlice`, which borrows the set (its
    /// pages stay shared while the slice lives).
    ///
    /// Errors: [`ChainError::NoBuffer`]; [`ChainError::NotOneSlice`] for an
    /// empty buffer or one that crosses regions (use
    /// [`slices`](Self::slices)).
    pub fn slice(&self, index: usize) -> Result<VolatileSlice<'_>, ChainError> {
        let buffer = self.buffer(index)?;
        match (&buffer.first, buffer.rest.len()) {
            (Some(pin), 0) => Ok(pin.as_volatile_slice()),
            _ => Err(ChainError::NotOneSlice {
                index,
                pieces: buffer.pieces().count(),
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
        Ok(self.buffer(index)?.pieces().map(Pin::as_volatile_slice))
    }

    /// Copies from `offset` within buffer `index` into `buf` (volatile
    /// loads).
    ///
    /// Errors: [`ChainError::NoBuffer`]; [`ChainError::OutOfBounds`] unless
    /// `buf` fits in the buffer from `offset`.
    #[inline]
    pub fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), ChainError> {
        let buffer = self.checked(index, offset, buf.len())?;
        let mut done = 0;
        for (pin, at, len) in pieces_of(buffer, offset, buf.len()) {
            // Inside the pin: the buffer's bounds were checked.
            let to = &mut buf[done..done + len];
            pin.read(at, to)
                .map_err(|_| out_of_bounds(index, offset, to.len(), buffer))?;
            done += len;
        }
        Ok(())
    }

    /// Copies `data` to `offset` within buffer `index` (volatile stores);
    /// errors as [`read`](Self::read).
    #[inline]
    pub fn write(&self, index: usize, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let buffer = self.checked(index, offset, data.len())?;
        let mut done = 0;
        for (pin, at, len) in pieces_of(buffer, offset, data.len()) {
            let from = &data[done..done + len];
            pin.write(at, from)
                .map_err(|_| out_of_bounds(index, offset, from.len(), buffer))?;
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

    fn buffer(&self, index: usize) -> Result<&Buffer<'a>, ChainError> {
        self.buffers.get(index).ok_or(ChainError::NoBuffer {
            index,
            buffers: self.buffers.len(),
        })
    }

    /// Buffer `index`, if `[offset, offset + len)` is inside it.
    #[inline]
    fn checked(&self, index: usize, offset: u64, len: usize) -> Result<&Buffer<'a>, ChainError> {
        let buffer = self.buffer(index)?;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > buffer.len)
        {
            return Err(out_of_bounds(index, offset, len, buffer));
        }
        Ok(buffer)
    }
}

/// The error for `[offset, offset + len)` outside `buffer`.
#[cold]
fn out_of_bounds(index: usize, offset: u64, len: usize, buffer: &Buffer<'_>) -> ChainError {
    ChainError::OutOfBounds {
        index,
        offset,
        len: len as u64,
        buffer_len: buffer.len,
    }
}

/// The parts of `[offset, offset + len)` of `buffer` (inside it) in each of
/// its pieces: the pin, the offset within it, and the bytes.
#[inline]
fn pieces_of<'b, 'a>(
    buffer: &'b Buffer<'a>,
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (&'b Pin<'a>, u64, usize)> {
    let (mut skip, mut left) = (offset, len as u64);
    buffer.pieces().filter_map(move |pin| {
        if left == 0 || skip >= pin.len() {
            skip = skip.saturating_sub(pin.len());
            return None;
        }
        let take = (pin.len() - skip).min(left);
        let part = (pin, skip, take as usize);
        (skip, left) = (0, left - take);
        Some(part)
    })
}
