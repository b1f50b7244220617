//! Kernel-parity scenarios: what `gmem selftest` runs.
//!
//! Host-side scenarios check the rules of sections 3 to 5 of the
//! specification (`guest_memfd.md`) on both backings: a sealed memfd
//! (`host/memfd/...`) and a kernel guest_memfd (`host/kvm/...`). Guest-side
//! scenarios (`guest/...`) run the interpreter of [`crate::guest`] on a
//! [`Machine`] and check what the guest and the host see around conversions.
//!
//! Every scenario catches its own panics and reports them as
//! [`Outcome::Fail`]; scenarios that need KVM report [`Outcome::Skip`] where
//! it is unavailable.
//!
//! The faults of raw accesses (to private pages: `SIGSEGV` under guard
//! markers, `SIGBUS` under the remap fallback; past the end of the file:
//! `SIGBUS`) are observed with [`HostMapping::probe`], which makes the access
//! in a forked child.

use std::any::Any;
use std::fmt::{Debug, Display};
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::Duration;

use gmem::falloc::{KEEP_SIZE, PUNCH_HOLE};
use gmem::kvm::{
    ConversionOutcome, ConversionRequest, ExitRegs, GuestIo, HostSupport, KvmError, VcpuStop, Vm,
};
use gmem::{Attribute, ConversionError, Flags, GuestMemfd, HostMapping, PAGE_SIZE};

use crate::guest::{Command, NOTIFY_PORT, fill_page, page_matches, pattern_word};
use crate::machine::{FIRMWARE_SIZE, Machine, Record};

// Errno values of x86_64 Linux (`libc` is not a dependency of this crate).
/// `EAGAIN`.
const EAGAIN: i32 = 11;
/// `EFAULT`.
const EFAULT: i32 = 14;
/// `EBUSY`.
const EBUSY: i32 = 16;
/// `ENODEV`.
const ENODEV: i32 = 19;
/// `EINVAL`.
const EINVAL: i32 = 22;
/// `EOPNOTSUPP`.
const EOPNOTSUPP: i32 = 95;

const P: u64 = PAGE_SIZE;

/// Which side of the VM a scenario exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The VMM's view: files, mappings, pins and conversions called directly.
    Host,
    /// A real KVM guest asking for conversions and touching memory.
    Guest,
}

/// How a scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every check held.
    Pass,
    /// A check failed (or the scenario panicked): what went wrong.
    Fail(String),
    /// The scenario could not run here (no KVM): why.
    Skip(String),
}

/// One self-test scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// A short kebab-case name: `host/<backing>/<rule>` or `guest/<rule>`.
    pub name: &'static str,
    /// Which side it exercises.
    pub side: Side,
    /// Runs it. Never panics: a panic inside is reported as a failure.
    pub run: fn() -> Outcome,
}

/// Every scenario, host side first (each rule on the memfd backing, then on
/// the kernel guest_memfd backing), then the guest side.
pub fn all() -> Vec<Scenario> {
    let mut list = Vec::new();
    macro_rules! host {
        ($name:literal, $rule:path) => {
            list.push(Scenario {
                name: concat!("host/memfd/", $name),
                side: Side::Host,
                run: || guarded(|| host(Kind::Memfd, $rule)),
            });
            list.push(Scenario {
                name: concat!("host/kvm/", $name),
                side: Side::Host,
                run: || guarded(|| host(Kind::Kernel, $rule)),
            });
        };
    }
    macro_rules! guest {
        ($name:literal, $run:path) => {
            list.push(Scenario {
                name: concat!("guest/", $name),
                side: Side::Guest,
                run: || guarded(|| finish($run())),
            });
        };
    }
    // 3. Creation and file operations.
    host!("create-size-einval", create_size_einval);
    host!("create-unknown-flag-einval", create_unknown_flag_einval);
    host!("initial-state", initial_state);
    host!("mmap-without-flag-enodev", mmap_without_flag_enodev);
    host!("mmap-past-end", mmap_past_end);
    host!("past-end-sigbus", past_end_sigbus);
    host!("fallocate-mode-eopnotsupp", fallocate_mode_eopnotsupp);
    host!("fallocate-unaligned-einval", fallocate_unaligned_einval);
    host!("allocate-past-end-einval", allocate_past_end_einval);
    host!("punch-past-end-noop", punch_past_end_noop);
    host!("punch-zeroes-keeps-state", punch_zeroes_keeps_state);
    // 4. Conversion.
    host!("convert-invalid-einval", convert_invalid_einval);
    host!("convert-nothing-to-change", convert_nothing_to_change);
    host!("convert-pinned-eagain", convert_pinned_eagain);
    host!(
        "convert-dropped-pin-one-drain",
        convert_dropped_pin_one_drain
    );
    host!("convert-to-shared-no-check", convert_to_shared_no_check);
    host!("convert-keeps-contents", convert_keeps_contents);
    // 5. References, and gmem's EBUSY and EFAULT.
    host!("punch-pinned-ebusy", punch_pinned_ebusy);
    host!("private-page-efault", private_page_efault);
    host!("private-page-faults", private_page_faults);
    host!("private-page-faults-fallback", private_page_faults_fallback);
    // The guest side.
    guest!(
        "host-writes-guest-reads-after-private",
        host_writes_guest_reads_after_private
    );
    guest!(
        "guest-writes-host-reads-after-shared",
        guest_writes_host_reads_after_shared
    );
    guest!(
        "punched-page-reads-zero-keeps-state",
        punched_page_reads_zero_keeps_state
    );
    guest!(
        "conversion-touches-only-requested-pages",
        conversion_touches_only_requested_pages
    );
    guest!(
        "conversion-waits-for-device-pins",
        conversion_waits_for_device_pins
    );
    guest!("vcpus-convert-own-regions", vcpus_convert_own_regions);
    list
}

// ---- Plumbing ----

/// Why a scenario stopped early.
#[derive(Debug)]
enum Stop {
    Fail(String),
    Skip(String),
}

type Check = Result<(), Stop>;

fn fail(message: impl Into<String>) -> Stop {
    Stop::Fail(message.into())
}

impl From<gmem::Error> for Stop {
    fn from(e: gmem::Error) -> Stop {
        fail(format!("unexpected error: {e} (errno {})", e.errno()))
    }
}

impl From<ConversionError> for Stop {
    fn from(e: ConversionError) -> Stop {
        fail(format!(
            "unexpected conversion error: {e} (errno {})",
            e.errno()
        ))
    }
}

impl From<KvmError> for Stop {
    fn from(e: KvmError) -> Stop {
        fail(format!("unexpected KVM error: {e}"))
    }
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Stop {
        fail(format!("{e:#}"))
    }
}

impl From<gmem::kvm::VcpuError> for Stop {
    fn from(e: gmem::kvm::VcpuError) -> Stop {
        fail(format!("the vCPU failed: {e}"))
    }
}

fn finish(result: Check) -> Outcome {
    match result {
        Ok(()) => Outcome::Pass,
        Err(Stop::Fail(message)) => Outcome::Fail(message),
        Err(Stop::Skip(reason)) => Outcome::Skip(reason),
    }
}

/// Runs `f`, turning a panic into [`Outcome::Fail`].
fn guarded(f: impl FnOnce() -> Outcome) -> Outcome {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Outcome::Fail(format!("panicked: {}", panic_message(&*payload))))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

/// Fails with the message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(fail(format!($($fmt)+)));
        }
    };
}

fn ensure_eq<T: PartialEq + Debug>(what: impl Display, got: T, want: T) -> Check {
    if got == want {
        Ok(())
    } else {
        Err(fail(format!("{what}: got {got:?}, expected {want:?}")))
    }
}

/// Errors that carry a kernel errno.
trait HasErrno: Debug {
    fn errno(&self) -> i32;
}

impl HasErrno for gmem::Error {
    fn errno(&self) -> i32 {
        gmem::Error::errno(self)
    }
}

impl HasErrno for ConversionError {
    fn errno(&self) -> i32 {
        ConversionError::errno(self)
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        EAGAIN => "EAGAIN",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        ENODEV => "ENODEV",
        EINVAL => "EINVAL",
        EOPNOTSUPP => "EOPNOTSUPP",
        _ => "another errno",
    }
}

/// Expects `result` to fail with `errno`; returns the error.
fn expect_errno<T, E: HasErrno>(
    what: impl Display,
    result: Result<T, E>,
    errno: i32,
) -> Result<E, Stop> {
    match result {
        Ok(_) => Err(fail(format!(
            "{what}: succeeded, expected {}",
            errno_name(errno)
        ))),
        Err(e) if e.errno() == errno => Ok(e),
        Err(e) => Err(fail(format!(
            "{what}: failed with errno {} ({}): {e:?}, expected {} ({errno})",
            e.errno(),
            errno_name(e.errno()),
            errno_name(errno)
        ))),
    }
}

/// The offset a host-side error names (the first private or pinned page).
fn error_offset(e: &gmem::Error) -> Option<u64> {
    match e {
        gmem::Error::Private { offset } | gmem::Error::Pinned { offset } => Some(*offset),
        _ => None,
    }
}

/// Whether this host can run the kernel guest_memfd scenarios.
fn kvm_support() -> Result<HostSupport, Stop> {
    let support = HostSupport::probe().map_err(|e| Stop::Skip(format!("KVM unavailable: {e}")))?;
    let needed = (Flags::MMAP | Flags::INIT_SHARED).bits();
    if !support.guest_memfd || support.guest_memfd_flags & needed != needed {
        return Err(Stop::Skip(format!(
            "the host's guest_memfd lacks MMAP | INIT_SHARED (guest_memfd: {}, flags: {:#x})",
            support.guest_memfd, support.guest_memfd_flags
        )));
    }
    Ok(support)
}

// ---- Host side ----

/// The backing a host scenario runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Memfd,
    Kernel,
}

/// Creates files on one backing.
struct Env {
    vm: Option<Vm>,
}

impl Env {
    fn open(kind: Kind) -> Result<Env, Stop> {
        match kind {
            Kind::Memfd => Ok(Env { vm: None }),
            Kind::Kernel => {
                kvm_support()?;
                Ok(Env {
                    vm: Some(Vm::new()?),
                })
            }
        }
    }

    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, gmem::Error> {
        self.create_with(size, flags, gmem::Options::default())
    }

    fn create_with(
        &self,
        size: u64,
        flags: Flags,
        options: gmem::Options,
    ) -> Result<GuestMemfd, gmem::Error> {
        match &self.vm {
            None => GuestMemfd::with_options(size, flags, options),
            Some(vm) => vm.create_guest_memfd_with(size, flags, options),
        }
    }

    /// A mappable file of `pages` pages, all shared.
    fn shared(&self, pages: u64) -> Result<GuestMemfd, Stop> {
        Ok(self.create(pages * P, Flags::MMAP | Flags::INIT_SHARED)?)
    }
}

fn host(kind: Kind, rule: fn(&Env) -> Check) -> Outcome {
    finish(Env::open(kind).and_then(|env| rule(&env)))
}

/// Reads `len` bytes at `offset` through the mapping.
fn read_vec(map: &HostMapping, offset: u64, len: u64) -> Result<Vec<u8>, Stop> {
    let mut buf = vec![0u8; len as usize];
    map.read(offset, &mut buf)?;
    Ok(buf)
}

/// A recognisable, page-varying byte pattern.
fn bytes(len: u64, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(7) % 251) as u8 ^ salt)
        .collect()
}

/// Expects every page of `[0, pages)` to be `want`.
fn expect_all(mem: &GuestMemfd, pages: u64, want: Attribute, when: &str) -> Check {
    for page in 0..pages {
        ensure_eq(
            format_args!("state of page {page} {when}"),
            mem.attribute(page * P)?,
            want,
        )?;
    }
    Ok(())
}

fn create_size_einval(env: &Env) -> Check {
    for size in [0, 1, P - 1, P + 1, 3 * P + 17] {
        expect_errno(
            format_args!("create of size {size}"),
            env.create(size, Flags::MMAP),
            EINVAL,
        )?;
    }
    ensure_eq(
        "size of a one-page file",
        env.create(P, Flags::empty())?.size(),
        P,
    )
}

fn create_unknown_flag_einval(env: &Env) -> Check {
    ensure_eq("GUEST_MEMFD_FLAG_MMAP", Flags::MMAP.bits(), 1)?;
    ensure_eq("GUEST_MEMFD_FLAG_INIT_SHARED", Flags::INIT_SHARED.bits(), 2)?;
    for bits in [1 << 2, 1 << 63, 0x7] {
        expect_errno(
            format_args!("create with flags {bits:#x}"),
            env.create(P, Flags::from_bits_retain(bits)),
            EINVAL,
        )?;
    }
    env.create(P, Flags::MMAP | Flags::INIT_SHARED)?;
    Ok(())
}

fn initial_state(env: &Env) -> Check {
    let private = env.create(4 * P, Flags::MMAP)?;
    let shared = env.shared(4)?;
    expect_all(&private, 4, Attribute::Private, "without INIT_SHARED")?;
    expect_all(&shared, 4, Attribute::Shared, "with INIT_SHARED")?;
    ensure_eq(
        "attribute of the last byte",
        shared.attribute(4 * P - 1)?,
        Attribute::Shared,
    )?;
    ensure_eq("private pages counted", private.stats().pages_private, 4)?;
    ensure_eq("shared pages counted", shared.stats().pages_shared, 4)?;
    expect_errno(
        "attribute at the end of the file",
        shared.attribute(4 * P),
        EINVAL,
    )?;
    // A private page is private to the host from the start.
    let map = private.mmap()?;
    expect_errno(
        "host read of an initially private page",
        map.read(0, &mut [0u8; 1]),
        EFAULT,
    )?;
    Ok(())
}

fn mmap_without_flag_enodev(env: &Env) -> Check {
    let mem = env.create(P, Flags::INIT_SHARED)?;
    expect_errno("mmap without MMAP", mem.mmap(), ENODEV)?;
    expect_errno("mmap_len without MMAP", mem.mmap_len(2 * P), ENODEV)?;
    expect_errno("zero-length mmap", env.shared(1)?.mmap_len(0), EINVAL)?;
    let map = env.shared(1)?.mmap()?;
    ensure_eq("length of a whole-file mapping", map.len(), P)
}

/// A mapping longer than the file is allowed and pages inside work. (The
/// `SIGBUS` past the end needs a forked child: see the module comment.)
fn mmap_past_end(env: &Env) -> Check {
    let mem = env.shared(2)?;
    let map = mem.mmap_len(4 * P - 100)?;
    ensure_eq("mapping length, rounded up to pages", map.len(), 4 * P)?;
    map.write(P, b"inside")?;
    ensure_eq(
        "bytes inside the file",
        read_vec(&map, P, 6)?,
        b"inside".to_vec(),
    )?;
    expect_errno(
        "copy from the end of the file",
        map.read(2 * P, &mut [0u8; 6]),
        EINVAL,
    )?;
    expect_errno(
        "copy across the end of the file",
        map.write(2 * P - 3, b"abcd"),
        EINVAL,
    )?;
    ensure_eq(
        "bytes inside after failed copies",
        read_vec(&map, P, 6)?,
        b"inside".to_vec(),
    )
}

/// `SIGBUS` on x86_64 Linux.
const SIGBUS: i32 = 7;
/// `SIGSEGV` on x86_64 Linux.
const SIGSEGV: i32 = 11;

/// How a raw access in a child ended, as text.
fn raw_access(map: &HostMapping, offset: u64) -> Result<&'static str, Stop> {
    Ok(match map.probe(offset, false)? {
        gmem::ProbeOutcome::Completed => "completed",
        gmem::ProbeOutcome::Signal(SIGBUS) => "SIGBUS",
        gmem::ProbeOutcome::Signal(SIGSEGV) => "SIGSEGV",
        gmem::ProbeOutcome::Signal(_) => "another signal",
    })
}

/// The fault a raw access to a private page of `map` raises, as text.
fn private_fault(map: &HostMapping) -> &'static str {
    match map.hiding() {
        gmem::Hiding::GuardMarkers => "SIGSEGV",
        gmem::Hiding::EmptyFileRemap => "SIGBUS",
    }
}

fn past_end_sigbus(env: &Env) -> Check {
    let mem = env.shared(2)?;
    let map = mem.mmap_len(4 * P)?;
    ensure_eq(
        "raw access inside the file",
        raw_access(&map, 2 * P - 1)?,
        "completed",
    )?;
    ensure_eq(
        "raw access at the end of the file",
        raw_access(&map, 2 * P)?,
        "SIGBUS",
    )?;
    ensure_eq(
        "raw access past the end",
        raw_access(&map, 4 * P - 1)?,
        "SIGBUS",
    )
}

fn private_page_faults(env: &Env) -> Check {
    raw_access_follows_state(env.shared(4)?)
}

/// As `private-page-faults`, with the remap fallback forced (`SIGBUS`).
fn private_page_faults_fallback(env: &Env) -> Check {
    let options = gmem::Options {
        hiding: Some(gmem::Hiding::EmptyFileRemap),
        ..Default::default()
    };
    let mem = env.create_with(4 * P, Flags::MMAP | Flags::INIT_SHARED, options)?;
    ensure_eq(
        "hiding of a fallback mapping",
        mem.mmap()?.hiding(),
        gmem::Hiding::EmptyFileRemap,
    )?;
    raw_access_follows_state(mem)
}

/// Raw accesses to pages 1 and 2 of a 4-page shared file fault after they
/// turn private, in a mapping made before and one made after, and no longer
/// after they turn shared again.
fn raw_access_follows_state(mem: GuestMemfd) -> Check {
    let early = mem.mmap()?;
    mem.set_attributes(P, 2 * P, Attribute::Private)?;
    let late = mem.mmap()?;
    for (which, map) in [
        ("a mapping made before", &early),
        ("a mapping made after", &late),
    ] {
        ensure_eq(
            format!("raw access to a shared page in {which}"),
            raw_access(map, 0)?,
            "completed",
        )?;
        ensure_eq(
            format!("raw access to a private page in {which}"),
            raw_access(map, P)?,
            private_fault(map),
        )?;
        ensure_eq(
            format!("raw access to a private page in {which}"),
            raw_access(map, 3 * P - 1)?,
            private_fault(map),
        )?;
        ensure_eq(
            format!("raw access after the range in {which}"),
            raw_access(map, 3 * P)?,
            "completed",
        )?;
    }
    mem.set_attributes(P, 2 * P, Attribute::Shared)?;
    ensure_eq(
        "raw access after the conversion back",
        raw_access(&early, P)?,
        "completed",
    )
}

fn fallocate_mode_eopnotsupp(env: &Env) -> Check {
    let mem = env.shared(4)?;
    for mode in [
        0,
        PUNCH_HOLE,
        KEEP_SIZE | 0x8,
        KEEP_SIZE | PUNCH_HOLE | 0x10,
        0x8,
    ] {
        expect_errno(
            format_args!("fallocate mode {mode:#x}"),
            mem.fallocate(mode, 0, P),
            EOPNOTSUPP,
        )?;
    }
    mem.fallocate(KEEP_SIZE, 0, P)?;
    mem.fallocate(KEEP_SIZE | PUNCH_HOLE, 0, P)?;
    Ok(())
}

fn fallocate_unaligned_einval(env: &Env) -> Check {
    let mem = env.shared(4)?;
    for mode in [KEEP_SIZE, KEEP_SIZE | PUNCH_HOLE] {
        for (offset, len) in [(1, P), (0, P + 1), (P / 2, P / 2), (0, 0)] {
            expect_errno(
                format_args!("fallocate mode {mode:#x} at {offset:#x}+{len:#x}"),
                mem.fallocate(mode, offset, len),
                EINVAL,
            )?;
        }
    }
    Ok(())
}

fn allocate_past_end_einval(env: &Env) -> Check {
    let mem = env.shared(4)?;
    for (offset, len) in [(4 * P, P), (3 * P, 2 * P), (u64::MAX - P + 1, P)] {
        expect_errno(
            format_args!("allocate {offset:#x}+{len:#x} of a 4-page file"),
            mem.allocate(offset, len),
            EINVAL,
        )?;
    }
    mem.allocate(0, 4 * P)?;
    Ok(())
}

fn punch_past_end_noop(env: &Env) -> Check {
    let mem = env.shared(4)?;
    let map = mem.mmap()?;
    let pattern = bytes(4 * P, 0x11);
    map.write(0, &pattern)?;
    mem.punch_hole(4 * P, P)?;
    mem.punch_hole(100 * P, 8 * P)?;
    ensure!(
        read_vec(&map, 0, 4 * P)? == pattern,
        "a punch past the end changed the contents inside the file"
    );
    expect_all(&mem, 4, Attribute::Shared, "after punches past the end")?;
    // A punch straddling the end frees the part inside only.
    mem.punch_hole(3 * P, 4 * P)?;
    ensure!(
        read_vec(&map, 0, 3 * P)? == pattern[..3 * P as usize],
        "a punch straddling the end changed pages before it"
    );
    ensure!(
        read_vec(&map, 3 * P, P)?.iter().all(|b| *b == 0),
        "a punch straddling the end did not zero the page inside"
    );
    Ok(())
}

fn punch_zeroes_keeps_state(env: &Env) -> Check {
    let mem = env.shared(4)?;
    let map = mem.mmap()?;
    map.write(0, &[7u8; 3 * P as usize])?;
    mem.set_attributes(P, P, Attribute::Private)?;
    mem.punch_hole(0, 2 * P)?;
    ensure_eq(
        "state of the punched shared page",
        mem.attribute(0)?,
        Attribute::Shared,
    )?;
    ensure_eq(
        "state of the punched private page",
        mem.attribute(P)?,
        Attribute::Private,
    )?;
    expect_errno(
        "host read of the punched private page",
        map.read(P, &mut [0u8; 1]),
        EFAULT,
    )?;
    ensure!(
        read_vec(&map, 0, P)?.iter().all(|b| *b == 0),
        "the punched shared page is not zero"
    );
    ensure!(
        read_vec(&map, 2 * P, P)?.iter().all(|b| *b == 7),
        "the page after the punch changed"
    );
    mem.set_attributes(P, P, Attribute::Shared)?;
    ensure!(
        read_vec(&map, P, P)?.iter().all(|b| *b == 0),
        "the punched private page is not zero once shared"
    );
    Ok(())
}

fn convert_invalid_einval(env: &Env) -> Check {
    let mem = env.shared(4)?;
    let cases = [
        (0, 0),
        (1, P),
        (0, P + 1),
        (P, u64::MAX - P + 1),
        (4 * P, P),
        (3 * P, 2 * P),
    ];
    for (offset, len) in cases {
        for to in [Attribute::Private, Attribute::Shared] {
            let err = expect_errno(
                format_args!("conversion of {offset:#x}+{len:#x} to {to:?}"),
                mem.set_attributes(offset, len, to),
                EINVAL,
            )?;
            ensure_eq(
                format_args!("error_offset of {offset:#x}+{len:#x}"),
                err.error_offset(),
                offset,
            )?;
        }
    }
    expect_all(&mem, 4, Attribute::Shared, "after invalid conversions")?;
    let stats = mem.stats();
    ensure_eq(
        "conversions counted",
        (stats.conversions_to_private, stats.conversions_to_shared),
        (0, 0),
    )
}

fn convert_nothing_to_change(env: &Env) -> Check {
    let mem = env.shared(4)?;
    let pin = mem.pin(0, 4 * P)?;
    // Every page is already shared: no unmap, no check, no drain, despite the pin.
    mem.set_attributes(0, 4 * P, Attribute::Shared)?;
    let stats = mem.stats();
    ensure_eq(
        "(to shared, drains, eagain) after a no-op conversion",
        (stats.conversions_to_shared, stats.drains, stats.eagain),
        (0, 0, 0),
    )?;
    drop(pin);
    mem.set_attributes(0, P, Attribute::Private)?;
    let drains = mem.stats().drains;
    mem.set_attributes(0, P, Attribute::Private)?;
    let stats = mem.stats();
    ensure_eq(
        "conversions to private after a repeat",
        stats.conversions_to_private,
        1,
    )?;
    ensure_eq("drains after a repeated conversion", stats.drains, drains)
}

fn convert_pinned_eagain(env: &Env) -> Check {
    let mem = env.shared(8)?;
    let map = mem.mmap()?;
    map.write(2 * P, &[9u8; 16])?;
    let pin = mem.pin(5 * P + 100, 2 * P)?; // pages 5, 6 and 7
    let err = expect_errno(
        "conversion over a live pin",
        mem.set_attributes(2 * P, 6 * P, Attribute::Private),
        EAGAIN,
    )?;
    ensure_eq("error_offset of the EAGAIN", err.error_offset(), 5 * P)?;
    // All or nothing: every page is still shared and mapped.
    expect_all(&mem, 8, Attribute::Shared, "after the EAGAIN")?;
    ensure_eq(
        "host read after the EAGAIN",
        read_vec(&map, 2 * P, 16)?,
        vec![9u8; 16],
    )?;
    map.write(5 * P, b"still")?;
    let stats = mem.stats();
    ensure_eq(
        "(eagain, drains, pins_live) after the EAGAIN",
        (stats.eagain, stats.drains, stats.pins_live),
        (1, 1, 1),
    )?;
    ensure_eq(
        "conversions to private after the EAGAIN",
        stats.conversions_to_private,
        0,
    )?;
    // The offset is clamped to the start of the request.
    let err = expect_errno(
        "conversion inside a live pin",
        mem.set_attributes(6 * P, P, Attribute::Private),
        EAGAIN,
    )?;
    ensure_eq("clamped error_offset", err.error_offset(), 6 * P)?;
    drop(pin);
    mem.set_attributes(2 * P, 6 * P, Attribute::Private)?;
    ensure_eq("pins_live after the drop", mem.stats().pins_live, 0)?;
    ensure_eq(
        "state after the retry",
        mem.attribute(5 * P)?,
        Attribute::Private,
    )
}

fn convert_dropped_pin_one_drain(env: &Env) -> Check {
    let mem = env.shared(4)?;
    drop(mem.pin(P, P)?);
    ensure_eq("drains before the conversion", mem.stats().drains, 0)?;
    mem.set_attributes(0, 4 * P, Attribute::Private)?;
    let stats = mem.stats();
    ensure_eq("drains for a parked release", stats.drains, 1)?;
    ensure_eq("EAGAINs for a parked release", stats.eagain, 0)?;
    // Another thread's parked release is drained too, the thread still alive.
    mem.set_attributes(0, 4 * P, Attribute::Shared)?;
    let (parked, proceed) = (Barrier::new(2), Barrier::new(2));
    let result = std::thread::scope(|s| {
        let other = s.spawn(|| {
            let pinned = mem.pin(2 * P, P).map(drop);
            parked.wait();
            proceed.wait();
            pinned
        });
        parked.wait();
        let result = mem.set_attributes(2 * P, P, Attribute::Private);
        proceed.wait();
        other
            .join()
            .map_err(|_| fail("the pinning thread panicked"))?
            .map_err(Stop::from)?;
        result.map_err(Stop::from)
    });
    result?;
    let stats = mem.stats();
    ensure_eq(
        "drains after another thread's parked release",
        stats.drains,
        2,
    )?;
    ensure_eq(
        "EAGAINs after another thread's parked release",
        stats.eagain,
        0,
    )
}

fn convert_to_shared_no_check(env: &Env) -> Check {
    let mem = env.shared(4)?;
    mem.set_attributes(2 * P, 2 * P, Attribute::Private)?;
    let pin = mem.pin(0, 2 * P)?;
    // Pinned shared pages in the range do not stop a conversion to shared.
    mem.set_attributes(0, 4 * P, Attribute::Shared)?;
    let stats = mem.stats();
    ensure_eq("drains of a conversion to shared", stats.drains, 0)?;
    ensure_eq("EAGAINs of a conversion to shared", stats.eagain, 0)?;
    expect_all(&mem, 4, Attribute::Shared, "after the conversion to shared")?;
    drop(pin);
    Ok(())
}

fn convert_keeps_contents(env: &Env) -> Check {
    let mem = env.shared(4)?;
    let map = mem.mmap()?;
    let pattern = bytes(4 * P, 0x5a);
    map.write(0, &pattern)?;
    mem.set_attributes(0, 4 * P, Attribute::Private)?;
    mem.set_attributes(0, 4 * P, Attribute::Shared)?;
    ensure!(
        read_vec(&map, 0, 4 * P)? == pattern,
        "contents changed through shared -> private -> shared"
    );
    // Written while shared, read through a pin after a round trip.
    mem.set_attributes(P, P, Attribute::Private)?;
    mem.set_attributes(P, P, Attribute::Shared)?;
    let pin = mem.pin(P, 10)?;
    let mut ten = [0u8; 10];
    pin.read(0, &mut ten)?;
    ensure!(
        ten[..] == pattern[P as usize..P as usize + 10],
        "a pin read different bytes after a round trip"
    );
    // From private first: a file created private, shared, written, and back.
    let private = env.create(2 * P, Flags::MMAP)?;
    let map = private.mmap()?;
    private.set_attributes(0, 2 * P, Attribute::Shared)?;
    map.write(0, &pattern[..2 * P as usize])?;
    private.set_attributes(0, 2 * P, Attribute::Private)?;
    private.set_attributes(0, 2 * P, Attribute::Shared)?;
    ensure!(
        read_vec(&map, 0, 2 * P)? == pattern[..2 * P as usize],
        "contents changed through private -> shared -> private -> shared"
    );
    Ok(())
}

fn punch_pinned_ebusy(env: &Env) -> Check {
    let mem = env.shared(4)?;
    let map = mem.mmap()?;
    map.write(0, &[3u8; 4 * P as usize])?;
    let pin = mem.pin(2 * P, 1)?;
    let err = expect_errno("punch over a pinned page", mem.punch_hole(0, 4 * P), EBUSY)?;
    ensure_eq("offset of the EBUSY", error_offset(&err), Some(2 * P))?;
    ensure!(
        read_vec(&map, 0, 4 * P)?.iter().all(|b| *b == 3),
        "a failed punch freed something"
    );
    drop(pin);
    mem.punch_hole(0, 4 * P)?;
    ensure!(
        read_vec(&map, 0, 4 * P)?.iter().all(|b| *b == 0),
        "the punch after the drop did not zero"
    );
    Ok(())
}

fn private_page_efault(env: &Env) -> Check {
    let mem = env.shared(4)?;
    let map = mem.mmap()?;
    mem.set_attributes(2 * P, P, Attribute::Private)?;
    let mut buf = vec![0u8; 2 * P as usize];
    let err = expect_errno(
        "read across a private page",
        map.read(P + 10, &mut buf),
        EFAULT,
    )?;
    ensure_eq(
        "offset of the read's EFAULT",
        error_offset(&err),
        Some(2 * P),
    )?;
    let err = expect_errno(
        "write into a private page",
        map.write(2 * P + 5, b"x"),
        EFAULT,
    )?;
    ensure_eq(
        "offset of the write's EFAULT",
        error_offset(&err),
        Some(2 * P),
    )?;
    let err = expect_errno("pin across a private page", mem.pin(P, 2 * P), EFAULT)?;
    ensure_eq(
        "offset of the pin's EFAULT",
        error_offset(&err),
        Some(2 * P),
    )?;
    ensure_eq("pins_live after the failed pin", mem.stats().pins_live, 0)?;
    // The neighbours stay accessible.
    map.read(0, &mut buf)?;
    map.write(3 * P, b"y")?;
    drop(mem.pin(3 * P, P)?);
    expect_errno("pin past the end", mem.pin(4 * P, 1), EINVAL)?;
    expect_errno("empty pin", mem.pin(0, 0), EINVAL)?;
    Ok(())
}

// ---- Guest side ----

/// Guest memory past the firmware area, in pages.
const GUEST_PAGES: u64 = 16;
/// The first page the guest may convert.
const BASE: u64 = FIRMWARE_SIZE;

fn machine(initial: Attribute) -> Result<Machine, Stop> {
    kvm_support()?;
    Ok(Machine::new(FIRMWARE_SIZE + GUEST_PAGES * P, initial)?)
}

fn gpa(page: u64) -> u32 {
    (BASE + page * P) as u32
}

/// Runs `commands` on vCPU `id` until it halts.
fn run_vcpu(machine: &Machine, id: u64, commands: &[Command], io: &mut dyn GuestIo) -> Check {
    let stop = machine.vcpu(id, commands)?.run(io)?;
    ensure_eq(
        format_args!("how vCPU {id} stopped"),
        stop,
        VcpuStop::Halted,
    )
}

/// A [`Record`] that also runs a host action at each `Notify`, collecting
/// the action's failures.
struct Hooked<F> {
    record: Record,
    on_notify: F,
    failures: Vec<String>,
}

impl<F: FnMut(u32) -> Check> Hooked<F> {
    fn new(on_notify: F) -> Self {
        Hooked {
            record: Record::default(),
            on_notify,
            failures: Vec::new(),
        }
    }

    /// Runs `commands` on vCPU `id` until it halts; returns the record,
    /// unless a host action failed (that failure first: it stops the vCPU).
    fn run(mut self, machine: &Machine, id: u64, commands: &[Command]) -> Result<Record, Stop> {
        let stopped = run_vcpu(machine, id, commands, &mut self);
        if let Some(first) = self.failures.into_iter().next() {
            return Err(fail(first));
        }
        stopped.map(|()| self.record)
    }
}

impl<F: FnMut(u32) -> Check> GuestIo for Hooked<F> {
    fn io_out(&mut self, vcpu: u64, port: u16, data: &[u8], regs: &ExitRegs) -> ControlFlow<()> {
        if port == NOTIFY_PORT {
            match (self.on_notify)(regs.rbx as u32) {
                Ok(()) => {}
                Err(Stop::Fail(message) | Stop::Skip(message)) => {
                    self.failures.push(message);
                    return ControlFlow::Break(());
                }
            }
        }
        self.record.io_out(vcpu, port, data, regs)
    }

    fn converted(&mut self, request: &ConversionRequest, outcome: &ConversionOutcome) {
        self.record.converted(request, outcome);
    }
}

/// Writes the pattern of `seed` to `pages` pages from `first`, through the
/// host mapping.
fn host_fill(machine: &Machine, first: u64, pages: u64, seed: u32) -> Check {
    let mut page = vec![0u8; P as usize];
    for i in first..first + pages {
        fill_page(&mut page, seed, u64::from(gpa(i)));
        machine.map.write(u64::from(gpa(i)), &page)?;
    }
    Ok(())
}

/// Expects the pattern of `seed` in `pages` pages from `first`, through the
/// host mapping.
fn host_expect(machine: &Machine, first: u64, pages: u64, seed: u32) -> Check {
    for i in first..first + pages {
        let page = read_vec(&machine.map, u64::from(gpa(i)), P)?;
        ensure!(
            page_matches(&page, seed, u64::from(gpa(i))),
            "the host does not see the pattern of {seed:#x} at {:#x}",
            gpa(i)
        );
    }
    Ok(())
}

fn expect_range(mem: &GuestMemfd, first: u64, pages: u64, want: Attribute, when: &str) -> Check {
    for i in first..first + pages {
        ensure_eq(
            format_args!("state of {:#x} {when}", gpa(i)),
            mem.attribute(u64::from(gpa(i)))?,
            want,
        )?;
    }
    Ok(())
}

fn expect_quiet(record: &Record) -> Check {
    ensure!(
        record.unknown.is_empty(),
        "the guest wrote to unknown ports {:?}",
        record.unknown
    );
    Ok(())
}

/// (a) The guest reads what the host wrote before a conversion to private.
fn host_writes_guest_reads_after_private() -> Check {
    const SEED: u32 = 0xa5a5_0001;
    let machine = machine(Attribute::Shared)?;
    host_fill(&machine, 0, 4, SEED)?;
    let record = machine.run(&[
        Command::Convert {
            gpa: gpa(0),
            pages: 4,
            to: Attribute::Private,
        },
        Command::Check {
            gpa: gpa(0),
            pages: 4,
            seed: SEED,
        },
        Command::Read { gpa: gpa(1) },
    ])?;
    expect_quiet(&record)?;
    ensure_eq("conversion results", record.results, vec![(gpa(0), 0)])?;
    ensure_eq("check results", record.checks, vec![(gpa(0), 4, 0)])?;
    ensure_eq(
        "dword read by the guest",
        record.reads,
        vec![(gpa(1), pattern_word(SEED, u64::from(gpa(1))))],
    )?;
    expect_range(
        &machine.mem,
        0,
        4,
        Attribute::Private,
        "after the guest's conversion",
    )?;
    expect_range(
        &machine.mem,
        4,
        1,
        Attribute::Shared,
        "next to the conversion",
    )?;
    let err = expect_errno(
        "host read of the converted page",
        machine.map.read(u64::from(gpa(0)), &mut [0u8; 4]),
        EFAULT,
    )?;
    ensure_eq(
        "offset of the EFAULT",
        error_offset(&err),
        Some(u64::from(gpa(0))),
    )
}

/// (b) The host reads what the guest wrote before a conversion to shared.
fn guest_writes_host_reads_after_shared() -> Check {
    const SEED: u32 = 0x5a5a_0002;
    let machine = machine(Attribute::Shared)?;
    // Something else first, so the host cannot see the pattern by chance.
    machine
        .map
        .write(u64::from(gpa(0)), &vec![0xee; 4 * P as usize])?;
    let record = machine.run(&[
        Command::Convert {
            gpa: gpa(0),
            pages: 4,
            to: Attribute::Private,
        },
        Command::Fill {
            gpa: gpa(0),
            pages: 4,
            seed: SEED,
        },
        Command::Convert {
            gpa: gpa(0),
            pages: 4,
            to: Attribute::Shared,
        },
    ])?;
    expect_quiet(&record)?;
    ensure_eq(
        "conversion results",
        record.results,
        vec![(gpa(0), 0), (gpa(0), 0)],
    )?;
    expect_range(
        &machine.mem,
        0,
        4,
        Attribute::Shared,
        "after the round trip",
    )?;
    host_expect(&machine, 0, 4, SEED)
}

/// (c) A punched page reads zero for both sides and keeps its state.
fn punched_page_reads_zero_keeps_state() -> Check {
    const SEED: u32 = 0x1234_0003;
    let machine = machine(Attribute::Shared)?;
    host_fill(&machine, 0, 2, SEED)?;
    let (mem, map) = (&machine.mem, &machine.map);
    let io = Hooked::new(|_| {
        ensure_eq(
            "state before the punch",
            mem.attribute(u64::from(gpa(0)))?,
            Attribute::Private,
        )?;
        mem.punch_hole(u64::from(gpa(0)), P)?;
        ensure_eq(
            "state after the punch",
            mem.attribute(u64::from(gpa(0)))?,
            Attribute::Private,
        )?;
        expect_errno(
            "host read of the punched private page",
            map.read(u64::from(gpa(0)), &mut [0u8; 4]),
            EFAULT,
        )?;
        Ok(())
    });
    let record = io.run(
        &machine,
        0,
        &[
            Command::Convert {
                gpa: gpa(0),
                pages: 2,
                to: Attribute::Private,
            },
            // The guest sees the host's pattern before the punch.
            Command::Read { gpa: gpa(0) },
            Command::Notify { a: 1, b: 0, c: 0 },
            Command::Read { gpa: gpa(0) },
            Command::Read {
                gpa: gpa(0) + P as u32 - 4,
            },
            // The page next to it was not punched.
            Command::Check {
                gpa: gpa(1),
                pages: 1,
                seed: SEED,
            },
            Command::Convert {
                gpa: gpa(0),
                pages: 1,
                to: Attribute::Shared,
            },
        ],
    )?;
    expect_quiet(&record)?;
    ensure_eq(
        "conversion results",
        record.results,
        vec![(gpa(0), 0), (gpa(0), 0)],
    )?;
    ensure_eq(
        "dwords read by the guest",
        record.reads,
        vec![
            (gpa(0), pattern_word(SEED, u64::from(gpa(0)))),
            (gpa(0), 0),
            (gpa(0) + P as u32 - 4, 0),
        ],
    )?;
    ensure_eq(
        "check of the unpunched page",
        record.checks,
        vec![(gpa(1), 1, 0)],
    )?;
    expect_range(
        mem,
        0,
        1,
        Attribute::Shared,
        "after the guest's conversion back",
    )?;
    expect_range(mem, 1, 1, Attribute::Private, "next to the punch")?;
    ensure!(
        read_vec(map, u64::from(gpa(0)), P)?.iter().all(|b| *b == 0),
        "the host does not read zeros from the punched page once shared"
    );
    Ok(())
}

/// (d) Conversions touch exactly the requested pages.
fn conversion_touches_only_requested_pages() -> Check {
    const K: u64 = 3;
    let machine = machine(Attribute::Shared)?;
    let (mem, map) = (&machine.mem, &machine.map);
    // At each notification `a`, page K + i is expected private iff bit i of
    // `a` is set, for i in 0..5.
    let io = Hooked::new(|mask| {
        for i in 0..5 {
            let offset = u64::from(gpa(K + i));
            let private = mask & (1 << i) != 0;
            let want = if private {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            let when = format!("at step {mask:#07b}");
            ensure_eq(
                format_args!("state of page k+{i} {when}"),
                mem.attribute(offset)?,
                want,
            )?;
            let read = map.read(offset, &mut [0u8; 8]);
            if private {
                let err =
                    expect_errno(format_args!("host read of page k+{i} {when}"), read, EFAULT)?;
                ensure_eq(
                    format_args!("EFAULT offset of page k+{i}"),
                    error_offset(&err),
                    Some(offset),
                )?;
            } else {
                read.map_err(|e| fail(format!("host read of page k+{i} {when}: {e}")))?;
            }
        }
        Ok(())
    });
    let record = io.run(
        &machine,
        0,
        &[
            Command::Notify { a: 0, b: 0, c: 0 },
            Command::Convert {
                gpa: gpa(K + 1),
                pages: 3,
                to: Attribute::Private,
            },
            Command::Notify {
                a: 0b01110,
                b: 0,
                c: 0,
            },
            Command::Convert {
                gpa: gpa(K + 2),
                pages: 1,
                to: Attribute::Shared,
            },
            Command::Notify {
                a: 0b01010,
                b: 0,
                c: 0,
            },
            Command::Convert {
                gpa: gpa(K),
                pages: 5,
                to: Attribute::Private,
            },
            Command::Notify {
                a: 0b11111,
                b: 0,
                c: 0,
            },
        ],
    )?;
    expect_quiet(&record)?;
    ensure_eq(
        "conversion results",
        record.results,
        vec![(gpa(K + 1), 0), (gpa(K + 2), 0), (gpa(K), 0)],
    )?;
    ensure_eq("notifications served", record.notifies.len(), 4)?;
    let stats = mem.stats();
    ensure_eq("pages private at the end", stats.pages_private, 5)
}

/// (e) A conversion the guest asks for while a device thread holds pins on
/// the same pages resolves, after the VMM asks the device to let go, without
/// `SIGBUS` and without losing what the device wrote.
fn conversion_waits_for_device_pins() -> Check {
    const SEED: u32 = 0xd00d_0005;
    const PAGES: u64 = 4;
    let machine = machine(Attribute::Shared)?;
    let (start, end) = (u64::from(gpa(0)), u64::from(gpa(PAGES)));
    let (let_go_tx, let_go_rx) = mpsc::channel::<(u64, u64)>();
    let let_go_tx = Mutex::new(let_go_tx);
    machine.vm.set_let_go(Arc::new(move |gpa, len| {
        let _ = let_go_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((gpa, len));
    }));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mem = machine.mem.clone();
    let device = std::thread::spawn(move || -> Result<u32, String> {
        let pinned = (|| {
            let pin = mem.pin(start, end - start)?;
            let mut page = vec![0u8; P as usize];
            for i in 0..PAGES {
                fill_page(&mut page, SEED, start + i * P);
                pin.write(i * P, &page)?;
            }
            Ok::<_, gmem::Error>(pin)
        })();
        let pin = match pinned {
            Ok(pin) => pin,
            Err(e) => {
                let _ = ready_tx.send(Err(format!("the device could not pin: {e}")));
                return Err(e.to_string());
            }
        };
        let _ = ready_tx.send(Ok(()));
        // Hold the pin until the VMM asks to let go of an overlapping range.
        let mut requests = 0;
        loop {
            match let_go_rx.recv_timeout(Duration::from_secs(1)) {
                Ok((gpa, len)) => {
                    requests += 1;
                    if gpa < end && start < gpa + len {
                        drop(pin);
                        return Ok(requests);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "the VMM did not ask the device to let go of {start:#x}..{end:#x} \
                         within 1 s ({requests} requests for other ranges)"
                    ));
                }
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(2))
        .map_err(|_| fail("the device thread did not start"))?
        .map_err(fail)?;
    let record = machine.run(&[
        Command::Convert {
            gpa: gpa(0),
            pages: PAGES as u32,
            to: Attribute::Private,
        },
        Command::Check {
            gpa: gpa(0),
            pages: PAGES as u32,
            seed: SEED,
        },
        Command::Convert {
            gpa: gpa(0),
            pages: PAGES as u32,
            to: Attribute::Shared,
        },
    ]);
    let device = device
        .join()
        .map_err(|_| fail("the device thread panicked"))?;
    let record = record?;
    expect_quiet(&record)?;
    ensure_eq(
        "conversion results",
        record.results.clone(),
        vec![(gpa(0), 0), (gpa(0), 0)],
    )?;
    let requests = device.map_err(fail)?;
    ensure!(requests >= 1, "the device was never asked to let go");
    let (request, outcome) = record
        .conversions
        .first()
        .ok_or_else(|| fail("no conversion was recorded"))?;
    ensure_eq("the first request's target", request.to, Attribute::Private)?;
    ensure!(
        outcome.result.is_ok() && outcome.attempts >= 2,
        "the conversion over the device's pin should succeed after >= 2 attempts: {outcome:?}"
    );
    ensure_eq(
        "check of the device's pattern",
        record.checks,
        vec![(gpa(0), PAGES as u32, 0)],
    )?;
    let totals = machine.vm.conversion_totals();
    ensure!(
        totals.eagain_retries >= 1 && totals.resolved_after_retry >= 1 && totals.failed == 0,
        "conversion totals: {totals:?}"
    );
    ensure_eq("pins live at the end", machine.mem.stats().pins_live, 0)?;
    host_expect(&machine, 0, PAGES, SEED)
}

/// (f) Two vCPUs convert their own regions at once.
const OWN_VCPUS: u64 = 2;
const OWN_PAGES: u64 = 4;
const OWN_ROUNDS: u32 = 3;

/// The first page of vCPU `id`'s region (a shared page between regions).
fn own_region(id: u64) -> u64 {
    id * (OWN_PAGES + 1)
}

fn own_seed(id: u64, round: u32) -> u32 {
    0xc0de_0000 ^ ((id as u32) << 8) ^ round
}

/// vCPU `id`'s rounds over its region; vCPU 0 leaves it private.
fn own_commands(id: u64) -> Vec<Command> {
    let (gpa, pages) = (gpa(own_region(id)), OWN_PAGES as u32);
    let mut commands = Vec::new();
    for round in 0..OWN_ROUNDS {
        let seed = own_seed(id, round);
        commands.extend([
            Command::Convert {
                gpa,
                pages,
                to: Attribute::Private,
            },
            Command::Fill { gpa, pages, seed },
            Command::Convert {
                gpa,
                pages,
                to: Attribute::Shared,
            },
            Command::Check { gpa, pages, seed },
        ]);
    }
    if id == 0 {
        commands.push(Command::Convert {
            gpa,
            pages,
            to: Attribute::Private,
        });
    }
    commands
}

/// How a vCPU stopped, and what it reported.
type VcpuRun = (Result<VcpuStop, gmem::kvm::VcpuError>, Record);

/// Runs one vCPU per command list at once; returns how each stopped and
/// what it reported.
fn run_at_once(machine: &Machine, lists: &[Vec<Command>]) -> Result<Vec<VcpuRun>, Stop> {
    let mut vcpus = Vec::new();
    for (id, commands) in lists.iter().enumerate() {
        vcpus.push(machine.vcpu(id as u64, commands)?);
    }
    let start = Barrier::new(vcpus.len());
    std::thread::scope(|s| {
        let threads: Vec<_> = vcpus
            .into_iter()
            .map(|mut vcpu| {
                let start = &start;
                s.spawn(move || {
                    let mut record = Record::default();
                    start.wait();
                    (vcpu.run(&mut record), record)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().map_err(|_| fail("a vCPU thread panicked")))
            .collect()
    })
}

fn vcpus_convert_own_regions() -> Check {
    let machine = machine(Attribute::Shared)?;
    let lists: Vec<_> = (0..OWN_VCPUS).map(own_commands).collect();
    for (id, (stop, record)) in run_at_once(&machine, &lists)?.into_iter().enumerate() {
        let id = id as u64;
        ensure_eq(
            format_args!("how vCPU {id} stopped"),
            stop?,
            VcpuStop::Halted,
        )?;
        expect_quiet(&record)?;
        let first = gpa(own_region(id));
        let conversions = OWN_ROUNDS as usize * 2 + usize::from(id == 0);
        ensure_eq(
            format_args!("vCPU {id}'s conversion results"),
            record.results,
            vec![(first, 0); conversions],
        )?;
        ensure_eq(
            format_args!("vCPU {id}'s check results"),
            record.checks,
            vec![(first, OWN_PAGES as u32, 0); OWN_ROUNDS as usize],
        )?;
        ensure!(
            record.conversions.iter().all(|(r, _)| r.vcpu == id),
            "vCPU {id} recorded another vCPU's conversion"
        );
    }
    let mem = &machine.mem;
    expect_range(
        mem,
        own_region(0),
        OWN_PAGES,
        Attribute::Private,
        "at the end (vCPU 0)",
    )?;
    expect_range(mem, OWN_PAGES, 1, Attribute::Shared, "between the regions")?;
    expect_range(
        mem,
        own_region(1),
        OWN_PAGES,
        Attribute::Shared,
        "at the end (vCPU 1)",
    )?;
    host_expect(
        &machine,
        own_region(1),
        OWN_PAGES,
        own_seed(1, OWN_ROUNDS - 1),
    )?;
    let totals = machine.vm.conversion_totals();
    let served = u64::from(OWN_ROUNDS) * 4 + 1;
    ensure_eq(
        "(requests, succeeded) served",
        (totals.requests, totals.succeeded),
        (served, served),
    )
}
