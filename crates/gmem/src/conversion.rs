//! In-place conversion: the kernel's `KVM_SET_MEMORY_ATTRIBUTES2` algorithm
//! on a gmem file, step by step as the specification numbers them.

use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};

use crate::attributes::{Attribute, AttributeMap, Planned};
use crate::file::{FileState, GuestMemfd};
use crate::held::{self, InFlight, View};
use crate::listener::Refusal;
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
    /// state and no host mapping shows a change. A failed conversion is
    /// invisible to raw host accesses but for one case: a listener that
    /// refuses (or panics) in its commit phase runs after the range was
    /// hidden, so a raw access racing that conversion on another thread may
    /// fault until the hiding is undone, as one racing a conversion that
    /// succeeds does. Once `set_attributes` has returned, the host mappings
    /// match the state.
    ///
    /// With backend processes attached ([`GuestMemfd::add_backend`]), a
    /// conversion to private also has every backend check and hide the
    /// range in its replica, after this process's check and before its
    /// mappings change; a conversion to shared tells them once it is done
    /// (see [`gmem::remote`](crate::remote)).
    ///
    /// Errors: `EINVAL` for a malformed range; `EAGAIN` with the offset of a
    /// page still referenced (here or in a backend); `EBUSY` if a listener refused (before, or in
    /// the commit phase); `EDEADLK` from a listener's callback of this file; `ENOMEM` (no
    /// memory, or over the VMA budget of the remap fallback); the errno of a
    /// failed `madvise`/`mmap`, which may also have poisoned a mapping
    /// ([`ConversionError::MappingPoisoned`]); a backend's fault
    /// ([`ConversionError::Backend`], `ETIMEDOUT` for one that does not
    /// answer in time); `EPERM` on a backend's replica.
    pub fn set_attributes(
        &self,
        offset: u64,
        len: u64,
        to: Attribute,
    ) -> Result<(), ConversionError> {
        if self.state.attached {
            return Err(ConversionError::Attached {
                error_offset: offset,
            });
        }
        self.convert(offset, len, to)
    }

    /// [`set_attributes`](Self::set_attributes) on any file: a backend's
    /// replica is converted so when the VMM asks.
    pub(crate) fn convert(
        &self,
        offset: u64,
        len: u64,
        to: Attribute,
    ) -> Result<(), ConversionError> {
        let pages = self.conversion_pages(offset, len)?;
        let state = &*self.state;
        let file = state.refs.id();
        if held::is_held(file) {
            // A listener's callback of this file: the lock is this thread's.
            return Err(ConversionError::WouldDeadlock {
                error_offset: offset,
            });
        }
        // 1. The invalidate lock, exclusively: no fault, new mapping or
        //    slow-path pin runs until we are done.
        let mut attrs = state.write_attrs();
        // 2. Nothing to change: success without check or mapping change. One
        //    walk over the runs plans all the map is asked until the set.
        let mut planned = attrs.plan(pages.clone(), to);
        if !planned.changes() {
            return Ok(());
        }
        // 3. Nothing after the point of no return may fail for memory.
        attrs
            .prepare_for(&mut planned)
            .map_err(|_| ConversionError::NoMemory {
                error_offset: offset,
            })?;
        let listening = state.listeners.any();
        if to == Attribute::Private && listening {
            held::with_held(file, &View::new(&attrs), || {
                state.ask_listeners(offset, len)
            })?;
        }
        // 4. The reference check, then the host mappings; then the
        //    listeners' commit phase, which may still undo it all.
        let costs =
            state.change_mappings(&attrs, &planned, pages.clone(), to, offset, listening)?;
        if listening {
            state.commit_phase(&attrs, &planned, pages.clone(), to, offset, costs)?;
        }
        // 5. Point of no return: store the new state. (Guest mappings are
        //    KVM's and stay valid: on a software-protected VM both states are
        //    mapped for the guest.)
        attrs.apply(&planned);
        state
            .refs
            .reshape(pages.clone(), |range| attrs.is_uniform(range));
        if to == Attribute::Shared && state.backends.any() {
            state.backends.show(pages, state.backend_timeout);
        }
        Counters::bump(match to {
            Attribute::Private => &state.counters.to_private,
            Attribute::Shared => &state.counters.to_shared,
        });
        if listening {
            held::with_held(file, &View::new(&attrs), || {
                state.listeners.converted(file, offset, len, to);
            });
        }
        // 7. The lock is released on return.
        Ok(())
    }

    pub(crate) fn conversion_pages(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Range<u64>, ConversionError> {
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
    /// changed. With a commit phase to come (`committing`), nothing is given
    /// back yet: its undo may need it.
    fn change_mappings(
        &self,
        attrs: &AttributeMap,
        planned: &Planned,
        pages: Range<u64>,
        to: Attribute,
        offset: u64,
        committing: bool,
    ) -> Result<Costs, ConversionError> {
        // The registry stays locked to the end: the mappings changed are
        // the mappings charged for.
        let mut mappings = self.mappings.lock();
        let before = mappings.fallback_cost();
        let changing = || attrs.changing_runs(planned);
        let private_runs_after = || attrs.private_runs_after(planned);
        let after = mappings
            .take_for_change(self, private_runs_after)
            .map_err(|over| ConversionError::VmaBudget {
                error_offset: offset,
                needed: over.needed,
                budget: over.budget,
            })?;
        let checked = match to {
            Attribute::Private => self
                .check_unreferenced(pages.clone(), offset)
                .and_then(|()| self.hide_in_backends(pages.clone(), offset)),
            Attribute::Shared => Ok(()),
        };
        let hidden_in_backends = checked.is_ok() && to == Attribute::Private;
        let changed = checked.and_then(|()| {
            mappings
                .apply(self, changing, to)
                .map_err(|failure| mapping_error(failure, offset))
        });
        if hidden_in_backends && changed.is_err() {
            self.show_in_backends(pages.clone());
        }
        let settle_at = match committing {
            false => after,
            true => before.max(after),
        };
        mappings.settle(self, changed.is_ok().then_some(settle_at));
        changed.map(|()| Costs { before, after })
    }

    /// Step 4c: the listeners' commit phase, with the range in flight to
    /// private published to their callbacks (no access reaches it). A refusal undoes
    /// the host mappings' change (poisoning a mapping that cannot be put
    /// back) and fails with `EBUSY`; a panic undoes it too and goes on
    /// unwinding.
    fn commit_phase(
        &self,
        attrs: &AttributeMap,
        planned: &Planned,
        pages: Range<u64>,
        to: Attribute,
        offset: u64,
        costs: Costs,
    ) -> Result<(), ConversionError> {
        let len = (pages.end - pages.start) << PAGE_SHIFT;
        let file = self.refs.id();
        // To private, the range passed the check and is hidden: no access
        // may reach it. To shared, the pages changing are private until the
        // state is stored, and the map says so already.
        let view = match to {
            Attribute::Private => View::committing(
                attrs,
                InFlight {
                    pages: pages.clone(),
                    folios: self.refs.folios_around(pages.clone()),
                },
            ),
            Attribute::Shared => View::new(attrs),
        };
        let commit =
            || held::with_held(file, &view, || self.listeners.commit(file, offset, len, to));
        let refusal = match panic::catch_unwind(AssertUnwindSafe(commit)) {
            Ok(Ok(())) => {
                self.mappings.lock().settle(self, Some(costs.after));
                return Ok(());
            }
            Ok(Err(refusal)) => refusal,
            Err(panic) => {
                if to == Attribute::Private {
                    self.show_in_backends(pages.clone());
                }
                if let Err(failure) = self.undo_change(attrs, planned, to, costs) {
                    tracing::error!(
                        ?failure,
                        "a listener panicked in its commit phase and the undo failed"
                    );
                }
                panic::resume_unwind(panic);
            }
        };
        if to == Attribute::Private {
            self.show_in_backends(pages.clone());
        }
        self.undo_change(attrs, planned, to, costs)
            .map_err(|failure| mapping_error(failure, offset))?;
        Err(self.refused(offset, len, refusal))
    }

    /// Step 4b with backend processes: each checks and hides the range in
    /// its replica (after this process's check passed, before its mappings
    /// change), or the conversion fails and each shows it again.
    fn hide_in_backends(&self, pages: Range<u64>, offset: u64) -> Result<(), ConversionError> {
        if !self.backends.any() {
            return Ok(());
        }
        let hidden = self.backends.hide(pages, offset, self.backend_timeout);
        if let Err(ConversionError::Again { .. }) = hidden {
            Counters::bump(&self.counters.eagain);
        }
        hidden
    }

    /// Undoes [`hide_in_backends`](Self::hide_in_backends).
    fn show_in_backends(&self, pages: Range<u64>) {
        if self.backends.any() {
            self.backends.show(pages, self.backend_timeout);
        }
    }

    /// Puts back the host mappings' change of a conversion whose commit
    /// phase refused, and settles the charge as before it.
    fn undo_change(
        &self,
        attrs: &AttributeMap,
        planned: &Planned,
        to: Attribute,
        costs: Costs,
    ) -> Result<(), MappingFailure> {
        let mut mappings = self.mappings.lock();
        let undone = mappings.undo(self, || attrs.changing_runs(planned), to.other());
        mappings.settle(self, Some(costs.before));
        undone
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

/// What a fallback mapping costs before and after a conversion's change.
#[derive(Debug, Clone, Copy)]
struct Costs {
    before: u64,
    after: u64,
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
