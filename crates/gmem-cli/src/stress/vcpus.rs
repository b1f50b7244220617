//! The vCPU-like threads of `gmem stress`, where `/dev/kvm` is usable: a VM
//! with the stress file bound as two memslots (its two halves, back to
//! back), and threads converting guest-physical ranges around the slots'
//! boundary through the VM's `GpaMap`, as guests' conversion requests do.
//! Those spanning both slots meet the workers' pins after their first part
//! converted (`EAGAIN`, rolled back), the checker's refusals and the
//! probing listener's panics; none may leave a part unrolled, and every
//! error must be one a request may give, naming a page inside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use gmem::kvm::{ConversionOutcome, ConversionPolicy, Memslot, MemslotFlags, Vm};
use gmem::testing::Rng;
use gmem::{Attribute, ConversionError, GuestMemfd};

use super::{P, Shadow, probing};

/// What the threads' requests came to.
#[derive(Debug, Default)]
pub(super) struct Requests {
    /// Succeeded.
    pub(super) ok: AtomicU64,
    /// Spanned both slots.
    pub(super) spanning: AtomicU64,
    /// Failed with `EAGAIN` (after the rollback of a first part, if any).
    pub(super) eagain: AtomicU64,
    /// Refused by the checker (`EBUSY`).
    pub(super) refused: AtomicU64,
    /// Ended by the probing listener's panic, caught.
    pub(super) panics: AtomicU64,
}

/// The VM and its two slots over the stress file.
pub(super) struct Vcpus {
    vm: Vm,
    _slots: [Memslot; 2],
    /// Where the second slot starts, in bytes (guest-physical and file).
    half: u64,
    pub(super) requests: Requests,
}

impl Vcpus {
    /// A VM over `mem` in two slots, or why there is none (no usable KVM).
    pub(super) fn new(mem: &Arc<GuestMemfd>) -> Result<Vcpus, String> {
        let vm = Vm::new().map_err(|err| format!("no VM: {err}"))?;
        let half = (mem.size() / 2) & !(P - 1);
        let bind = |slot: u32, start: u64, len: u64| {
            vm.bind(slot, start, mem, start, len, MemslotFlags::empty())
                .map_err(|err| format!("binding slot {slot}: {err}"))
        };
        let slots = [bind(0, 0, half)?, bind(1, half, mem.size() - half)?];
        // Fail at once on EAGAIN: the threads retry by themselves.
        vm.set_conversion_policy(ConversionPolicy {
            max_attempts: 1,
            first_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        });
        Ok(Vcpus {
            vm,
            _slots: slots,
            half,
            requests: Requests::default(),
        })
    }

    /// One thread's requests until `deadline` or `stop`.
    pub(super) fn run(&self, shadow: &Shadow, seed: u64, deadline: Instant, stop: &AtomicBool) {
        let mut rng = Rng::new(seed);
        while Instant::now() < deadline && !stop.load(Relaxed) {
            // Around the boundary: mostly across it, sometimes in one slot.
            let start = self.half - (1 + rng.below(6)) * P;
            let pages = 1 + rng.below(10);
            let to = if rng.below(2) == 0 {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            let request = || self.vm.convert(start, pages, to);
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(request)) {
                Ok(outcome) => self.check(shadow, start, pages, to, &outcome),
                Err(panic) if panic.downcast_ref::<&str>() == Some(&probing::PANIC) => {
                    self.requests.panics.fetch_add(1, Relaxed);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }

    /// Checks what a request came to.
    fn check(
        &self,
        shadow: &Shadow,
        start: u64,
        pages: u64,
        to: Attribute,
        outcome: &ConversionOutcome,
    ) {
        let end = start + pages * P;
        let r = &self.requests;
        if end > self.half {
            r.spanning.fetch_add(1, Relaxed);
        }
        let what = format!("a GpaMap request of {start:#x}+{:#x} to {to:?}", pages * P);
        if !outcome.rollback_failures.is_empty() {
            shadow.violation(format!(
                "{what} left parts unrolled: {:?}",
                outcome.rollback_failures
            ));
        }
        let inside = outcome
            .failed_gpa
            .is_some_and(|gpa| (start..end).contains(&gpa));
        match &outcome.result {
            Ok(()) => r.ok.fetch_add(1, Relaxed),
            Err(ConversionError::Again { .. }) if to == Attribute::Private && inside => {
                r.eagain.fetch_add(1, Relaxed)
            }
            Err(ConversionError::Refused { .. }) if to == Attribute::Private && inside => {
                r.refused.fetch_add(1, Relaxed)
            }
            Err(err) => {
                shadow.violation(format!(
                    "{what} failed with {err} at {:?}",
                    outcome.failed_gpa
                ));
                0
            }
        };
        shadow.listener_checks.fetch_add(1, Relaxed);
    }
}
