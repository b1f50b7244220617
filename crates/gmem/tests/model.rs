//! Model-based test of a `GuestMemfd` (sections 3 to 5 of `guest_memfd.md`):
//! random sequences of conversions, pins, unpins, punches, allocations,
//! copies through host mappings (full, short and long) and through pins,
//! listeners that record and refuse, and file creation, checked after every
//! operation against the reference model of `gmem::testing` (one state, one
//! pin count and 4096 bytes per page), the same driver the fuzz target runs.
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default).

use gmem::testing::{Case, Op, PAGES, SIZE};
use gmem::{Attribute, PAGE_SIZE};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;

/// Ranges for conversions, punches and allocations: mostly page-aligned and
/// inside the file, sometimes empty, past the end, unaligned or wrapping.
fn file_range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        10 => (0..PAGES, 1..=4u64).prop_map(|(p, n)| (p * P, n * P)),
        2 => (0..=PAGES + 2, 0..=PAGES + 2).prop_map(|(p, n)| (p * P, n * P)),
        1 => (0..SIZE + 2 * P, 0..3 * P),
        1 => (0..=2u64).prop_map(|n| (u64::MAX - P + 1 - n * P, 2 * P)),
        1 => (0..=2u64).prop_map(|n| (i64::MAX as u64 - P + 1, (n + 1) * P)),
    ]
}

/// Byte offsets for copies: anywhere, near page boundaries, near the end,
/// or absurdly large.
fn byte_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..SIZE,
        4 => (0..=PAGES, 0..16u64).prop_map(|(p, d)| (p * P).saturating_sub(8) + d),
        1 => Just(u64::MAX - 3),
    ]
}

fn byte_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0..64usize,
        1 => 0..(P as usize + 200),
    ]
}

/// Pin ranges: unaligned ones are allowed (they cover whole pages).
fn pin_range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        6 => (0..PAGES, 1..=3u64).prop_map(|(p, n)| (p * P, n * P)),
        3 => (0..SIZE, 0..2 * P),
        1 => (SIZE - 2 * P..SIZE + P, 0..3 * P),
        1 => Just((u64::MAX - 1, 4)),
    ]
}

fn attribute() -> impl Strategy<Value = Attribute> {
    prop_oneof![Just(Attribute::Shared), Just(Attribute::Private)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (file_range(), attribute()).prop_map(|((offset, len), to)| Op::Convert { offset, len, to }),
        5 => pin_range().prop_map(|(offset, len)| Op::Pin { offset, len }),
        4 => any::<usize>().prop_map(|index| Op::Unpin { index }),
        2 => file_range().prop_map(|(offset, len)| Op::Punch { offset, len }),
        1 => file_range().prop_map(|(offset, len)| Op::Allocate { offset, len }),
        4 => (any::<usize>(), byte_offset(), byte_len()).prop_map(|(map, offset, len)| Op::Read { map, offset, len }),
        4 => (any::<usize>(), byte_offset(), byte_len(), any::<u8>())
            .prop_map(|(map, offset, len, seed)| Op::Write { map, offset, len, seed }),
        2 => (any::<usize>(), 0..2 * P, 0..80usize).prop_map(|(index, offset, len)| Op::PinRead { index, offset, len }),
        3 => (any::<usize>(), 0..2 * P, 0..80usize, any::<u8>())
            .prop_map(|(index, offset, len, seed)| Op::PinWrite { index, offset, len, seed }),
        1 => Just(Op::Drain),
        1 => map_len().prop_map(|len| Op::Map { len }),
        1 => any::<usize>().prop_map(|index| Op::Unmap { index }),
        1 => any::<bool>().prop_map(|refuse| Op::AddListener { refuse }),
        1 => (0..PAGES, any::<bool>()).prop_map(|(page, keep)| Op::AddProbe { page, keep }),
        1 => any::<usize>().prop_map(|index| Op::RemoveListener { index }),
        1 => (create_size(), prop_oneof![4 => 0..=3u64, 1 => any::<u64>()], any::<bool>())
            .prop_map(|(size, flags, huge_folios)| Op::Create { size, flags, huge_folios }),
    ]
}

/// Mapping lengths: the whole file (`u64::MAX`), short, long, empty, huge.
fn map_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(u64::MAX),
        4 => 1..SIZE + 3 * P,
        1 => Just(0),
        1 => (1..=P).prop_map(|n| u64::MAX - n),
        1 => (0..=2u64).prop_map(|n| isize::MAX as u64 - n),
    ]
}

/// Sizes of other files: small and valid, unaligned, or past `isize::MAX`.
fn create_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (1..=64u64).prop_map(|n| n * P),
        1 => 0..=64 * P,
        1 => isize::MAX as u64 + 1..=u64::MAX,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn gmem_follows_the_model(init_shared in any::<bool>(), ops in prop::collection::vec(op(), 1..80)) {
        gmem::testing::run(&Case { init_shared, ops }).map_err(TestCaseError::fail)?;
    }
}
