//! The `gmem` command end to end, on the real `/dev/kvm`.

use std::process::Command;

use gmem::Attribute;
use gmem_cli::guest::Command as Guest;
use gmem_cli::machine::{FIRMWARE_SIZE, Machine};

/// Whether KVM tests may run; panics where they must (`GMEM_REQUIRE_KVM`).
fn kvm() -> bool {
    match gmem::kvm::HostSupport::probe() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("GMEM_REQUIRE_KVM").is_none(),
                "skipped on a KVM host: {e}"
            );
            eprintln!("skipped: KVM unavailable: {e}");
            false
        }
    }
}

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
    assert!(last.ends_with(" passed, 0 failed, 0 skipped"), "{last}");
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(passed, gmem_cli::scenarios::all().len());
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
    // 12 MiB of guest memory in 256 KiB chunks, two conversions per chunk a round.
    assert_eq!(summary["conversions"], 48 * 2 * 3);
    assert!(summary["guest_bytes_verified"].as_u64() > Some(0));
    assert!(summary["host_bytes_verified"].as_u64() > Some(0));
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
    assert_eq!(info["guest_memfd"], true);
    let flags = info["guest_memfd_flags"]
        .as_array()
        .expect("a list of flags");
    assert!(
        flags.contains(&"MMAP".into()) && flags.contains(&"INIT_SHARED".into()),
        "{out}"
    );
    assert!(info["per_page_attributes"].is_boolean());
    let hiding = &info["hiding"];
    for backing in ["memfd", "kernel_guest_memfd"] {
        let mechanism = hiding[backing].as_str().unwrap_or_default();
        assert!(
            ["guard_markers", "empty_file_remap"].contains(&mechanism),
            "{backing}: {hiding}"
        );
    }
    let max = hiding["max_map_count"].as_u64().expect("max_map_count");
    assert_eq!(hiding["process_vma_budget"].as_u64(), Some(max / 4));
}
