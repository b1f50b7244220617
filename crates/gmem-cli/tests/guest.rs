//! The guest-side self-test scenarios, one test each, on the real `/dev/kvm`.
//!
//! Without KVM the scenarios skip; where `GMEM_REQUIRE_KVM` is set (CI on a
//! KVM host) a skip fails the test instead. On a host without guest_memfd
//! they run on memfd slots.

use gmem_cli::scenarios::{self, Outcome, Side};

/// Runs the guest-side scenario `name` and asserts that it passed.
fn run(name: &str) {
    let scenario = scenarios::all()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario named {name}"));
    assert_eq!(scenario.side, Side::Guest, "{name} is not a guest scenario");
    let start = std::time::Instant::now();
    let outcome = scenario.run();
    eprintln!("{name}: {outcome:?} in {:?}", start.elapsed());
    match outcome {
        Outcome::Pass => {}
        Outcome::Fail(message) => panic!("{name} failed: {message}"),
        Outcome::Skip(reason) => {
            if let Some(variable) = gmem::conformance::skip_forbidden_by(&reason) {
                panic!("{name} skipped with {variable} set: {reason}");
            }
            eprintln!("skipped: {reason}");
        }
    }
}

#[test]
fn host_writes_guest_reads_after_private() {
    run("guest/host-writes-guest-reads-after-private");
}

#[test]
fn guest_writes_host_reads_after_shared() {
    run("guest/guest-writes-host-reads-after-shared");
}

#[test]
fn punched_page_reads_zero_keeps_state() {
    run("guest/punched-page-reads-zero-keeps-state");
}

#[test]
fn conversion_touches_only_requested_pages() {
    run("guest/conversion-touches-only-requested-pages");
}

#[test]
fn conversion_waits_for_device_pins() {
    run("guest/conversion-waits-for-device-pins");
}

#[test]
fn vcpus_convert_own_regions() {
    run("guest/vcpus-convert-own-regions");
}

#[test]
fn every_guest_scenario_has_a_test() {
    let tested = [
        "guest/host-writes-guest-reads-after-private",
        "guest/guest-writes-host-reads-after-shared",
        "guest/punched-page-reads-zero-keeps-state",
        "guest/conversion-touches-only-requested-pages",
        "guest/conversion-waits-for-device-pins",
        "guest/vcpus-convert-own-regions",
    ];
    for scenario in scenarios::all() {
        if scenario.side == Side::Guest {
            assert!(
                tested.contains(&scenario.name.as_str()),
                "{} has no test here",
                scenario.name
            );
        }
    }
}
