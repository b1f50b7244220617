//! The KVM case of `gmem bench`: a guest-requested 4 KiB conversion round
//! trip, against a null port-I/O exit round trip plus the raw mapping change.

use std::ops::ControlFlow;
use std::time::Instant;

use gmem::Attribute;
use gmem::kvm::uapi::KVM_MAP_GPA_RANGE_ENCRYPTED;
use gmem::kvm::{CONVERSION_PORT, ExitRegs, GuestIo, Vcpu, VcpuStop};
use iced_x86::code_asm::*;

use super::{CaseResult, Goal, skipped, timed};
use crate::floor::RawMapping;
use crate::machine::{FIRMWARE_SIZE, Machine};

const NAME: &str = "kvm-guest-round-trip-4k";
const GOAL: Goal = Goal::RatioAtMost(1.3);
const OURS_GPA: u64 = 0x3000;
const FLOOR_GPA: u64 = 0x3800;
const NULL_PORT: u16 = 0x4d60;
const ROUND_TRIPS: u64 = 100;
const SAMPLES: usize = 11;

/// `edi` round trips of page `target`: private then shared, each a write to
/// `port` with the request in `ebx`, `ecx`, `esi`; then `hlt`.
fn program(base: u64, port: u16, target: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut again = a.create_label();
    a.mov(dx, port as u32)?;
    a.set_label(&mut again)?;
    a.mov(ebx, target as u32)?;
    a.mov(ecx, 1u32)?;
    a.mov(esi, KVM_MAP_GPA_RANGE_ENCRYPTED as u32)?;
    a.out(dx, al)?;
    a.xor(esi, esi)?;
    a.out(dx, al)?;
    a.dec(edi)?;
    a.jnz(again)?;
    a.hlt()?;
    a.assemble(base)
}

/// The floor's device: each null exit does the raw mapping change a
/// conversion would (hide, then show, with guard markers as gmem's default).
struct NullDevice {
    raw: RawMapping,
    hidden: bool,
}

impl GuestIo for NullDevice {
    fn io_out(&mut self, _: u64, port: u16, _: &[u8], _: &ExitRegs) -> ControlFlow<()> {
        if port == NULL_PORT {
            let changed = if self.hidden {
                self.raw.guard_remove(0, 4096)
            } else {
                self.raw.guard_install(0, 4096)
            };
            changed.expect("guard markers on the floor's own mapping");
            self.hidden = !self.hidden;
        }
        ControlFlow::Continue(())
    }
}

struct Silent;

impl GuestIo for Silent {
    fn io_out(&mut self, _: u64, _: u16, _: &[u8], _: &ExitRegs) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

fn sample(vcpu: &mut Vcpu, entry: u64, stack: u64, io: &mut dyn GuestIo) -> anyhow::Result<f64> {
    vcpu.enter_protected_mode(entry, stack)?;
    vcpu.set_arguments(ROUND_TRIPS, 0)?;
    let started = Instant::now();
    let stop = vcpu.run(io)?;
    anyhow::ensure!(
        stop == VcpuStop::Halted,
        "the bench guest stopped: {stop:?}"
    );
    Ok(started.elapsed().as_nanos() as f64 / ROUND_TRIPS as f64)
}

fn measure() -> anyhow::Result<(f64, f64)> {
    let machine = Machine::new(FIRMWARE_SIZE + (2 << 20), Attribute::Shared)?;
    let target = FIRMWARE_SIZE;
    machine
        .map
        .write(OURS_GPA, &program(OURS_GPA, CONVERSION_PORT, target)?)?;
    machine
        .map
        .write(FLOOR_GPA, &program(FLOOR_GPA, NULL_PORT, target)?)?;
    machine.map.write(target, &[1u8; 4096])?;
    let mut ours_vcpu = machine.vm.create_vcpu(0)?;
    let mut floor_vcpu = machine.vm.create_vcpu(1)?;
    let mut device = NullDevice {
        raw: RawMapping::new(2 << 20)?,
        hidden: false,
    };
    device.raw.touch(0, 4096);
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        ours.push(sample(&mut ours_vcpu, OURS_GPA, 0x8000, &mut Silent)?);
        floor.push(sample(&mut floor_vcpu, FLOOR_GPA, 0x7000, &mut device)?);
    }
    let totals = machine.vm.conversion_totals();
    anyhow::ensure!(totals.failed == 0, "guest conversions failed: {totals:?}");
    ours.sort_by(f64::total_cmp);
    floor.sort_by(f64::total_cmp);
    Ok((ours[SAMPLES / 2], floor[SAMPLES / 2]))
}

/// The case; skipped with the reason where KVM cannot run guests.
pub fn guest_round_trip() -> CaseResult {
    match measure() {
        Ok((ours, floor)) => timed(
            NAME,
            ours,
            Some(floor),
            GOAL,
            "floor: null port I/O + guards",
        ),
        Err(e) => skipped(NAME, GOAL, format!("{e:#}")),
    }
}
