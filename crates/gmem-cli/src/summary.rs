//! `gmem run`'s summary as text (`--json` prints [`Summary`] as it is).

use std::io::{self, Write};

use crate::workload::{SnapshotAction, Summary};

impl Summary {
    /// Writes the summary for people (`--json` prints the struct itself).
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        let s = self;
        writeln!(
            out,
            "gmem run: {} vCPUs, {} MiB {}, {} rounds of {} KiB conversions, {} device threads, requests by {}",
            s.vcpus,
            s.memory_bytes >> 20,
            s.backing,
            s.rounds,
            s.chunk_bytes >> 10,
            s.device_threads,
            s.request_path
        )?;
        writeln!(
            out,
            "  conversions      {} in {:.2} s ({:.0}/s)",
            s.conversions, s.elapsed_s, s.conversions_per_sec
        )?;
        writeln!(
            out,
            "  EAGAIN           {} met, {} retried after let-go requests, {} requests resolved, {} failed",
            s.eagain.met, s.eagain.retried, s.eagain.resolved, s.eagain.failed
        )?;
        writeln!(out, "  drains           {}", s.drains)?;
        if s.huge_folios {
            writeln!(
                out,
                "  huge folios      {} splits, {} merges",
                s.folio_splits, s.folio_merges
            )?;
        }
        writeln!(
            out,
            "  device pins      {} taken, {} refused (buffer already private), {} let-go requests",
            s.device_pins, s.device_pins_refused, s.let_go_requests
        )?;
        writeln!(
            out,
            "  verified         {} bytes by the guest, {} bytes by the host",
            s.guest_bytes_verified, s.host_bytes_verified
        )?;
        let v = &s.virtio;
        writeln!(
            out,
            "  virtio           {} requests on {} queues, {} bytes, {} buffer conversions, {} let-go retries",
            v.requests, v.queues, v.bytes, v.conversions, v.let_go_retries
        )?;
        writeln!(
            out,
            "  virtio errors    {} data, {} access, {} bad chains",
            v.data_errors, v.access_errors, v.bad_chains
        )?;
        match &s.snapshot {
            Some(note) if note.action == SnapshotAction::Saved => writeln!(
                out,
                "  snapshot         {} of {} run, then saved to {} ({} bytes); \
                 `gmem run --restore` runs the rest",
                rounds(1, note.round),
                s.rounds,
                note.file,
                note.bytes
            )?,
            Some(note) => writeln!(
                out,
                "  snapshot         restored from {} ({} bytes) at round {}: {} of {} run",
                note.file,
                note.bytes,
                note.round,
                rounds(note.round + 1, s.rounds),
                s.rounds
            )?,
            None => {}
        }
        if s.interrupted {
            writeln!(
                out,
                "  interrupted      by Ctrl-C after {:.2} s: the counts so far",
                s.elapsed_s
            )?;
        }
        if s.ok {
            writeln!(out, "  invariants       all held")?;
        } else {
            writeln!(out, "  invariants       {} BROKEN:", s.broken.len())?;
            for what in &s.broken {
                writeln!(out, "    {what}")?;
            }
        }
        Ok(())
    }
}

/// Rounds `first` to `last` (1-based), for people.
fn rounds(first: u32, last: u32) -> String {
    if first == last {
        format!("round {first}")
    } else {
        format!("rounds {first}-{last}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(summary: &Summary) -> String {
        let mut out = Vec::new();
        summary.write_to(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// A run that Ctrl-C stopped says so, before its invariants; one that
    /// ran to the end does not.
    #[test]
    fn an_interrupted_run_says_so() {
        let finished = Summary {
            ok: true,
            elapsed_s: 1.5,
            ..Summary::default()
        };
        assert!(!text(&finished).contains("interrupted"));
        let stopped = Summary {
            interrupted: true,
            ..finished
        };
        let text = text(&stopped);
        assert!(
            text.contains("  interrupted      by Ctrl-C after 1.50 s: the counts so far\n  invariants       all held"),
            "{text}"
        );
    }

    /// A run on either side of a snapshot says which rounds it ran.
    #[test]
    fn a_snapshot_run_says_which_rounds_it_ran() {
        let note = |action| crate::workload::SnapshotNote {
            action,
            round: 2,
            file: "run.snap".into(),
            bytes: 4096,
        };
        let saved = Summary {
            ok: true,
            rounds: 4,
            snapshot: Some(note(SnapshotAction::Saved)),
            ..Summary::default()
        };
        let out = text(&saved);
        assert!(
            out.contains("rounds 1-2 of 4 run, then saved to run.snap (4096 bytes)"),
            "{out}"
        );
        let restored = Summary {
            snapshot: Some(note(SnapshotAction::Restored)),
            ..saved
        };
        let out = text(&restored);
        assert!(
            out.contains("restored from run.snap (4096 bytes) at round 2: rounds 3-4 of 4 run"),
            "{out}"
        );
        assert!(!text(&Summary::default()).contains("snapshot"));
        let last = Summary {
            rounds: 3,
            ..restored
        };
        let out = text(&last);
        assert!(out.contains("at round 2: round 3 of 3 run"), "{out}");
    }
}
