//! The host-side self-test scenarios, on both backings.
//!
//! The kernel guest_memfd scenarios skip without KVM or without a kernel
//! guest_memfd; `GMEM_REQUIRE_KVM` (CI on a KVM host) makes the first a
//! failure, `GMEM_REQUIRE_GUEST_MEMFD` (CI on a host with guest_memfd) both.

use std::collections::HashSet;
use std::time::Instant;

use gmem_cli::scenarios::{self, Outcome, Side};

#[test]
fn every_host_scenario_passes() {
    let mut failed = Vec::new();
    let mut ran = 0;
    for scenario in scenarios::all()
        .into_iter()
        .filter(|s| s.side == Side::Host)
    {
        let start = Instant::now();
        let outcome = scenario.run();
        eprintln!("{} {:?} in {:?}", scenario.name, outcome, start.elapsed());
        ran += 1;
        match outcome {
            Outcome::Pass => {}
            Outcome::Fail(message) => failed.push(format!("{}: {message}", scenario.name)),
            Outcome::Skip(reason) => match gmem::conformance::skip_forbidden_by(&reason) {
                Some(variable) => failed.push(format!(
                    "{} skipped with {variable} set: {reason}",
                    scenario.name
                )),
                None => eprintln!("skipped: {}: {reason}", scenario.name),
            },
        }
    }
    assert!(ran > 0, "no host scenario");
    assert!(
        failed.is_empty(),
        "{} of {ran} host scenarios failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn scenario_names_are_unique_kebab_case_and_cover_both_backings() {
    let all = scenarios::all();
    let mut names = HashSet::new();
    for scenario in &all {
        assert!(
            names.insert(scenario.name.as_str()),
            "{} twice",
            scenario.name
        );
        assert!(
            scenario
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '/'),
            "{} is not kebab-case",
            scenario.name
        );
        let prefix_ok = match scenario.side {
            Side::Host => {
                scenario.name.starts_with("host/memfd/") || scenario.name.starts_with("host/kvm/")
            }
            Side::Guest => scenario.name.starts_with("guest/"),
        };
        assert!(prefix_ok, "{} does not name its side", scenario.name);
    }
    for scenario in all.iter().filter(|s| s.name.starts_with("host/memfd/")) {
        let rule = &scenario.name["host/memfd/".len()..];
        assert!(
            names.contains(format!("host/kvm/{rule}").as_str()),
            "{rule} runs on the memfd backing only"
        );
    }
}
