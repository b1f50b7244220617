//! `gmem run --snapshot FILE --snapshot-at-round N` and `--restore FILE`
//! end to end, on the real `/dev/kvm` (memfd slots where the host has no
//! guest_memfd).

use std::path::PathBuf;

mod common;
use common::{gmem_full, kvm};

/// A snapshot file for `test`, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(test: &str) -> TempFile {
        let name = format!("gmem-{test}-{}.snap", std::process::id());
        TempFile(std::env::temp_dir().join(name))
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).expect("the snapshot file")
    }

    fn write(&self, bytes: &[u8]) {
        std::fs::write(&self.0, bytes).expect("writing the snapshot file");
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `gmem run` with `args`, expecting a clean JSON summary.
fn clean_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["run", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = gmem_full(&all, &[]);
    assert_eq!(code, Some(0), "{all:?}: {out}{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(summary["ok"], true, "{all:?}: {out}");
    summary
}

/// The machine-state record of a snapshot file, as JSON, and where the
/// guest memory's snapshot begins.
fn record(bytes: &[u8]) -> (serde_json::Value, usize) {
    assert_eq!(&bytes[..8], b"GMEMRUN\0");
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let json = serde_json::from_slice(&bytes[20..20 + len]).expect("the record");
    (json, 20 + len)
}

/// `bytes` with its record replaced by `json` (its checksum made anew).
fn with_record(bytes: &[u8], json: &serde_json::Value) -> Vec<u8> {
    let (_, memory) = record(bytes);
    let encoded = serde_json::to_vec(json).unwrap();
    let mut out = bytes[..12].to_vec();
    out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&encoded).to_le_bytes());
    out.extend_from_slice(&encoded);
    out.extend_from_slice(&bytes[memory..]);
    out
}

/// Requests a run of `rounds` rounds posts: a request a chunk and round
/// (16 MiB: 12 MiB past the firmware area, 6 MiB a vCPU, 24 chunks).
fn requests(rounds: u64) -> u64 {
    2 * 24 * rounds
}

/// A run stopped after round 2 of 4 writes its snapshot and ends cleanly;
/// a restore finishes rounds 3 and 4 with every invariant held, its first
/// checks being of the device's pattern of round 2, in restored memory.
#[test]
fn a_snapshot_at_round_2_is_finished_by_a_restore() {
    if !kvm() {
        return;
    }
    let file = TempFile::new("finish");
    let base = ["--memory-mib", "16", "--rounds", "4"];
    let mut args = base.to_vec();
    args.extend(["--snapshot", file.path(), "--snapshot-at-round", "2"]);
    let saved = clean_json(&args);
    assert_eq!(saved["snapshot"]["action"], "saved", "{saved}");
    assert_eq!(saved["snapshot"]["round"], 2, "{saved}");
    assert_eq!(saved["virtio"]["requests"], requests(2), "{saved}");
    let bytes = file.bytes();
    assert_eq!(saved["snapshot"]["bytes"], bytes.len() as u64, "{saved}");
    let (state, _) = record(&bytes);
    assert_eq!(state["round"], 2, "{state}");
    assert_eq!(state["rounds"], 4, "{state}");
    // Each device stopped where its vCPU's requests ended: drained.
    for queue in state["queues"].as_array().expect("queues") {
        assert_eq!(queue["next_avail"], 48, "{state}");
        assert_eq!(queue["next_used"], 48, "{state}");
    }

    let (code, out, err) = gmem_full(&["run", "--restore", file.path()], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("at round 2: rounds 3-4 of 4 run"), "{out}");
    assert!(out.ends_with("invariants       all held\n"), "{out}");

    // Flags that agree with the snapshot's may be given; --json says what
    // was restored.
    let restored = clean_json(&["--vcpus", "2", "--rounds", "4", "--restore", file.path()]);
    assert_eq!(restored["snapshot"]["action"], "restored", "{restored}");
    assert_eq!(restored["snapshot"]["round"], 2, "{restored}");
    assert_eq!(restored["virtio"]["requests"], requests(2), "{restored}");
    assert_eq!(restored["rounds"], 4, "{restored}");
}

/// The guest's checks after a restore are of the restored memory: a record
/// that says the run stopped a round earlier than its memory did makes the
/// guest find the wrong host pattern, and the run fails.
#[test]
fn a_restore_checks_the_restored_memory() {
    if !kvm() {
        return;
    }
    let file = TempFile::new("checks");
    let args = [
        "--memory-mib",
        "16",
        "--rounds",
        "4",
        "--snapshot",
        file.path(),
        "--snapshot-at-round",
        "2",
    ];
    clean_json(&args);
    let bytes = file.bytes();
    let (mut state, _) = record(&bytes);
    state["round"] = 1.into();
    file.write(&with_record(&bytes, &state));
    let (code, out, err) = gmem_full(&["run", "--restore", file.path()], &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("of the host's pattern wrong"), "{out}");
}

/// Bad input to `--restore` (a missing, foreign, corrupt, truncated or
/// inconsistent snapshot, or flags that disagree with it) is one line on
/// stderr and exit 2, never a panic.
#[test]
fn a_bad_snapshot_is_a_one_line_error() {
    if !kvm() {
        return;
    }
    let file = TempFile::new("bad");
    let args = [
        "--memory-mib",
        "8",
        "--rounds",
        "3",
        "--snapshot",
        file.path(),
        "--snapshot-at-round",
        "1",
    ];
    clean_json(&args);
    let good = file.bytes();
    let (state, memory) = record(&good);
    let changed = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut state = state.clone();
        edit(&mut state);
        with_record(&good, &state)
    };
    let mut flipped_record = good.clone();
    flipped_record[memory - 3] ^= 1;
    let mut flipped_memory = good.clone();
    flipped_memory[memory + good[memory..].len() / 2] ^= 1;
    let mut trailing = good.clone();
    trailing.push(0);
    let cases: Vec<(Vec<u8>, &[&str], &str)> = vec![
        (
            b"not a snapshot at all".to_vec(),
            &[],
            "not a gmem run snapshot",
        ),
        (
            good[..10].to_vec(),
            &[],
            "truncated: it ends inside its header",
        ),
        (flipped_record, &[], "machine-state record is corrupt"),
        (flipped_memory, &[], "guest memory: "),
        (good[..good.len() - 100].to_vec(), &[], "guest memory: "),
        (trailing, &[], "bytes follow the guest memory's snapshot"),
        (
            good.clone(),
            &["--vcpus", "1"],
            "--vcpus 1 disagrees with the snapshot's 2",
        ),
        (
            good.clone(),
            &["--huge-folios"],
            "--huge-folios true disagrees",
        ),
        (
            changed(&|s| s["round"] = 3.into()),
            &[],
            "after round 3 of 3: nothing to finish",
        ),
        (
            changed(&|s| s["vcpus"] = 0.into()),
            &[],
            "the snapshot's run: --vcpus must be 1 to 4",
        ),
        (
            changed(&|s| s["queues"] = serde_json::json!([])),
            &[],
            "0 virtio queues for 2 vCPUs",
        ),
        (
            changed(&|s| s["memory_mib"] = 16.into()),
            &[],
            "is not that of the run",
        ),
        (
            changed(&|s| s["queues"][0]["next_used"] = 7.into()),
            &[],
            "virtqueue at",
        ),
        (
            changed(&|s| s["extra"] = 1.into()),
            &[],
            "record is malformed",
        ),
    ];
    for (i, (bytes, flags, want)) in cases.iter().enumerate() {
        file.write(bytes);
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend(["--restore", file.path()]);
        let (code, out, err) = gmem_full(&args, &[]);
        let case = format!("case {i} ({want}): {args:?}");
        assert_eq!(code, Some(2), "{case}: {out}{err}");
        assert!(out.is_empty(), "{case}: {out}");
        assert_eq!(err.lines().count(), 1, "{case}: {err}");
        assert!(err.starts_with("gmem: "), "{case}: {err}");
        assert!(err.contains(want), "{case}: {err}");
    }
    let missing = format!("{}.missing", file.path());
    let (code, _, err) = gmem_full(&["run", "--restore", &missing], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("No such file"), "{err}");
}

/// The snapshot flags' combinations and ranges fail before any KVM work:
/// exit 2, one line.
#[test]
fn snapshot_flags_out_of_place_are_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["--snapshot", "x"], "--snapshot needs --snapshot-at-round"),
        (
            &["--snapshot-at-round", "1"],
            "--snapshot-at-round needs --snapshot",
        ),
        (
            &[
                "--restore",
                "x",
                "--snapshot",
                "y",
                "--snapshot-at-round",
                "1",
            ],
            "leave out --snapshot",
        ),
        (
            &[
                "--rounds",
                "4",
                "--snapshot",
                "x",
                "--snapshot-at-round",
                "4",
            ],
            "must be 1 to 3",
        ),
        (
            &[
                "--rounds",
                "4",
                "--snapshot",
                "x",
                "--snapshot-at-round",
                "0",
            ],
            "must be 1 to 3",
        ),
        (
            &[
                "--rounds",
                "1",
                "--snapshot",
                "x",
                "--snapshot-at-round",
                "1",
            ],
            "a run of 2 rounds or more, not 1",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        let (code, out, err) = gmem_full(&args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
