//! `gmem bench`: the headline cases, each timed against a floor measured in
//! the same run, in one process.
//!
//! Method: every timed case has an `ours` and (mostly) a `floor` closure. The
//! harness calibrates a batch to about 5 ms, then runs `SAMPLES` batches of
//! each, alternating ours and floor so that drift hits both, and reports the
//! median time per iteration. Memory cases report bytes. The slow cases
//! (hundreds of milliseconds an iteration: the fragmented 1 GiB files) take
//! an untimed first pass of each side and then `SLOW_SAMPLES` samples of
//! each, fewer (at least one) if they have taken `SLOW_BUDGET` already; their
//! rows say how many.

use std::hint::black_box;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use gmem::{Attribute, Flags, GuestMemfd, PAGE_SIZE};
use serde::{Deserialize, Serialize};

mod backend;
pub mod check;
pub mod fixtures;
pub mod instructions;
pub mod kvm;
mod snapshot;
pub mod study;
pub mod table;
pub mod virtio;

pub use fixtures::{Copies, Fragmented, PinUnpin, RoundTrip};

const SAMPLES: usize = 11;
/// Samples of each side of a slow case.
const SLOW_SAMPLES: usize = 5;
/// The time after which a slow case takes no further samples.
const SLOW_BUDGET: Duration = Duration::from_secs(30);
const BATCH: Duration = Duration::from_millis(5);
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// What a case must reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// `ours / floor` at most this.
    RatioAtMost(f64),
    /// `floor / ours` (a speed-up) at least this.
    SpeedupAtLeast(f64),
    /// Our time at most this many nanoseconds.
    NanosAtMost(f64),
    /// A size in bytes at most this.
    BytesAtMost(f64),
    /// A fraction (of the file's memory) at most this.
    FractionAtMost(f64),
    /// Instructions per unit of work at most this.
    InstructionsAtMost(f64),
}

impl Goal {
    /// The goal in words, in the unit its row's value is shown in.
    fn describe(&self) -> String {
        use table::{format_kib, format_percent, format_ratio, format_speedup, trim};
        match self {
            Goal::RatioAtMost(r) => format!("<= {}", format_ratio(*r, 3)),
            Goal::SpeedupAtLeast(r) => format!(">= {}", format_speedup(*r, 3)),
            Goal::NanosAtMost(ns) => format!("<= {}", trim(&table::format_ns(*ns))),
            Goal::BytesAtMost(b) => format!("<= {}", format_kib(*b)),
            Goal::FractionAtMost(f) => format!("<= {}", format_percent(*f, 2)),
            Goal::InstructionsAtMost(n) => format!("<= {n:.0} instructions"),
        }
    }
}

/// One row of the results (`gmem bench --json` writes them, `--from` reads
/// them back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    /// The case.
    pub name: String,
    /// Our median time per iteration, for timed cases.
    pub ours_ns: Option<f64>,
    /// The floor's median time per iteration, where there is a floor.
    pub floor_ns: Option<f64>,
    /// `ours / floor`, or `floor / ours` for speed-up goals.
    pub ratio: Option<f64>,
    /// Whether `ratio` is `floor / ours` (a speed-up).
    #[serde(default)]
    pub speedup: bool,
    /// What `floor_ns` measures: the floor (the raw work gmem cannot avoid)
    /// or the reference the case is compared with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared_with: Option<String>,
    /// The goal, in words.
    pub goal: Option<String>,
    /// Whether the goal was met; `None` (JSON `null`) for a reference row,
    /// which has no goal.
    pub met: Option<bool>,
    /// The measured value of a memory case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Its unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Why the case did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The process's VMAs (`/proc/self/maps` lines) before a conversion to
    /// private, where counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmas_before: Option<usize>,
    /// And after it; the goal then also asks for the same count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmas_after: Option<usize>,
    /// The samples of each side, for the slow cases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
}

impl CaseResult {
    fn timed(name: &str, ours: f64, floor: Option<f64>, goal: Goal) -> CaseResult {
        let ratio = floor.map(|floor| match goal {
            Goal::SpeedupAtLeast(_) => floor / ours,
            _ => ours / floor,
        });
        let met = match (goal, ratio) {
            (Goal::RatioAtMost(max), Some(r)) => r <= max,
            (Goal::SpeedupAtLeast(min), Some(r)) => r >= min,
            (Goal::NanosAtMost(max), _) => ours <= max,
            _ => false,
        };
        CaseResult {
            name: name.into(),
            ours_ns: Some(ours),
            floor_ns: floor,
            ratio,
            speedup: matches!(goal, Goal::SpeedupAtLeast(_)),
            compared_with: None,
            goal: Some(goal.describe()),
            met: Some(met),
            value: None,
            unit: None,
            skipped: None,
            vmas_before: None,
            vmas_after: None,
            samples: None,
        }
    }

    /// A reference row: a speed-up (`floor / ours`) shown without a goal,
    /// so with nothing to meet (`met` is `None`).
    fn reference(name: &str, ours: f64, floor: f64) -> CaseResult {
        CaseResult {
            goal: None,
            met: None,
            ..CaseResult::timed(name, ours, Some(floor), Goal::SpeedupAtLeast(0.0))
        }
    }

    /// The VMA counts around the private half; the goal is met only if they
    /// are equal.
    fn with_vmas(mut self, before: usize, after: usize) -> CaseResult {
        self.vmas_before = Some(before);
        self.vmas_after = Some(after);
        self.met = self.met.map(|met| met && before == after);
        self
    }

    /// Names what `floor_ns` measures.
    fn against(mut self, what: &str) -> CaseResult {
        self.compared_with = Some(what.into());
        self
    }

    /// The samples each side had (a slow case).
    fn with_samples(mut self, samples: usize) -> CaseResult {
        self.samples = Some(samples);
        self
    }

    /// The VMA counts and samples in words, for the tables.
    pub(crate) fn note(&self) -> String {
        let mut notes = Vec::new();
        if let (Some(before), Some(after)) = (self.vmas_before, self.vmas_after) {
            notes.push(format!("VMAs {before} -> {after}"));
        }
        if let Some(samples) = self.samples {
            let plural = if samples == 1 { "" } else { "s" };
            notes.push(format!("{samples} sample{plural}"));
        }
        if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join(", "))
        }
    }

    /// An instruction count: `per` instructions a `unit` of work.
    fn instructions(name: &str, per: f64, unit: &str, goal: Goal) -> CaseResult {
        CaseResult {
            unit: Some(format!("instructions per {unit}")),
            ..CaseResult::value(name, per, goal)
        }
    }

    /// A memory case or a count: `value` in bytes, as a fraction or in
    /// instructions, as `goal` says.
    fn value(name: &str, value: f64, goal: Goal) -> CaseResult {
        let (unit, max) = match goal {
            Goal::BytesAtMost(max) => ("bytes", max),
            Goal::FractionAtMost(max) => ("fraction of memory", max),
            Goal::InstructionsAtMost(max) => ("instructions", max),
            _ => unreachable!("a value's goal is a size, a fraction or a count"),
        };
        CaseResult {
            name: name.into(),
            ours_ns: None,
            floor_ns: None,
            ratio: None,
            speedup: false,
            compared_with: None,
            goal: Some(goal.describe()),
            met: Some(value <= max),
            value: Some(value),
            unit: Some(unit.into()),
            skipped: None,
            vmas_before: None,
            vmas_after: None,
            samples: None,
        }
    }

    fn skipped(name: &str, goal: Goal, why: String) -> CaseResult {
        CaseResult {
            name: name.into(),
            ours_ns: None,
            floor_ns: None,
            ratio: None,
            speedup: false,
            compared_with: None,
            goal: Some(goal.describe()),
            met: Some(false),
            value: None,
            unit: None,
            skipped: Some(why),
            vmas_before: None,
            vmas_after: None,
            samples: None,
        }
    }
}

/// Median nanoseconds per iteration of `ours` and `floor`, alternating.
pub fn measure(ours: &mut dyn FnMut(), mut floor: Option<&mut dyn FnMut()>) -> (f64, Option<f64>) {
    let iters_ours = calibrate(ours);
    let iters_floor = floor.as_mut().map(|f| calibrate(*f));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        a.push(batch(ours, iters_ours));
        if let (Some(f), Some(iters)) = (floor.as_mut(), iters_floor) {
            b.push(batch(*f, iters));
        }
    }
    (median(a), (!b.is_empty()).then(|| median(b)))
}

fn calibrate(f: &mut dyn FnMut()) -> u64 {
    f(); // warm up
    let mut iters = 1;
    loop {
        let started = Instant::now();
        for _ in 0..iters {
            f();
        }
        if started.elapsed() >= BATCH / 4 || iters >= 1 << 24 {
            let per = started.elapsed().as_nanos().max(1) as f64 / iters as f64;
            return ((BATCH.as_nanos() as f64 / per) as u64).max(1);
        }
        iters *= 4;
    }
}

fn batch(f: &mut dyn FnMut(), iters: u64) -> f64 {
    let started = Instant::now();
    for _ in 0..iters {
        f();
    }
    started.elapsed().as_nanos() as f64 / iters as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the headline cases (those whose name contains `only`, if given);
/// `progress` hears each name before it runs.
pub fn run_all(progress: &mut dyn FnMut(&str), only: Option<&str>) -> Vec<CaseResult> {
    let mut results = Vec::new();
    for_each_case(&mut |name, run| {
        if only.is_none_or(|only| name.contains(only)) {
            progress(name);
            results.extend(run());
        }
    });
    results
}

/// The names of the headline cases, in the order `run_all` runs them
/// (nothing is measured).
pub fn case_names() -> Vec<String> {
    let mut names = Vec::new();
    for_each_case(&mut |name, _| names.push(name.to_owned()));
    names
}

/// How to measure one case: its rows.
type Measure<'a> = dyn FnMut() -> Vec<CaseResult> + 'a;

/// Hands each headline case, by name, to `case`, which may run it.
fn for_each_case(case: &mut dyn FnMut(&str, &mut Measure<'_>)) {
    for len in [4 * KIB, 2 * MIB, 64 * MIB] {
        let name = format!("round-trip-{}", size_name(len));
        case(&name, &mut || vec![round_trip(&name, len)]);
    }
    for len in [4 * KIB, 2 * MIB, 64 * MIB] {
        let name = format!("round-trip-{}-remap", size_name(len));
        case(&name, &mut || vec![round_trip_remap(&name, len)]);
    }
    {
        // One 1 GiB file for the three instruction counts, made when the
        // first runs.
        let scenario = std::cell::OnceCell::new();
        let scenario = || scenario.get_or_init(instructions::Scenario::new);
        for pattern in instructions::Pattern::ALL {
            case(&pattern.row(), &mut || {
                vec![instructions::row(scenario(), pattern)]
            });
        }
    }
    {
        // One pair of 1 GiB files for the three fragmented cases, made when
        // the first runs.
        let fixture = std::cell::OnceCell::new();
        let fixture = || fixture.get_or_init(Fragmented::new);
        case("fragmented-1g", &mut || vec![fragmented(fixture())]);
        case("fragmented-scattered-1g", &mut || {
            vec![fragmented_scattered(fixture())]
        });
        case("fragmented-batch-1g", &mut || {
            vec![fragmented_batch(fixture())]
        });
    }
    case("pin-unpin", &mut pin_unpin);
    case("pin-unpin-2-threads", &mut pin_unpin_two_threads);
    case("copies-64k", &mut copies);
    case("virtio-chain-64k", &mut virtio::virtio_chain);
    case("convert-64g-sparse", &mut || vec![convert_sparse_64g()]);
    case("metadata-64g", &mut metadata_64g);
    case("huge-folio-check-64m", &mut || vec![huge_folio_check()]);
    case("drain-path", &mut || vec![drain_path()]);
    case("snapshot-4g-sparse", &mut snapshot::sparse_4g);
    case("snapshot-fragmented-1g", &mut snapshot::fragmented_1g);
    case("backend-pin-unpin", &mut backend::rows);
    case("kvm-guest-round-trip-4k", &mut || {
        vec![kvm::guest_round_trip()]
    });
}

fn size_name(len: u64) -> String {
    if len >= MIB {
        format!("{}m", len / MIB)
    } else {
        format!("{}k", len / KIB)
    }
}

/// Shared to private to shared of a populated range, with one host mapping,
/// against guard install and remove of a populated range of a raw mapping.
/// Both ranges are populated (every page faulted in) before each timed round
/// trip, untimed.
fn round_trip(name: &str, len: u64) -> CaseResult {
    let goal = Goal::RatioAtMost(if len <= 4 * KIB { 1.2 } else { 1.1 });
    if let Some(why) = fixtures::guard_markers_unsupported() {
        return CaseResult::skipped(name, goal, why);
    }
    let fixture = RoundTrip::new(len);
    if fixture.hiding() != gmem::Hiding::GuardMarkers {
        return CaseResult::skipped(name, goal, "gmem's mapping has no guard markers".into());
    }
    let (o, f) = measure_round_trip(&fixture);
    CaseResult::timed(name, o, Some(f), goal).against("floor: guard install+remove")
}

/// As [`round_trip`] on a file that hides private pages by remapping them
/// to an empty file (gmem's fallback), against the same two remaps of a raw
/// mapping.
fn round_trip_remap(name: &str, len: u64) -> CaseResult {
    let goal = Goal::RatioAtMost(if len <= 4 * KIB { 1.5 } else { 1.15 });
    let fixture = RoundTrip::remap(len);
    assert_eq!(fixture.hiding(), gmem::Hiding::EmptyFileRemap);
    let (o, f) = measure_round_trip(&fixture);
    CaseResult::timed(name, o, Some(f), goal).against("floor: two remaps")
}

fn measure_round_trip(fixture: &RoundTrip) -> (f64, f64) {
    measure_prepared(
        &mut || fixture.ours(),
        &mut || fixture.populate_ours(),
        &mut || fixture.floor(),
        &mut || fixture.populate_floor(),
    )
}

/// Nanoseconds of one run of `f` after its untimed `prepare`.
fn once(f: &mut dyn FnMut(), prepare: &mut dyn FnMut()) -> f64 {
    prepare();
    let started = Instant::now();
    f();
    started.elapsed().as_nanos() as f64
}

/// Median nanoseconds of `ours` and `floor`, each run after its untimed
/// `prepare`, alternating, until each has had about `SAMPLES` batches' time.
fn measure_prepared(
    ours: &mut dyn FnMut(),
    prepare_ours: &mut dyn FnMut(),
    floor: &mut dyn FnMut(),
    prepare_floor: &mut dyn FnMut(),
) -> (f64, f64) {
    once(ours, prepare_ours);
    once(floor, prepare_floor);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + BATCH * (2 * SAMPLES as u32);
    while a.len() < 4 * SAMPLES + 1 || (Instant::now() < deadline && a.len() < 1000) {
        a.push(once(ours, prepare_ours));
        b.push(once(floor, prepare_floor));
    }
    (median(a), median(b))
}

/// As [`measure_prepared`] for slow cases whose `ours` has had its untimed
/// first pass: one untimed run of `floor`, then samples of each, alternating,
/// until `SLOW_SAMPLES` each or `SLOW_BUDGET` spent (at least one each).
/// Medians, and the samples each.
fn measure_slow(
    ours: &mut dyn FnMut(),
    prepare_ours: &mut dyn FnMut(),
    floor: &mut dyn FnMut(),
    prepare_floor: &mut dyn FnMut(),
) -> (f64, f64, usize) {
    let started = Instant::now();
    once(floor, prepare_floor);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    while a.is_empty() || (a.len() < SLOW_SAMPLES && started.elapsed() < SLOW_BUDGET) {
        a.push(once(ours, prepare_ours));
        b.push(once(floor, prepare_floor));
    }
    let samples = a.len();
    (median(a), median(b), samples)
}

/// Why a fragmented case cannot run, if it cannot: guard markers missing, or
/// gmem failing the untimed first pass (the odd pages to private one by one,
/// and back). Otherwise the VMA counts before and after the private half.
fn fragmented_first_pass(fixture: &Fragmented, scattered: bool) -> Result<(usize, usize), String> {
    if let Some(why) = fixtures::guard_markers_unsupported() {
        return Err(why);
    }
    if fixture.hiding() != gmem::Hiding::GuardMarkers {
        return Err("gmem's mapping has no guard markers".into());
    }
    let vmas = || fixtures::vma_count().map_err(|e| format!("/proc/self/maps: {e}"));
    let gmem_failed = |e: gmem::ConversionError| format!("gmem failed: {e}");
    let pages = fixture.odd_pages(scattered);
    let pass = || {
        let before = vmas()?;
        fixture
            .convert_each(pages, Attribute::Private)
            .map_err(gmem_failed)?;
        let after = vmas()?;
        fixture
            .convert_each(pages, Attribute::Shared)
            .map_err(gmem_failed)?;
        Ok((before, after))
    };
    let result = pass();
    if result.is_err() {
        fixture.reset();
    }
    result
}

/// Every other page of a 1 GiB file (131,072 pages) to private, one
/// `set_attributes` call per page, then each back to shared, with one live
/// host mapping; against the same single-page guard installs and removes on
/// a raw mapping. The pages are allocated, not populated. The VMA count
/// before and after the private half (in the untimed first pass) must be
/// equal. Slow: `SLOW_SAMPLES` samples, medians.
fn fragmented(fixture: &Fragmented) -> CaseResult {
    let (name, goal) = ("fragmented-1g", Goal::RatioAtMost(1.3));
    let (before, after) = match fragmented_first_pass(fixture, false) {
        Ok(vmas) => vmas,
        Err(why) => return CaseResult::skipped(name, goal, why),
    };
    let (o, f, samples) = measure_slow(
        &mut || fixture.ours(false),
        &mut || {},
        &mut || fixture.floor(),
        &mut || {},
    );
    CaseResult::timed(name, o, Some(f), goal)
        .against("floor: per-page guards")
        .with_vmas(before, after)
        .with_samples(samples)
}

/// The conversions of `fragmented-1g` in a fixed scattered order, against
/// the same in order, in the same run. Slow: `SLOW_SAMPLES` samples, medians.
fn fragmented_scattered(fixture: &Fragmented) -> CaseResult {
    let (name, goal) = ("fragmented-scattered-1g", Goal::RatioAtMost(2.0));
    if let Err(why) = fragmented_first_pass(fixture, true) {
        return CaseResult::skipped(name, goal, why);
    }
    let (o, f, samples) = measure_slow(
        &mut || fixture.ours(true),
        &mut || {},
        &mut || fixture.ours(false),
        &mut || {},
    );
    CaseResult::timed(name, o, Some(f), goal)
        .against("same in order")
        .with_samples(samples)
}

/// A 1 GiB file whose pages alternate private and shared (prepared untimed,
/// one call per page), made private by one `set_attributes` call over it all,
/// which hides its 131,072 one-page shared runs at once; against guard
/// installs over the same ranges of a raw mapping by `process_madvise`
/// batches of 1024 (prepared untimed by guarding it all and removing those).
/// Slow: `SLOW_SAMPLES` samples, medians.
fn fragmented_batch(fixture: &Fragmented) -> CaseResult {
    let (name, goal) = ("fragmented-batch-1g", Goal::RatioAtMost(1.2));
    if let Some(why) = fixtures::guard_markers_unsupported() {
        return CaseResult::skipped(name, goal, why);
    }
    if fixture.hiding() != gmem::Hiding::GuardMarkers {
        return CaseResult::skipped(name, goal, "gmem's mapping has no guard markers".into());
    }
    // The untimed first pass.
    let first_pass = fixture
        .try_prepare_batch_ours()
        .and_then(|()| fixture.try_batch_ours());
    if let Err(e) = first_pass {
        fixture.reset();
        return CaseResult::skipped(name, goal, format!("gmem failed: {e}"));
    }
    let (o, f, samples) = measure_slow(
        &mut || fixture.batch_ours(),
        &mut || fixture.prepare_batch_ours(),
        &mut || fixture.batch_floor(),
        &mut || fixture.prepare_batch_floor(),
    );
    fixture.reset();
    CaseResult::timed(name, o, Some(f), goal)
        .against("floor: batched guards")
        .with_samples(samples)
}

/// Pin + unpin of one page on one thread, against an atomic increment and
/// decrement, and against the mutex design (a reference row); of 16 pages,
/// with small and with huge folios, against 16 such floors.
fn pin_unpin() -> Vec<CaseResult> {
    let fixture = PinUnpin::new();
    let (o, f) = measure(&mut || fixture.ours(), Some(&mut || fixture.atomic()));
    let (o2, m) = measure(&mut || fixture.ours(), Some(&mut || fixture.mutex()));
    let (o16, f16) = measure(&mut || fixture.ours_16(), Some(&mut || fixture.atomic_16()));
    let (h16, g16) = measure(
        &mut || fixture.ours_16_huge(),
        Some(&mut || fixture.atomic_16()),
    );
    vec![
        CaseResult::timed("pin-unpin", o, f, Goal::RatioAtMost(1.5))
            .against("floor: atomic add+sub"),
        CaseResult::reference("pin-unpin-vs-mutex", o2, m.expect("a floor"))
            .against("mutex design"),
        CaseResult::timed("pin-unpin-16", o16, f16, Goal::RatioAtMost(1.5))
            .against("floor: 16 atomic add+sub"),
        CaseResult::timed("pin-unpin-16-huge", h16, g16, Goal::RatioAtMost(0.2))
            .against("floor: 16 atomic add+sub"),
    ]
}

/// Nanoseconds per operation (aggregate) of `threads` threads each running
/// `op` on its own page `OPS` times: from the first thread's start to the
/// last thread's end, as the workers see them (a coordinating thread would
/// compete with them for the machine's cores and read the clock late). The
/// workers start together on a spinning barrier: waking a thread blocked in
/// a futex can take longer, on a nested host, than the run itself.
fn per_op(threads: usize, op: &(dyn Fn(u64) + Sync)) -> f64 {
    const OPS: u64 = 1 << 21;
    // Pages in different 2 MiB chunks: their counts share no cache line.
    let pages = [0, 512];
    let arrived = std::sync::atomic::AtomicUsize::new(0);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let workers: Vec<_> = pages[..threads]
            .iter()
            .map(|page| {
                let arrived = &arrived;
                s.spawn(move || {
                    op(*page);
                    // Relaxed: only a start signal; no data is handed over.
                    arrived.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    while arrived.load(std::sync::atomic::Ordering::Relaxed) < threads {
                        std::hint::spin_loop();
                    }
                    let start = Instant::now();
                    for _ in 0..OPS {
                        op(black_box(*page));
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a benchmark thread panicked"))
            .collect()
    });
    let start = spans.iter().map(|s| s.0).min().expect("a thread");
    let end = spans.iter().map(|s| s.1).max().expect("a thread");
    (end - start).as_nanos() as f64 / (OPS * threads as u64) as f64
}

/// Two threads pinning distinct pages: throughput against one thread; and
/// against the mutex design with two threads.
fn pin_unpin_two_threads() -> Vec<CaseResult> {
    let mem = GuestMemfd::new(4 * MIB, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
    let mutex = fixtures::MutexRefs::new(1024);
    let ours = |page: u64| drop(black_box(mem.pin(page * PAGE_SIZE, 1).expect("pin")));
    let locked = |page: u64| {
        assert!(mutex.pin(page));
        mutex.unpin(page);
    };
    let (mut one, mut two, mut two_locked) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        one.push(per_op(1, &ours));
        two.push(per_op(2, &ours));
        two_locked.push(per_op(2, &locked));
    }
    let two = median(two);
    vec![
        CaseResult::timed(
            "pin-unpin-2-threads",
            two,
            Some(median(one)),
            Goal::SpeedupAtLeast(1.9),
        )
        .against("one thread"),
        CaseResult::reference("pin-unpin-2-threads-vs-mutex", two, median(two_locked))
            .against("mutex design, 2 threads"),
    ]
}

/// 64 KiB copies through a host mapping and through a pin, against
/// `copy_nonoverlapping` from and to a raw mapping of a memfd.
fn copies() -> Vec<CaseResult> {
    let mut fixture = Copies::new();
    let mut results = Vec::new();
    for (name, ours, floor) in [
        (
            "host-mapping-read-64k",
            Copies::host_read as fn(&mut Copies),
            Copies::floor_read as fn(&mut Copies),
        ),
        (
            "host-mapping-write-64k",
            Copies::host_write,
            Copies::floor_write,
        ),
        ("pin-read-64k", Copies::pin_read, Copies::floor_read),
        ("pin-write-64k", Copies::pin_write, Copies::floor_write),
    ] {
        let fixture = std::cell::RefCell::new(&mut fixture);
        let (o, f) = measure(
            &mut || ours(&mut fixture.borrow_mut()),
            Some(&mut || floor(&mut fixture.borrow_mut())),
        );
        // Bandwidth at least 0.9 of the floor's: time at most 1/0.9 of it.
        results.push(
            CaseResult::timed(name, o, f, Goal::RatioAtMost(1.0 / 0.9)).against("floor: memcpy"),
        );
    }
    results
}

/// A round trip over 63 GiB of a 64 GiB file with 1 MiB allocated and 16
/// pins in the last GiB: the cost must follow what is allocated and pinned.
fn convert_sparse_64g() -> CaseResult {
    let size = 64 * GIB;
    let range = 63 * GIB;
    let mem = GuestMemfd::new(size, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
    let map = mem.mmap().expect("mmap");
    map.write(0, &vec![1u8; MIB as usize]).expect("populate");
    let pins: Vec<_> = (0..16)
        .map(|i| mem.pin(range + i * 64 * MIB, PAGE_SIZE).expect("pin"))
        .collect();
    let mut ours = || {
        mem.set_attributes(0, range, Attribute::Private)
            .expect("to private");
        mem.set_attributes(0, range, Attribute::Shared)
            .expect("to shared");
    };
    let (o, _) = measure(&mut ours, None);
    drop(pins);
    CaseResult::timed("convert-64g-sparse", o, None, Goal::NanosAtMost(10e6))
}

/// gmem's metadata for an idle 64 GiB file, and for one whose every 2 MiB
/// has been pinned (all reference chunks made).
fn metadata_64g() -> Vec<CaseResult> {
    let size = 64 * GIB;
    let mem = GuestMemfd::new(size, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
    let idle = mem.stats().metadata_bytes as f64;
    for chunk in (0..size).step_by(2 * MIB as usize) {
        drop(mem.pin(chunk, 1).expect("pin"));
    }
    let touched = mem.stats().metadata_bytes as f64 / size as f64;
    mem.punch_hole(0, size).expect("punch");
    vec![
        CaseResult::value("metadata-64g-idle", idle, Goal::BytesAtMost(MIB as f64)),
        CaseResult::value("metadata-64g-touched", touched, Goal::FractionAtMost(0.002)),
    ]
}

/// A round trip of 64 MiB whose every 2 MiB chunk has been pinned before, on
/// a file with huge folios (one count to check per chunk) against one
/// without (512 counts per chunk).
fn huge_folio_check() -> CaseResult {
    let len = 64 * MIB;
    let file = |huge_folios| {
        let options = gmem::Options::new().huge_folios(huge_folios);
        let mem = GuestMemfd::with_options(len, Flags::MMAP | Flags::INIT_SHARED, options)
            .expect("memfd");
        for chunk in (0..len).step_by(2 * MIB as usize) {
            drop(mem.pin(chunk, PAGE_SIZE).expect("pin"));
        }
        mem.drain_pin_batches();
        mem
    };
    let (huge, small) = (file(true), file(false));
    let round_trip = |mem: &GuestMemfd| {
        mem.set_attributes(0, len, Attribute::Private)
            .expect("to private");
        mem.set_attributes(0, len, Attribute::Shared)
            .expect("to shared");
    };
    let (o, f) = measure(&mut || round_trip(&huge), Some(&mut || round_trip(&small)));
    assert_eq!(
        huge.stats().huge_folios,
        32,
        "the huge file kept its folios"
    );
    CaseResult::timed("huge-folio-check-64m", o, f, Goal::RatioAtMost(1.0)).against("small folios")
}

/// A round trip whose check meets two other threads' parked releases in
/// range (one drain), against the same round trip after the same threads did
/// the same pins but flushed their releases first (no drain).
fn drain_path() -> CaseResult {
    let len = 2 * MIB;
    let mem = Arc::new(GuestMemfd::new(4 * MIB, Flags::MMAP | Flags::INIT_SHARED).expect("memfd"));
    let _map = mem.mmap().expect("mmap");
    mem.allocate(0, len).expect("allocate");
    let mut threads = Vec::new();
    for t in 0..2u64 {
        // A request says whether to flush the parked release; None stops.
        let (request_tx, request_rx) = mpsc::channel::<Option<bool>>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let mem = mem.clone();
        let handle = std::thread::spawn(move || {
            while let Ok(Some(flush)) = request_rx.recv() {
                drop(mem.pin(t * 8 * PAGE_SIZE, PAGE_SIZE).expect("pin"));
                if flush {
                    mem.drain_pin_batches();
                }
                done_tx.send(()).expect("bench alive");
            }
        });
        threads.push((request_tx, done_rx, handle));
    }
    let sample = |flush: bool| -> f64 {
        for (request, done, _) in &threads {
            request.send(Some(flush)).expect("thread alive");
            done.recv().expect("thread alive");
        }
        let started = Instant::now();
        mem.set_attributes(0, len, Attribute::Private)
            .expect("to private");
        mem.set_attributes(0, len, Attribute::Shared)
            .expect("to shared");
        started.elapsed().as_nanos() as f64
    };
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES * 30 {
        ours.push(sample(false));
        floor.push(sample(true));
    }
    for (request, _, handle) in threads {
        request.send(None).expect("thread alive");
        handle.join().expect("thread");
    }
    CaseResult::timed(
        "drain-path",
        median(ours),
        Some(median(floor)),
        Goal::RatioAtMost(2.0),
    )
    .against("no drain")
}

/// Exposed for `bench_kvm`.
pub(crate) fn timed(
    name: &str,
    ours: f64,
    floor: Option<f64>,
    goal: Goal,
    against: &str,
) -> CaseResult {
    CaseResult::timed(name, ours, floor, goal).against(against)
}

/// Exposed for `bench_kvm`.
pub(crate) fn skipped(name: &str, goal: Goal, why: String) -> CaseResult {
    CaseResult::skipped(name, goal, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON rows carry the fields scripts rely on.
    #[test]
    fn rows_have_the_documented_fields() {
        let timed = CaseResult::timed("t", 2.0, Some(1.0), Goal::RatioAtMost(1.5));
        let absolute = CaseResult::timed("a", 5.0, None, Goal::NanosAtMost(10.0));
        let value = CaseResult::value("v", 3.0, Goal::BytesAtMost(2.0));
        let json = serde_json::to_value([&timed, &absolute, &value]).unwrap();
        for row in json.as_array().unwrap() {
            for field in ["name", "ours_ns", "floor_ns", "ratio", "goal", "met"] {
                assert!(row.get(field).is_some(), "{field} missing in {row}");
            }
        }
        assert_eq!(json[0]["ratio"], 2.0);
        assert_eq!(json[0]["met"], false);
        assert!(json[1]["floor_ns"].is_null() && json[1]["ratio"].is_null());
        assert_eq!(json[1]["met"], true);
        assert_eq!(
            (json[2]["value"].as_f64(), json[2]["met"].as_bool()),
            (Some(3.0), Some(false))
        );
        let speedup = CaseResult::timed("s", 10.0, Some(20.0), Goal::SpeedupAtLeast(1.8));
        assert_eq!((speedup.ratio, speedup.met), (Some(2.0), Some(true)));
        assert!(json[0].get("vmas_before").is_none());
    }

    /// A reference row has no goal, so nothing met or missed: `met` is
    /// `null` in the JSON, and reads back so.
    #[test]
    fn reference_rows_meet_nothing() {
        let row = CaseResult::reference("r", 10.0, 20.0);
        let json = serde_json::to_value(&row).unwrap();
        assert!(json["goal"].is_null() && json["met"].is_null(), "{json}");
        assert_eq!(json["ratio"], 2.0);
        let back: CaseResult = serde_json::from_value(json).unwrap();
        assert_eq!(back.met, None);
    }

    /// A VMA count that grows fails the goal, whatever the ratio.
    #[test]
    fn vma_counts_must_be_equal() {
        let row = |before, after| {
            CaseResult::timed("f", 1.0, Some(1.0), Goal::RatioAtMost(1.3)).with_vmas(before, after)
        };
        assert_eq!(row(40, 40).met, Some(true));
        let grown = row(40, 131_112);
        assert_eq!(grown.met, Some(false));
        assert_eq!(grown.note(), " (VMAs 40 -> 131112)");
        let json = serde_json::to_value(&grown).unwrap();
        assert_eq!(
            (json["vmas_before"].as_u64(), json["vmas_after"].as_u64()),
            (Some(40), Some(131_112))
        );
        assert!(json.get("samples").is_none());
        assert_eq!(
            grown.with_samples(5).note(),
            " (VMAs 40 -> 131112, 5 samples)"
        );
    }
}
