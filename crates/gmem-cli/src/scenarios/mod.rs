//! Kernel-parity scenarios: what `gmem selftest` runs.
//!
//! Host-side scenarios (`host`) are the specification's host rules, the
//! table of [`gmem::conformance`], on both backings: a sealed memfd
//! (`host/memfd/<rule>`) and a kernel guest_memfd (`host/kvm/<rule>`).
//! Guest-side scenarios (`guest/<rule>`) run the interpreter of
//! [`crate::guest`] on a [`Machine`](crate::machine::Machine) and check what
//! the guest and the host see around conversions: with one vCPU
//! (`guest`) or several at once (`multi_vcpu`).
//!
//! Every scenario catches its own panics and reports them as
//! [`Outcome::Fail`]; scenarios that need KVM report [`Outcome::Skip`] where
//! it is unavailable. On a KVM host without guest_memfd the guest side runs
//! on a memfd slot (see [`Machine`](crate::machine::Machine)), and the
//! `host/kvm/` rules, which are about the kernel guest_memfd, skip.

mod guest;
mod host;
mod multi_vcpu;

use std::panic::{AssertUnwindSafe, catch_unwind};

use gmem::conformance::{BACKINGS, Failure, RULES, Rule, panic_message};
use gmem::{BackingKind, ConversionError, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

/// Which side of the VM a scenario exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The VMM's view: files, mappings, pins and conversions called directly.
    Host,
    /// A real KVM guest asking for conversions and touching memory.
    Guest,
}

/// How a scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every check held.
    Pass,
    /// A check failed (or the scenario panicked): what went wrong.
    Fail(String),
    /// The scenario could not run here (no KVM): why.
    Skip(String),
}

/// One self-test scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// A short kebab-case name: `host/<backing>/<rule>` or `guest/<rule>`.
    pub name: String,
    /// Which side it exercises.
    pub side: Side,
    runner: Runner,
}

#[derive(Debug, Clone, Copy)]
enum Runner {
    /// A rule of the conformance table on a backing.
    Host(&'static Rule, BackingKind),
    /// A guest-side scenario.
    Guest(GuestScenario),
}

impl Scenario {
    /// Runs it. Never panics: a panic inside is reported as a failure.
    pub fn run(&self) -> Outcome {
        match self.runner {
            Runner::Host(rule, kind) => host::run(rule, kind),
            Runner::Guest(scenario) => guarded(|| finish(scenario())),
        }
    }
}

/// A guest-side scenario.
type GuestScenario = fn() -> Check;

/// The guest-side scenarios, named `guest/<name>`.
const GUEST: &[(&str, GuestScenario)] = &[
    (
        "host-writes-guest-reads-after-private",
        guest::host_writes_guest_reads_after_private,
    ),
    (
        "guest-writes-host-reads-after-shared",
        guest::guest_writes_host_reads_after_shared,
    ),
    (
        "punched-page-reads-zero-keeps-state",
        guest::punched_page_reads_zero_keeps_state,
    ),
    (
        "conversion-touches-only-requested-pages",
        guest::conversion_touches_only_requested_pages,
    ),
    (
        "conversion-waits-for-device-pins",
        guest::conversion_waits_for_device_pins,
    ),
    (
        "vcpus-convert-own-regions",
        multi_vcpu::vcpus_convert_own_regions,
    ),
];

/// Every scenario, host side first (each rule on the memfd backing, then on
/// the kernel guest_memfd backing), then the guest side.
pub fn all() -> Vec<Scenario> {
    let mut list = Vec::new();
    for rule in RULES {
        for kind in BACKINGS {
            list.push(Scenario {
                name: host::name(rule, kind),
                side: Side::Host,
                runner: Runner::Host(rule, kind),
            });
        }
    }
    for &(name, scenario) in GUEST {
        list.push(Scenario {
            name: format!("guest/{name}"),
            side: Side::Guest,
            runner: Runner::Guest(scenario),
        });
    }
    list
}

// ---- Plumbing of the guest side ----

/// Why a scenario stopped early.
#[derive(Debug)]
enum Stop {
    Fail(String),
    Skip(String),
}

type Check = Result<(), Stop>;

fn fail(message: impl Into<String>) -> Stop {
    Stop::Fail(message.into())
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Stop {
        fail(failure.to_string())
    }
}

impl From<gmem::Error> for Stop {
    fn from(e: gmem::Error) -> Stop {
        Failure::from(e).into()
    }
}

impl From<ConversionError> for Stop {
    fn from(e: ConversionError) -> Stop {
        Failure::from(e).into()
    }
}

impl From<gmem::kvm::KvmError> for Stop {
    fn from(e: gmem::kvm::KvmError) -> Stop {
        fail(format!("unexpected KVM error: {e}"))
    }
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Stop {
        fail(format!("{e:#}"))
    }
}

impl From<gmem::kvm::VcpuError> for Stop {
    fn from(e: gmem::kvm::VcpuError) -> Stop {
        fail(format!("the vCPU failed: {e}"))
    }
}

fn finish(result: Check) -> Outcome {
    match result {
        Ok(()) => Outcome::Pass,
        Err(Stop::Fail(message)) => Outcome::Fail(message),
        Err(Stop::Skip(reason)) => Outcome::Skip(reason),
    }
}

/// Runs `f`, turning a panic into [`Outcome::Fail`].
fn guarded(f: impl FnOnce() -> Outcome) -> Outcome {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Outcome::Fail(format!("panicked: {}", panic_message(&*payload))))
}

/// Fails with the message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(fail(format!($($fmt)+)));
        }
    };
}
use ensure;
