//! Guest-side scenarios with several vCPUs at once.

use std::sync::Barrier;

use gmem::Attribute;
use gmem::conformance::ensure_eq;
use gmem::kvm::VcpuStop;

use super::guest::{expect_quiet, expect_range, gpa, host_expect, machine};
use super::{Check, Stop, ensure, fail};
use crate::guest::Command;
use crate::machine::{Machine, Record};

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

pub(super) fn vcpus_convert_own_regions() -> Check {
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
            record
                .conversions
                .iter()
                .all(|(r, _)| r.gpa == u64::from(first)),
            "vCPU {id} recorded a conversion outside its own region"
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
    )?;
    Ok(())
}
