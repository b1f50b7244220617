//! The rules, one function each, and the table of them.

use libc::{EAGAIN, EBUSY, EFAULT, EFBIG, EINVAL, ENODEV, ENOMEM, EOPNOTSUPP};

use super::{
    Backing, Failure, Rule, ensure, ensure_eq, error_offset, expect_all, expect_errno, expect_raw,
    private_fault, read_vec,
};
use crate::falloc::{KEEP_SIZE, PUNCH_HOLE};
use crate::{Attribute, BackingKind, Flags, GuestMemfd, Hiding, HostMapping, Options, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

type Check = Result<(), Failure>;

/// The table: a rule a line, `"section" "name" check,`.
macro_rules! rules {
    ($($section:literal $name:literal $check:ident,)*) => {
        &[$(Rule { name: $name, section: $section, check: $check },)*]
    };
}

/// Every host rule, in the order of the specification.
pub static RULES: &[Rule] = rules! {
    // 3. Creation and file operations.
    "3" "create-size-einval" create_size_einval,
    "3" "create-unknown-flag-einval" create_unknown_flag_einval,
    "3" "create-size-past-address-space" create_size_past_address_space,
    "3" "initial-state" initial_state,
    "3" "mmap-without-flag-enodev" mmap_without_flag_enodev,
    "3" "mmap-past-end" mmap_past_end,
    "3" "past-end-sigbus" past_end_sigbus,
    "3" "fallocate-mode-eopnotsupp" fallocate_mode_eopnotsupp,
    "3" "fallocate-unaligned-einval" fallocate_unaligned_einval,
    "3" "fallocate-past-largest-offset-efbig" fallocate_past_largest_offset_efbig,
    "3" "allocate-past-end-einval" allocate_past_end_einval,
    "3" "punch-past-end-noop" punch_past_end_noop,
    "3" "allocate-and-punch-count" allocate_and_punch_count,
    "3" "punch-zeroes-keeps-state" punch_zeroes_keeps_state,
    // 4. Conversion.
    "4" "convert-invalid-einval" convert_invalid_einval,
    "4" "convert-nothing-to-change" convert_nothing_to_change,
    "4" "convert-pinned-eagain" convert_pinned_eagain,
    "4" "convert-dropped-pin-one-drain" convert_dropped_pin_one_drain,
    "4" "convert-to-shared-no-check" convert_to_shared_no_check,
    "4" "convert-keeps-contents" convert_keeps_contents,
    // 5. References, and gmem's EBUSY, EFAULT and faults (section 8).
    "8" "punch-pinned-ebusy" punch_pinned_ebusy,
    "8" "private-page-efault" private_page_efault,
    "5" "pin-allocates-copies-within-range" pin_allocates_copies_within_range,
    "8" "private-page-faults" private_page_faults,
    "8" "private-page-faults-fallback" private_page_faults_fallback,
};

/// A recognisable, page-varying byte pattern.
fn bytes(len: u64, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(7) % 251) as u8 ^ salt)
        .collect()
}

/// Expects `want` at `offset` of `map`, read through the mapping.
fn expect_bytes(map: &HostMapping, offset: u64, want: &[u8], when: &str) -> Check {
    let seen = read_vec(map, offset, want.len() as u64)?;
    ensure_eq(format_args!("bytes at {offset:#x} {when}"), &seen[..], want)
}

/// Expects every byte of `[offset, offset + len)` of `map` to be `byte`.
fn expect_filled(map: &HostMapping, offset: u64, len: u64, byte: u8, what: &str) -> Check {
    let seen = read_vec(map, offset, len)?;
    match seen.iter().position(|b| *b != byte) {
        None => Ok(()),
        Some(at) => Err(Failure::new(
            what,
            format_args!("every byte {byte:#x}"),
            format_args!("{:#x} at {:#x}", seen[at], offset + at as u64),
        )),
    }
}

/// Expects `pages` pages allocated in `mem`, where its backing counts them
/// (a kernel guest_memfd does not account blocks).
fn expect_allocated(backing: &dyn Backing, mem: &GuestMemfd, pages: u64, when: &str) -> Check {
    match mem.stats().pages_allocated {
        None if backing.kind() == BackingKind::KernelGuestMemfd => Ok(()),
        counted => ensure_eq(format_args!("pages allocated {when}"), counted, Some(pages)),
    }
}

fn create_size_einval(backing: &dyn Backing) -> Check {
    for size in [0, 1, P - 1, P + 1, 3 * P + 17] {
        expect_errno(
            format_args!("create of size {size}"),
            backing.create(size, Flags::MMAP),
            EINVAL,
        )?;
    }
    ensure_eq(
        "size of a one-page file",
        backing.create(P, Flags::empty())?.size(),
        P,
    )
}

fn create_unknown_flag_einval(backing: &dyn Backing) -> Check {
    ensure_eq("GUEST_MEMFD_FLAG_MMAP", Flags::MMAP.bits(), 1)?;
    ensure_eq("GUEST_MEMFD_FLAG_INIT_SHARED", Flags::INIT_SHARED.bits(), 2)?;
    for bits in [1 << 2, 1 << 63, 0x7] {
        expect_errno(
            format_args!("create with flags {bits:#x}"),
            backing.create(P, Flags::from_bits_retain(bits)),
            EINVAL,
        )?;
    }
    backing.create(P, Flags::MMAP | Flags::INIT_SHARED)?;
    Ok(())
}

/// A size the address space cannot hold is an error, not an abort.
fn create_size_past_address_space(backing: &dyn Backing) -> Check {
    for size in [1 << 50, 1 << 62, u64::MAX - P + 1] {
        match backing.create(size, Flags::MMAP) {
            Err(e) if [EINVAL, ENOMEM, EFBIG].contains(&e.errno()) => {}
            other => {
                return Err(Failure::new(
                    format_args!("create of size {size:#x}"),
                    "EINVAL, ENOMEM or EFBIG",
                    format_args!("{other:?}"),
                ));
            }
        }
    }
    Ok(())
}

fn initial_state(backing: &dyn Backing) -> Check {
    let private = backing.create(4 * P, Flags::MMAP)?;
    let shared = backing.shared(4)?;
    expect_all(&private, 4, Attribute::Private, "without INIT_SHARED")?;
    expect_all(&shared, 4, Attribute::Shared, "with INIT_SHARED")?;
    ensure_eq(
        "attribute of a byte inside a page",
        shared.attribute(P + 5)?,
        Attribute::Shared,
    )?;
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

fn mmap_without_flag_enodev(backing: &dyn Backing) -> Check {
    let mem = backing.create(P, Flags::INIT_SHARED)?;
    expect_errno("mmap without MMAP", mem.mmap(), ENODEV)?;
    expect_errno("mmap_len without MMAP", mem.mmap_len(2 * P), ENODEV)?;
    expect_errno("zero-length mmap", backing.shared(1)?.mmap_len(0), EINVAL)?;
    let map = backing.shared(1)?.mmap()?;
    ensure_eq("length of a whole-file mapping", map.len(), P)
}

/// A mapping longer than the file is allowed and pages inside work; checked
/// copies past the end are `EINVAL`, not a fault.
fn mmap_past_end(backing: &dyn Backing) -> Check {
    let mem = backing.shared(2)?;
    let map = mem.mmap_len(4 * P - 100)?;
    ensure_eq("mapping length, rounded up to pages", map.len(), 4 * P)?;
    map.write(P, b"inside")?;
    expect_bytes(&map, P, b"inside", "inside the file")?;
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
    expect_bytes(&map, P, b"inside", "after failed copies")
}

/// A raw access at or past the end of the file raises `SIGBUS` and does not
/// disturb the pages inside.
fn past_end_sigbus(backing: &dyn Backing) -> Check {
    let mem = backing.shared(2)?;
    let map = mem.mmap_len(4 * P)?;
    map.write(P, b"inside")?;
    expect_raw(
        &map,
        "a mapping twice as long as the file",
        &[
            (2 * P - 1, "completed"),
            (2 * P, "SIGBUS"),
            (4 * P - 1, "SIGBUS"),
            (P, "completed"),
        ],
    )?;
    expect_bytes(&map, P, b"inside", "after the faults")
}

fn fallocate_mode_eopnotsupp(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
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

fn fallocate_unaligned_einval(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
    for mode in [KEEP_SIZE, KEEP_SIZE | PUNCH_HOLE] {
        for (offset, len) in [(1, P), (0, P + 1), (P / 2, P / 2), (0, 0)] {
            expect_errno(
                format_args!("fallocate mode {mode:#x} at {offset:#x}+{len:#x}"),
                mem.fallocate(mode, offset, len),
                EINVAL,
            )?;
        }
    }
    expect_errno("empty punch", mem.punch_hole(P, 0), EINVAL)?;
    Ok(())
}

/// `offset + len` past `i64::MAX` is `EFBIG`, as `vfs_fallocate` gives; a
/// negative offset or length is `EINVAL`.
fn fallocate_past_largest_offset_efbig(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
    let max = i64::MAX as u64;
    for (offset, len) in [
        (P, max - P + 1),
        (max - P + 1, 2 * P),
        (max / 2 + 1, max / 2 + 1),
    ] {
        for mode in [KEEP_SIZE, KEEP_SIZE | PUNCH_HOLE] {
            expect_errno(
                format_args!("fallocate mode {mode:#x} at {offset:#x}+{len:#x}"),
                mem.fallocate(mode, offset, len),
                EFBIG,
            )?;
        }
    }
    // An end up to i64::MAX is no EFBIG (past this file: EINVAL to
    // allocate, a no-op to punch).
    for (offset, len) in [(max + 1, P), (0, 1 << 63), (P, max - P)] {
        expect_errno(
            format_args!("allocate {offset:#x}+{len:#x}"),
            mem.allocate(offset, len),
            EINVAL,
        )?;
    }
    mem.punch_hole(4 * P, (max - 4 * P) & !(P - 1))?;
    Ok(())
}

fn allocate_past_end_einval(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
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

fn punch_past_end_noop(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
    let map = mem.mmap()?;
    let pattern = bytes(4 * P, 0x11);
    map.write(0, &pattern)?;
    mem.punch_hole(4 * P, P)?;
    mem.punch_hole(100 * P, 8 * P)?;
    ensure(
        read_vec(&map, 0, 4 * P)? == pattern,
        "contents inside the file after punches past the end",
        "unchanged",
        "changed",
    )?;
    expect_all(&mem, 4, Attribute::Shared, "after punches past the end")?;
    // A punch straddling the end frees the part inside only.
    mem.punch_hole(3 * P, 4 * P)?;
    ensure(
        read_vec(&map, 0, 3 * P)? == pattern[..3 * P as usize],
        "pages before a punch straddling the end",
        "unchanged",
        "changed",
    )?;
    expect_filled(
        &map,
        3 * P,
        P,
        0,
        "the page inside a punch straddling the end",
    )
}

/// Allocation and punches change what is allocated, and only inside the file.
fn allocate_and_punch_count(backing: &dyn Backing) -> Check {
    let mem = backing.shared(8)?;
    expect_allocated(backing, &mem, 0, "in a new file")?;
    mem.allocate(0, 8 * P)?;
    expect_allocated(backing, &mem, 8, "after allocating the whole file")?;
    // A punch straddling the end frees the part inside.
    mem.punch_hole(6 * P, 4 * P)?;
    expect_allocated(backing, &mem, 6, "after a punch straddling the end")
}

fn punch_zeroes_keeps_state(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
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
    expect_filled(&map, 0, P, 0, "the punched shared page")?;
    expect_filled(&map, 2 * P, P, 7, "the page after the punch")?;
    mem.set_attributes(P, P, Attribute::Shared)?;
    expect_filled(&map, P, P, 0, "the punched private page once shared")
}

fn convert_invalid_einval(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
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

fn convert_nothing_to_change(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
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

fn convert_pinned_eagain(backing: &dyn Backing) -> Check {
    let mem = backing.shared(8)?;
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
    expect_raw(
        &map,
        "the mapping after the EAGAIN",
        &[(2 * P, "completed"), (5 * P, "completed")],
    )?;
    ensure_eq(
        "host read after the EAGAIN",
        read_vec(&map, 2 * P, 16)?,
        vec![9u8; 16],
    )?;
    map.write(5 * P, b"still")?;
    // The check drained once, since the pin could have been a parked release.
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

fn convert_dropped_pin_one_drain(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
    drop(mem.pin(P, P)?);
    ensure_eq("drains before the conversion", mem.stats().drains, 0)?;
    mem.set_attributes(0, 4 * P, Attribute::Private)?;
    let stats = mem.stats();
    ensure_eq("drains for a parked release", stats.drains, 1)?;
    ensure_eq("EAGAINs for a parked release", stats.eagain, 0)?;
    // Another thread's parked release is drained too, the thread still alive.
    mem.set_attributes(0, 4 * P, Attribute::Shared)?;
    let (parked, proceed) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
    std::thread::scope(|s| {
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
            .map_err(|_| Failure::new("the pinning thread", "no panic", "a panic"))??;
        Ok::<_, Failure>(result?)
    })?;
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

fn convert_to_shared_no_check(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
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

fn convert_keeps_contents(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
    let map = mem.mmap()?;
    let pattern = bytes(4 * P, 0x5a);
    map.write(0, &pattern)?;
    mem.set_attributes(0, 4 * P, Attribute::Private)?;
    mem.set_attributes(0, 4 * P, Attribute::Shared)?;
    ensure(
        read_vec(&map, 0, 4 * P)? == pattern,
        "contents through shared -> private -> shared",
        "unchanged",
        "changed",
    )?;
    // Written while shared, read through a pin after a round trip.
    mem.set_attributes(P, P, Attribute::Private)?;
    mem.set_attributes(P, P, Attribute::Shared)?;
    let pin = mem.pin(P, 10)?;
    let mut ten = [0u8; 10];
    pin.read(0, &mut ten)?;
    ensure_eq(
        "bytes a pin reads after a round trip",
        &ten[..],
        &pattern[P as usize..P as usize + 10],
    )?;
    // From private first: a file created private, shared, written, and back.
    let private = backing.create(2 * P, Flags::MMAP)?;
    let map = private.mmap()?;
    private.set_attributes(0, 2 * P, Attribute::Shared)?;
    map.write(0, &pattern[..2 * P as usize])?;
    private.set_attributes(0, 2 * P, Attribute::Private)?;
    private.set_attributes(0, 2 * P, Attribute::Shared)?;
    ensure(
        read_vec(&map, 0, 2 * P)? == pattern[..2 * P as usize],
        "contents through private -> shared -> private -> shared",
        "unchanged",
        "changed",
    )
}

fn punch_pinned_ebusy(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
    let map = mem.mmap()?;
    map.write(0, &[3u8; 4 * P as usize])?;
    let pin = mem.pin(2 * P, 1)?;
    let err = expect_errno("punch over a pinned page", mem.punch_hole(0, 4 * P), EBUSY)?;
    ensure_eq("offset of the EBUSY", error_offset(&err), Some(2 * P))?;
    expect_filled(&map, 0, 4 * P, 3, "contents after a failed punch")?;
    drop(pin);
    mem.punch_hole(0, 4 * P)?;
    expect_filled(
        &map,
        0,
        4 * P,
        0,
        "contents after the punch once the pin is dropped",
    )
}

fn private_page_efault(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
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

/// A pin allocates the pages it covers, and its copies stay inside its range.
fn pin_allocates_copies_within_range(backing: &dyn Backing) -> Check {
    let mem = backing.shared(4)?;
    let pin = mem.pin(P + 8, 2 * P)?;
    expect_allocated(backing, &mem, 3, "after a pin over parts of 3 pages")?;
    ensure_eq(
        "(offset, len) of the pin",
        (pin.offset(), pin.len()),
        (P + 8, 2 * P),
    )?;
    pin.write(2 * P - 4, b"tail")?;
    expect_errno(
        "write across the end of the pin",
        pin.write(2 * P - 3, b"tail"),
        EINVAL,
    )?;
    ensure_eq(
        "bytes the pin wrote, read through a mapping",
        read_vec(&mem.mmap()?, 3 * P + 4, 4)?,
        b"tail".to_vec(),
    )
}

fn private_page_faults(backing: &dyn Backing) -> Check {
    raw_access_follows_state(backing.shared(4)?)
}

/// As `private-page-faults`, with the remap fallback forced (`SIGBUS`).
fn private_page_faults_fallback(backing: &dyn Backing) -> Check {
    let options = Options::new().hiding(Hiding::EmptyFileRemap);
    let mem = backing.create_with(4 * P, Flags::MMAP | Flags::INIT_SHARED, options)?;
    ensure_eq(
        "hiding of a fallback mapping",
        mem.mmap()?.hiding(),
        Hiding::EmptyFileRemap,
    )?;
    raw_access_follows_state(mem)
}

/// Raw accesses to pages 1 and 2 of a 4-page shared file fault after they
/// turn private, in every mapping made before (one of them longer than the
/// file) and one made after, and no longer after they turn shared again.
fn raw_access_follows_state(mem: GuestMemfd) -> Check {
    let early = mem.mmap()?;
    let longer = mem.mmap_len(8 * P)?;
    expect_raw(&early, "a mapping", &[(P, "completed")])?;
    expect_raw(&longer, "a longer mapping", &[(P, "completed")])?;
    mem.set_attributes(P, 2 * P, Attribute::Private)?;
    let late = mem.mmap()?;
    let maps = [
        ("a mapping made before", &early),
        ("a longer mapping made before", &longer),
        ("a mapping made after", &late),
    ];
    for (which, map) in maps {
        let fault = private_fault(map);
        let expected = [
            (0, "completed"),
            (P, fault),
            (3 * P - 1, fault),
            (3 * P, "completed"),
        ];
        expect_raw(map, which, &expected)?;
    }
    mem.set_attributes(P, 2 * P, Attribute::Shared)?;
    for (which, map) in maps {
        let expected = [(P, "completed"), (2 * P, "completed")];
        expect_raw(
            map,
            &format!("{which}, after the conversion back"),
            &expected,
        )?;
    }
    Ok(())
}
