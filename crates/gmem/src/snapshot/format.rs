//! The encoding of a snapshot: the header, the run lengths, and a reader
//! that knows where it is and turns a short read into
//! [`SnapshotError::Truncated`]. The layout is documented in the module
//! above this one.

use std::io::{ErrorKind, Read};

use super::SnapshotError;
use crate::Attribute;

/// The first eight bytes of every snapshot.
pub(crate) const MAGIC: [u8; 8] = *b"GMEMSNAP";
/// The last eight bytes of every snapshot.
pub(crate) const TRAILER: [u8; 8] = *b"GMEMEND\0";
/// The version this build writes and reads.
pub(crate) const VERSION: u32 = 1;
/// Bytes of the header, checksum included.
pub(crate) const HEADER_LEN: usize = 64;
/// Bytes of an extent's offset and length.
pub(crate) const EXTENT_HEAD_LEN: usize = 16;
/// The most bytes a LEB128 `u64` takes.
const VARINT_MAX: usize = 10;

/// The header's fields, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) first: Attribute,
    pub(crate) size: u64,
    pub(crate) flags: u64,
    pub(crate) run_count: u64,
    pub(crate) runs_len: u64,
    pub(crate) extent_count: u64,
}

impl Header {
    /// The 64 bytes of the header, its checksum last.
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let first = u32::from(self.first == Attribute::Private);
        out[12..16].copy_from_slice(&first.to_le_bytes());
        for (at, field) in [
            (16, self.size),
            (24, self.flags),
            (32, self.run_count),
            (40, self.runs_len),
            (48, self.extent_count),
        ] {
            out[at..at + 8].copy_from_slice(&field.to_le_bytes());
        }
        // Bytes 56..60 are reserved, zero.
        let crc = crc32fast::hash(&out[..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// The header in `bytes`, after checking its magic, version, checksum
    /// and reserved bytes (not yet its values: the caller does).
    pub(crate) fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, SnapshotError> {
        if bytes[0..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(SnapshotError::UnsupportedVersion { version });
        }
        if crc32fast::hash(&bytes[..60]) != u32_at(60) {
            return Err(SnapshotError::Checksum {
                section: "header",
                at: 60,
            });
        }
        let malformed = |at, reason| SnapshotError::Malformed { at, reason };
        let first = match u32_at(12) {
            0 => Attribute::Shared,
            1 => Attribute::Private,
            _ => return Err(malformed(12, "the first run's state is neither 0 nor 1")),
        };
        if u32_at(56) != 0 {
            return Err(malformed(56, "reserved bytes are not zero"));
        }
        Ok(Header {
            first,
            size: u64_at(16),
            flags: u64_at(24),
            run_count: u64_at(32),
            runs_len: u64_at(40),
            extent_count: u64_at(48),
        })
    }
}

/// Appends `value` as LEB128.
pub(crate) fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The LEB128 number at the start of `bytes` and the bytes it took; `None`
/// if `bytes` ends inside it, `Err` if it is longer than ten bytes or
/// overflows a `u64`.
pub(crate) fn take_varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, &'static str> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(VARINT_MAX) {
        let bits = u64::from(byte & 0x7f);
        if i == VARINT_MAX - 1 && *byte > 1 {
            return Err("a run length overflows 64 bits");
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= VARINT_MAX {
        Err("a run length is longer than ten bytes")
    } else {
        Ok(None)
    }
}

/// A reader of a snapshot that counts the bytes it has read, so errors can
/// say where they are, and turns an early end into `Truncated`.
pub(crate) struct Cursor<R> {
    pub(crate) inner: R,
    pub(crate) at: u64,
}

impl<R: Read> Cursor<R> {
    pub(crate) fn new(inner: R) -> Cursor<R> {
        Cursor { inner, at: 0 }
    }

    /// Fills `buf` exactly.
    pub(crate) fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(SnapshotError::Truncated {
                        at: self.at + done as u64,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(SnapshotError::stream("read")(e)),
            }
        }
        self.at += buf.len() as u64;
        Ok(())
    }

    pub(crate) fn read_u32(&mut self) -> Result<u32, SnapshotError> {
        let mut bytes = [0u8; 4];
        self.read_exact(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_reject_overlong_ones() {
        for value in [0, 1, 127, 128, 300, 1 << 40, u64::MAX] {
            let mut out = Vec::new();
            push_varint(&mut out, value);
            assert_eq!(take_varint(&out), Ok(Some((value, out.len()))), "{value}");
            assert_eq!(take_varint(&out[..out.len() - 1]), Ok(None));
        }
        assert!(take_varint(&[0xff; 11]).is_err());
        // Ten bytes whose last carries more than the 64th bit.
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert!(take_varint(&over).is_err());
    }

    #[test]
    fn a_header_reads_back_and_its_checksum_covers_every_byte() {
        let header = Header {
            first: Attribute::Private,
            size: 1 << 30,
            flags: 3,
            run_count: 5,
            runs_len: 7,
            extent_count: 2,
        };
        let bytes = header.encode();
        assert_eq!(Header::decode(&bytes), Ok(header));
        for i in 8..HEADER_LEN {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "byte {i}");
        }
    }
}
