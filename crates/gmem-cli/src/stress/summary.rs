//! What `gmem stress` reports: the summary at the end and the live counts
//! of the progress line.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use super::{KINDS, Kind, Shadow};

/// What `gmem stress` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StressSummary {
    /// Worker threads at a time.
    pub threads: u64,
    /// File size, bytes.
    pub size_bytes: u64,
    /// Whether the file counts references per huge folio.
    pub huge_folios: bool,
    /// Backend processes attached.
    pub backends: u64,
    /// What they did.
    pub backend_work: crate::backend::Tortured,
    /// Seconds run.
    pub elapsed_s: f64,
    /// Operations, by kind (conversions: requests that succeeded, no-ops
    /// included).
    pub ops: std::collections::BTreeMap<&'static str, u64>,
    /// All operations.
    pub ops_total: u64,
    /// Invariant checks made.
    pub invariant_checks: u64,
    /// Bytes read back and compared with what was written.
    pub bytes_verified: u64,
    /// Conversions the listener heard of: to private, to shared.
    pub listener_heard: [u64; 2],
    /// The vCPU-like threads' requests through a `GpaMap` (none without KVM).
    pub gpa_map_requests: Option<GpaMapRequests>,
    /// Why there were no vCPU-like threads, if there were none.
    pub gpa_map_skipped: Option<String>,
    /// The probing listener's pins and reads from inside callbacks: granted,
    /// refused as the phase requires, and its panics (caught).
    pub probes: [u64; 3],
    /// The file's own counters at the end.
    pub drains: u64,
    /// Huge folio splits and merges (huge folios only).
    pub folio_splits: u64,
    /// Merges.
    pub folio_merges: u64,
    /// Violations seen.
    pub violations: u64,
    /// The first violations, verbatim.
    pub violation_list: Vec<String>,
    /// Whether every invariant held.
    pub ok: bool,
    /// Whether Ctrl-C ended the run before its `--seconds` (the end checks
    /// ran all the same).
    pub interrupted: bool,
}

/// Live counts, for the progress line.
pub struct Live {
    pub(super) shadow: Arc<Shadow>,
}

impl Live {
    /// One line of counts.
    pub fn line(&self) -> String {
        let s = &self.shadow;
        let ops: u64 = KINDS
            .iter()
            .filter(|(k, _)| !matches!(k, Kind::Check | Kind::BytesVerified))
            .map(|(k, _)| s.total(*k))
            .sum();
        format!(
            "{ops} ops, {} pins, {} to private ({} EAGAIN), {} to shared, {} punches, {} checks, {} violations",
            s.total(Kind::Pin),
            s.total(Kind::ToPrivate),
            s.total(Kind::ToPrivateEagain),
            s.total(Kind::ToShared),
            s.total(Kind::Punch),
            s.total(Kind::Check),
            s.violations.load(Relaxed)
        )
    }
}

/// What the vCPU-like threads' `GpaMap` requests came to.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GpaMapRequests {
    /// Succeeded.
    pub ok: u64,
    /// Spanned the two slots (all or nothing, rolled back on failure).
    pub spanning_slots: u64,
    /// Failed with `EAGAIN` on a worker's pin.
    pub eagain: u64,
    /// Refused by the checker.
    pub refused: u64,
    /// Ended by the probing listener's panic (caught, rolled back).
    pub listener_panics: u64,
}

impl StressSummary {
    /// Writes the summary for people (`--json` prints the struct itself).
    pub fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "gmem stress: {} threads, {} MiB file{}, {:.1} s",
            self.threads,
            self.size_bytes >> 20,
            if self.huge_folios {
                ", huge folios"
            } else {
                ""
            },
            self.elapsed_s
        )?;
        writeln!(
            out,
            "  operations       {} ({:.0}/s)",
            self.ops_total,
            self.ops_total as f64 / self.elapsed_s.max(1e-9)
        )?;
        for (name, count) in &self.ops {
            writeln!(out, "    {name:<24} {count}")?;
        }
        writeln!(
            out,
            "  listener heard   {} to private, {} to shared",
            self.listener_heard[0], self.listener_heard[1]
        )?;
        writeln!(
            out,
            "  callback probes  {} granted, {} refused as the phase requires, {} listener panics",
            self.probes[0], self.probes[1], self.probes[2]
        )?;
        if let Some(r) = &self.gpa_map_requests {
            writeln!(
                out,
                "  GpaMap requests  {} ok, {} spanning slots, {} EAGAIN, {} refused, {} listener panics",
                r.ok, r.spanning_slots, r.eagain, r.refused, r.listener_panics
            )?;
        }
        if let Some(why) = &self.gpa_map_skipped {
            writeln!(out, "  GpaMap requests  none: {why}")?;
        }
        if self.backends > 0 {
            let work = &self.backend_work;
            writeln!(
                out,
                "  backends         {} processes: {} pins held and checked, {} refused, {} checked reads",
                self.backends, work.pins, work.refused, work.reads
            )?;
        }
        writeln!(out, "  drains           {}", self.drains)?;
        if self.huge_folios {
            writeln!(
                out,
                "  huge folios      {} splits, {} merges",
                self.folio_splits, self.folio_merges
            )?;
        }
        writeln!(
            out,
            "  invariant checks {} ({} bytes read back exact)",
            self.invariant_checks, self.bytes_verified
        )?;
        if self.interrupted {
            writeln!(out, "  interrupted      by Ctrl-C before --seconds")?;
        }
        if self.ok {
            writeln!(out, "  invariants       all held")?;
        } else {
            writeln!(out, "  invariants       {} violations:", self.violations)?;
            for what in &self.violation_list {
                writeln!(out, "    {what}")?;
            }
        }
        Ok(())
    }
}
