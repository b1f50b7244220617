//! The specification's host rules (`guest_memfd.md`, sections 3 to 5, and
//! gmem's own in section 8): the table of `gmem::conformance`, one test per
//! rule and backing (`memfd::<rule>`, `kvm::<rule>`), and the listeners,
//! which the table does not cover.
//!
//! The kernel guest_memfd tests skip without KVM or on a KVM host without
//! guest_memfd, saying why; `GMEM_REQUIRE_KVM` (CI on a KVM host) makes the
//! first a failure, `GMEM_REQUIRE_GUEST_MEMFD` (CI on a host with
//! guest_memfd) both.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use Attribute::{Private, Shared};
use common::reads_ok;
use gmem::conformance::{self, Outcome};
use gmem::{Attribute, BackingKind, ConversionListener, Flags, GuestMemfd, PAGE_SIZE, Refusal};

const P: u64 = PAGE_SIZE;

fn shared(pages: u64) -> GuestMemfd {
    GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).unwrap()
}

/// Runs the rule `name` on a backing of `kind`.
fn check(kind: BackingKind, name: &str) {
    let rule = conformance::rule(name).unwrap_or_else(|| panic!("no rule named {name}"));
    let backing = conformance::backing_name(kind);
    match conformance::run(rule, kind) {
        Outcome::Pass => {}
        Outcome::Fail(failure) => {
            panic!("{name} (section {}) on {backing}: {failure}", rule.section)
        }
        Outcome::Skip(reason) => {
            if let Some(variable) = conformance::skip_forbidden_by(&reason) {
                panic!("{name} on {backing} skipped with {variable} set: {reason}");
            }
            eprintln!("skipped: {reason}");
        }
    }
}

/// One test per rule on each backing, and the list of the rules tested.
macro_rules! rules {
    ($($test:ident: $name:literal,)*) => {
        const TESTED: &[&str] = &[$($name),*];
        mod memfd {
            $(#[test] fn $test() { super::check(gmem::BackingKind::Memfd, $name) })*
        }
        mod kvm {
            $(#[test] fn $test() { super::check(gmem::BackingKind::KernelGuestMemfd, $name) })*
        }
    };
}

rules! {
    create_size_einval: "create-size-einval",
    create_unknown_flag_einval: "create-unknown-flag-einval",
    create_size_past_address_space: "create-size-past-address-space",
    initial_state: "initial-state",
    mmap_without_flag_enodev: "mmap-without-flag-enodev",
    mmap_past_end: "mmap-past-end",
    past_end_sigbus: "past-end-sigbus",
    fallocate_mode_eopnotsupp: "fallocate-mode-eopnotsupp",
    fallocate_unaligned_einval: "fallocate-unaligned-einval",
    fallocate_past_largest_offset_efbig: "fallocate-past-largest-offset-efbig",
    allocate_past_end_einval: "allocate-past-end-einval",
    punch_past_end_noop: "punch-past-end-noop",
    allocate_and_punch_count: "allocate-and-punch-count",
    punch_zeroes_keeps_state: "punch-zeroes-keeps-state",
    convert_invalid_einval: "convert-invalid-einval",
    convert_nothing_to_change: "convert-nothing-to-change",
    convert_pinned_eagain: "convert-pinned-eagain",
    convert_dropped_pin_one_drain: "convert-dropped-pin-one-drain",
    convert_to_shared_no_check: "convert-to-shared-no-check",
    convert_keeps_contents: "convert-keeps-contents",
    punch_pinned_ebusy: "punch-pinned-ebusy",
    private_page_efault: "private-page-efault",
    pin_allocates_copies_within_range: "pin-allocates-copies-within-range",
    private_page_faults: "private-page-faults",
    private_page_faults_fallback: "private-page-faults-fallback",
}

#[test]
fn every_rule_has_a_test_and_a_unique_kebab_case_name() {
    let table: BTreeSet<_> = conformance::RULES.iter().map(|rule| rule.name).collect();
    assert_eq!(table.len(), conformance::RULES.len(), "a rule name twice");
    assert_eq!(table, TESTED.iter().copied().collect::<BTreeSet<_>>());
    for name in table {
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{name} is not kebab-case"
        );
    }
}

// ---- Listeners (gmem's own: no kernel rule) ----

#[derive(Default)]
struct Recorder {
    refuse: Mutex<bool>,
    events: Mutex<Vec<String>>,
}

impl ConversionListener for Recorder {
    fn before_private(&self, offset: u64, len: u64) -> Result<(), Refusal> {
        self.events
            .lock()
            .unwrap()
            .push(format!("before {offset:#x}+{len:#x}"));
        if *self.refuse.lock().unwrap() {
            return Err(Refusal::new("device busy"));
        }
        Ok(())
    }

    fn converted(&self, offset: u64, len: u64, to: Attribute) {
        self.events
            .lock()
            .unwrap()
            .push(format!("{to:?} {offset:#x}+{len:#x}"));
    }
}

#[test]
fn listeners_hear_conversions_and_may_refuse() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    let recorder = Arc::new(Recorder::default());
    let id = mem.add_listener(recorder.clone());
    *recorder.refuse.lock().unwrap() = true;
    let err = mem.set_attributes(0, P, Private).unwrap_err();
    assert_eq!((err.errno(), err.error_offset()), (libc::EBUSY, 0));
    assert!(reads_ok(&map, 0), "a refused conversion changes nothing");
    assert_eq!(mem.attribute(0).unwrap(), Shared);
    *recorder.refuse.lock().unwrap() = false;
    mem.set_attributes(0, P, Private).unwrap();
    mem.set_attributes(0, P, Shared).unwrap();
    assert!(mem.remove_listener(id));
    mem.set_attributes(P, P, Private).unwrap();
    let events = recorder.events.lock().unwrap().clone();
    assert_eq!(
        events,
        [
            "before 0x0+0x1000",
            "before 0x0+0x1000",
            "Private 0x0+0x1000",
            "Shared 0x0+0x1000"
        ]
    );
    assert_eq!(mem.stats().refused, 1);
}

#[test]
fn a_listener_may_drop_pins_before_the_check() {
    struct DropPins<'a>(Mutex<Vec<gmem::Pin<'a>>>);
    impl ConversionListener for DropPins<'static> {
        fn before_private(&self, _: u64, _: u64) -> Result<(), Refusal> {
            self.0.lock().unwrap().clear();
            Ok(())
        }
    }
    let mem: &'static GuestMemfd = Box::leak(Box::new(shared(2)));
    let listener = Arc::new(DropPins(Mutex::new(vec![mem.pin(0, 2 * P).unwrap()])));
    mem.add_listener(listener);
    mem.set_attributes(0, 2 * P, Private).unwrap();
}
