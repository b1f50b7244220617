//! The guest-physical map of a VM's gmem memslots, and the conversion
//! service on it: translation of guest ranges to file ranges (several slots,
//! several files), the `EAGAIN` retry policy, the let-go callback, and the
//! slot-by-slot conversion of a range with rollback.
//!
//! Memslots ([`Memslot`](super::Memslot)) add and remove their entries;
//! vCPUs and a VMM's own run loop convert through it.
//!
//! **Serialization.** A request within one slot is one
//! [`GuestMemfd::set_attributes`], atomic on its own under the file's
//! invalidate lock. A request spanning slots is several, and its rollback
//! puts back what it saw before converting: were another request to convert
//! the same pages in between, the rollback would undo a conversion that
//! vCPU was told succeeded. So every request holds the map's request lock:
//! shared for one part (concurrent single-slot requests still run in
//! parallel, each atomic on its file), exclusive for several parts, from the
//! snapshot through the last part or the end of the rollback. Requests thus
//! take effect in some serial order, a failed one having changed nothing.
//! Two consequences: a request spanning slots waits for every request under
//! way, and others wait for it (its `EAGAIN` retries and pauses included);
//! and the let-go callback and conversion listeners of the files must not
//! make requests through the map (they run under the lock: it would
//! deadlock). A VMM's own [`GuestMemfd::set_attributes`] calls on a bound
//! file bypass the lock: they are atomic per file, but may interleave
//! with a request spanning slots, whose rollback may then undo them.

use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use super::attributes::{AttributeSync, changing_runs};
use crate::{Attribute, ConversionError, GuestMemfd, ListenerId, PAGE_SIZE};

/// How the VMM retries a guest conversion that failed with `EAGAIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The pause after the first `EAGAIN`; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
}

impl Default for ConversionPolicy {
    fn default() -> Self {
        ConversionPolicy {
            max_attempts: 16,
            first_backoff: Duration::from_micros(20),
            max_backoff: Duration::from_millis(2),
        }
    }
}

/// Counts of the conversion requests served through a [`GpaMap`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConversionTotals {
    /// Requests served (hypercall, port I/O, memory fault or direct call).
    pub requests: u64,
    /// Requests that ended in success.
    pub succeeded: u64,
    /// Requests that ended in an error.
    pub failed: u64,
    /// `EAGAIN`s met and retried after asking device threads to let go.
    pub eagain_retries: u64,
    /// Requests that succeeded after at least one `EAGAIN`.
    pub resolved_after_retry: u64,
    /// Failed requests spanning slots whose converted parts could not all
    /// be put back (see [`ConversionOutcome::rollback_failures`]).
    pub rollback_failures: u64,
}

#[derive(Debug, Default)]
struct Totals {
    requests: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    eagain_retries: AtomicU64,
    resolved_after_retry: AtomicU64,
    rollback_failures: AtomicU64,
}

impl Totals {
    fn bump(counter: &AtomicU64) {
        // Relaxed: statistics.
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Called on `EAGAIN` with a guest-physical range (address, length) before
/// the retry: tell the device threads that hold pins there to let go.
pub type LetGo = dyn Fn(u64, u64) + Send + Sync;

/// What became of a conversion of a guest-physical range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionOutcome {
    /// The result: `Ok`, or the error that stopped the conversion. On error
    /// nothing changed, unless [`rollback_failures`](Self::rollback_failures)
    /// says otherwise.
    pub result: Result<(), ConversionError>,
    /// The most attempts any one slot's part needed (more than one after
    /// `EAGAIN`; 0 if the request was refused before any).
    pub attempts: u32,
    /// On error, the guest-physical address it names: the page still
    /// referenced for `EAGAIN`, the first address not in a gmem slot for a
    /// range not fully covered, else the start of the part that failed.
    pub failed_gpa: Option<u64>,
    /// Parts of a range spanning slots that were converted before a later
    /// part failed and could not be put back: they stay in the new state.
    pub rollback_failures: Vec<RollbackFailure>,
}

/// A part of a failed multi-slot conversion that could not be put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackFailure {
    /// Its guest-physical address.
    pub gpa: u64,
    /// Its length.
    pub len: u64,
    /// Why the rollback failed.
    pub error: ConversionError,
}

impl ConversionOutcome {
    /// The errno of the result, 0 for success.
    pub fn errno(&self) -> i32 {
        self.result.as_ref().err().map_or(0, ConversionError::errno)
    }

    /// The value for `kvm_run.hypercall.ret` (and gmem's port-I/O result):
    /// 0, or the negative errno as a two's-complement `u64`, KVM's
    /// convention.
    pub fn guest_ret(&self) -> u64 {
        (-i64::from(self.errno())) as u64
    }

    fn failed(error: ConversionError, attempts: u32, failed_gpa: u64) -> ConversionOutcome {
        ConversionOutcome {
            result: Err(error),
            attempts,
            failed_gpa: Some(failed_gpa),
            rollback_failures: Vec::new(),
        }
    }
}

/// A bound range, as the map keeps it. Holding the file keeps its fd and
/// gmem's own mapping (the one KVM was given) alive.
pub(super) struct SlotEntry {
    pub(super) slot: u32,
    pub(super) gpa: u64,
    pub(super) len: u64,
    pub(super) offset: u64,
    pub(super) mem: Arc<GuestMemfd>,
}

impl SlotEntry {
    fn gpa_range(&self) -> Range<u64> {
        self.gpa..self.gpa + self.len
    }
}

/// The slot table, and the listeners that keep KVM's memory attributes in
/// step, one per bound file.
#[derive(Default)]
pub(super) struct SlotTable {
    pub(super) entries: Vec<SlotEntry>,
    pub(super) syncing: Vec<(u64, ListenerId)>,
}

/// One slot's part of a guest-physical range.
#[derive(Clone)]
struct Part {
    gpa: u64,
    offset: u64,
    len: u64,
    mem: Arc<GuestMemfd>,
}

/// The guest-physical map of a VM's gmem slots, and the conversion service
/// on it. Reach it with [`Vm::gpa_map`](super::Vm::gpa_map).
pub struct GpaMap {
    table: Mutex<SlotTable>,
    /// The request lock (see the module doc): shared for a request in one
    /// slot, exclusive for one spanning slots, with its rollback.
    requests: RwLock<()>,
    policy: Mutex<ConversionPolicy>,
    let_go: Mutex<Option<Arc<LetGo>>>,
    totals: Totals,
    sync: AttributeSync,
}

impl std::fmt::Debug for GpaMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table();
        let slots: Vec<_> = table
            .entries
            .iter()
            .map(|e| (e.slot, e.gpa, e.len))
            .collect();
        f.debug_struct("GpaMap")
            .field("slots", &slots)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

impl GpaMap {
    pub(super) fn new(sync: AttributeSync) -> GpaMap {
        GpaMap {
            table: Mutex::new(SlotTable::default()),
            requests: RwLock::new(()),
            policy: Mutex::new(ConversionPolicy::default()),
            let_go: Mutex::new(None),
            totals: Totals::default(),
            sync,
        }
    }

    pub(super) fn table(&self) -> MutexGuard<'_, SlotTable> {
        lock(&self.table)
    }

    /// How conversions keep KVM's own memory attributes in step.
    pub(super) fn sync(&self) -> &AttributeSync {
        &self.sync
    }

    /// The file and offset of `[gpa, gpa + len)` if one slot holds it all.
    pub fn translate(&self, gpa: u64, len: u64) -> Option<(Arc<GuestMemfd>, u64)> {
        let end = gpa.checked_add(len)?;
        let table = self.table();
        let slot = table
            .entries
            .iter()
            .find(|s| s.gpa <= gpa && end <= s.gpa + s.len)?;
        Some((slot.mem.clone(), slot.offset + (gpa - slot.gpa)))
    }

    /// The slots as (slot, guest-physical range, file offset), in order of
    /// address.
    pub fn slots(&self) -> Vec<(u32, Range<u64>, u64)> {
        let table = self.table();
        let mut slots: Vec<_> = table
            .entries
            .iter()
            .map(|e| (e.slot, e.gpa_range(), e.offset))
            .collect();
        slots.sort_by_key(|s| s.1.start);
        slots
    }

    /// A vm-memory view of the slots as they are now, for rust-vmm devices:
    /// every slot a region, its slices pinned for their life; `resident`
    /// ranges (a device's rings) stay pinned for the view's life. Slots bound
    /// or deleted later are not in it: build the view again at the device's
    /// activation or reset.
    ///
    /// Errors as [`GuestMemoryGmem::from_regions_with_resident`](crate::vm_memory::GuestMemoryGmem::from_regions_with_resident).
    #[cfg(feature = "vm-memory")]
    pub fn guest_memory(
        &self,
        resident: impl IntoIterator<Item = (::vm_memory::GuestAddress, u64)>,
    ) -> Result<crate::vm_memory::GuestMemoryGmem, crate::vm_memory::ViewError> {
        let regions: Vec<_> = self
            .table()
            .entries
            .iter()
            .map(|e| {
                (
                    ::vm_memory::GuestAddress(e.gpa),
                    e.mem.clone(),
                    e.offset,
                    e.len,
                )
            })
            .collect();
        crate::vm_memory::GuestMemoryGmem::from_regions_with_resident(regions, resident)
    }

    /// Sets how conversions that meet `EAGAIN` are retried.
    pub fn set_policy(&self, policy: ConversionPolicy) {
        *lock(&self.policy) = ConversionPolicy {
            max_attempts: policy.max_attempts.max(1),
            ..policy
        };
    }

    /// Sets what is called on `EAGAIN`, before a retry, with a guest-physical
    /// range: it should make device threads drop their pins there. The range
    /// is the failing slot's part of the request, widened to the failing
    /// huge folio on files with huge folios.
    pub fn set_let_go(&self, let_go: Arc<LetGo>) {
        *lock(&self.let_go) = Some(let_go);
    }

    /// Counts of the conversions served so far.
    pub fn totals(&self) -> ConversionTotals {
        let t = &self.totals;
        // Relaxed: statistics.
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConversionTotals {
            requests: get(&t.requests),
            succeeded: get(&t.succeeded),
            failed: get(&t.failed),
            eagain_retries: get(&t.eagain_retries),
            resolved_after_retry: get(&t.resolved_after_retry),
            rollback_failures: get(&t.rollback_failures),
        }
    }

    /// Converts `[gpa, gpa + pages * 4096)` to `to`, slot by slot in order
    /// of address, each part retried on `EAGAIN` under the policy (calling
    /// the let-go callback before each retry).
    ///
    /// A range not fully covered by gmem slots (or empty, unaligned or
    /// wrapping) is `EINVAL` and nothing changes. If a part fails, the parts
    /// already converted are put back to the state each page had; a part
    /// that cannot be put back is reported in
    /// [`ConversionOutcome::rollback_failures`].
    ///
    /// Requests through the map take effect in some serial order (see the
    /// module doc of `gpa_map`): one spanning slots holds the map's request
    /// lock exclusively, so never make a request from the let-go callback
    /// or from a conversion listener of a bound file.
    pub fn convert(&self, gpa: u64, pages: u64, to: Attribute) -> ConversionOutcome {
        Totals::bump(&self.totals.requests);
        let outcome = match self.parts(gpa, pages) {
            Ok(parts) => self.convert_parts(&parts, to),
            Err((reason, at)) => {
                let invalid = ConversionError::Invalid {
                    offset: gpa,
                    len: pages.saturating_mul(PAGE_SIZE),
                    reason,
                };
                ConversionOutcome::failed(invalid, 0, at)
            }
        };
        let t = &self.totals;
        match &outcome.result {
            Ok(()) if outcome.attempts > 1 => {
                Totals::bump(&t.succeeded);
                Totals::bump(&t.resolved_after_retry);
            }
            Ok(()) => Totals::bump(&t.succeeded),
            Err(_) => Totals::bump(&t.failed),
        }
        if !outcome.rollback_failures.is_empty() {
            Totals::bump(&t.rollback_failures);
        }
        outcome
    }

    /// The slots' parts of the range, in order; or why not, with the first
    /// guest-physical address not covered.
    fn parts(&self, gpa: u64, pages: u64) -> Result<Vec<Part>, (&'static str, u64)> {
        let end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| gpa.checked_add(len))
            .ok_or(("the guest range wraps", gpa))?;
        if pages == 0 || gpa % PAGE_SIZE != 0 {
            return Err(("the guest range is empty or not page-aligned", gpa));
        }
        let table = self.table();
        let mut parts = Vec::new();
        let mut at = gpa;
        while at < end {
            let Some(slot) = table.entries.iter().find(|s| s.gpa_range().contains(&at)) else {
                return Err(("the guest range is not fully inside gmem memslots", at));
            };
            let part_end = end.min(slot.gpa + slot.len);
            parts.push(Part {
                gpa: at,
                offset: slot.offset + (at - slot.gpa),
                len: part_end - at,
                mem: slot.mem.clone(),
            });
            at = part_end;
        }
        Ok(parts)
    }

    /// Converts `parts` in order under the request lock, rolling back the
    /// converted ones if one fails or panics.
    fn convert_parts(&self, parts: &[Part], to: Attribute) -> ConversionOutcome {
        // Poisoning is ignored: the lock guards no data, only the order.
        let _order = if parts.len() == 1 {
            RequestOrder::Shared(self.requests.read().unwrap_or_else(|e| e.into_inner()))
        } else {
            RequestOrder::Exclusive(self.requests.write().unwrap_or_else(|e| e.into_inner()))
        };
        let mut done: Vec<(Part, Vec<Range<u64>>)> = Vec::new();
        let mut attempts = 0;
        for (index, part) in parts.iter().enumerate() {
            // What a rollback would put back: the runs this part changes.
            let changing = if index + 1 < parts.len() {
                rollback_runs(part, to)
            } else {
                Vec::new()
            };
            // A panic (a listener's, or the let-go callback's) still puts
            // the parts done back before it goes on unwinding.
            let converting = || self.convert_with_policy(part, part.offset, part.len, to);
            let (result, tries) = match panic::catch_unwind(AssertUnwindSafe(converting)) {
                Ok(converted) => converted,
                Err(payload) => {
                    self.roll_back(&done, to.other());
                    panic::resume_unwind(payload);
                }
            };
            attempts = attempts.max(tries);
            if let Err(error) = result {
                let failed_gpa = part.gpa + (error.error_offset().max(part.offset) - part.offset);
                let mut outcome = ConversionOutcome::failed(error, attempts, failed_gpa);
                outcome.rollback_failures = self.roll_back(&done, to.other());
                return outcome;
            }
            done.push((part.clone(), changing));
        }
        ConversionOutcome {
            result: Ok(()),
            attempts,
            failed_gpa: None,
            rollback_failures: Vec::new(),
        }
    }

    /// Puts the runs that `done` changed back to `back`, newest first. A
    /// panic (a listener's) in one run's rollback does not stop the others:
    /// it goes on unwinding once they are done.
    fn roll_back(&self, done: &[(Part, Vec<Range<u64>>)], back: Attribute) -> Vec<RollbackFailure> {
        let mut failures = Vec::new();
        let mut panicked = None;
        for (part, runs) in done.iter().rev() {
            for run in runs {
                let len = run.end - run.start;
                let rolling = || self.convert_with_policy(part, run.start, len, back);
                let rolled = match panic::catch_unwind(AssertUnwindSafe(rolling)) {
                    Ok(rolled) => rolled,
                    Err(payload) => {
                        panicked.get_or_insert(payload);
                        continue;
                    }
                };
                if let (Err(error), _) = rolled {
                    let gpa = part.gpa + (run.start - part.offset);
                    tracing::error!(gpa, len, %error, "rolling back a conversion spanning slots failed");
                    failures.push(RollbackFailure { gpa, len, error });
                }
            }
        }
        if let Some(payload) = panicked {
            panic::resume_unwind(payload);
        }
        failures
    }

    /// Converts `[offset, offset + len)` of `part`'s file, retrying `EAGAIN`
    /// under the policy; the result and the attempts made.
    fn convert_with_policy(
        &self,
        part: &Part,
        offset: u64,
        len: u64,
        to: Attribute,
    ) -> (Result<(), ConversionError>, u32) {
        let policy = *lock(&self.policy);
        let mut backoff = policy.first_backoff;
        let mut attempt = 1;
        loop {
            match part.mem.set_attributes(offset, len, to) {
                Err(ConversionError::Again { error_offset }) if attempt < policy.max_attempts => {
                    Totals::bump(&self.totals.eagain_retries);
                    let let_go = lock(&self.let_go).clone();
                    if let Some(let_go) = let_go {
                        let (start, end) = let_go_range(&part.mem, offset, len, error_offset);
                        // `start <= offset`: the range begins at or before the request.
                        let gpa = part.gpa + (offset - part.offset);
                        let_go(gpa.saturating_sub(offset - start), end - start);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(policy.max_backoff);
                    attempt += 1;
                }
                result => return (result, attempt),
            }
        }
    }
}

/// The request lock as a request holds it.
enum RequestOrder<'a> {
    Shared(#[allow(dead_code, reason = "held for its drop")] RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code, reason = "held for its drop")] RwLockWriteGuard<'a, ()>),
}

/// The runs of `part` that a conversion to `to` changes: what a rollback
/// puts back. Only the part's own runs are read, not the whole file's.
fn rollback_runs(part: &Part, to: Attribute) -> Vec<Range<u64>> {
    let range = part.offset..part.offset + part.len;
    changing_runs(&part.mem.shared_runs_in(range.clone()), range, to)
}

/// The file range whose pins must go for a conversion of `[offset, offset +
/// len)` that failed at `error_offset`: the request, widened to the folio of
/// the failing page (a pin anywhere in a huge folio blocks it).
fn let_go_range(mem: &GuestMemfd, offset: u64, len: u64, error_offset: u64) -> (u64, u64) {
    // The failing page is inside the request, so inside the file; were it
    // not, the request alone is the range.
    let folio = mem
        .folio_range(error_offset)
        .unwrap_or(offset..offset + len);
    (offset.min(folio.start), (offset + len).max(folio.end))
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[path = "gpa_map_tests.rs"]
mod tests;
