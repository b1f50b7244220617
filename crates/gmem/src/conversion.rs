//! In-place conversion: the kernel's `KVM_SET_MEMORY_ATTRIBUTES2` algorithm
//! on a gmem file, step by step as the specification numbers them.

use std::ops::Range;

use crate::attributes::{Attribute, AttributeMap};
use crate::file::{FileState, GuestMemfd};
use crate::stats::Counters;
use crate::{ConversionError, PAGE_SHIFT, PAGE_SIZE};

impl GuestMemfd {
    /// Converts `[offset, offset + len)` to `to`, in place.
    ///
    /// Shared to private removes the range from every host mapping and then
    /// checks that no page holds a reference (a pin, or a released pin parked
    /// in some thread's batch); on the first referenced page it drains every
    /// thread's batch once and checks again. Private to shared has no check.
    /// Contents are kept both ways. All or nothing: on error no page changed.
    ///
    /// Errors: `EINVAL` for a malformed range; `EAGAIN` with the offset of a
    /// page still referenced; `EBUSY` if a listener refused; `ENOMEM`.
    pub fn set_attributes(
        &self,
        offset: u64,
        len: u64,
        to: Attribute,
    ) -> Result<(), ConversionError> {
        let pages = self.conversion_pages(offset, len)?;
        let state = &*self.state;
        // 1. The invalidate lock, exclusively: no fault, new mapping or
        //    slow-path pin runs until we are done.
        let mut attrs = state.write_attrs();
        // 2. Nothing to change: success without unmap or check.
        if attrs.first_not(pages.clone(), to).is_none() {
            return Ok(());
        }
        // 3. Nothing after the point of no return may fail for memory.
        attrs.prepare().map_err(|_| ConversionError::NoMemory {
            error_offset: offset,
        })?;
        match to {
            // 4. Unmap, then the exact reference check.
            Attribute::Private => state.unmap_and_check(&attrs, pages.clone(), offset)?,
            // 6. No check; map the pages back into the host.
            Attribute::Shared => state
                .mappings
                .remap_all(state, &attrs, pages.clone(), Attribute::Shared)
                .map_err(|errno| ConversionError::Os {
                    error_offset: offset,
                    call: "mmap",
                    errno,
                })?,
        }
        // 5. Point of no return: store the new state. (Guest mappings are
        //    KVM's and stay valid: on a software-protected VM both states are
        //    mapped for the guest.)
        attrs.set(pages.clone(), to);
        state.refs.reshape(pages, |range| attrs.is_uniform(range));
        Counters::bump(match to {
            Attribute::Private => &state.counters.to_private,
            Attribute::Shared => &state.counters.to_shared,
        });
        state.listeners.converted(offset, len, to);
        // 7. The lock is released on return.
        Ok(())
    }

    fn conversion_pages(&self, offset: u64, len: u64) -> Result<Range<u64>, ConversionError> {
        let invalid = |reason| ConversionError::Invalid {
            offset,
            len,
            reason,
        };
        if len == 0 {
            return Err(invalid("size is zero"));
        }
        let end = offset
            .checked_add(len)
            .ok_or(invalid("offset + size wraps"))?;
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(invalid("offset or size is not page-aligned"));
        }
        if end > self.size() {
            return Err(invalid("range is not inside the file"));
        }
        Ok((offset >> PAGE_SHIFT)..(end >> PAGE_SHIFT))
    }
}

impl FileState {
    /// Step 4 of a shared to private conversion: ask the listeners, remove the
    /// range from every host mapping and from the pin fast path, then check
    /// references exactly. On failure the host mappings are restored.
    fn unmap_and_check(
        &self,
        attrs: &AttributeMap,
        pages: Range<u64>,
        offset: u64,
    ) -> Result<(), ConversionError> {
        let len = (pages.end - pages.start) << PAGE_SHIFT;
        if let Err(refusal) = self.listeners.before_private(offset, len) {
            Counters::bump(&self.counters.refused);
            tracing::debug!(offset, len, %refusal, "conversion refused by a listener");
            return Err(ConversionError::Refused {
                error_offset: offset,
                reason: refusal.reason,
            });
        }
        self.mappings
            .remap_all(self, attrs, pages.clone(), Attribute::Private)
            .map_err(|errno| ConversionError::Os {
                error_offset: offset,
                call: "mmap",
                errno,
            })?;
        // After this no fast-path pin succeeds in the range, and slow-path
        // pins wait for our lock: only references already taken remain.
        self.refs.unmap(pages.clone());
        if let Err(page) = self.refs.check_unreferenced(pages.clone()) {
            self.mappings
                .restore_all(self, attrs, pages, Attribute::Private);
            Counters::bump(&self.counters.eagain);
            // Clamped to the start of the request (a huge folio may begin
            // before it).
            let error_offset = (page << PAGE_SHIFT).max(offset);
            tracing::trace!(
                offset,
                len,
                error_offset,
                "conversion failed: page referenced"
            );
            return Err(ConversionError::Again { error_offset });
        }
        Ok(())
    }
}
