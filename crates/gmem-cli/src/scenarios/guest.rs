//! Guest-side scenarios with one vCPU: the interpreter of [`crate::guest`]
//! on a [`Machine`], and what the guest and the host see around conversions.
//! The helpers here serve [`super::multi_vcpu`] too.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use gmem::conformance::{ensure_eq, error_offset, expect_errno, read_vec};
use gmem::kvm::{ConversionOutcome, ConversionRequest, ExitRegs, GuestIo, VcpuStop};
use gmem::{Attribute, GuestMemfd};

use super::{Check, P, Stop, ensure, fail};
use crate::guest::{Command, NOTIFY_PORT, fill_page, page_matches, pattern_word};
use crate::machine::{FIRMWARE_SIZE, Machine, Record};

/// `EFAULT` on Linux (`libc` is not a dependency of this crate).
const EFAULT: i32 = 14;

/// Guest memory past the firmware area, in pages.
const GUEST_PAGES: u64 = 16;
/// The first page the guest may convert.
const BASE: u64 = FIRMWARE_SIZE;

pub(super) fn machine(initial: Attribute) -> Result<Machine, Stop> {
    gmem::conformance::kvm_support().map_err(Stop::Skip)?;
    Ok(Machine::new(FIRMWARE_SIZE + GUEST_PAGES * P, initial)?)
}

pub(super) fn gpa(page: u64) -> u32 {
    (BASE + page * P) as u32
}

/// Runs `commands` on vCPU `id` until it halts.
fn run_vcpu(machine: &Machine, id: u64, commands: &[Command], io: &mut dyn GuestIo) -> Check {
    let stop = machine.vcpu(id, commands)?.run(io)?;
    ensure_eq(
        format_args!("how vCPU {id} stopped"),
        stop,
        VcpuStop::Halted,
    )?;
    Ok(())
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
pub(super) fn host_expect(machine: &Machine, first: u64, pages: u64, seed: u32) -> Check {
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

pub(super) fn expect_range(
    mem: &GuestMemfd,
    first: u64,
    pages: u64,
    want: Attribute,
    when: &str,
) -> Check {
    for i in first..first + pages {
        ensure_eq(
            format_args!("state of {:#x} {when}", gpa(i)),
            mem.attribute(u64::from(gpa(i)))?,
            want,
        )?;
    }
    Ok(())
}

/// Expects the guest to have written to no unknown port, and its
/// conversions to have returned `results` (address and result of each).
fn expect_results(record: &Record, results: &[(u32, u32)]) -> Check {
    expect_quiet(record)?;
    ensure_eq("conversion results", &record.results[..], results)?;
    Ok(())
}

pub(super) fn expect_quiet(record: &Record) -> Check {
    ensure!(
        record.unknown.is_empty(),
        "the guest wrote to unknown ports {:?}",
        record.unknown
    );
    Ok(())
}

/// (a) The guest reads what the host wrote before a conversion to private.
pub(super) fn host_writes_guest_reads_after_private() -> Check {
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
    expect_results(&record, &[(gpa(0), 0)])?;
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
    )?;
    Ok(())
}

/// (b) The host reads what the guest wrote before a conversion to shared.
pub(super) fn guest_writes_host_reads_after_shared() -> Check {
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
    expect_results(&record, &[(gpa(0), 0), (gpa(0), 0)])?;
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
pub(super) fn punched_page_reads_zero_keeps_state() -> Check {
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
    expect_results(&record, &[(gpa(0), 0), (gpa(0), 0)])?;
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
pub(super) fn conversion_touches_only_requested_pages() -> Check {
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
    expect_results(&record, &[(gpa(K + 1), 0), (gpa(K + 2), 0), (gpa(K), 0)])?;
    ensure_eq("notifications served", record.notifies.len(), 4)?;
    let stats = mem.stats();
    ensure_eq("pages private at the end", stats.pages_private, 5)?;
    Ok(())
}

/// (e) A conversion the guest asks for while a device thread holds pins on
/// the same pages resolves, after the VMM asks the device to let go, without
/// `SIGBUS` and without losing what the device wrote.
pub(super) fn conversion_waits_for_device_pins() -> Check {
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
    expect_results(&record, &[(gpa(0), 0), (gpa(0), 0)])?;
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
