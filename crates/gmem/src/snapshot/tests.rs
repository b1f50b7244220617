//! Hostile snapshots, made with valid checksums so that each check is the
//! one that refuses them: every one a typed error, never a panic, nothing
//! returned.

use super::format::{Header, push_varint};
use super::*;

const P: u64 = PAGE_SIZE;

/// The parts of a snapshot, written with correct checksums.
#[derive(Clone)]
pub(super) struct Parts {
    header: Header,
    /// Run lengths in pages.
    runs: Vec<u64>,
    /// Extents: offset, length, and the byte the contents repeat.
    extents: Vec<(u64, u64, u8)>,
}

impl Parts {
    /// Eight pages: shared, two private, five shared; pages 0 and 2..4 populated.
    pub(super) fn valid() -> Parts {
        Parts {
            header: Header {
                first: Attribute::Shared,
                size: 8 * P,
                flags: (Flags::MMAP | Flags::INIT_SHARED).bits(),
                run_count: 3,
                runs_len: 3,
                extent_count: 2,
            },
            runs: vec![1, 2, 5],
            extents: vec![(0, P, 0xa1), (2 * P, 2 * P, 0xb2)],
        }
    }

    pub(super) fn bytes(&self) -> Vec<u8> {
        let mut out = self.header.encode().to_vec();
        let mut runs = Vec::new();
        for len in &self.runs {
            push_varint(&mut runs, *len);
        }
        out.extend_from_slice(&runs);
        out.extend_from_slice(&crc32fast::hash(&runs).to_le_bytes());
        for (offset, len, byte) in &self.extents {
            let mut extent = offset.to_le_bytes().to_vec();
            extent.extend_from_slice(&len.to_le_bytes());
            extent.resize(16 + *len as usize, *byte);
            out.extend_from_slice(&extent);
            out.extend_from_slice(&crc32fast::hash(&extent).to_le_bytes());
        }
        out.extend_from_slice(b"GMEMEND\0");
        out
    }

    /// Sets the counts to match the runs and extents given.
    fn counted(mut self) -> Parts {
        let mut runs = Vec::new();
        for len in &self.runs {
            push_varint(&mut runs, *len);
        }
        self.header.run_count = self.runs.len() as u64;
        self.header.runs_len = runs.len() as u64;
        self.header.extent_count = self.extents.len() as u64;
        self
    }

    fn restore(&self) -> Result<GuestMemfd, SnapshotError> {
        GuestMemfd::restore(&self.bytes()[..], Options::new())
    }
}

fn malformed_at(result: Result<GuestMemfd, SnapshotError>, field: u64) -> String {
    match result {
        Err(SnapshotError::Malformed { at, reason }) => {
            assert_eq!(at, field, "{reason}");
            reason.to_owned()
        }
        other => panic!("expected Malformed at {field}, got {other:?}"),
    }
}

#[test]
fn the_valid_parts_restore() {
    let file = Parts::valid().restore().unwrap();
    assert_eq!(file.size(), 8 * P);
    assert_eq!(file.shared_runs(), vec![0..P, 3 * P..8 * P]);
    let map = file.mmap().unwrap();
    let mut page = vec![0u8; P as usize];
    map.read(0, &mut page).unwrap();
    assert!(page.iter().all(|b| *b == 0xa1));
    map.read(3 * P, &mut page).unwrap();
    assert!(page.iter().all(|b| *b == 0xb2));
    map.read(5 * P, &mut page).unwrap();
    assert!(page.iter().all(|b| *b == 0));
}

#[test]
fn every_prefix_is_truncated() {
    let bytes = Parts::valid().bytes();
    for len in 0..bytes.len() {
        let error = GuestMemfd::restore(&bytes[..len], Options::new()).unwrap_err();
        assert_eq!(error, SnapshotError::Truncated { at: len as u64 }, "{len}");
        assert_eq!(error.errno(), libc::EINVAL);
    }
}

#[test]
fn every_changed_byte_is_refused() {
    let bytes = Parts::valid().bytes();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x04;
        let error = GuestMemfd::restore(&bad[..], Options::new()).unwrap_err();
        assert!(
            [libc::EINVAL, libc::EBADMSG].contains(&error.errno()),
            "{i}: {error}"
        );
    }
}

#[test]
fn magic_version_and_checksums() {
    let mut bytes = Parts::valid().bytes();
    bytes[0] = b'X';
    let error = GuestMemfd::restore(&bytes[..], Options::new()).unwrap_err();
    assert_eq!(
        (error.clone(), error.errno()),
        (SnapshotError::BadMagic, libc::EINVAL)
    );

    let mut bytes = Parts::valid().bytes();
    bytes[8] = 2;
    let error = GuestMemfd::restore(&bytes[..], Options::new()).unwrap_err();
    assert_eq!(error, SnapshotError::UnsupportedVersion { version: 2 });

    // A field changed without its checksum: the header's, the runs', an
    // extent's.
    for (byte, section) in [(20, "header"), (64, "runs"), (96, "extent")] {
        let mut bytes = Parts::valid().bytes();
        bytes[byte] ^= 1;
        let error = GuestMemfd::restore(&bytes[..], Options::new()).unwrap_err();
        assert!(
            matches!(error, SnapshotError::Checksum { section: s, .. } if s == section),
            "{byte}: {error}"
        );
        assert_eq!(error.errno(), libc::EBADMSG);
    }
}

#[test]
fn sizes_and_flags() {
    for size in [
        0,
        1 << 63,
        u64::MAX,
        3 * P + 1,
        (isize::MAX as u64 + 1) & !(P - 1),
    ] {
        let mut parts = Parts::valid();
        parts.header.size = size;
        malformed_at(parts.restore(), 16);
    }
    let mut parts = Parts::valid();
    parts.header.flags |= 1 << 9;
    malformed_at(parts.restore(), 24);
}

#[test]
fn counts_beyond_the_file_or_the_input() {
    let mut parts = Parts::valid();
    parts.header.run_count = 0;
    malformed_at(parts.restore(), 32);
    parts.header.run_count = 9;
    malformed_at(parts.restore(), 32);
    let mut parts = Parts::valid();
    parts.header.runs_len = 31;
    malformed_at(parts.restore(), 40);
    let mut parts = Parts::valid();
    parts.header.extent_count = 9;
    malformed_at(parts.restore(), 48);
    // Counts as large as the size allows, with the input ending at once:
    // truncated, after no allocation of that size.
    let mut parts = Parts::valid();
    parts.header.size = 1 << 46;
    parts.header.run_count = 1 << 34;
    parts.header.runs_len = 10 << 34;
    let bytes = &parts.bytes()[..HEADER_LEN + 3];
    let error = GuestMemfd::restore(bytes, Options::new()).unwrap_err();
    assert!(matches!(error, SnapshotError::Truncated { .. }), "{error}");
}

#[test]
fn runs_that_overlap_pass_the_end_or_fall_short() {
    for (runs, reason) in [
        (vec![1, 0, 7], "overlap"),
        (vec![1, 2, 6], "past the end"),
        (vec![1, u64::MAX, 1], "past the end"),
        (vec![1, 2, 4], "do not cover"),
    ] {
        let mut parts = Parts::valid();
        parts.runs = runs;
        let parts = parts.counted();
        let error = parts.restore().unwrap_err();
        assert!(error.to_string().contains(reason), "{error}");
        assert_eq!(error.errno(), libc::EINVAL);
    }
    // More lengths than the header counts.
    let mut parts = Parts::valid().counted();
    parts.header.run_count = 2;
    let error = parts.restore().unwrap_err();
    assert!(error.to_string().contains("more runs"), "{error}");
}

#[test]
fn extents_that_overlap_pass_the_end_or_are_unaligned() {
    for (extents, reason) in [
        (vec![(0, 2 * P, 1), (P, P, 2)], "overlap"),
        (vec![(4 * P, P, 1), (0, P, 2)], "out of order"),
        (vec![(6 * P, 4 * P, 1)], "past the end"),
        (vec![(!(P - 1), P, 1)], "past the end"),
        (vec![(P + 1, P, 1)], "page-aligned"),
        (vec![(P, 0, 1)], "empty"),
    ] {
        let mut parts = Parts::valid();
        parts.extents = extents;
        let error = parts.counted().restore().unwrap_err();
        assert!(error.to_string().contains(reason), "{reason}: {error}");
        assert_eq!(error.errno(), libc::EINVAL);
    }
}

#[test]
fn a_missing_trailer_is_malformed() {
    let mut bytes = Parts::valid().bytes();
    let len = bytes.len();
    bytes[len - 1] = b'!';
    let error = GuestMemfd::restore(&bytes[..], Options::new()).unwrap_err();
    assert!(error.to_string().contains("trailer"), "{error}");
}

/// The reader stops at the trailer: what follows is left for the caller.
#[test]
fn a_restore_reads_nothing_past_the_trailer() {
    let mut bytes = Parts::valid().bytes();
    let len = bytes.len();
    bytes.extend_from_slice(b"machine state");
    let mut input = &bytes[..];
    GuestMemfd::restore(&mut input, Options::new()).unwrap();
    assert_eq!(input, b"machine state");
    assert_eq!(bytes.len() - input.len(), len);
}
