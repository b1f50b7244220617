//! In-place conversion: the kernel's `KVM_SET_MEMORY_ATTRIBUTES2` algorithm
//! on a gmem file, step by step as the specification numbers them.

use std::ops::Range;

use crate::attributes::{Attribute, AttributeMap};
use crate::file::{FileState, GuestMemfd};
use crate::listener::{self, Refusal};
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
    /// page still referenced; `EBUSY` if a listener refused (before, or in
    /// the commit phase); `EDEADLK` from a listener's callback of this file; `ENOMEM` (no
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
        let file = state.refs.id();
        if listener::is_held(file) {
            // A listener's callback of this file: the lock is this thread's.
            return Err(ConversionError::WouldDeadlock {
                error_offset: offset,
            });
        }
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
        if to == Attribute::Private && state.listeners.any() {
            listener::with_held(file, &attrs, || state.ask_listeners(offset, len))?;
        }
        // 4. The reference check, then the host mappings; then the
        //    listeners' commit phase, which may still undo it all.
        let old_cost = state.change_mappings(&attrs, pages.clone(), to, offset)?;
        let listening = state.listeners.any();
        if listening {
            listener::with_held(file, &attrs, || {
                state.commit_phase(&attrs, pages.clone(), to, offset, old_cost)
            })?;
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
        if listening {
            listener::with_held(file, &attrs, || {
                state.listeners.converted(file, offset, len, to);
            });
        }
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
        let file = self.refs.id();
        let asked = self.listeners.before_private(file, offset, len);
        asked.map_err(|refusal| self.refused(offset, len, refusal))
    }

    fn refused(&self, offset: u64, len: u64, refusal: Refusal) -> ConversionError {
        Counters::bump(&self.counters.refused);
        tracing::debug!(offset, len, %refusal, "conversion refused by a listener");
        ConversionError::Refused {
            error_offset: offset,
            reason: refusal.reason,
        }
    }

    /// Step 4: for shared to private, the exact reference check; then the
    /// runs of `pages` not in state `to` are hidden (or shown) in every host
    /// mapping, with the VMA budget taken first. Host mappings hold no
    /// counted references (a fast-path pin's "PTE" is the MAPPED bit, cleared
    /// by the check), so they change only after it passes. On error nothing
    /// changed. Returns what a fallback mapping cost before, for an undo.
    fn change_mappings(
        &self,
        attrs: &AttributeMap,
        pages: Range<u64>,
        to: Attribute,
        offset: u64,
    ) -> Result<u64, ConversionError> {
        // The registry stays locked to the end: the mappings changed are
        // the mappings charged for.
        let mut mappings = self.mappings.lock();
        let old_cost = mappings.fallback_cost();
        let changing = || changing_runs(attrs, pages.clone(), to);
        let private_runs_after = || attrs.private_runs_after(pages.clone(), to);
        let cost = mappings
            .take_for_change(self, changing, to, private_runs_after)
            .map_err(|over| ConversionError::VmaBudget {
                error_offset: offset,
                needed: over.needed,
                budget: over.budget,
            })?;
        let checked = match to {
            Attribute::Private => self.check_unreferenced(pages.clone(), offset),
            Attribute::Shared => Ok(()),
        };
        let changed = checked.and_then(|()| {
            mappings
                .apply(self, changing, to)
                .map_err(|failure| mapping_error(failure, offset))
        });
        mappings.settle(self, changed.is_ok().then_some(cost));
        changed.map(|()| old_cost)
    }

    /// Step 4c: the listeners' commit phase. A refusal undoes the host
    /// mappings' change (poisoning a mapping that cannot be put back) and
    /// fails with `EBUSY`.
    fn commit_phase(
        &self,
        attrs: &AttributeMap,
        pages: Range<u64>,
        to: Attribute,
        offset: u64,
        old_cost: u64,
    ) -> Result<(), ConversionError> {
        let len = (pages.end - pages.start) << PAGE_SHIFT;
        let file = self.refs.id();
        let Err(refusal) = self.listeners.commit(file, offset, len, to) else {
            return Ok(());
        };
        let mut mappings = self.mappings.lock();
        let undone = mappings.undo(self, || changing_runs(attrs, pages.clone(), to), to.other());
        mappings.settle(self, Some(old_cost));
        undone.map_err(|failure| mapping_error(failure, offset))?;
        Err(self.refused(offset, len, refusal))
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

/// The runs of `pages` not in state `to`: those a conversion changes.
fn changing_runs(
    attrs: &AttributeMap,
    pages: Range<u64>,
    to: Attribute,
) -> impl Iterator<Item = Range<u64>> + '_ {
    let runs = attrs.runs_in(pages);
    runs.filter(move |run| run.attr != to)
        .map(|run| run.range())
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
