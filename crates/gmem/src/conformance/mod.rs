//! The host rules of the specification (`guest_memfd.md`, sections 3 to 5,
//! and gmem's own in section 8) as one table, run by the library's tests on
//! each backing and by `gmem selftest`.
//!
//! A [`Rule`] is a name (kebab-case, as the self-test shows it after
//! `host/<backing>/`), the section it checks, and a function of a
//! [`Backing`] that makes its own files, checks, and says what it expected
//! and what it saw where a check fails ([`Failure`]). [`run`] opens a
//! backing (a sealed memfd, or a kernel guest_memfd on a KVM VM: skipped
//! where the host has none) and runs one rule on it, panics included.
//!
//! Raw accesses (to a private page: `SIGSEGV` under guard markers, `SIGBUS`
//! under the remap fallback and in runs of 2 MiB or more; past the end of
//! the file: `SIGBUS`) are made in a forked child with
//! [`HostMapping::probe`].
//!
//! Not a stable API: this module exists for gmem's tests and command
//! (feature `conformance`).

mod rules;

use std::any::Any;
use std::fmt::{self, Debug, Display};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::{Attribute, BackingKind, ConversionError, Error, Flags, GuestMemfd, HostMapping};
use crate::{Hiding, Options, PAGE_SIZE, ProbeOutcome};

pub use rules::RULES;

/// One host rule of the specification.
#[derive(Clone, Copy)]
pub struct Rule {
    /// Kebab-case: the self-test names it `host/<backing>/<name>`.
    pub name: &'static str,
    /// The section of `guest_memfd.md` it checks.
    pub section: &'static str,
    /// Checks the rule on files of a backing.
    pub check: fn(&dyn Backing) -> Result<(), Failure>,
}

impl Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (section {})", self.name, self.section)
    }
}

/// The rule named `name`.
pub fn rule(name: &str) -> Option<&'static Rule> {
    RULES.iter().find(|rule| rule.name == name)
}

/// A check that did not hold: what was checked, what was expected, and what
/// was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What was checked.
    pub check: String,
    /// What the rule expects.
    pub expected: String,
    /// What happened.
    pub seen: String,
}

impl Failure {
    /// A failure of `check`: `expected`, but `seen`.
    pub fn new(check: impl Display, expected: impl Display, seen: impl Display) -> Failure {
        Failure {
            check: check.to_string(),
            expected: expected.to_string(),
            seen: seen.to_string(),
        }
    }
}

impl Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, seen {}",
            self.check, self.expected, self.seen
        )
    }
}

impl std::error::Error for Failure {}

/// An error where the rule needed success.
impl<E: HasErrno + Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::new(
            "an operation the rule needs",
            "success",
            format_args!("{e} (errno {})", e.errno()),
        )
    }
}

/// What a rule checks on a backing: how to make files.
pub trait Backing {
    /// Which kind of file it makes.
    fn kind(&self) -> BackingKind;

    /// A new file, as [`GuestMemfd::with_options`].
    fn create_with(&self, size: u64, flags: Flags, options: Options) -> Result<GuestMemfd, Error>;

    /// A new file with the default options.
    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, Error> {
        self.create_with(size, flags, Options::default())
    }

    /// A mappable file of `pages` pages, all shared.
    fn shared(&self, pages: u64) -> Result<GuestMemfd, Failure> {
        Ok(self.create(pages * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED)?)
    }
}

/// Sealed memfds.
#[derive(Debug)]
pub struct Memfd;

impl Backing for Memfd {
    fn kind(&self) -> BackingKind {
        BackingKind::Memfd
    }

    fn create_with(&self, size: u64, flags: Flags, options: Options) -> Result<GuestMemfd, Error> {
        GuestMemfd::with_options(size, flags, options)
    }
}

/// Kernel guest_memfds of one KVM VM.
#[cfg(feature = "kvm")]
#[derive(Debug)]
pub struct KernelGuestMemfd(pub crate::kvm::Vm);

#[cfg(feature = "kvm")]
impl Backing for KernelGuestMemfd {
    fn kind(&self) -> BackingKind {
        BackingKind::KernelGuestMemfd
    }

    fn create_with(&self, size: u64, flags: Flags, options: Options) -> Result<GuestMemfd, Error> {
        self.0.create_guest_memfd_with(size, flags, options)
    }
}

/// Every backing, in the order the self-test runs them.
pub const BACKINGS: [BackingKind; 2] = [BackingKind::Memfd, BackingKind::KernelGuestMemfd];

/// The short name of a backing in scenario names: `memfd` or `kvm`.
pub fn backing_name(kind: BackingKind) -> &'static str {
    match kind {
        BackingKind::Memfd => "memfd",
        BackingKind::KernelGuestMemfd => "kvm",
    }
}

/// How a rule ended on a backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every check held.
    Pass,
    /// A check failed, or the rule panicked.
    Fail(Failure),
    /// The backing is not available here (no KVM): why.
    Skip(String),
}

/// The host's KVM support, or why a guest cannot run here (no usable
/// `/dev/kvm`). Guests run on a kernel guest_memfd where the host has one,
/// and on memfd slots where not.
#[cfg(feature = "kvm")]
pub fn kvm_support() -> Result<crate::kvm::HostSupport, String> {
    crate::kvm::HostSupport::probe().map_err(|e| format!("KVM unavailable: {e}"))
}

/// The host's KVM support, or why the kernel guest_memfd backing cannot run
/// here: no `/dev/kvm`, or no guest_memfd with `MMAP | INIT_SHARED` (the
/// reason then starts with [`NO_GUEST_MEMFD`]).
#[cfg(feature = "kvm")]
pub fn guest_memfd_support() -> Result<crate::kvm::HostSupport, String> {
    let support = kvm_support()?;
    if support.memory_backing() != BackingKind::KernelGuestMemfd {
        return Err(format!(
            "{NO_GUEST_MEMFD} (guest_memfd: {}, flags: {:#x})",
            support.guest_memfd, support.guest_memfd_flags
        ));
    }
    Ok(support)
}

/// How the reason of a skip for want of a kernel guest_memfd begins (on a
/// KVM host without one), as opposed to one for want of KVM.
pub const NO_GUEST_MEMFD: &str = "the host has no guest_memfd with MMAP | INIT_SHARED";

/// Whether a test may skip for `reason` here: `None` if it may, else the
/// environment variable that forbids it. A skip for want of a kernel
/// guest_memfd ([`NO_GUEST_MEMFD`]) is forbidden by
/// `GMEM_REQUIRE_GUEST_MEMFD` (CI on a host with one); any other skip (no
/// KVM) by `GMEM_REQUIRE_KVM` (CI on a host with a usable `/dev/kvm`) or
/// `GMEM_REQUIRE_GUEST_MEMFD`.
pub fn skip_forbidden_by(reason: &str) -> Option<&'static str> {
    let set = |name: &'static str| std::env::var_os(name).is_some().then_some(name);
    let guest_memfd = set("GMEM_REQUIRE_GUEST_MEMFD");
    if reason.starts_with(NO_GUEST_MEMFD) {
        guest_memfd
    } else {
        set("GMEM_REQUIRE_KVM").or(guest_memfd)
    }
}

/// Opens a backing of `kind`: `Err` with the outcome where it cannot be.
fn open(kind: BackingKind) -> Result<Box<dyn Backing>, Outcome> {
    match kind {
        BackingKind::Memfd => Ok(Box::new(Memfd)),
        #[cfg(feature = "kvm")]
        BackingKind::KernelGuestMemfd => {
            guest_memfd_support().map_err(Outcome::Skip)?;
            let vm = crate::kvm::Vm::new()
                .map_err(|e| Outcome::Fail(Failure::new("creating a KVM VM", "success", e)))?;
            Ok(Box::new(KernelGuestMemfd(vm)))
        }
        #[cfg(not(feature = "kvm"))]
        BackingKind::KernelGuestMemfd => Err(Outcome::Skip(
            "gmem was built without the kvm feature".to_owned(),
        )),
    }
}

/// Runs `rule` on a new backing of `kind`; a panic is a failure.
pub fn run(rule: &Rule, kind: BackingKind) -> Outcome {
    let ran = catch_unwind(AssertUnwindSafe(|| {
        let backing = match open(kind) {
            Ok(backing) => backing,
            Err(outcome) => return outcome,
        };
        match (rule.check)(&*backing) {
            Ok(()) => Outcome::Pass,
            Err(failure) => Outcome::Fail(failure),
        }
    }));
    ran.unwrap_or_else(|payload| {
        Outcome::Fail(Failure::new(
            rule.name,
            "no panic",
            format_args!("a panic: {}", panic_message(&*payload)),
        ))
    })
}

/// The text of a panic's payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

// ---- Checks, shared with the self-test's guest-side scenarios ----

/// Fails unless `seen == expected`.
pub fn ensure_eq<T: PartialEq + Debug>(
    check: impl Display,
    seen: T,
    expected: T,
) -> Result<(), Failure> {
    if seen == expected {
        Ok(())
    } else {
        Err(Failure::new(
            check,
            format_args!("{expected:?}"),
            format_args!("{seen:?}"),
        ))
    }
}

/// Fails with `check`, `expected` and `seen` unless `holds`.
pub fn ensure(holds: bool, check: impl Display, expected: &str, seen: &str) -> Result<(), Failure> {
    if holds {
        Ok(())
    } else {
        Err(Failure::new(check, expected, seen))
    }
}

/// Errors that carry a kernel errno.
pub trait HasErrno: Debug {
    /// The errno.
    fn errno(&self) -> i32;
}

impl HasErrno for Error {
    fn errno(&self) -> i32 {
        Error::errno(self)
    }
}

impl HasErrno for ConversionError {
    fn errno(&self) -> i32 {
        ConversionError::errno(self)
    }
}

/// The name of an errno the rules expect.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EAGAIN => "EAGAIN",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EFBIG => "EFBIG",
        libc::ENOMEM => "ENOMEM",
        _ => "another errno",
    }
}

/// Expects `result` to fail with `errno`; returns the error.
pub fn expect_errno<T, E: HasErrno>(
    check: impl Display,
    result: Result<T, E>,
    errno: i32,
) -> Result<E, Failure> {
    let expected = format_args!("{} ({errno})", errno_name(errno)).to_string();
    match result {
        Ok(_) => Err(Failure::new(check, expected, "success")),
        Err(e) if e.errno() == errno => Ok(e),
        Err(e) => Err(Failure::new(
            check,
            expected,
            format_args!("{} ({}): {e:?}", errno_name(e.errno()), e.errno()),
        )),
    }
}

/// The offset a host-side error names (the first private or pinned page).
pub fn error_offset(e: &Error) -> Option<u64> {
    match e {
        Error::Private { offset } | Error::Pinned { offset } => Some(*offset),
        _ => None,
    }
}

/// Reads `len` bytes at `offset` through the mapping.
pub fn read_vec(map: &HostMapping, offset: u64, len: u64) -> Result<Vec<u8>, Failure> {
    let mut buf = vec![0u8; len as usize];
    map.read(offset, &mut buf)?;
    Ok(buf)
}

/// How a raw read of the byte at `offset` ends in a forked child, as text:
/// `completed`, `SIGBUS`, `SIGSEGV` or `signal N`.
pub fn raw_access(map: &HostMapping, offset: u64) -> Result<String, Failure> {
    Ok(match map.probe(offset, false)? {
        ProbeOutcome::Completed => "completed".to_owned(),
        ProbeOutcome::Signal(libc::SIGBUS) => "SIGBUS".to_owned(),
        ProbeOutcome::Signal(libc::SIGSEGV) => "SIGSEGV".to_owned(),
        ProbeOutcome::Signal(other) => format!("signal {other}"),
    })
}

/// Expects raw reads at the offsets of `map` (in forked children) to end as
/// given: `completed`, `SIGBUS` or `SIGSEGV`; `which` names the mapping.
pub fn expect_raw(map: &HostMapping, which: &str, expected: &[(u64, &str)]) -> Result<(), Failure> {
    for &(offset, want) in expected {
        ensure_eq(
            format_args!("raw access at {offset:#x} of {which}"),
            raw_access(map, offset)?,
            want.to_owned(),
        )?;
    }
    Ok(())
}

/// The fault a raw access to a private page of `map` raises, as text, in a
/// run shorter than 2 MiB.
pub fn private_fault(map: &HostMapping) -> &'static str {
    match map.hiding() {
        Hiding::GuardMarkers => "SIGSEGV",
        Hiding::EmptyFileRemap => "SIGBUS",
    }
}

/// Expects every page of `[0, pages)` of `mem` to be `want`.
pub fn expect_all(
    mem: &GuestMemfd,
    pages: u64,
    want: Attribute,
    when: &str,
) -> Result<(), Failure> {
    for page in 0..pages {
        ensure_eq(
            format_args!("state of page {page} {when}"),
            mem.attribute(page * PAGE_SIZE)?,
            want,
        )?;
    }
    Ok(())
}
