//! `gmem run --snapshot FILE --snapshot-at-round N` and
//! `gmem run --restore FILE`: a run stopped at a round boundary, saved, and
//! finished later by another process.
//!
//! **Where a run stops.** The guest's command list is cut after round `N`:
//! each vCPU halts there, after the round's `Complete` has waited for every
//! virtio request to be used, so no request is in flight, every queue is
//! drained, and, once the device threads have ended, no pin is held. Every
//! state the guest keeps between commands is in guest memory (its rings'
//! indices and slot statuses; the command pointer and the queue base are
//! given afresh at each start), so no vCPU register is saved: the restore
//! rebuilds the command list of rounds `N + 1` onwards and starts each vCPU
//! at the interpreter's entry, as the first run did. The guest's first
//! check there is of the pattern the virtio device left in round `N`, which
//! only the restored memory can hold.
//!
//! **What is saved.** A small machine-state record, then gmem's snapshot of
//! the guest's memory (page states and contents, [`gmem::snapshot`]):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `GMEMRUN\0` |
//! | 8..12 | record format version, 1 (little-endian) |
//! | 12..16 | bytes of the record (1 to [`MAX_RECORD`]) |
//! | 16..20 | CRC-32 of the record |
//! | 20.. | the record, JSON ([`MachineState`]) |
//!
//! and the memory snapshot, which must end the file. The record holds the
//! run's flags (the restore runs with them; flags given beside `--restore`
//! must agree), the rounds done, and where each virtio device stopped in
//! its queue (the device side's indices; the restore checks the rings in
//! memory show the same, drained).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use gmem::{GuestMemfd, Options, SnapshotError};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::virtio::QueuePosition;
use crate::workload::{
    self, BadFlag, Leg, Restored, RunConfig, RunFlags, SnapshotAction, SnapshotNote, Summary,
};

const MAGIC: [u8; 8] = *b"GMEMRUN\0";
/// The record format this build writes and reads.
pub const VERSION: u32 = 1;
/// The most bytes a record may take (a record of four queues takes about
/// 400).
pub const MAX_RECORD: u32 = 64 << 10;
const HEADER_LEN: usize = 20;

/// The flags of `gmem run` a snapshot records, by their field names in
/// [`RunFlags`] (and clap's ids): those given beside `--restore` must agree.
pub const MACHINE_FLAGS: [&str; 6] = [
    "memory_mib",
    "vcpus",
    "rounds",
    "chunk_kib",
    "device_threads",
    "huge_folios",
];

/// What `gmem run` does about snapshots, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// A whole run.
    Whole,
    /// Run rounds `1..=at_round`, then write the snapshot to `file`.
    Save {
        /// The snapshot file.
        file: PathBuf,
        /// The last round run.
        at_round: u32,
    },
    /// Finish the run saved in `file`.
    Restore {
        /// The snapshot file.
        file: PathBuf,
    },
}

impl Stage {
    /// The stage of `--snapshot`, `--snapshot-at-round` and `--restore`.
    pub fn from_flags(
        snapshot: Option<PathBuf>,
        at_round: Option<u32>,
        restore: Option<PathBuf>,
    ) -> Result<Stage, BadFlag> {
        let bad = |message: &str| Err(BadFlag(message.into()));
        match (snapshot, at_round, restore) {
            (None, None, None) => Ok(Stage::Whole),
            (Some(file), Some(at_round), None) => Ok(Stage::Save { file, at_round }),
            (None, None, Some(file)) => Ok(Stage::Restore { file }),
            (Some(_), None, _) => {
                bad("--snapshot needs --snapshot-at-round N: the round to stop after")
            }
            (None, Some(_), _) => {
                bad("--snapshot-at-round needs --snapshot FILE: where to write it")
            }
            (_, _, Some(_)) => {
                bad("--restore finishes a saved run: leave out --snapshot and --snapshot-at-round")
            }
        }
    }

    /// Checks `--snapshot-at-round` against the run's rounds: the snapshot
    /// must leave a round for the restore.
    pub fn check_rounds(&self, rounds: u32) -> Result<(), BadFlag> {
        match *self {
            Stage::Save { .. } if rounds < 2 => Err(BadFlag(format!(
                "--snapshot needs a run of 2 rounds or more, not {rounds}: the restore runs the rest"
            ))),
            Stage::Save { at_round, .. } if at_round == 0 || at_round >= rounds => {
                Err(BadFlag(format!(
                    "--snapshot-at-round {at_round} must be 1 to {} (the run has {rounds} rounds: \
                     the restore runs the rest)",
                    rounds.saturating_sub(1)
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The machine state a snapshot saves beside guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    /// `--memory-mib`.
    pub memory_mib: u64,
    /// `--vcpus`.
    pub vcpus: u64,
    /// The run's rounds, all told.
    pub rounds: u32,
    /// `--chunk-kib`.
    pub chunk_kib: u64,
    /// `--device-threads`.
    pub device_threads: usize,
    /// `--huge-folios`.
    pub huge_folios: bool,
    /// Rounds done before the snapshot.
    pub round: u32,
    /// Where each vCPU's virtio device stopped in its queue.
    pub queues: Vec<QueuePosition>,
}

impl MachineState {
    /// The run's flags.
    pub fn flags(&self) -> RunFlags {
        RunFlags {
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            rounds: Some(self.rounds),
            chunk_kib: self.chunk_kib,
            device_threads: self.device_threads,
            huge_folios: self.huge_folios,
        }
    }

    /// Checks that the flags given beside `--restore` (`given` names the
    /// ones on the command line, as their field names) agree with the
    /// snapshot's.
    pub fn check_given(&self, flags: &RunFlags, given: &[&str]) -> Result<(), BadFlag> {
        let rounds = flags.rounds.map_or_else(String::new, |r| r.to_string());
        let values = [
            (
                "memory_mib",
                flags.memory_mib.to_string(),
                self.memory_mib.to_string(),
            ),
            ("vcpus", flags.vcpus.to_string(), self.vcpus.to_string()),
            ("rounds", rounds, self.rounds.to_string()),
            (
                "chunk_kib",
                flags.chunk_kib.to_string(),
                self.chunk_kib.to_string(),
            ),
            (
                "device_threads",
                flags.device_threads.to_string(),
                self.device_threads.to_string(),
            ),
            (
                "huge_folios",
                flags.huge_folios.to_string(),
                self.huge_folios.to_string(),
            ),
        ];
        for (name, given_value, saved_value) in values {
            if given.contains(&name) && given_value != saved_value {
                let flag = name.replace('_', "-");
                return Err(BadFlag(format!(
                    "--{flag} {given_value} disagrees with the snapshot's {saved_value}: \
                     leave it out with --restore"
                )));
            }
        }
        Ok(())
    }

    /// Checks the record's own consistency and gives the run's
    /// configuration (its flags validated as the command line's are).
    pub fn validate(&self, available: Option<u64>) -> Result<RunConfig, BadFlag> {
        let config = self
            .flags()
            .validate(available)
            .map_err(|BadFlag(why)| BadFlag(format!("the snapshot's run: {why}")))?;
        if self.round == 0 || self.round >= self.rounds {
            return Err(BadFlag(format!(
                "the snapshot was taken after round {} of {}: nothing to finish",
                self.round, self.rounds
            )));
        }
        if self.queues.len() as u64 != self.vcpus {
            return Err(BadFlag(format!(
                "the snapshot has {} virtio queues for {} vCPUs",
                self.queues.len(),
                self.vcpus
            )));
        }
        Ok(config)
    }
}

/// Why a snapshot file could not be read or written. The messages leave
/// the source out: `gmem` prints the chain (`{:#}`).
#[derive(Debug, Error)]
pub enum RunSnapshotError {
    /// The file could not be opened, created, read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file ends inside its header or record.
    #[error("{0}: truncated: it ends inside its header or machine-state record")]
    Truncated(String),
    /// The file does not start as a run snapshot does.
    #[error("{0}: not a gmem run snapshot (no GMEMRUN header)")]
    BadMagic(String),
    /// The record is of a format this build does not read.
    #[error("{path}: run snapshot format {version}, this gmem reads {VERSION}")]
    UnsupportedVersion {
        /// The file.
        path: String,
        /// Its version.
        version: u32,
    },
    /// The record's length is out of range.
    #[error("{path}: a machine-state record of {len} bytes (1 to {MAX_RECORD})")]
    RecordLength {
        /// The file.
        path: String,
        /// The length read.
        len: u32,
    },
    /// The record's checksum does not match.
    #[error("{0}: the machine-state record is corrupt (CRC-32 mismatch)")]
    RecordChecksum(String),
    /// The record is not one this build writes.
    #[error("{path}: the machine-state record is malformed")]
    Record {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The guest memory's snapshot failed to restore or to save.
    #[error("{path}: guest memory")]
    Memory {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: SnapshotError,
    },
    /// Bytes follow the memory snapshot.
    #[error("{0}: bytes follow the guest memory's snapshot")]
    TrailingBytes(String),
}

/// A run snapshot opened for restoring: its record read and checked, its
/// memory not read yet.
pub struct SavedRun {
    /// The machine state.
    pub state: MachineState,
    path: String,
    input: BufReader<File>,
}

impl SavedRun {
    /// Opens `file` and reads its machine-state record.
    pub fn open(file: &Path) -> Result<SavedRun, RunSnapshotError> {
        let path = file.display().to_string();
        let io = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::UnexpectedEof => RunSnapshotError::Truncated(path.clone()),
            _ => RunSnapshotError::Io {
                path: path.clone(),
                source,
            },
        };
        let mut input = BufReader::new(File::open(file).map_err(io)?);
        let mut header = [0u8; HEADER_LEN];
        input.read_exact(&mut header).map_err(io)?;
        if header[..8] != MAGIC {
            return Err(RunSnapshotError::BadMagic(path));
        }
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let (version, len, crc) = (word(8), word(12), word(16));
        if version != VERSION {
            return Err(RunSnapshotError::UnsupportedVersion { path, version });
        }
        if len == 0 || len > MAX_RECORD {
            return Err(RunSnapshotError::RecordLength { path, len });
        }
        let mut record = vec![0u8; len as usize];
        input.read_exact(&mut record).map_err(io)?;
        if crc32fast::hash(&record) != crc {
            return Err(RunSnapshotError::RecordChecksum(path));
        }
        let state = serde_json::from_slice(&record).map_err(|source| RunSnapshotError::Record {
            path: path.clone(),
            source,
        })?;
        Ok(SavedRun { state, path, input })
    }

    /// Reads the guest memory that follows the record, and checks that
    /// nothing follows it.
    fn restore_memory(mut self, options: Options) -> Result<GuestMemfd, RunSnapshotError> {
        let path = self.path;
        let mem = GuestMemfd::restore(&mut self.input, options).map_err(|source| {
            RunSnapshotError::Memory {
                path: path.clone(),
                source,
            }
        })?;
        let mut more = [0u8; 1];
        match self.input.read(&mut more) {
            Ok(0) => Ok(mem),
            Ok(_) => Err(RunSnapshotError::TrailingBytes(path)),
            Err(source) => Err(RunSnapshotError::Io { path, source }),
        }
    }
}

/// Runs rounds `1..=at_round` of `config`, then (if every invariant held
/// and Ctrl-C did not stop it) writes the run's snapshot to `file`.
pub fn save(
    config: &RunConfig,
    file: &Path,
    at_round: u32,
    progress: ProgressBar,
    interrupt: &'static AtomicBool,
) -> anyhow::Result<Summary> {
    let leg = Leg {
        rounds: 0..at_round,
        restored: None,
    };
    let end = workload::run_leg(config, leg, progress, interrupt)?;
    let mut summary = end.summary;
    if !summary.ok || summary.interrupted {
        return Ok(summary);
    }
    let Some(queues) = end.queues.into_iter().collect::<Option<Vec<_>>>() else {
        anyhow::bail!("a virtio device ended without its place in the queue: no snapshot written");
    };
    let state = MachineState {
        memory_mib: config.memory >> 20,
        vcpus: config.vcpus,
        rounds: config.rounds,
        chunk_kib: config.chunk >> 10,
        device_threads: config.device_threads,
        huge_folios: config.huge_folios,
        round: at_round,
        queues,
    };
    let bytes = write(file, &state, &end.machine.mem)?;
    summary.snapshot = Some(SnapshotNote {
        action: SnapshotAction::Saved,
        round: at_round,
        file: file.display().to_string(),
        bytes,
    });
    Ok(summary)
}

/// Writes the snapshot file: header, record, guest memory. A file left
/// part-written by an error is removed.
fn write(file: &Path, state: &MachineState, mem: &GuestMemfd) -> anyhow::Result<u64> {
    let path = file.display().to_string();
    let record = serde_json::to_vec(state).context("encoding the machine state")?;
    let len = u32::try_from(record.len())
        .ok()
        .filter(|&len| len <= MAX_RECORD)
        .context("the machine state is over its size limit")?;
    let written = (|| {
        let mut out = BufWriter::new(File::create(file)?);
        out.write_all(&MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&len.to_le_bytes())?;
        out.write_all(&crc32fast::hash(&record).to_le_bytes())?;
        out.write_all(&record)?;
        let saved = mem.snapshot(&mut out).map_err(std::io::Error::other)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok::<_, std::io::Error>((HEADER_LEN + record.len()) as u64 + saved.bytes)
    })();
    written.map_err(|source| {
        let _ = std::fs::remove_file(file);
        RunSnapshotError::Io { path, source }.into()
    })
}

/// Finishes the run saved in `saved` (its record validated into `config`):
/// restores its memory and runs the remaining rounds.
pub fn restore(
    config: &RunConfig,
    saved: SavedRun,
    progress: ProgressBar,
    interrupt: &'static AtomicBool,
) -> anyhow::Result<Summary> {
    let state = saved.state.clone();
    let file = saved.path.clone();
    progress.set_message("restoring guest memory");
    let options = Options::new().huge_folios(config.huge_folios);
    let mem = saved.restore_memory(options)?;
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let leg = Leg {
        rounds: state.round..config.rounds,
        restored: Some(Restored {
            mem,
            queues: state.queues,
        }),
    };
    let mut summary = workload::run_leg(config, leg, progress, interrupt)?.summary;
    summary.snapshot = Some(SnapshotNote {
        action: SnapshotAction::Restored,
        round: state.round,
        file,
        bytes,
    });
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MachineState {
        MachineState {
            memory_mib: 64,
            vcpus: 2,
            rounds: 4,
            chunk_kib: 256,
            device_threads: 2,
            huge_folios: false,
            round: 2,
            queues: vec![
                QueuePosition {
                    next_avail: 96,
                    next_used: 96,
                };
                2
            ],
        }
    }

    #[test]
    fn the_stage_follows_the_flags() {
        let file = || Some(PathBuf::from("f"));
        assert_eq!(Stage::from_flags(None, None, None), Ok(Stage::Whole));
        assert_eq!(
            Stage::from_flags(file(), Some(2), None),
            Ok(Stage::Save {
                file: "f".into(),
                at_round: 2
            })
        );
        assert_eq!(
            Stage::from_flags(None, None, file()),
            Ok(Stage::Restore { file: "f".into() })
        );
        for (snapshot, at, restore) in [
            (file(), None, None),
            (None, Some(1), None),
            (file(), Some(1), file()),
            (None, Some(1), file()),
            (file(), None, file()),
        ] {
            assert!(Stage::from_flags(snapshot, at, restore).is_err());
        }
    }

    #[test]
    fn a_snapshot_leaves_a_round_for_the_restore() {
        let save = |at_round| Stage::Save {
            file: "f".into(),
            at_round,
        };
        assert!(save(1).check_rounds(2).is_ok());
        assert!(save(3).check_rounds(4).is_ok());
        assert!(save(4).check_rounds(4).is_err());
        assert!(save(0).check_rounds(4).is_err());
        assert!(save(1).check_rounds(1).is_err());
        assert!(Stage::Whole.check_rounds(1).is_ok());
    }

    #[test]
    fn only_flags_given_must_agree() {
        let saved = state();
        // Defaults that differ from the snapshot's but were not given.
        let flags = RunFlags {
            memory_mib: 16,
            vcpus: 1,
            rounds: None,
            chunk_kib: 4,
            device_threads: 0,
            huge_folios: true,
        };
        assert!(saved.check_given(&flags, &[]).is_ok());
        let err = saved.check_given(&flags, &["vcpus"]).unwrap_err();
        assert_eq!(
            err.0,
            "--vcpus 1 disagrees with the snapshot's 2: leave it out with --restore"
        );
        // Every flag a snapshot records is compared.
        for name in MACHINE_FLAGS {
            let err = saved.check_given(&flags, &[name]).unwrap_err();
            assert!(err.0.starts_with(&format!("--{}", name.replace('_', "-"))));
        }
        assert!(saved.check_given(&saved.flags(), &MACHINE_FLAGS).is_ok());
    }

    #[test]
    fn a_record_must_be_consistent() {
        assert!(state().validate(None).is_ok());
        let bad = [
            MachineState {
                round: 0,
                ..state()
            },
            MachineState {
                round: 4,
                ..state()
            },
            MachineState {
                queues: Vec::new(),
                ..state()
            },
            MachineState {
                vcpus: 0,
                ..state()
            },
            MachineState {
                memory_mib: u64::MAX,
                ..state()
            },
        ];
        for record in bad {
            assert!(record.validate(None).is_err(), "{record:?}");
        }
    }
}
