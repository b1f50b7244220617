//! `gmem bench --study`: conversion latency (median and p99) by size, from
//! 4 KiB to 1 GiB in powers of 4, in five cases, each beside its floor.
//!
//! Each sample populates the range (untimed, `MADV_POPULATE_WRITE`), then
//! times the conversion to private and, right after it, the conversion back
//! to shared: the two directions are timed separately. The floor sample does
//! the same on a raw mapping of a memfd with the cheapest kernel work that
//! hides and shows the range: guard install and remove below 2 MiB, the two
//! `mmap(MAP_FIXED)` remaps from 2 MiB on (gmem's guard mappings hide runs
//! that long by the remap). gmem and floor samples alternate.
//!
//! The cases: `plain` (one host mapping, nothing else); `drain` (before each
//! sample another thread pins and drops a page of the range and keeps the
//! release parked, so the check drains once); `pins-elsewhere` (16 device
//! pins held past the range); `huge-folios` (a file counting references per
//! 2 MiB, every chunk pinned once before); `fragmented` (every other page of
//! the range private before the conversion to private, which hides the
//! one-page shared runs between them; the floor installs guards on the same
//! runs by batched `process_madvise` and removes them with one call).
//!
//! Each point (case and size) takes an untimed first pass, then as many
//! samples as fit in [`POINT_BUDGET`], between [`MIN_SAMPLES`] and
//! [`MAX_SAMPLES`]; p99 is the nearest-rank percentile (the largest sample
//! below 100 samples).

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use gmem::{Attribute, Flags, GuestMemfd, HostMapping, Options, PAGE_SIZE};
use plotters::prelude::*;
use serde::Serialize;

use super::table::{self, align, format_ns, format_size, trim};
use super::{GIB, KIB, MIB, fixtures};
use crate::floor::{RawMapping, populate};

/// From this size on, gmem's guard mappings hide a run by the remap, and so
/// does the floor.
const REMAP_FROM: u64 = 2 * MIB;
/// The time a point's samples may take after its first pass.
pub const POINT_BUDGET: Duration = Duration::from_millis(1500);
/// Samples of each side at least.
pub const MIN_SAMPLES: usize = 5;
/// Samples of each side at most.
pub const MAX_SAMPLES: usize = 201;
/// Pins the `pins-elsewhere` case holds past the range.
const PINS_ELSEWHERE: u64 = 16;
/// The largest size studied.
const MAX_SIZE: u64 = GIB;
/// The file: the largest size, and 2 MiB past it for the pins elsewhere.
const FILE_LEN: u64 = MAX_SIZE + 2 * MIB;

/// The sizes studied: 4 KiB to 1 GiB, powers of 4.
pub fn sizes() -> Vec<u64> {
    (0..10).map(|i| (4 * KIB) << (2 * i)).collect()
}

/// A case of the study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// One host mapping, nothing else.
    Plain,
    /// A parked release in the range: the check drains once.
    Drain,
    /// Device pins held past the range.
    PinsElsewhere,
    /// References counted per 2 MiB, every chunk made.
    HugeFolios,
    /// Every other page of the range private before the conversion.
    Fragmented,
}

impl Case {
    /// Every case, in the order they run.
    pub const ALL: [Case; 5] = [
        Case::Plain,
        Case::Drain,
        Case::PinsElsewhere,
        Case::HugeFolios,
        Case::Fragmented,
    ];

    /// The case's name in tables, JSON and the plot.
    pub fn name(self) -> &'static str {
        match self {
            Case::Plain => "plain",
            Case::Drain => "drain",
            Case::PinsElsewhere => "pins-elsewhere",
            Case::HugeFolios => "huge-folios",
            Case::Fragmented => "fragmented",
        }
    }
}

/// Which way a conversion goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Shared to private (for `fragmented`: half-private to private).
    ToPrivate,
    /// Private to shared.
    ToShared,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::ToPrivate => "to private",
            Direction::ToShared => "to shared",
        }
    }
}

/// The median and p99 of a side's samples.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median, in nanoseconds.
    pub median_ns: f64,
    /// Nearest-rank 99th percentile, in nanoseconds.
    pub p99_ns: f64,
}

impl Latency {
    /// The median and p99 of `samples` (at least one).
    pub fn of(mut samples: Vec<f64>) -> Latency {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let rank = (n * 99).div_ceil(100).max(1);
        Latency {
            median_ns: samples[n / 2],
            p99_ns: samples[rank - 1],
        }
    }

    fn cell(&self) -> String {
        format!("{} / {}", format_ns(self.median_ns), format_ns(self.p99_ns))
    }
}

/// One case, size and direction.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// The case.
    pub case: Case,
    /// The range converted, in bytes.
    pub size_bytes: u64,
    /// Which way.
    pub direction: Direction,
    /// gmem's `set_attributes`.
    pub gmem: Latency,
    /// The floor.
    pub floor: Latency,
    /// The floor's kernel work.
    pub floor_work: &'static str,
    /// `gmem.median_ns / floor.median_ns`.
    pub ratio: f64,
    /// Samples of each side.
    pub samples: usize,
}

/// The study's results.
#[derive(Debug, Clone, Serialize)]
pub struct Study {
    /// How it was measured, in words.
    pub method: &'static str,
    /// Every point, by case, size, direction.
    pub points: Vec<Point>,
}

const METHOD: &str = "Each sample populates the range (untimed), then times \
    set_attributes to private and then to shared separately; the floor does \
    the same on a raw memfd mapping with guard install/remove below 2 MiB and \
    the two mmap(MAP_FIXED) remaps from 2 MiB on (fragmented: batched guard \
    install over the shared pages, one guard remove). gmem and floor samples \
    alternate. p99 is nearest-rank (the largest sample below 100 samples).";

/// The files of one case: gmem's (one host mapping) and the floor's.
struct Setup {
    mem: Arc<GuestMemfd>,
    map: HostMapping,
    raw: RawMapping,
}

impl Setup {
    fn new(case: Case) -> anyhow::Result<Setup> {
        let options = Options::new().huge_folios(case == Case::HugeFolios);
        let mem = GuestMemfd::with_options(FILE_LEN, Flags::MMAP | Flags::INIT_SHARED, options)
            .context("creating the file")?;
        let map = mem.mmap().context("mapping the file")?;
        anyhow::ensure!(
            map.hiding() == gmem::Hiding::GuardMarkers,
            "gmem's mapping has no guard markers"
        );
        mem.allocate(0, FILE_LEN).context("allocating the file")?;
        let raw = RawMapping::new(MAX_SIZE as usize).context("the floor's raw mapping")?;
        if case == Case::HugeFolios {
            for chunk in (0..FILE_LEN).step_by(2 * MIB as usize) {
                drop(mem.pin(chunk, PAGE_SIZE).context("pinning a chunk")?);
            }
            mem.drain_pin_batches();
            anyhow::ensure!(mem.stats().huge_folios > 0, "no huge folios were made");
        }
        Ok(Setup {
            mem: Arc::new(mem),
            map,
            raw,
        })
    }
}

/// A thread that, asked, pins and drops the first page and leaves the
/// release parked in its batch.
struct Parker {
    request: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Parker {
    fn new(mem: Arc<GuestMemfd>) -> Parker {
        let (request, requests) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            while requests.recv().is_ok() {
                drop(mem.pin(0, PAGE_SIZE).expect("pin"));
                if done_tx.send(()).is_err() {
                    break;
                }
            }
        });
        Parker {
            request: Some(request),
            done,
            thread: Some(thread),
        }
    }

    fn park_one(&self) {
        let request = self.request.as_ref().expect("running");
        request.send(()).expect("parker alive");
        self.done.recv().expect("parker alive");
    }
}

impl Drop for Parker {
    fn drop(&mut self) {
        drop(self.request.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The floor's work for `case` at `size`, in words.
fn floor_work(case: Case, size: u64) -> &'static str {
    match case {
        Case::Fragmented => "batched guard install / guard remove",
        _ if size >= REMAP_FROM => "remap to empty file / remap back",
        _ => "guard install / guard remove",
    }
}

/// Nanoseconds since `started`.
fn since(started: Instant) -> f64 {
    started.elapsed().as_nanos() as f64
}

/// One sample of each side: gmem to private, to shared; floor to private,
/// to shared.
fn sample(setup: &Setup, case: Case, size: u64, parker: Option<&Parker>) -> [f64; 4] {
    let page = PAGE_SIZE as usize;
    let len = size as usize;
    let odd = || (1..size / PAGE_SIZE).step_by(2);
    let ranges = |first: usize| -> Vec<(usize, usize)> {
        (first..len / page)
            .step_by(2)
            .map(|p| (p * page, page))
            .collect()
    };
    // gmem.
    populate(&setup.map, size).expect("populate");
    if case == Case::Fragmented {
        for p in odd() {
            setup
                .mem
                .set_attributes(p * PAGE_SIZE, PAGE_SIZE, Attribute::Private)
                .expect("fragment");
        }
    }
    if let Some(parker) = parker {
        parker.park_one();
    }
    let started = Instant::now();
    setup
        .mem
        .set_attributes(0, size, Attribute::Private)
        .expect("to private");
    let ours_private = since(started);
    let started = Instant::now();
    setup
        .mem
        .set_attributes(0, size, Attribute::Shared)
        .expect("to shared");
    let ours_shared = since(started);
    // The floor.
    setup.raw.touch(0, len);
    let (floor_private, floor_shared);
    if case == Case::Fragmented {
        let (odd, even) = (ranges(1), ranges(0));
        setup.raw.guard_install_ranges(&odd).expect("fragment");
        let started = Instant::now();
        setup
            .raw
            .guard_install_ranges(&even)
            .expect("guard install");
        floor_private = since(started);
        let started = Instant::now();
        setup.raw.guard_remove(0, len).expect("guard remove");
        floor_shared = since(started);
    } else if size >= REMAP_FROM {
        let started = Instant::now();
        setup.raw.hide(0, len);
        floor_private = since(started);
        let started = Instant::now();
        setup.raw.show(0, len);
        floor_shared = since(started);
    } else {
        let started = Instant::now();
        setup.raw.guard_install(0, len).expect("guard install");
        floor_private = since(started);
        let started = Instant::now();
        setup.raw.guard_remove(0, len).expect("guard remove");
        floor_shared = since(started);
    }
    [ours_private, ours_shared, floor_private, floor_shared]
}

/// Both directions of one case at one size.
fn point(setup: &Setup, case: Case, size: u64, parker: Option<&Parker>) -> [Point; 2] {
    let started = Instant::now();
    sample(setup, case, size, parker);
    let pass = started.elapsed().as_nanos().max(1);
    let samples = usize::try_from(POINT_BUDGET.as_nanos() / pass)
        .unwrap_or(MAX_SAMPLES)
        .clamp(MIN_SAMPLES, MAX_SAMPLES);
    let mut sides: [Vec<f64>; 4] = Default::default();
    for _ in 0..samples {
        for (side, ns) in sides.iter_mut().zip(sample(setup, case, size, parker)) {
            side.push(ns);
        }
    }
    let [ours_private, ours_shared, floor_private, floor_shared] = sides.map(Latency::of);
    let point = |direction, gmem: Latency, floor: Latency| Point {
        case,
        size_bytes: size,
        direction,
        gmem,
        floor,
        floor_work: floor_work(case, size),
        ratio: gmem.median_ns / floor.median_ns,
        samples,
    };
    [
        point(Direction::ToPrivate, ours_private, floor_private),
        point(Direction::ToShared, ours_shared, floor_shared),
    ]
}

/// Runs the study; `progress` hears a line before each point.
pub fn run(progress: &mut dyn FnMut(&str)) -> anyhow::Result<Study> {
    if let Some(why) = fixtures::guard_markers_unsupported() {
        anyhow::bail!("the study needs guard markers: {why}");
    }
    let started = Instant::now();
    let mut points = Vec::new();
    for case in Case::ALL {
        progress(&format!("study: {} (setting up)", case.name()));
        let setup = Setup::new(case)?;
        let _pins = if case == Case::PinsElsewhere {
            (0..PINS_ELSEWHERE)
                .map(|i| setup.mem.pin(MAX_SIZE + i * 16 * KIB, PAGE_SIZE))
                .collect::<Result<Vec<_>, _>>()
                .context("pinning past the range")?
        } else {
            Vec::new()
        };
        let parker = (case == Case::Drain).then(|| Parker::new(setup.mem.clone()));
        for size in sizes() {
            progress(&format!(
                "study: {} {} ({:.0} s so far)",
                case.name(),
                format_size(size),
                started.elapsed().as_secs_f64()
            ));
            points.extend(point(&setup, case, size, parker.as_ref()));
        }
    }
    Ok(Study {
        method: METHOD,
        points,
    })
}

const STUDY_HEADERS: [&str; 8] = [
    "case",
    "size",
    "to private: gmem (median / p99)",
    "floor (median / p99)",
    "to shared: gmem (median / p99)",
    "floor (median / p99)",
    "ratio (private, shared)",
    "samples",
];

/// A row per case and size.
fn study_rows(study: &Study) -> Vec<[String; 8]> {
    let mut rows = Vec::new();
    for pair in study.points.chunks(2) {
        let [private, shared] = pair else {
            continue;
        };
        rows.push([
            private.case.name().to_string(),
            format_size(private.size_bytes),
            private.gmem.cell(),
            private.floor.cell(),
            shared.gmem.cell(),
            shared.floor.cell(),
            format!("{:.2}x, {:.2}x", private.ratio, shared.ratio),
            private.samples.to_string(),
        ]);
    }
    rows
}

/// The study's table for a terminal.
pub fn terminal_table(study: &Study) -> String {
    let right = [false, true, true, true, true, true, true, true];
    align(STUDY_HEADERS, right, &study_rows(study))
}

/// The study's table as Markdown.
pub fn markdown_table(study: &Study) -> String {
    table::markdown(STUDY_HEADERS, &study_rows(study))
}

const COLOURS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// The plot, as SVG: median latency against size, log-log, one panel per
/// direction; gmem solid with points, each case's floor dashed in its
/// colour.
pub fn plot(study: &Study) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(600);
        for (area, direction) in [(left, Direction::ToPrivate), (right, Direction::ToShared)] {
            draw_panel(&area, study, direction)?;
        }
        root.present()?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    study: &Study,
    direction: Direction,
) -> anyhow::Result<()> {
    let points: Vec<&Point> = study
        .points
        .iter()
        .filter(|p| p.direction == direction)
        .collect();
    let times = points
        .iter()
        .flat_map(|p| [p.gmem.median_ns, p.floor.median_ns]);
    let lo = times.clone().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = times.fold(1.0, f64::max);
    let x = |p: &Point| (p.size_bytes as f64).log2();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("conversion {} (median)", direction.name()),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(11.5f64..30.5f64, (lo / 1.5..hi * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("size converted")
        .y_desc("latency")
        .x_labels(10)
        .max_light_lines(0)
        .x_label_formatter(&|x| format_size(2f64.powf(x.round()) as u64))
        .y_label_formatter(&|y| trim(&format_ns(*y)))
        .draw()?;
    for (case, colour) in Case::ALL.into_iter().zip(COLOURS) {
        let ours: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.case == case)
            .map(|p| (x(p), p.gmem.median_ns))
            .collect();
        let floor: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.case == case)
            .map(|p| (x(p), p.floor.median_ns))
            .collect();
        chart
            .draw_series(LineSeries::new(ours.clone(), colour.stroke_width(2)))?
            .label(format!("gmem, {}", case.name()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
        chart.draw_series(ours.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        chart.draw_series(DashedLineSeries::new(floor, 6, 4, colour.stroke_width(1)))?;
    }
    chart
        .draw_series(DashedLineSeries::new(
            std::iter::empty::<(f64, f64)>(),
            6,
            4,
            BLACK.stroke_width(1),
        ))?
        .label("floor (dashed, same colour)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_powers_of_four_from_4k_to_1g() {
        let sizes = sizes();
        assert_eq!(sizes.first(), Some(&(4 * KIB)));
        assert_eq!(sizes.last(), Some(&GIB));
        assert!(sizes.windows(2).all(|w| w[1] == 4 * w[0]));
    }

    #[test]
    fn p99_is_nearest_rank() {
        let l = Latency::of((1..=200).map(f64::from).collect());
        assert_eq!((l.median_ns, l.p99_ns), (101.0, 198.0));
        let l = Latency::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((l.median_ns, l.p99_ns), (2.0, 3.0));
        let l = Latency::of(vec![5.0]);
        assert_eq!((l.median_ns, l.p99_ns), (5.0, 5.0));
    }

    fn fake() -> Study {
        let mut points = Vec::new();
        for case in Case::ALL {
            for size in sizes() {
                for direction in [Direction::ToPrivate, Direction::ToShared] {
                    let ns = size as f64 / 4.0;
                    let latency = Latency {
                        median_ns: ns,
                        p99_ns: 2.0 * ns,
                    };
                    points.push(Point {
                        case,
                        size_bytes: size,
                        direction,
                        gmem: latency,
                        floor: latency,
                        floor_work: floor_work(case, size),
                        ratio: 1.0,
                        samples: 5,
                    });
                }
            }
        }
        Study {
            method: METHOD,
            points,
        }
    }

    /// The plot is SVG with both panels and every case in the legend; the
    /// tables have a row per case and size.
    #[test]
    fn plot_and_tables_of_a_study() {
        let study = fake();
        let svg = plot(&study).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        for text in [
            "conversion to private",
            "conversion to shared",
            "gmem, drain",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.contains("1 GiB") && svg.contains("4 KiB"));
        let markdown = markdown_table(&study);
        assert_eq!(markdown.lines().count(), 2 + 5 * 10);
        assert!(markdown.contains("| fragmented | 1 GiB | 268.44 ms / 536.87 ms |"));
        let json = serde_json::to_value(&study).unwrap();
        assert_eq!(json["points"][0]["case"], "plain");
        assert_eq!(json["points"][1]["direction"], "to-shared");
        assert_eq!(terminal_table(&study).lines().count(), 1 + 5 * 10);
    }
}
