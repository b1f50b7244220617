//! Guest memory with per-page shared/private state and in-place conversion.
//!
//! `gmem` reproduces, for userspace VMMs, the semantics of Linux's
//! `guest_memfd` together with the (unmerged) in-place conversion series:
//!
//! * a [`GuestMemfd`] is a fixed-size file whose every page is
//!   [`Attribute::Shared`] or [`Attribute::Private`], independently of whether
//!   a page is allocated there;
//! * [`HostMapping`]s are the VMM's view of the file: shared pages are
//!   readable and writable; a private page is hidden in every live mapping
//!   by guard markers (a raw access raises `SIGSEGV`, and no VMA is spent
//!   however the guest fragments the file), or where the kernel refuses them
//!   by an empty file mapped over it (`SIGBUS`) within a VMA budget; past the
//!   end of the file, `SIGBUS`;
//! * [`GuestMemfd::set_attributes`] converts a range in place, following the
//!   kernel's protocol: exclusive invalidate lock, exact reference check,
//!   one drain of every thread's batch of released pins, `EAGAIN` with the
//!   failing offset, then the host mappings; all or nothing, and a failed
//!   conversion leaves no trace a raw host access can see;
//! * [`Pin`]s are the device-I/O references (the analogue of GUP) that a
//!   conversion respects; taking one is lock-free.
//!
//! What it does not do: it does not protect guest memory against a hostile
//! host (private pages are hidden by the VMM's own page tables), and a forked
//! child keeps the mappings it had at fork time.
//!
//! The memory is backed by a sealed `memfd`, or (with the `kvm` feature) by a
//! kernel `guest_memfd` created on a KVM VM; either binds as KVM guest
//! memory (a memfd as a plain memslot, for hosts without guest_memfd); see
//! `ARCHITECTURE.md` for the layers.
//!
//! ```
//! use gmem::{Attribute, Flags, GuestMemfd, PAGE_SIZE};
//!
//! let mem = GuestMemfd::new(16 * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED)?;
//! let map = mem.mmap()?;
//! map.write(0, b"hello")?;
//!
//! // The guest takes the first page private: the host can no longer touch it.
//! mem.set_attributes(0, PAGE_SIZE, Attribute::Private)?;
//! let err = map.write(0, b"x").unwrap_err();
//! assert!(matches!(err, gmem::Error::Private { offset: 0 }));
//! assert_eq!(err.errno(), libc::EFAULT); // what the kernel would give
//!
//! // A device pins the second page: converting it now fails with EAGAIN.
//! let pin = mem.pin(PAGE_SIZE, 512)?;
//! let err = mem.set_attributes(PAGE_SIZE, PAGE_SIZE, Attribute::Private).unwrap_err();
//! assert_eq!(err.error_offset(), PAGE_SIZE);
//! drop(pin);
//! mem.set_attributes(PAGE_SIZE, PAGE_SIZE, Attribute::Private)?;
//!
//! // Back to shared, contents preserved.
//! mem.set_attributes(0, PAGE_SIZE, Attribute::Shared)?;
//! let mut buf = [0u8; 5];
//! map.read(0, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_code)]

mod attributes;
mod backing;
mod batch;
mod budget;
#[cfg(feature = "conformance")]
#[doc(hidden)]
pub mod conformance;
mod conversion;
mod error;
mod file;
mod folios;
#[allow(unsafe_code)] // Erases the lifetime of a map published to callbacks.
mod held;
#[cfg(test)]
mod hiding_tests;
mod listener;
#[cfg(all(test, loom))]
mod loom_tests;
mod mapping;
mod pin;
mod refs;
pub mod remote;
pub mod snapshot;
mod stats;
mod sync;
#[allow(unsafe_code)] // The one leaf module for memfd, mmap and raw copies.
mod sys;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
#[cfg(feature = "vm-memory")]
pub mod vm_memory;

#[cfg(feature = "kvm")]
pub mod kvm;

pub use attributes::Attribute;
pub use backing::BackingKind;
pub use budget::{VmaLimits, vma_limits};
pub use error::{ConversionError, Error};
pub use file::{Flags, GuestMemfd, Options, falloc};
pub use listener::{ConversionListener, ListenerId, Refusal};
pub use mapping::{Hiding, HostMapping};
pub use pin::{OwnedPin, Pin};
pub use remote::{Attached, BackendFault, BackendId, BackendStatus};
pub use snapshot::{CopyMethod, Saved, SnapshotError};
pub use stats::Stats;
pub use sys::ProbeOutcome;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;

/// The size of a page, and the granularity of state, allocation and mapping.
pub const PAGE_SIZE: u64 = 4096;

/// `PAGE_SIZE` as a shift.
pub(crate) const PAGE_SHIFT: u32 = 12;
