//! The maps that this thread's conversions hold while their listeners'
//! callbacks run, and how a callback's accesses see them.
//!
//! A conversion holds its file's invalidate lock exclusively while it calls
//! the listeners, so a callback that queried, pinned or copied through the
//! lock would deadlock. Instead the conversion publishes the map it holds
//! ([`with_held`]) and the callback's calls are served from it. Callbacks
//! may convert another file, whose callbacks may query the first: the
//! published maps form a stack (a chain of frames on the Rust stack, one per
//! [`with_held`] under way on this thread), searched by file.
//!
//! In the commit phase the map still holds the old state, but a range in
//! flight to private has passed the check and is hidden already: a
//! [`View`] reads it as its old state and lets no access reach it (pins,
//! checked copies and the vm-memory view fail as on a private page), widened
//! for pins to whole folios, so that no reference lands where the check
//! passed.
//!
//! The one `unsafe` here erases a frame's lifetime while it is on the chain;
//! the chain is restored by a drop guard, so a panicking callback leaves the
//! thread as it found it.

use std::cell::Cell;
use std::ops::Range;
use std::ptr::NonNull;

use crate::attributes::{Attribute, AttributeMap};

/// The attribute map as a thread's access checks see it: the map, and in a
/// conversion's commit phase the pages in flight, which no access may reach.
#[derive(Debug)]
pub(crate) struct View<'a> {
    attrs: &'a AttributeMap,
    in_flight: Option<InFlight>,
}

/// The pages of a conversion in its commit phase.
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    /// The pages converting.
    pub(crate) pages: Range<u64>,
    /// The same, widened to the folios holding its first and last page: a
    /// reference anywhere in them would meet the split that follows.
    pub(crate) folios: Range<u64>,
}

impl<'a> View<'a> {
    /// The view of a map with nothing in flight.
    pub(crate) fn new(attrs: &'a AttributeMap) -> View<'a> {
        View {
            attrs,
            in_flight: None,
        }
    }

    /// The view of a map during a commit phase of `in_flight`.
    pub(crate) fn committing(attrs: &'a AttributeMap, in_flight: InFlight) -> View<'a> {
        View {
            attrs,
            in_flight: Some(in_flight),
        }
    }

    /// The map, as stored: queries see the state before a conversion in
    /// flight.
    pub(crate) fn attrs(&self) -> &'a AttributeMap {
        self.attrs
    }

    /// The first page of `pages` the host may not access: private, or in
    /// flight.
    pub(crate) fn first_hidden(&self, pages: Range<u64>) -> Option<u64> {
        let in_flight = self.in_flight.as_ref().map(|f| f.pages.clone());
        self.first_hidden_with(pages, in_flight)
    }

    /// The first page of `pages` that may not be pinned: private, or in the
    /// folios of a conversion in flight.
    pub(crate) fn first_unpinnable(&self, pages: Range<u64>) -> Option<u64> {
        let in_flight = self.in_flight.as_ref().map(|f| f.folios.clone());
        self.first_hidden_with(pages, in_flight)
    }

    /// Whether `pages` has one state and nothing in flight: where a new
    /// chunk may start as one huge folio.
    pub(crate) fn is_uniform(&self, pages: Range<u64>) -> bool {
        let clear = self
            .in_flight
            .as_ref()
            .is_none_or(|f| f.folios.end <= pages.start || pages.end <= f.folios.start);
        clear && self.attrs.is_uniform(pages)
    }

    fn first_hidden_with(&self, pages: Range<u64>, in_flight: Option<Range<u64>>) -> Option<u64> {
        let private = self.attrs.first_not(pages.clone(), Attribute::Shared);
        let flying = in_flight.and_then(|f| {
            let start = f.start.max(pages.start);
            (start < f.end.min(pages.end)).then_some(start)
        });
        match (private, flying) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One published map: a frame of [`with_held`], on its caller's stack.
struct Frame {
    file: u64,
    /// The view, its lifetime erased: valid while this frame is on the chain.
    view: NonNull<View<'static>>,
    /// The frame published before this one on this thread.
    outer: Option<NonNull<Frame>>,
}

thread_local! {
    /// The innermost published frame of this thread.
    static TOP: Cell<Option<NonNull<Frame>>> = const { Cell::new(None) };
}

/// Puts the chain back as it was when dropped, on return or unwind.
struct Restore(Option<NonNull<Frame>>);

impl Drop for Restore {
    fn drop(&mut self) {
        TOP.set(self.0);
    }
}

/// Runs `f` with `view`, the locked map of `file`, published to this
/// thread's calls (see the module documentation).
pub(crate) fn with_held<R>(file: u64, view: &View<'_>, f: impl FnOnce() -> R) -> R {
    let frame = Frame {
        file,
        view: NonNull::from(view).cast(),
        outer: TOP.get(),
    };
    let _restore = Restore(frame.outer);
    TOP.set(Some(NonNull::from(&frame)));
    f()
}

/// Whether this thread is in a callback of a conversion of `file`, holding
/// its invalidate lock: then its map is served by [`held`], and taking the
/// lock would deadlock.
#[inline]
pub(crate) fn is_held(file: u64) -> bool {
    find(file).is_some()
}

/// Runs `f` on the view of `file` published by this thread's conversion, if
/// it is in one of its callbacks; else gives `f` back.
pub(crate) fn held<R, F: FnOnce(&View<'_>) -> R>(file: u64, f: F) -> Result<R, F> {
    let Some(view) = find(file) else {
        return Err(f);
    };
    // The frame that holds `view` is on the chain, so its `with_held` has
    // not returned and the view it borrows is alive; frames leave the chain
    // only when their `with_held` returns or unwinds, which cannot happen
    // while `f`, called from inside it, runs. The view is only read.
    // SAFETY: the view outlives this call (above), and is only read.
    let view = unsafe { view.as_ref() };
    Ok(f(view))
}

/// The view published for `file`, innermost first.
#[inline]
fn find(file: u64) -> Option<NonNull<View<'static>>> {
    let mut at = TOP.get();
    while let Some(frame) = at {
        // A frame on the chain lives on the stack of a `with_held` that has
        // not returned (see `held`).
        // SAFETY: the frame is alive while on the chain (above), and only read.
        let frame = unsafe { frame.as_ref() };
        if frame.file == file {
            return Some(frame.view);
        }
        at = frame.outer;
    }
    None
}
