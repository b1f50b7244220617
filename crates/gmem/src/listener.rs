//! Conversion listeners: the VMM's own users of guest memory (an IOMMU, a
//! vhost backend, KVM's own memory attributes) that must hear of conversions,
//! as QEMU's `RamDiscardManager` listeners do, and the rules that make them
//! safe to write.
//!
//! Callbacks run with the file's invalidate lock held exclusively by the
//! converting thread. So that a callback never deadlocks, the conversion
//! publishes the attribute map it holds in a scoped thread-local while
//! callbacks run ([`with_held`]): queries from the callback (`attribute`,
//! `stats`, slow-path pins, allocation, checked copies) are served from it,
//! and what cannot be served there (converting, punching or mapping the same
//! file) fails with `EDEADLK`. A listener is never called after
//! [`GuestMemfd::remove_listener`](crate::GuestMemfd::remove_listener)
//! returns: every call holds its entry's `calls` lock shared, and removal
//! marks the entry and then takes that lock exclusively.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::Attribute;
use crate::attributes::AttributeMap;

/// Hears of conversions of one file.
///
/// Callbacks run with the file's invalidate lock held. They may query the
/// file (`attribute`, `stats`, `shared_runs`), pin (fast or slow path),
/// allocate, copy through pins and host mappings, drop pins, and add or
/// remove listeners (a listener may remove itself); converting, punching or
/// mapping the same file from a callback fails with `EDEADLK`. A callback
/// must not wait for another thread that is converting the same file.
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
    /// The file whose attribute map `HELD` is, while its callbacks run.
    static HELD_FILE: Cell<Option<u64>> = const { Cell::new(None) };
}

scoped_tls::scoped_thread_local!(static HELD: AttributeMap);

/// Runs `f` with `attrs`, the locked map of `file`, published to this
/// thread's callbacks (see the module documentation).
pub(crate) fn with_held<R>(file: u64, attrs: &AttributeMap, f: impl FnOnce() -> R) -> R {
    let outer = HELD_FILE.replace(Some(file));
    let result = HELD.set(attrs, f);
    HELD_FILE.set(outer);
    result
}

/// Whether this thread is in a callback of `file`, holding its invalidate
/// lock: then its map is served by [`held`], and a lock would deadlock.
pub(crate) fn is_held(file: u64) -> bool {
    HELD_FILE.get() == Some(file)
}

/// Runs `f` on the map of `file` held by this thread's conversion, if it is
/// in one of its callbacks.
pub(crate) fn held<R>(file: u64, f: impl FnOnce(&AttributeMap) -> R) -> Option<R> {
    is_held(file).then(|| HELD.with(f))
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
            let outer = CALLING.replace(Some((file, entry.id)));
            let result = f(&*entry.listener);
            CALLING.set(outer);
            result?;
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
