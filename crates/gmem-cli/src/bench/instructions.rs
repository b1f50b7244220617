//! Instructions per conversion: gmem's own work, outside the kernel, in
//! instructions retired in user space, which no host's system-call cost or
//! load changes (`gmem bench --instructions`).
//!
//! The scenario is `fragmented-1g`'s: a 1 GiB file, allocated, with one
//! live host mapping hiding private pages by guard markers.
//!
//! * `in-order`: its 131,072 odd pages to private one `set_attributes`
//!   call each, ascending, then each back to shared: instructions per
//!   single-page conversion (262,144 of them).
//! * `scattered`: the same in a fixed seeded permutation.
//! * `batch`: the pages alternating private and shared (prepared, not
//!   counted), one call makes the whole 1 GiB private, hiding the 131,072
//!   one-page shared runs: instructions per page of the range (262,144).
//!
//! Each pattern runs once uncounted first (the attribute map's nodes and
//! the mapping's buffers are then as a running VMM has them), then once
//! counted. Only [`counted`] is counted: the counter is enabled around
//! it, and `scripts/instructions.sh` counts the same function under
//! callgrind (`--toggle-collect`) where the host has no hardware counter.
//! Each row's counted work and goal are printed to stderr as
//! `counted: PATTERN UNITS UNIT GOAL`, for that script.

use gmem::{Attribute, Flags, GuestMemfd, HostMapping, PAGE_SIZE};

use super::fixtures::{self, FRAGMENTED_LEN};
use super::{CaseResult, Goal};
use crate::counter::{Counter, Event};

/// One way of converting the scenario's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Single pages, ascending.
    InOrder,
    /// Single pages, scattered.
    Scattered,
    /// One call over alternating runs.
    Batch,
}

impl Pattern {
    /// Every pattern, in the order of the rows.
    pub const ALL: [Pattern; 3] = [Pattern::InOrder, Pattern::Scattered, Pattern::Batch];

    /// The pattern's name (its row is `instructions-NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Pattern::InOrder => "in-order",
            Pattern::Scattered => "scattered",
            Pattern::Batch => "batch",
        }
    }

    /// The name of its bench row.
    pub fn row(self) -> String {
        format!("instructions-{}", self.name())
    }

    /// What its count is divided by.
    pub fn unit(self) -> &'static str {
        match self {
            Pattern::InOrder | Pattern::Scattered => "conversion",
            Pattern::Batch => "page",
        }
    }

    /// The most instructions a unit may take (issue 16).
    pub fn goal(self) -> f64 {
        match self {
            Pattern::InOrder | Pattern::Scattered => 700.0,
            Pattern::Batch => 60.0,
        }
    }
}

/// The counted work: `work`, and nothing else. Never inlined, so that
/// callgrind can name it (`--toggle-collect=*instructions*counted*`).
#[inline(never)]
pub fn counted(work: &mut dyn FnMut()) {
    work();
}

/// The file, its mapping and the page orders, made once for every pattern.
pub struct Scenario {
    mem: GuestMemfd,
    _map: HostMapping,
    odd: Vec<u64>,
    scattered: Vec<u64>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario {
    /// A 1 GiB file, allocated, mapped once; every page shared.
    pub fn new() -> Scenario {
        let mem = GuestMemfd::new(FRAGMENTED_LEN, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
        let map = mem.mmap().expect("mmap");
        mem.allocate(0, FRAGMENTED_LEN).expect("allocate");
        let odd: Vec<u64> = (0..FRAGMENTED_LEN / PAGE_SIZE)
            .filter(|p| p % 2 == 1)
            .collect();
        let scattered = fixtures::scattered_order(odd.len(), 0x9e37_79b9_7f4a_7c15)
            .into_iter()
            .map(|i| odd[i])
            .collect();
        Scenario {
            mem,
            _map: map,
            odd,
            scattered,
        }
    }

    /// How the mapping hides private pages.
    pub fn hiding(&self) -> gmem::Hiding {
        self._map.hiding()
    }

    /// Runs `pattern` once uncounted, then once through `count` (which
    /// must call [`counted`] with the work it is given, once). Returns what
    /// `count` returned and the units of work counted.
    pub fn run<R>(
        &self,
        pattern: Pattern,
        count: &mut dyn FnMut(&mut dyn FnMut()) -> R,
    ) -> (R, u64) {
        let convert = |pages: &[u64], to| {
            for page in pages {
                self.mem
                    .set_attributes(page * PAGE_SIZE, PAGE_SIZE, to)
                    .expect("a single-page conversion");
            }
        };
        let all = |to| {
            self.mem
                .set_attributes(0, FRAGMENTED_LEN, to)
                .expect("a conversion of the file");
        };
        let mut single = |pages: &[u64]| {
            let mut work = || {
                convert(pages, Attribute::Private);
                convert(pages, Attribute::Shared);
            };
            work();
            (count(&mut work), 2 * pages.len() as u64)
        };
        match pattern {
            Pattern::InOrder => single(&self.odd),
            Pattern::Scattered => single(&self.scattered),
            Pattern::Batch => {
                let prepare = || {
                    all(Attribute::Shared);
                    convert(&self.odd, Attribute::Private);
                };
                prepare();
                all(Attribute::Private);
                prepare();
                let counted = count(&mut || all(Attribute::Private));
                all(Attribute::Shared);
                (counted, FRAGMENTED_LEN / PAGE_SIZE)
            }
        }
    }
}

/// The row of `pattern` on `scenario`: counted by the hardware counter
/// where the host has one; elsewhere the work still runs (for callgrind)
/// and the row says why it has no count.
pub fn row(scenario: &Scenario, pattern: Pattern) -> CaseResult {
    let goal = Goal::InstructionsAtMost(pattern.goal());
    let name = pattern.row();
    if scenario.hiding() != gmem::Hiding::GuardMarkers {
        return CaseResult::skipped(&name, goal, "gmem's mapping has no guard markers".into());
    }
    let counter = Counter::open(Event::Instructions);
    let (counted_instructions, units) = scenario.run(pattern, &mut |work| match &counter {
        Ok(counter) => Some(counter.count(&mut || counted(work))),
        Err(_) => {
            counted(work);
            None
        }
    });
    eprintln!(
        "counted: {} {units} {} {}",
        pattern.name(),
        pattern.unit(),
        pattern.goal()
    );
    let why = match (counter, counted_instructions) {
        (_, Some(Ok(n))) => {
            return CaseResult::instructions(&name, n as f64 / units as f64, pattern.unit(), goal);
        }
        (Err(e), _) | (_, Some(Err(e))) => e,
        (Ok(_), None) => unreachable!("an open counter counts"),
    };
    CaseResult::skipped(
        &name,
        goal,
        format!(
            "no instruction counter here (perf_event_open: {why}); \
             scripts/instructions.sh counts it under callgrind"
        ),
    )
}
