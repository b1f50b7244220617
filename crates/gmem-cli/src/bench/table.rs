//! The tables of `gmem bench`: every value with its unit, the compared-with
//! column named for what it measures, columns aligned for a terminal and the
//! same cells as Markdown; and the exit status of `--check`.

use super::CaseResult;

/// The columns of the results table.
pub const HEADERS: [&str; 6] = ["case", "gmem", "compared with", "ratio", "goal", "met"];

/// Whether each column is right-aligned in the terminal (numbers are).
const RIGHT: [bool; 6] = [false, true, false, true, false, false];

/// Nanoseconds in the unit that suits them (ns, us, ms, s), with 1 or 2
/// decimals.
pub fn format_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// A formatted number without trailing zeros after its decimal point
/// ("10.00 ms" is "10 ms", "1.50x" is "1.5x").
pub fn trim(text: &str) -> String {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number = if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    };
    format!("{number}{unit}")
}

/// Bytes in KiB, to the nearest KiB.
pub fn format_kib(bytes: f64) -> String {
    format!("{:.0} KiB", bytes / 1024.0)
}

/// A size in bytes in the largest binary unit that divides it (B, KiB, MiB,
/// GiB), else in KiB with decimals.
pub fn format_size(bytes: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= scale && bytes % scale == 0 {
            return format!("{} {unit}", bytes / scale);
        }
    }
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{:.2} KiB", bytes as f64 / 1024.0)
    }
}

/// A fraction as a percentage with `decimals` decimals, trailing zeros
/// trimmed where `decimals` is a bound rather than a precision (goals).
pub fn format_percent(fraction: f64, decimals: usize) -> String {
    trim(&format!("{:.*}%", decimals, fraction * 100.0))
}

/// A ratio (gmem's time over the compared time), at most `decimals`
/// decimals: "1.07x".
pub fn format_ratio(ratio: f64, decimals: usize) -> String {
    trim(&format!("{ratio:.decimals$}x"))
}

/// A speed-up (the compared time over gmem's): "1.62x faster".
pub fn format_speedup(speedup: f64, decimals: usize) -> String {
    format!("{} faster", format_ratio(speedup, decimals))
}

/// The "gmem" cell: a time, a size, a percentage, or "skipped".
fn gmem_cell(r: &CaseResult) -> String {
    if r.skipped.is_some() {
        return "skipped".into();
    }
    match (r.value, r.unit.as_deref()) {
        (Some(v), Some("bytes")) => format_kib(v),
        (Some(v), Some(unit)) if unit.starts_with("instructions") => {
            format!("{v:.0} {}", unit.replace("instructions per ", "instr/"))
        }
        (Some(v), _) => format!("{:.4}%", v * 100.0),
        (None, _) => r.ours_ns.map_or("-".into(), format_ns),
    }
}

/// The "compared with" cell's time and what it measures.
fn compared_cell(r: &CaseResult) -> (String, String) {
    match (r.floor_ns, &r.compared_with, &r.skipped) {
        (Some(ns), Some(what), None) => (format_ns(ns), what.clone()),
        (Some(ns), None, None) => (format_ns(ns), String::new()),
        _ => ("-".into(), String::new()),
    }
}

fn ratio_cell(r: &CaseResult) -> String {
    match r.ratio {
        None => "-".into(),
        Some(x) if r.speedup => format_speedup(x, 2),
        Some(x) => format!("{x:.2}x"),
    }
}

/// The "met" cell; `no` is how a miss is written.
fn met_cell(r: &CaseResult, no: &str) -> String {
    match &r.skipped {
        Some(why) => format!("skipped: {why}"),
        None if r.goal.is_none() => "-".into(),
        None if r.met == Some(true) => format!("yes{}", r.note()),
        None => format!("{no}{}", r.note()),
    }
}

/// The cells of every row, the compared-with time padded to the widest so
/// that names line up (`pad`), in the order of [`HEADERS`].
fn rows(results: &[CaseResult], pad: bool, no: &str) -> Vec<[String; 6]> {
    let compared: Vec<_> = results.iter().map(compared_cell).collect();
    let width = compared.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
    results
        .iter()
        .zip(compared)
        .map(|(r, (time, what))| {
            let compared = match (what.is_empty(), pad) {
                (true, _) => time,
                (false, true) => format!("{time:>width$}  {what}"),
                (false, false) => format!("{time} ({what})"),
            };
            [
                r.name.clone(),
                gmem_cell(r),
                compared,
                ratio_cell(r),
                r.goal.clone().unwrap_or_else(|| "-".into()),
                met_cell(r, no),
            ]
        })
        .collect()
}

/// `rows` under `headers`, each column as wide as its widest cell and
/// aligned as `right` says; the last column is not padded.
pub fn align<const N: usize>(headers: [&str; N], right: [bool; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right[i] {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else if i + 1 < N {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str(cell);
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers);
    for row in rows {
        out.push_str(&line(std::array::from_fn(|i| row[i].as_str())));
    }
    out
}

/// `rows` under `headers` as a Markdown table.
pub fn markdown<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut out = format!("| {} |\n", headers.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(N)));
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

/// The table for a terminal.
pub fn terminal_table(results: &[CaseResult]) -> String {
    align(HEADERS, RIGHT, &rows(results, true, "NO"))
}

/// The table as Markdown, for `BENCHMARKS.md`.
pub fn markdown_table(results: &[CaseResult]) -> String {
    markdown(HEADERS, &rows(results, false, "**no**"))
}

/// The rows whose goal was measured and missed (skipped cases are not
/// misses: they say why they could not run).
pub fn missed(results: &[CaseResult]) -> Vec<&CaseResult> {
    results
        .iter()
        .filter(|r| r.goal.is_some() && r.skipped.is_none() && r.met != Some(true))
        .collect()
}

/// The exit status of `gmem bench`: 1 where `check` is asked for and a goal
/// was missed, else 0.
pub fn exit_status(results: &[CaseResult], check: bool) -> u8 {
    u8::from(check && !missed(results).is_empty())
}

#[cfg(test)]
mod tests {
    use super::super::Goal;
    use super::*;

    #[test]
    fn units_are_written_out() {
        assert_eq!(format_ns(13.24), "13.2 ns");
        assert_eq!(format_ns(3_030.0), "3.03 us");
        assert_eq!(format_ns(1_200_000.0), "1.20 ms");
        assert_eq!(format_ns(2.5e9), "2.50 s");
        assert_eq!(trim("10.00 ms"), "10 ms");
        assert_eq!(trim("1.50x"), "1.5x");
        assert_eq!(trim("120 ns"), "120 ns");
        assert_eq!(format_kib(524_288.0), "512 KiB");
        assert_eq!(format_percent(0.002, 2), "0.2%");
        assert_eq!(format_ratio(1.0 / 0.9, 3), "1.111x");
        assert_eq!(format_speedup(10.0, 3), "10x faster");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(3 << 20), "3 MiB");
        assert_eq!(format_size(6144), "6 KiB");
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(1536 + (1 << 20)), "1025.50 KiB");
    }

    /// Goals are stated in the unit of their row's value.
    #[test]
    fn goals_use_the_value_unit() {
        assert_eq!(Goal::RatioAtMost(1.5).describe(), "<= 1.5x");
        assert_eq!(Goal::RatioAtMost(1.0 / 0.9).describe(), "<= 1.111x");
        assert_eq!(Goal::SpeedupAtLeast(1.9).describe(), ">= 1.9x faster");
        assert_eq!(Goal::NanosAtMost(10e6).describe(), "<= 10 ms");
        assert_eq!(Goal::BytesAtMost(1048576.0).describe(), "<= 1024 KiB");
        assert_eq!(Goal::FractionAtMost(0.002).describe(), "<= 0.2%");
        let idle = CaseResult::value("idle", 524_288.0, Goal::BytesAtMost(1048576.0));
        assert_eq!(gmem_cell(&idle), "512 KiB");
        let touched = CaseResult::value("touched", 0.001965, Goal::FractionAtMost(0.002));
        assert_eq!(gmem_cell(&touched), "0.1965%");
        let goal = Goal::InstructionsAtMost(700.0);
        assert_eq!(goal.describe(), "<= 700 instructions");
        let count = CaseResult::instructions("count", 885.6, "conversion", goal);
        assert_eq!(gmem_cell(&count), "886 instr/conversion");
        assert_eq!(count.met, Some(false));
    }

    fn sample() -> Vec<CaseResult> {
        vec![
            CaseResult::timed(
                "round-trip-4k",
                3030.0,
                Some(2840.0),
                Goal::RatioAtMost(1.5),
            )
            .against("floor: guard install+remove"),
            CaseResult::reference("pin-unpin-2-threads-vs-mutex", 13.2, 67.6)
                .against("mutex design"),
            CaseResult::timed(
                "convert-64g-sparse",
                127_130.0,
                None,
                Goal::NanosAtMost(10e6),
            ),
            CaseResult::value("metadata-64g-idle", 524_288.0, Goal::BytesAtMost(1048576.0)),
            CaseResult::skipped("kvm", Goal::RatioAtMost(1.3), "no /dev/kvm".into()),
        ]
    }

    /// Every line of the terminal table has its columns at the same places,
    /// however long a case's name.
    #[test]
    fn terminal_columns_line_up() {
        let table = terminal_table(&sample());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6);
        // The "ratio" column is right-aligned: each row's ratio cell ends
        // where the header's does.
        let end = lines[0].find("ratio").unwrap() + "ratio".len();
        assert_eq!(&lines[1][end - 5..end], "1.07x");
        assert_eq!(&lines[2][end - 12..end], "5.12x faster");
        assert_eq!(&lines[3][end - 1..end], "-");
        // Names of what is compared with start in the same column.
        let name = lines[1].find("floor:").unwrap();
        assert_eq!(lines[2].find("mutex design"), Some(name));
        assert!(lines[4].contains("512 KiB") && lines[4].contains("<= 1024 KiB"));
        assert!(lines[5].contains("skipped: no /dev/kvm"));
        assert!(
            lines[2].trim_end().ends_with('-'),
            "a reference has no goal"
        );
    }

    #[test]
    fn markdown_rows_match_the_headers() {
        let table = markdown_table(&sample());
        for line in table.lines() {
            assert_eq!(line.matches('|').count(), 7, "{line}");
        }
        assert!(table.contains("| 3.03 us | 2.84 us (floor: guard install+remove) | 1.07x |"));
    }

    /// `--check` exits 1 on a measured miss, never without `--check`, and
    /// not for a skipped case or a reference row.
    #[test]
    fn check_fails_only_on_a_measured_miss() {
        let mut results = sample();
        assert_eq!(exit_status(&results, true), 0);
        results.push(CaseResult::timed(
            "slow",
            2.0,
            Some(1.0),
            Goal::RatioAtMost(1.5),
        ));
        assert_eq!(missed(&results).len(), 1);
        assert_eq!(exit_status(&results, true), 1);
        assert_eq!(exit_status(&results, false), 0);
        assert_eq!(exit_status(&[], true), 0);
    }
}
