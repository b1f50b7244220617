//! Conversion listeners: the VMM's own users of guest memory (an IOMMU, a
//! vhost backend, KVM's own memory attributes) that must hear of conversions,
//! as QEMU's `RamDiscardManager` listeners do, and the rules that make them
//! safe to write.
//!
//! Callbacks run with the file's invalidate lock held exclusively by the
//! converting thread. So that a callback never deadlocks, the conversion
//! publishes the map it holds (`held.rs`): queries from the callback
//! (`attribute`, `stats`, slow-path pins, allocation, checked copies) are
//! served from it, and what cannot be served there (converting, punching or
//! mapping the same file) fails with `EDEADLK`. A listener is never called
//! after [`GuestMemfd::remove_listener`](crate::GuestMemfd::remove_listener)
//! returns: every call holds its entry's `calls` lock shared, and removal
//! marks the entry and then takes that lock exclusively.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::Attribute;

/// Hears of conversions of one file.
///
/// Callbacks run on the converting thread with the file's invalidate lock
/// held; the file's queries, pins and copies made from a callback are served
/// from the map the conversion holds. What a callback may do, by phase:
///
/// * [`before_private`](Self::before_private): query, pin (fast or slow
///   path), allocate, copy through pins and host mappings, drop pins, add or
///   remove listeners (a listener may remove itself). A pin of the range
///   kept past the callback makes the conversion fail with `EAGAIN`.
/// * [`commit`](Self::commit): the range has passed the check and is hidden
///   (to private) or shown (to shared) in the host mappings, but its new
///   state is not stored, and queries see the old one. To private, pins,
///   checked copies and vm-memory accesses of the range fail as on a
///   private page (`EFAULT`), and so do pins anywhere in the huge folios
///   around it; to shared, the pages changing are still private. The rest
///   of the file is as before.
/// * [`converted`](Self::converted): the new state is stored and everything
///   is as after the conversion.
///
/// In every phase converting, punching or mapping the same file fails with
/// `EDEADLK`. A callback may convert another file (whose listeners may then
/// query this one), but must not wait for another thread that is converting
/// this file. A panic in a callback reaches the caller of `set_attributes`
/// after the conversion is undone (`before_private`, `commit`) or with it
/// done (`converted`): the file stays usable, its state and host mappings
/// agree, and later listeners of that phase are not called.
pub trait ConversionListener: Send + Sync {
    /// `[offset, offset + len)` is about to become private. Returning an error
    /// refuses the conversion: it then fails with `EBUSY` and nothing changes.
    /// Called before the reference check and before any host mapping changes.
    fn before_private(&self, offset: u64, len: u64) -> Result<(), Refusal> {
        let _ = (offset, len);
        Ok(())
    }

    /// `[offset, offset + len)` passed the reference check and is hidden (or
    /// shown) in every host mapping; the state is not yet stored. The last
    /// point to refuse (say, setting KVM's own memory attributes or unmapping
    /// an IOVA failed): an error undoes the conversion, which fails with
    /// `EBUSY`, and the listeners that already accepted hear of nothing more.
    fn commit(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Refusal> {
        let _ = (offset, len, to);
        Ok(())
    }

    /// `[offset, offset + len)` has been converted to `to`.
    fn converted(&self, offset: u64, len: u64, to: Attribute) {
        let _ = (offset, len, to);
    }
}

/// A listener's refusal of a conversion, with its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// Why the listener refused.
    pub reason: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
        }
    }
}

/// Names a registered listener, for [`GuestMemfd::remove_listener`](crate::GuestMemfd::remove_listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

/// A registered listener.
struct Entry {
    id: ListenerId,
    listener: Arc<dyn ConversionListener>,
    /// Set by removal before it waits; a call that sees it skips the entry.
    /// Release/Acquire, though the `calls` lock already orders a call that
    /// starts after removal's wait.
    removed: AtomicBool,
    /// Held shared by every call of the listener, exclusively by removal
    /// once it has set `removed`: when removal returns, no call is running
    /// and none will start.
    calls: RwLock<()>,
}

/// The listeners of one file.
#[derive(Default)]
pub(crate) struct Listeners {
    list: Mutex<(u64, Vec<Arc<Entry>>)>,
    /// How many are registered, so that a conversion with none takes no lock.
    count: AtomicUsize,
}

thread_local! {
    /// (file, listener) whose callback this thread is running, if any.
    static CALLING: Cell<Option<(u64, ListenerId)>> = const { Cell::new(None) };
}

/// Puts `CALLING` back as it was when dropped, on return or unwind.
struct RestoreCalling(Option<(u64, ListenerId)>);

impl Drop for RestoreCalling {
    fn drop(&mut self) {
        CALLING.set(self.0);
    }
}

impl Listeners {
    pub(crate) fn add(&self, listener: Arc<dyn ConversionListener>) -> ListenerId {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.0 += 1;
        let id = ListenerId(list.0);
        list.1.push(Arc::new(Entry {
            id,
            listener,
            removed: AtomicBool::new(false),
            calls: RwLock::new(()),
        }));
        // Release pairs with the Acquire in `any`: a conversion that starts
        // after `add` returns sees the listener.
        self.count.store(list.1.len(), Ordering::Release);
        id
    }

    /// Removes listener `id` of `file`; once this returns it is never called
    /// again (but for the call this runs in, if a listener removes itself).
    pub(crate) fn remove(&self, file: u64, id: ListenerId) -> bool {
        let entry = {
            let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
            let Some(index) = list.1.iter().position(|entry| entry.id == id) else {
                return false;
            };
            let entry = list.1.remove(index);
            // Release: as in `add`.
            self.count.store(list.1.len(), Ordering::Release);
            entry
        };
        // Release pairs with the Acquire in `each`.
        entry.removed.store(true, Ordering::Release);
        if CALLING.get() != Some((file, id)) {
            // Wait for calls under way on other threads.
            drop(entry.calls.write().unwrap_or_else(|e| e.into_inner()));
        }
        true
    }

    /// Whether any listener is registered: a conversion with none takes no
    /// lock and makes no snapshot.
    pub(crate) fn any(&self) -> bool {
        // Acquire pairs with the Release in `add` and `remove`.
        self.count.load(Ordering::Acquire) != 0
    }

    /// Calls `f` on each listener of `file` not removed, in order of
    /// registration; the first error stops the calls and is returned.
    fn each(
        &self,
        file: u64,
        mut f: impl FnMut(&dyn ConversionListener) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        if !self.any() {
            return Ok(());
        }
        // A snapshot: no list lock is held while listeners run, so they may
        // add and remove listeners.
        let entries = self
            .list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        for entry in entries {
            let _calls = entry.calls.read().unwrap_or_else(|e| e.into_inner());
            // Acquire pairs with the Release in `remove`.
            if entry.removed.load(Ordering::Acquire) {
                continue;
            }
            let _restore = RestoreCalling(CALLING.replace(Some((file, entry.id))));
            f(&*entry.listener)?;
        }
        Ok(())
    }

    /// Asks every listener; the first refusal wins.
    pub(crate) fn before_private(&self, file: u64, offset: u64, len: u64) -> Result<(), Refusal> {
        self.each(file, |l| l.before_private(offset, len))
    }

    /// The commit phase; the first refusal wins.
    pub(crate) fn commit(
        &self,
        file: u64,
        offset: u64,
        len: u64,
        to: Attribute,
    ) -> Result<(), Refusal> {
        self.each(file, |l| l.commit(offset, len, to))
    }

    pub(crate) fn converted(&self, file: u64, offset: u64, len: u64, to: Attribute) {
        let _ = self.each(file, |l| {
            l.converted(offset, len, to);
            Ok(())
        });
    }

    /// Tells `listener` of every run in `shared` (byte ranges), as if each
    /// had just been converted to shared.
    pub(crate) fn replay(
        listener: &dyn ConversionListener,
        shared: impl Iterator<Item = std::ops::Range<u64>>,
    ) {
        for run in shared {
            listener.converted(run.start, run.end - run.start, Attribute::Shared);
        }
    }
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        write!(f, "Listeners({})", list.1.len())
    }
}
