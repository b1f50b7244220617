//! The backend rows of `gmem bench`: a pin on a backend's replica against
//! the atomic pair, a 4 KiB round trip with one backend process against the
//! page-table work in both processes plus one message round trip, and the
//! cost of 1, 2 and 4 backends on a 64 MiB round trip.
//!
//! The backends are real processes: this binary started as `gmem backend`
//! (and, for the floor, `gmem backend --echo`), on a socket in a fresh
//! temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use gmem::{Attribute, Flags, GuestMemfd, HostMapping, Options, PAGE_SIZE};

use super::fixtures::PinUnpin;
use super::{CaseResult, Goal, MIB, measure, measure_prepared};
use crate::backend::Process;
use crate::floor::{RawMapping, populate};

/// One echoed message to the floor's peer.
fn echo(peer: &mut Process) {
    let mut message = [7u8; 32];
    let socket = peer.socket.as_mut().expect("the peer's socket");
    socket.write_all(&message).expect("echo");
    socket.read_exact(&mut message).expect("echo");
}

/// All the backend rows.
pub(super) fn rows() -> Vec<CaseResult> {
    let mut rows = vec![pin_unpin()];
    rows.extend(round_trip_4k().unwrap_or_else(|why| {
        vec![CaseResult::skipped(
            "round-trip-4k-backend",
            Goal::RatioAtMost(1.3),
            why,
        )]
    }));
    match check_cost() {
        Ok(more) => rows.extend(more),
        Err(why) => rows.push(CaseResult::skipped(
            "round-trip-64m-backends-1",
            Goal::SpeedupAtLeast(0.0),
            why,
        )),
    }
    rows
}

/// A pin and unpin on a backend's replica (the same code as the VMM's pin,
/// on the replica's own reference table; the replica is attached in this
/// process, a thread playing the VMM) against the atomic pair.
fn pin_unpin() -> CaseResult {
    let name = "backend-pin-unpin";
    let goal = Goal::RatioAtMost(1.5);
    let vmm = GuestMemfd::new(4 * MIB, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
    let Ok((a, b)) = UnixStream::pair() else {
        return CaseResult::skipped(name, goal, "no socket pair".into());
    };
    let attaching = std::thread::spawn(move || GuestMemfd::attach(b, Options::new()));
    if let Err(e) = vmm.add_backend(a, None) {
        return CaseResult::skipped(name, goal, format!("attach: {e}"));
    }
    let attached = attaching.join().expect("attach thread").expect("attach");
    let replica = attached.file();
    drop(replica.pin(0, PAGE_SIZE).expect("pin"));
    let floor = PinUnpin::new();
    let (o, f) = measure(
        &mut || {
            drop(std::hint::black_box(
                replica.pin(std::hint::black_box(0), 1).expect("pin"),
            ))
        },
        Some(&mut || floor.atomic()),
    );
    CaseResult::timed(name, o, f, goal).against("floor: atomic add+sub")
}

/// A populated, mapped VMM file of `len` bytes.
fn mapped(len: u64) -> (GuestMemfd, HostMapping) {
    let mem = GuestMemfd::new(len.max(2 * MIB), Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
    mem.allocate(0, mem.size()).expect("allocate");
    let map = mem.mmap().expect("mmap");
    (mem, map)
}

fn convert_round_trip(mem: &GuestMemfd, len: u64) {
    mem.set_attributes(0, len, Attribute::Private)
        .expect("to private");
    mem.set_attributes(0, len, Attribute::Shared)
        .expect("to shared");
}

/// 4 KiB shared to private to shared with one backend process (which maps
/// the file) against guard install and remove here, the same in the peer,
/// and one message round trip to it; and, as a reference, against the
/// same with two message round trips, which is what gmem's protocol
/// sends (a conversion to shared waits for every backend to have shown
/// the range, so that a backend's raw access after the guest's kick
/// finds it).
fn round_trip_4k() -> Result<Vec<CaseResult>, String> {
    let len = PAGE_SIZE;
    if let Some(why) = super::fixtures::guard_markers_unsupported() {
        return Err(why);
    }
    let (mem, map) = mapped(len);
    let _backend = Process::attach(&mem, &[])?;
    let mut peer = Process::start(&["--echo"])?;
    let raw = RawMapping::new(len as usize).map_err(|e| e.to_string())?;
    let mut floor = |messages: usize| {
        raw.guard_install(0, len as usize).expect("guard");
        for _ in 0..messages {
            echo(&mut peer);
        }
        raw.guard_remove(0, len as usize).expect("guard");
    };
    let (o, f) = measure_prepared(
        &mut || convert_round_trip(&mem, len),
        &mut || populate(&map, len).expect("populate"),
        &mut || floor(1),
        &mut || raw.touch(0, len as usize),
    );
    let (o2, f2) = measure_prepared(
        &mut || convert_round_trip(&mem, len),
        &mut || populate(&map, len).expect("populate"),
        &mut || floor(2),
        &mut || raw.touch(0, len as usize),
    );
    let goal = Goal::RatioAtMost(1.3);
    Ok(vec![
        CaseResult::timed("round-trip-4k-backend", o, Some(f), goal)
            .against("floor: guards here and in the peer + 1 message round trip"),
        CaseResult::reference("round-trip-4k-backend-2-messages", o2, f2)
            .against("the same floor with 2 message round trips"),
    ])
}

/// A 64 MiB round trip with 1, 2 and 4 backend processes against the same
/// without any (reference rows: the cost the backends add).
fn check_cost() -> Result<Vec<CaseResult>, String> {
    let len = 64 * MIB;
    let (alone, alone_map) = mapped(len);
    let (mem, map) = mapped(len);
    let mut backends = Vec::new();
    let mut rows = Vec::new();
    for count in [1, 2, 4] {
        while backends.len() < count {
            backends.push(Process::attach(&mem, &[])?);
        }
        let (o, f) = measure_prepared(
            &mut || convert_round_trip(&mem, len),
            &mut || populate(&map, len).expect("populate"),
            &mut || convert_round_trip(&alone, len),
            &mut || populate(&alone_map, len).expect("populate"),
        );
        let name = format!("round-trip-64m-backends-{count}");
        rows.push(CaseResult::reference(&name, o, f).against("no backend"));
    }
    Ok(rows)
}
