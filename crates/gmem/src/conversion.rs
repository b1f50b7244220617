//! In-place conversion: the kernel's `KVM_SET_MEMORY_ATTRIBUTES2` algorithm
//! on a gmem file, step by step as the specification numbers them.

use std::ops::Range;

use crate::attributes::Attribute;
use crate::file::{FileState, GuestMemfd};
use crate::mapping::MappingFailure;
use crate::stats::Counters;
use crate::{ConversionError, PAGE_SHIFT, PAGE_SIZE};

impl GuestMemfd {
    /// Converts `[offset, offset + len)` to `to`, in place.
    ///
    /// Shared to private first checks that no page holds a reference (a pin,
    /// or a released pin parked in some thread's batch), draining every
    /// thread's batch once on the first referenced page, and only then hides
    /// the range in every host mapping. Private to shared has no check.
    /// Contents are kept both ways. All or nothing: on error no page changed
    /// state and no host mapping shows a change, so a failed conversion is
    /// invisible to raw host accesses.
    ///
    /// Errors: `EINVAL` for a malformed range; `EAGAIN` with the offset of a
    /// page still referenced; `EBUSY` if a listener refused; `ENOMEM` (no
    /// memory, or over the VMA budget of the remap fallback); the errno of a
    /// failed `madvise`/`mmap`, which may also have poisoned a mapping
    /// ([`ConversionError::MappingPoisoned`]).
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
        // 2. Nothing to change: success without check or mapping change.
        if attrs.first_not(pages.clone(), to).is_none() {
            return Ok(());
        }
        // 3. Nothing after the point of no return may fail for memory.
        attrs.prepare().map_err(|_| ConversionError::NoMemory {
            error_offset: offset,
        })?;
        if to == Attribute::Private {
            state.ask_listeners(offset, len)?;
        }
        // The registry stays locked to the commit: the mappings changed are
        // the mappings charged for.
        let mut mappings = state.mappings.lock();
        let changing = || {
            attrs
                .runs_in(pages.clone())
                .filter(|run| run.attr != to)
                .map(|run| run.range())
        };
        let fallback_cost = mappings
            .take_for_change(state, changing, to, || {
                attrs.private_runs_after(pages.clone(), to)
            })
            .map_err(|over| ConversionError::VmaBudget {
                error_offset: offset,
                needed: over.needed,
                budget: over.budget,
            })?;
        // 4. Shared to private: the exact reference check. Host mappings
        //    hold no counted references (a fast-path pin's "PTE" is the
        //    MAPPED bit, cleared here), so they are changed after it passes.
        //    4b. Then hide (or show) the runs that change, in every host
        //    mapping; still undoable: a failure puts every mapping back.
        let checked = match to {
            Attribute::Private => state.check_unreferenced(pages.clone(), offset),
            Attribute::Shared => Ok(()),
        };
        let changed = checked.and_then(|()| {
            mappings
                .apply(state, changing, to)
                .map_err(|failure| mapping_error(failure, offset))
        });
        mappings.settle(state, changed.is_ok().then_some(fallback_cost));
        changed?;
        drop(mappings);
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
    /// Asks the listeners whether `[offset, offset + len)` may become
    /// private; the first refusal fails the conversion with `EBUSY`.
    fn ask_listeners(&self, offset: u64, len: u64) -> Result<(), ConversionError> {
        self.listeners
            .before_private(offset, len)
            .map_err(|refusal| {
                Counters::bump(&self.counters.refused);
                tracing::debug!(offset, len, %refusal, "conversion refused by a listener");
                ConversionError::Refused {
                    error_offset: offset,
                    reason: refusal.reason,
                }
            })
    }

    /// Step 4 of a shared to private conversion: remove the pages from the
    /// pin fast path, then check references exactly (one drain allowed).
    fn check_unreferenced(&self, pages: Range<u64>, offset: u64) -> Result<(), ConversionError> {
        // After this no fast-path pin succeeds in the range, and slow-path
        // pins wait for our lock: only references already taken remain.
        self.refs.unmap(pages.clone());
        let Err(page) = self.refs.check_unreferenced(pages) else {
            return Ok(());
        };
        Counters::bump(&self.counters.eagain);
        // Clamped to the start of the request (a huge folio may begin
        // before it).
        let error_offset = (page << PAGE_SHIFT).max(offset);
        tracing::debug!(offset, error_offset, "conversion failed: page referenced");
        Err(ConversionError::Again { error_offset })
    }
}

/// The conversion error for a failed change of the host mappings.
fn mapping_error(failure: MappingFailure, error_offset: u64) -> ConversionError {
    let MappingFailure {
        call,
        errno,
        poisoned,
    } = failure;
    if poisoned {
        ConversionError::MappingPoisoned {
            error_offset,
            call,
            errno,
        }
    } else {
        ConversionError::Os {
            error_offset,
            call,
            errno,
        }
    }
}
