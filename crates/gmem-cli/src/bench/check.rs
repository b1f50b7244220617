//! What `gmem bench --check` says of a missed goal: which rows depend on
//! the host they run on, and how. A ratio against a floor of system calls
//! moves with the host's system-call cost (on a host whose system calls are
//! twice as cheap, gmem's fixed work weighs twice as much); an instruction
//! count does not move at all.

use super::CaseResult;
use super::table::{align, trim};

/// What a row's value depends on, besides gmem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependence {
    /// Instructions retired in user space: the same on any host of the
    /// architecture (only the compiler and the C library change them).
    Instructions,
    /// A ratio against a floor of system calls (guard advice, remaps,
    /// `copy_file_range`, a VM exit), or gmem against gmem with system calls
    /// on both sides: the lower the host's system-call cost, the more
    /// gmem's own work weighs.
    SystemCalls,
    /// A ratio against user-space work (atomics, `memcpy`, another guest
    /// memory): the host's CPU and caches, no system call.
    UserSpace,
    /// An absolute time: the host's speed as a whole.
    AbsoluteTime,
    /// A size: the same on any host.
    Memory,
}

impl Dependence {
    /// What the dependence is, in words for the `--check` table.
    pub fn describe(self) -> &'static str {
        match self {
            Dependence::Instructions => "instruction count: the same on any host",
            Dependence::SystemCalls => "ratio against system calls: the host's system-call cost",
            Dependence::UserSpace => "ratio against user-space work: the host's CPU",
            Dependence::AbsoluteTime => "absolute time: the host's speed",
            Dependence::Memory => "size: the same on any host",
        }
    }
}

/// The dependence of the row `name` (any row `gmem bench` makes).
pub fn dependence(name: &str) -> Dependence {
    const USER_SPACE: [&str; 5] = [
        "pin-unpin",
        "backend-pin-unpin",
        "host-mapping-",
        "pin-read",
        "pin-write",
    ];
    const SIZES: [&str; 2] = ["metadata-", "snapshot-4g-sparse-size"];
    const ABSOLUTE: [&str; 2] = ["convert-64g-sparse", "snapshot-fragmented-1g"];
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
    if name.starts_with("instructions-") {
        Dependence::Instructions
    } else if starts(&SIZES) {
        Dependence::Memory
    } else if starts(&ABSOLUTE) {
        Dependence::AbsoluteTime
    } else if starts(&USER_SPACE) || name.starts_with("virtio-chain") {
        Dependence::UserSpace
    } else {
        // Round trips (with backends too), the fragmented files, the
        // drain, huge folios against small ones, snapshots and restores,
        // the guest's round trip.
        Dependence::SystemCalls
    }
}

/// The missed rows (see [`table::missed`](super::table::missed)) as a
/// table: each row's value, its goal and what the value depends on; or a
/// line saying that every measured goal was met.
pub fn missed_table(results: &[CaseResult]) -> String {
    let missed = super::table::missed(results);
    if missed.is_empty() {
        return "every measured goal met\n".into();
    }
    let rows: Vec<[String; 4]> = missed
        .iter()
        .map(|row| {
            [
                row.name.clone(),
                value_cell(row),
                row.goal.clone().unwrap_or_default(),
                dependence(&row.name).describe().into(),
            ]
        })
        .collect();
    let headers = ["missed", "value", "goal", "depends on"];
    align(headers, [false, true, false, false], &rows)
}

/// A missed row's value: its ratio, speed-up, time or value.
fn value_cell(row: &CaseResult) -> String {
    let ratio = |r: f64| match row.speedup {
        true => super::table::format_speedup(r, 2),
        false => format!("{r:.2}x"),
    };
    match (row.ratio, row.value, row.ours_ns) {
        (Some(r), _, _) => ratio(r),
        (None, Some(v), _) => trim(&format!("{v:.4}")),
        (None, None, Some(ns)) => super::table::format_ns(ns),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Goal;
    use super::*;

    /// Each kind of row says what it depends on; a row not named otherwise
    /// is taken to depend on system calls (the cautious reading).
    #[test]
    fn rows_say_what_they_depend_on() {
        for (name, dependence) in [
            ("instructions-in-order", Dependence::Instructions),
            ("instructions-batch", Dependence::Instructions),
            ("round-trip-4k", Dependence::SystemCalls),
            ("round-trip-64m-remap", Dependence::SystemCalls),
            ("fragmented-1g", Dependence::SystemCalls),
            ("kvm-guest-round-trip-4k", Dependence::SystemCalls),
            ("restore-4g-sparse", Dependence::SystemCalls),
            ("pin-unpin-16-huge", Dependence::UserSpace),
            ("backend-pin-unpin", Dependence::UserSpace),
            ("round-trip-4k-backend", Dependence::SystemCalls),
            ("host-mapping-read-64k", Dependence::UserSpace),
            ("pin-write-64k", Dependence::UserSpace),
            ("virtio-chain-64k-per-slice", Dependence::UserSpace),
            ("convert-64g-sparse", Dependence::AbsoluteTime),
            ("snapshot-fragmented-1g-load", Dependence::AbsoluteTime),
            ("metadata-64g-idle", Dependence::Memory),
            ("snapshot-4g-sparse-size", Dependence::Memory),
            ("snapshot-4g-sparse", Dependence::SystemCalls),
        ] {
            assert_eq!(super::dependence(name), dependence, "{name}");
        }
    }

    /// The table lists the missed rows only, with what each depends on.
    #[test]
    fn the_missed_table_lists_misses_only() {
        let met = CaseResult::timed("round-trip-2m", 1.0, Some(1.0), Goal::RatioAtMost(1.1));
        let missed = CaseResult::timed("round-trip-4k", 1.3, Some(1.0), Goal::RatioAtMost(1.2));
        let count = CaseResult::instructions(
            "instructions-in-order",
            880.0,
            "conversion",
            Goal::InstructionsAtMost(700.0),
        );
        let table = missed_table(&[met.clone(), missed, count]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[1].contains("round-trip-4k") && lines[1].contains("1.30x"));
        assert!(lines[1].contains("system-call cost"), "{table}");
        assert!(lines[2].contains("880") && lines[2].contains("<= 700 instructions"));
        assert!(lines[2].contains("the same on any host"), "{table}");
        assert_eq!(missed_table(&[met]), "every measured goal met\n");
    }
}
