//! The errors of snapshots and restores: what a caller can tell apart, and
//! the errno each one maps to.

use rustix::io::Errno;

use crate::Error;

/// An error of [`GuestMemfd::snapshot`](crate::GuestMemfd::snapshot) or
/// [`GuestMemfd::restore`](crate::GuestMemfd::restore).
///
/// A restore that fails has made nothing: the file it was filling is
/// dropped with the error. `at` is the byte offset in the snapshot where
/// the problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The input does not start with the snapshot magic (`EINVAL`).
    #[error("not a gmem snapshot (bad magic)")]
    BadMagic,
    /// A version of the format this build cannot read (`EINVAL`).
    #[error("snapshot format version {version} is not supported (this build reads version 1)")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// The input ends before the snapshot does (`EINVAL`).
    #[error("the snapshot is truncated at byte {at}")]
    Truncated {
        /// Where the input ended.
        at: u64,
    },
    /// A field holds a value the format forbids (`EINVAL`): a size that is
    /// not a page multiple or above `isize::MAX`, unknown flags, runs that
    /// overlap or do not cover the file, extents out of order, overlapping
    /// or past the end, and the like.
    #[error("malformed snapshot at byte {at}: {reason}")]
    Malformed {
        /// Where the bad field starts.
        at: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A section's checksum does not match its contents (`EBADMSG`).
    #[error("checksum mismatch in the {section} ending at byte {at}")]
    Checksum {
        /// Which section: the header, the runs or an extent.
        section: &'static str,
        /// Where its checksum is.
        at: u64,
    },
    /// Reading or writing the snapshot stream failed (its errno; `EIO` for
    /// an error without one).
    #[error("{call} of the snapshot failed: {errno}")]
    Stream {
        /// What was being done.
        call: &'static str,
        /// The error's errno.
        errno: Errno,
    },
    /// Making the restored file, or reading or writing guest memory, failed.
    #[error(transparent)]
    File(#[from] Error),
}

impl SnapshotError {
    /// The errno for the failure: `EINVAL` for malformed input (truncated,
    /// bad magic or version, a forbidden value), `EBADMSG` for a checksum
    /// mismatch, the stream's or the file's errno otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            SnapshotError::BadMagic
            | SnapshotError::UnsupportedVersion { .. }
            | SnapshotError::Truncated { .. }
            | SnapshotError::Malformed { .. } => Errno::INVAL.raw_os_error(),
            SnapshotError::Checksum { .. } => Errno::BADMSG.raw_os_error(),
            SnapshotError::Stream { errno, .. } => errno.raw_os_error(),
            SnapshotError::File(error) => error.errno(),
        }
    }

    /// A stream error from `std::io`, keeping its errno.
    pub(crate) fn stream(call: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
        move |error| SnapshotError::Stream {
            call,
            errno: error
                .raw_os_error()
                .map_or(Errno::IO, Errno::from_raw_os_error),
        }
    }
}
