//! Host-side scenarios: the rules of [`gmem::conformance`] on each backing.

use gmem::BackingKind;
use gmem::conformance::{self, Rule};

use super::Outcome;

/// `host/<backing>/<rule>`.
pub(super) fn name(rule: &Rule, kind: BackingKind) -> String {
    format!("host/{}/{}", conformance::backing_name(kind), rule.name)
}

/// Runs `rule` on a new backing of `kind` (panics included).
pub(super) fn run(rule: &Rule, kind: BackingKind) -> Outcome {
    match conformance::run(rule, kind) {
        conformance::Outcome::Pass => Outcome::Pass,
        conformance::Outcome::Fail(failure) => Outcome::Fail(failure.to_string()),
        conformance::Outcome::Skip(reason) => Outcome::Skip(reason),
    }
}
