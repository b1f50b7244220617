//! Conversion listeners: the VMM's own users of guest memory (an IOMMU, a
//! vhost backend) that must hear of conversions, as QEMU's
//! `RamDiscardManager` listeners do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::Attribute;

/// Hears of conversions of one file.
///
/// Both methods run with the file's invalidate lock held exclusively: they
/// may drop pins of the file, but must not convert, map, pin with the slow
/// path or punch the same file (that would deadlock).
pub trait ConversionListener: Send + Sync {
    /// `[offset, offset + len)` is about to become private. Returning an error
    /// refuses the conversion: it then fails with `EBUSY` and nothing changes.
    /// Called before the unmap and the reference check.
    fn before_private(&self, offset: u64, len: u64) -> Result<(), Refusal> {
        let _ = (offset, len);
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

type Entry = (ListenerId, Arc<dyn ConversionListener>);

/// The listeners of one file.
#[derive(Default)]
pub(crate) struct Listeners {
    list: Mutex<(u64, Vec<Entry>)>,
    /// How many are registered, so that a conversion with none takes no lock.
    count: AtomicUsize,
}

impl Listeners {
    pub(crate) fn add(&self, listener: Arc<dyn ConversionListener>) -> ListenerId {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.0 += 1;
        let id = ListenerId(list.0);
        list.1.push((id, listener));
        // Release pairs with the Acquire in `snapshot`: a conversion that
        // starts after `add` returns sees the listener.
        self.count.store(list.1.len(), Ordering::Release);
        id
    }

    pub(crate) fn remove(&self, id: ListenerId) -> bool {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let before = list.1.len();
        list.1.retain(|(other, _)| *other != id);
        // Release: as in `add`.
        self.count.store(list.1.len(), Ordering::Release);
        list.1.len() != before
    }

    /// Whether any listener is registered: a conversion with none takes no
    /// lock and makes no snapshot.
    fn any(&self) -> bool {
        // Acquire pairs with the Release in `add` and `remove`.
        self.count.load(Ordering::Acquire) != 0
    }

    /// A snapshot, so that no lock is held while listeners run.
    fn snapshot(&self) -> Vec<Arc<dyn ConversionListener>> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.1.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Asks every listener; the first refusal wins.
    pub(crate) fn before_private(&self, offset: u64, len: u64) -> Result<(), Refusal> {
        if !self.any() {
            return Ok(());
        }
        self.snapshot()
            .iter()
            .try_for_each(|l| l.before_private(offset, len))
    }

    pub(crate) fn converted(&self, offset: u64, len: u64, to: Attribute) {
        if !self.any() {
            return;
        }
        for listener in self.snapshot() {
            listener.converted(offset, len, to);
        }
    }
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        write!(f, "Listeners({})", list.1.len())
    }
}
