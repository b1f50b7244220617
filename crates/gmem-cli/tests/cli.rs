//! The `gmem` command end to end, on the real `/dev/kvm`.

use std::process::Command;

use gmem::Attribute;
use gmem_cli::guest::Command as Guest;
use gmem_cli::machine::{FIRMWARE_SIZE, Machine};

mod common;
use common::{gmem_full, kvm};

fn gmem(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("gmem runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn selftest_passes_and_closes_with_the_counts() {
    if !kvm() {
        return;
    }
    let (ok, out) = gmem(&["selftest"]);
    let last = out.lines().last().expect("a closing line");
    assert!(ok, "{out}");
    // Without a kernel guest_memfd its host scenarios skip (guests run on
    // memfd slots); with one nothing does.
    let all = gmem_cli::scenarios::all();
    let support = gmem::kvm::HostSupport::probe().unwrap();
    let skipped = match support.memory_backing() {
        gmem::BackingKind::Memfd => all
            .iter()
            .filter(|s| s.name.starts_with("host/kvm/"))
            .count(),
        gmem::BackingKind::KernelGuestMemfd => 0,
    };
    let closing = format!(" passed, 0 failed, {skipped} skipped");
    assert!(last.ends_with(&closing), "{last}");
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(passed + skipped, all.len());
}

#[test]
fn run_json_reports_a_clean_workload() {
    if !kvm() {
        return;
    }
    let (ok, out) = gmem(&["run", "--json", "--memory-mib", "16", "--rounds", "3"]);
    assert!(ok, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(summary["ok"], true, "{out}");
    assert_eq!(summary["broken"].as_array().map(Vec::len), Some(0));
    assert!(
        ["kernel-guest-memfd", "memfd"].contains(&summary["backing"].as_str().unwrap_or_default())
    );
    // 12 MiB of guest memory in 256 KiB chunks, two conversions per chunk a round.
    assert_eq!(summary["conversions"], 48 * 2 * 3);
    assert!(summary["guest_bytes_verified"].as_u64() > Some(0));
    assert!(summary["host_bytes_verified"].as_u64() > Some(0));
}

/// The guest's virtio requests are all served, with their bytes and
/// conversions counted and no errors.
#[test]
fn run_json_reports_the_virtio_requests() {
    if !kvm() {
        return;
    }
    let (ok, out) = gmem(&["run", "--json", "--memory-mib", "16", "--rounds", "2"]);
    assert!(ok, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let virtio = &summary["virtio"];
    // 12 MiB in 256 KiB chunks, one request a chunk a round.
    assert_eq!(virtio["requests"], 48 * 2, "{out}");
    assert_eq!(virtio["bytes"], 48 * 2 * (256 << 10), "{out}");
    assert_eq!(virtio["conversions"], 48 * 2 * 2, "{out}");
    assert_eq!(virtio["queues"], 2, "{out}");
    for errors in ["data_errors", "access_errors", "bad_chains"] {
        assert_eq!(virtio[errors], 0, "{errors}: {out}");
    }
    assert_eq!(summary["ok"], true, "{out}");
}

#[test]
fn run_rejects_bad_arguments_with_a_message() {
    if !kvm() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(["run", "--vcpus", "9"])
        .output()
        .expect("gmem runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus must be 1 to 4"));
}

#[test]
fn a_machine_runs_command_lists_again() {
    if !kvm() {
        return;
    }
    let machine = Machine::new(FIRMWARE_SIZE + (1 << 20), Attribute::Shared).unwrap();
    let gpa = FIRMWARE_SIZE as u32;
    for value in [1, 2] {
        let record = machine
            .run(&[Guest::Write { gpa, value }, Guest::Read { gpa }])
            .unwrap();
        assert_eq!(record.reads, [(gpa, value)]);
    }
}

#[test]
fn run_with_huge_folios_splits_and_merges_and_stays_clean() {
    if !kvm() {
        return;
    }
    let args = [
        "run",
        "--json",
        "--huge-folios",
        "--memory-mib",
        "16",
        "--rounds",
        "2",
    ];
    let (ok, out) = gmem(&args);
    assert!(ok, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(summary["ok"], true, "{out}");
    assert!(summary["folio_splits"].as_u64() > Some(0), "{out}");
    assert!(summary["folio_merges"].as_u64() > Some(0), "{out}");
}

#[test]
fn info_reports_guest_memfd_support() {
    if !kvm() {
        return;
    }
    let (ok, out) = gmem(&["info", "--json"]);
    assert!(ok, "{out}");
    let info: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let flags = info["guest_memfd_flags"]
        .as_array()
        .expect("a list of flags");
    let usable = info["guest_memfd"] == true
        && flags.contains(&"MMAP".into())
        && flags.contains(&"INIT_SHARED".into());
    // Guests run on a kernel guest_memfd where it is usable, else on memfd slots.
    let memory = if usable {
        "kernel-guest-memfd"
    } else {
        "memfd"
    };
    assert_eq!(info["guest_memory"], memory, "{out}");
    assert!(info["per_page_attributes"].is_boolean());
    let hiding = &info["hiding"];
    let backings: &[&str] = if usable {
        &["memfd", "kernel_guest_memfd"]
    } else {
        &["memfd"]
    };
    for &backing in backings {
        let mechanism = hiding[backing].as_str().unwrap_or_default();
        assert!(
            ["guard_markers", "empty_file_remap"].contains(&mechanism),
            "{backing}: {hiding}"
        );
    }
    let max = hiding["max_map_count"].as_u64().expect("max_map_count");
    assert_eq!(hiding["process_vma_budget"].as_u64(), Some(max / 4));
}

/// Flags out of range fail before any KVM work: exit 2, one line naming the
/// limit (no KVM needed).
#[test]
fn run_bounds_every_flag_with_a_one_line_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["--memory-mib", "5000"], "5 to 4078"),
        (&["--memory-mib", "4079"], "local APIC at 0xfee00000"),
        (&["--memory-mib", "4"], "5 to 4078"),
        // Would overflow when turned into bytes.
        (&["--memory-mib", "17592186044416"], "5 to 4078"),
        (&["--chunk-kib", "18014398509481984"], "from 4 to 30720"),
        (&["--chunk-kib", "6"], "multiple of the 4 KiB page"),
        (&["--chunk-kib", "0"], "multiple of the 4 KiB page"),
        (&["--chunk-kib", "30724"], "from 4 to 30720"),
        (&["--device-threads", "33"], "over 32"),
        (&["--device-threads", "100000"], "over 32"),
        (&["--vcpus", "0"], "--vcpus must be 1 to 4"),
        (&["--rounds", "0"], "must be 1 to 107"),
        (&["--rounds", "108"], "must be 1 to 107"),
        (
            &["--memory-mib", "4078", "--chunk-kib", "4"],
            "use bigger chunks or less memory",
        ),
    ];
    for (flags, limit) in cases {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        let (code, stdout, stderr) = gmem_full(&args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("gmem: "), "{args:?}: {stderr}");
        assert!(stderr.contains(limit), "{args:?}: {stderr}");
    }
}

#[test]
fn run_help_states_the_ranges() {
    use gmem_cli::workload::{GUEST_MEMORY_END, MAX_DEVICE_THREADS, RunFlags};
    let (code, help, _) = gmem_full(&["run", "--help"], &[]);
    assert_eq!(code, Some(0));
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let (min, max) = (RunFlags::MIN_MEMORY_MIB, RunFlags::MAX_MEMORY_MIB);
    for range in [
        format!("Guest memory in MiB: {min} to {max}"),
        format!("{GUEST_MEMORY_END:#X}").replace("0X", "0x"),
        format!("vCPUs: 1 to {}", gmem_cli::machine::MAX_VCPUS),
        format!(
            "of the {} a vCPU holds",
            gmem_cli::machine::MAX_COMMANDS - 1
        ),
        "up to 107 rounds with the default".into(),
        "a multiple of 4 (the page)".into(),
        format!("0 to {MAX_DEVICE_THREADS}"),
    ] {
        assert!(help.contains(&range), "{range:?} not in: {help}");
    }
}

/// A reader that goes away early (`gmem selftest | head -1`) ends gmem as
/// `SIGPIPE` would, with no panic message. The pipe is closed before gmem
/// writes anything, so its first line meets it closed.
#[test]
fn a_closed_pipe_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .arg("selftest")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gmem runs");
    drop(child.stdout.take().expect("piped"));
    let out = child.wait_with_output().expect("gmem ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

#[test]
fn selftest_with_no_matching_scenario_fails() {
    let (code, stdout, stderr) = gmem_full(&["selftest", "nosuchname"], &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("no self-test scenario"), "{stderr}");
}

/// The README's promise: `RUST_LOG=gmem=debug` shows EAGAINs; and a log
/// that is not a terminal carries no colour codes.
#[test]
fn debug_logs_show_eagain_without_colour() {
    let (code, stdout, stderr) = gmem_full(
        &["selftest", "host/memfd/convert-pinned-eagain"],
        &[("RUST_LOG", "gmem=debug")],
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("ok 1 - host/memfd/convert-pinned-eagain"),
        "{stdout}"
    );
    assert!(
        stderr.contains("DEBUG") && stderr.contains("conversion failed: page referenced"),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "colour codes in {stderr:?}");
}

/// A clean run at `flags` (16 MiB, 2 rounds).
fn assert_clean_run(flags: &[&str]) {
    let mut args = vec!["run", "--json", "--memory-mib", "16", "--rounds", "2"];
    args.extend_from_slice(flags);
    let (code, out, err) = gmem_full(&args, &[]);
    assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(summary["ok"], true, "{args:?}: {out}");
    assert!(summary["device_pins"].as_u64() > Some(0), "{args:?}: {out}");
}

/// Chunks smaller than a device buffer (4 pages) once broke the device
/// threads' placement (4 and 8 KiB) or divided by zero (12 KiB).
#[test]
fn run_with_chunks_smaller_than_a_device_buffer_stays_clean() {
    if !kvm() {
        return;
    }
    for chunk in ["4", "8", "12", "20"] {
        assert_clean_run(&["--chunk-kib", chunk]);
    }
}

/// 12 device threads and more once wrote over the guest's pattern.
#[test]
fn run_with_many_device_threads_stays_clean() {
    if !kvm() {
        return;
    }
    for threads in ["12", "32"] {
        assert_clean_run(&["--device-threads", threads]);
    }
}

/// `gmem bench --check` exits 1 after printing the whole table when a
/// measured goal is missed, and 0 when none is (a skipped case is no miss);
/// the rows come from an earlier `--json` run, so nothing is measured.
#[test]
fn bench_check_exits_1_on_a_missed_goal() {
    let dir = std::env::temp_dir().join(format!("gmem-bench-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let row = |name: &str, ratio: f64, met: bool| {
        serde_json::json!({
            "name": name, "ours_ns": 2000.0 * ratio, "floor_ns": 2000.0,
            "ratio": ratio, "compared_with": "floor: guard install+remove",
            "goal": "<= 1.5x", "met": met,
        })
    };
    let skipped = serde_json::json!({
        "name": "kvm-guest-round-trip-4k", "ours_ns": null, "floor_ns": null,
        "ratio": null, "goal": "<= 1.3x", "met": false, "skipped": "no /dev/kvm",
    });
    let write = |name: &str, rows: Vec<serde_json::Value>| {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::json!({ "cases": rows }).to_string()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let missed = write(
        "missed.json",
        vec![
            row("round-trip-4k", 1.1, true),
            row("round-trip-2m", 1.9, false),
            skipped.clone(),
        ],
    );
    let met = write("met.json", vec![row("round-trip-4k", 1.1, true), skipped]);

    let (code, stdout, stderr) = gmem_full(&["bench", "--check", "--from", &missed], &[]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("compared with"), "{stdout}");
    assert!(
        stdout.contains("round-trip-2m") && stdout.contains("NO"),
        "{stdout}"
    );
    assert!(
        stdout.contains("kvm-guest-round-trip-4k"),
        "every row printed: {stdout}"
    );
    assert!(stderr.contains("goals missed: round-trip-2m"), "{stderr}");
    assert!(
        stderr.contains("depends on") && stderr.contains("system-call cost"),
        "the misses' table: {stderr}"
    );

    let (code, stdout, _) = gmem_full(&["bench", "--from", &missed], &[]);
    assert_eq!(code, Some(0), "no --check, no failure: {stdout}");
    let (code, stdout, _) = gmem_full(&["bench", "--check", "--from", &met], &[]);
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) = gmem_full(&["bench", "--markdown", "--from", &met], &[]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("| round-trip-4k | 2.20 us | 2.00 us (floor: guard install+remove) | 1.10x | <= 1.5x | yes |"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `gmem stress` needs no KVM: a short run holds every invariant and says so.
#[test]
fn stress_runs_clean_for_two_seconds() {
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args([
            "stress",
            "--seconds",
            "2",
            "--threads",
            "3",
            "--size-mib",
            "4",
        ])
        .output()
        .expect("gmem runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("invariants       all held"), "{stdout}");
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(["stress", "--seconds", "1", "--huge-folios", "--json"])
        .output()
        .expect("gmem runs");
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["violations"], 0);
    assert!(summary["ops"]["pins"].as_u64().unwrap() > 0);
}

/// `gmem stress --backends`: backend processes pin and check their
/// replicas while the workers convert, and report what they did.
#[test]
fn stress_with_backend_processes_runs_clean() {
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args([
            "stress",
            "--seconds",
            "2",
            "--size-mib",
            "4",
            "--backends",
            "2",
        ])
        .args(["--json"])
        .output()
        .expect("gmem runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["violations"], 0, "{summary}");
    assert_eq!(summary["backends"], 2);
    assert!(
        summary["backend_work"]["pins"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(
        summary["backend_work"]["reads"].as_u64().unwrap() > 0,
        "{summary}"
    );
}

/// Each flag out of range: one line naming it, exit 2.
#[test]
fn stress_flags_out_of_range_exit_2() {
    for (args, want) in [
        (&["--threads", "0"][..], "--threads 0 is outside 1 to 64"),
        (&["--threads", "65"][..], "--threads 65 is outside"),
        (&["--seconds", "0"][..], "--seconds 0 is outside"),
        (&["--size-mib", "0"][..], "--size-mib 0 is outside"),
        (&["--size-mib", "65537"][..], "--size-mib 65537 is outside"),
        (&["--backends", "5"][..], "--backends 5 is outside 0 to 4"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
            .arg("stress")
            .args(args)
            .output()
            .expect("gmem runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with(&format!("gmem: {want}")), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// Without `--rounds`, every memory size and chunk in the documented range
/// runs (16 rounds where they fit, else the most that do); where this host
/// cannot run the guest, the run still gets past the flags and fails on
/// what it lacks.
#[test]
fn run_defaults_fit_every_memory_size_and_chunk() {
    for (flags, rounds) in [(["--memory-mib", "512"], 12), (["--chunk-kib", "4"], 1)] {
        let mut args = vec!["run", "--json"];
        args.extend_from_slice(&flags);
        let (code, out, err) = gmem_full(&args, &[]);
        if code == Some(0) {
            let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
            assert_eq!(summary["rounds"], rounds, "{args:?}: {out}");
            assert_eq!(summary["ok"], true, "{args:?}: {out}");
            continue;
        }
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert!(
            !err.starts_with("gmem: --"),
            "{args:?}: a flag refused: {err}"
        );
        let guest_memfd = gmem::kvm::HostSupport::probe().is_ok_and(|s| s.guest_memfd);
        assert!(!guest_memfd, "{args:?} failed on a guest_memfd host: {err}");
        assert!(
            std::env::var_os("GMEM_REQUIRE_KVM").is_none(),
            "{args:?}: no full run on a KVM host: {err}"
        );
        eprintln!("full run skipped: {err}");
    }
    // An explicit count out of range is still refused in one line.
    let (code, _, err) = gmem_full(&["run", "--memory-mib", "512", "--rounds", "16"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("gmem: --rounds 16 must be 1 to 12"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `--only` that names no case is a one-line error and exit 2 (as
/// `selftest` does), before anything is measured.
#[test]
fn bench_only_with_no_matching_case_fails() {
    let (code, stdout, stderr) = gmem_full(&["bench", "--only", "nonesuch"], &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with("gmem: no bench case name contains \"nonesuch\""),
        "{stderr}"
    );
    assert!(stderr.contains("round-trip-4k, "), "the names: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// `gmem bench --instructions` runs the three instruction rows only, each
/// counted where the host has a hardware counter or else skipped with the
/// way to count it; either way it reports each row's counted work on
/// stderr in the line `scripts/instructions.sh` reads.
#[test]
fn bench_instructions_runs_the_counts_and_reports_the_work() {
    let (code, stdout, stderr) = gmem_full(&["bench", "--instructions", "--json"], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rows = json["cases"].as_array().unwrap();
    let names: Vec<_> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "instructions-in-order",
            "instructions-scattered",
            "instructions-batch"
        ]
    );
    for row in rows {
        match row["skipped"].as_str() {
            Some(why) => assert!(why.contains("scripts/instructions.sh"), "{row}"),
            None => assert!(row["value"].as_f64().unwrap() > 0.0, "{row}"),
        }
    }
    for line in [
        "counted: in-order 262144 conversion 700",
        "counted: scattered 262144 conversion 700",
        "counted: batch 262144 page 60",
    ] {
        assert!(stderr.lines().any(|l| l == line), "{line} in {stderr}");
    }
}

/// A reference row (no goal) meets nothing: `"met": null` in the JSON,
/// which `--from` reads back, with `-` in the table and no miss for
/// `--check`.
#[test]
fn bench_reference_rows_have_no_met() {
    let dir = std::env::temp_dir().join(format!("gmem-bench-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("reference.json");
    let rows = serde_json::json!({ "cases": [{
        "name": "pin-unpin-vs-mutex", "ours_ns": 10.0, "floor_ns": 20.0, "ratio": 2.0,
        "speedup": true, "compared_with": "mutex design", "goal": null, "met": null,
    }]});
    std::fs::write(&path, rows.to_string()).unwrap();
    let path = path.to_str().unwrap();
    let (code, stdout, stderr) = gmem_full(&["bench", "--check", "--from", path], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("pin-unpin-vs-mutex") && l.trim_end().ends_with('-')),
        "{stdout}"
    );
    let (code, stdout, stderr) = gmem_full(&["bench", "--json", "--from", path], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(json["cases"][0]["met"].is_null(), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--study --out` somewhere that cannot be written fails at once, before
/// the study's measuring (which takes tens of seconds), in one line.
#[test]
fn bench_study_checks_out_before_measuring() {
    // A file where the directory should be: no user, root included, can
    // make a directory there.
    let file = std::env::temp_dir().join(format!("gmem-study-out-{}", std::process::id()));
    std::fs::write(&file, b"not a directory").unwrap();
    let out = file.join("study");
    let started = std::time::Instant::now();
    let (code, stdout, stderr) =
        gmem_full(&["bench", "--study", "--out", out.to_str().unwrap()], &[]);
    let took = started.elapsed();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "nothing measured: {stderr}");
    assert!(stderr.starts_with("gmem: creating "), "{stderr}");
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    // A directory where a result file should be.
    let dir = std::env::temp_dir().join(format!("gmem-study-dir-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("study.svg")).unwrap();
    let (code, _, stderr) = gmem_full(&["bench", "--study", "--out", dir.to_str().unwrap()], &[]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "nothing measured: {stderr}");
    assert!(stderr.contains("study.svg for writing"), "{stderr}");
}

/// Runs `gmem` with stdout on `/dev/full`: (exit code, stderr).
fn gmem_to_full(args: &[&str]) -> (Option<i32>, String) {
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .stdout(full)
        .output()
        .expect("gmem runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Output that cannot be written (a full disk) is a one-line error and exit
/// 2, not a panic (exit 101 and a backtrace).
#[test]
fn output_errors_are_one_line() {
    let dir = std::env::temp_dir().join(format!("gmem-full-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rows = dir.join("rows.json");
    let row = serde_json::json!({ "cases": [{
        "name": "round-trip-4k", "ours_ns": 2200.0, "floor_ns": 2000.0, "ratio": 1.1,
        "goal": "<= 1.5x", "met": true,
    }]});
    std::fs::write(&rows, row.to_string()).unwrap();
    let rows = rows.to_str().unwrap();
    let mut cases: Vec<Vec<&str>> = vec![
        vec!["selftest", "host/memfd/convert-pinned-eagain"],
        vec!["bench", "--from", rows],
        vec!["bench", "--json", "--from", rows],
        vec!["stress", "--seconds", "1", "--size-mib", "2"],
        vec!["stress", "--seconds", "1", "--size-mib", "2", "--json"],
    ];
    if kvm() {
        cases.extend([vec!["info"], vec!["info", "--json"]]);
        cases.push(vec!["run", "--json", "--memory-mib", "16", "--rounds", "1"]);
    }
    for args in &cases {
        let (code, stderr) = gmem_to_full(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        // The library's own log lines may come first (`gmem stress` makes
        // requests whose rollback a listener refuses); the error is one line.
        assert_eq!(
            stderr.trim_end().lines().last(),
            Some("gmem: writing the output: No space left on device (os error 28)"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends `SIGINT` to `gmem args` after `after`; gives (exit code, stdout),
/// failing if gmem takes more than a few seconds to end.
fn interrupted(args: &[&str], after: std::time::Duration) -> (Option<i32>, String) {
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("gmem runs");
    std::thread::sleep(after);
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let sent = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if sent.elapsed() > Duration::from_secs(10) {
            child.kill().expect("kill");
            panic!("{args:?}: still running 10 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("gmem ends");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Ctrl-C stops `gmem stress` cleanly: the summary so far (or its JSON),
/// every end check made, exit 130.
#[test]
fn ctrl_c_ends_stress_with_its_summary() {
    let after = std::time::Duration::from_millis(1500);
    let (code, out) = interrupted(&["stress", "--seconds", "30", "--size-mib", "4"], after);
    assert_eq!(code, Some(130), "{out}");
    assert!(out.contains("interrupted      by Ctrl-C"), "{out}");
    assert!(out.contains("invariants       all held"), "{out}");
    let args = ["stress", "--seconds", "30", "--size-mib", "4", "--json"];
    let (code, out) = interrupted(&args, after);
    assert_eq!(code, Some(130), "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(summary["interrupted"], true, "{out}");
    assert_eq!(summary["ok"], true, "{out}");
    assert!(summary["elapsed_s"].as_f64() < Some(10.0), "{out}");
}

/// Ctrl-C stops `gmem run` at the vCPUs' next port write: the JSON so far,
/// no invariant broken, exit 130.
#[test]
fn ctrl_c_ends_run_with_its_summary() {
    if !kvm() {
        return;
    }
    let after = std::time::Duration::from_millis(1500);
    let (code, out) = interrupted(&["run", "--json", "--memory-mib", "512"], after);
    assert_eq!(code, Some(130), "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(summary["interrupted"], true, "{out}");
    assert_eq!(summary["ok"], true, "{out}");
    let (code, out) = interrupted(&["run", "--memory-mib", "512"], after);
    assert_eq!(code, Some(130), "{out}");
    assert!(out.contains("interrupted      by Ctrl-C"), "{out}");
}
