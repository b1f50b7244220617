//! A hardware counter of this thread's user-space instructions
//! (`perf_event_open` with `PERF_COUNT_HW_INSTRUCTIONS`, the kernel and
//! hypervisor excluded), for `gmem bench --instructions`; and the same
//! plumbing for a software event, so that it can be tested on a host whose
//! CPU (or hypervisor) offers no hardware counters.
//! A module of the command with `unsafe` (with `floor.rs`): the system call,
//! the counter's `ioctl`s.

use std::ffi::{c_int, c_long, c_ulong};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `perf_event_open`: its number in the table shared by every architecture
/// but x86 and a few others (`asm-generic/unistd.h`), and x86-64's.
#[cfg(target_arch = "x86_64")]
const SYS_PERF_EVENT_OPEN: c_long = 298;
#[cfg(not(target_arch = "x86_64"))]
const SYS_PERF_EVENT_OPEN: c_long = 241;

/// `PERF_TYPE_HARDWARE` and `PERF_TYPE_SOFTWARE` (`linux/perf_event.h`).
const PERF_TYPE_HARDWARE: u32 = 0;
const PERF_TYPE_SOFTWARE: u32 = 1;
/// `PERF_COUNT_HW_INSTRUCTIONS`.
const PERF_COUNT_HW_INSTRUCTIONS: u64 = 1;
/// `PERF_COUNT_SW_TASK_CLOCK`: nanoseconds this task ran.
const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
/// The attribute bits: `disabled`, `exclude_kernel`, `exclude_hv`.
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_EXCLUDE_KERNEL: u64 = 1 << 5;
const ATTR_EXCLUDE_HV: u64 = 1 << 6;
/// `PERF_EVENT_IOC_ENABLE`, `_DISABLE` and `_RESET`: `_IO('$', 0..3)`.
const IOC_ENABLE: c_ulong = 0x2400;
const IOC_DISABLE: c_ulong = 0x2401;
const IOC_RESET: c_ulong = 0x2403;

/// `struct perf_event_attr` as of `PERF_ATTR_SIZE_VER0` (64 bytes): the
/// fields this counter sets, then the ones it leaves zero. The kernel takes
/// any size it knows and zero-extends it.
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

// glibc's entry points, declared here as in `floor.rs`.
// SAFETY: the signatures are glibc's (`unistd.h`, `sys/ioctl.h`).
unsafe extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
    fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
}

/// What a [`Counter`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Instructions retired in user space.
    Instructions,
    /// Nanoseconds the thread ran (a software event every kernel has).
    TaskClock,
}

/// An open counter of one event on the calling thread, disabled until
/// [`count`](Counter::count).
#[derive(Debug)]
pub struct Counter {
    fd: OwnedFd,
}

impl Counter {
    /// Opens a counter of `event` on this thread (any CPU), user space only.
    /// Fails where the host has no such counter: `ENOENT` or `EOPNOTSUPP`
    /// for hardware events under most hypervisors.
    pub fn open(event: Event) -> std::io::Result<Counter> {
        let (kind, config) = match event {
            Event::Instructions => (PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS),
            Event::TaskClock => (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK),
        };
        let attr = PerfEventAttr {
            kind,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config,
            sample_period: 0,
            sample_type: 0,
            read_format: 0,
            flags: ATTR_DISABLED | ATTR_EXCLUDE_KERNEL | ATTR_EXCLUDE_HV,
            wakeup_events: 0,
            bp_type: 0,
            config1: 0,
        };
        let (this_thread, any_cpu, no_group, no_flags): (c_long, c_long, c_long, c_long) =
            (0, -1, -1, 0);
        // The kernel reads `attr` (its `size` says how much) and writes
        // nothing of ours.
        // SAFETY: `attr` is an initialised `perf_event_attr` that outlives the call.
        let fd = unsafe {
            syscall(
                SYS_PERF_EVENT_OPEN,
                &attr as *const PerfEventAttr,
                this_thread,
                any_cpu,
                no_group,
                no_flags,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = c_int::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidData)?;
        // SAFETY: the kernel just returned this descriptor, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Counter { fd })
    }

    /// The events counted while `f` runs.
    pub fn count(&self, f: &mut dyn FnMut()) -> std::io::Result<u64> {
        self.control(IOC_RESET)?;
        self.control(IOC_ENABLE)?;
        f();
        self.control(IOC_DISABLE)?;
        let mut value = [0u8; 8];
        let read = rustix::io::read(&self.fd, &mut value)?;
        if read != value.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(u64::from_ne_bytes(value))
    }

    /// One of the counter's argument-less `ioctl`s.
    fn control(&self, request: c_ulong) -> std::io::Result<()> {
        // ENABLE, DISABLE and RESET take no pointer.
        // SAFETY: the kernel touches no memory of ours.
        let ret = unsafe { ioctl(self.fd.as_raw_fd(), request, 0 as c_ulong) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attribute, system call, `ioctl`s and read, on a software
    /// event every kernel has: a busy loop of a few milliseconds counts
    /// that many nanoseconds, and nothing is counted while disabled.
    #[test]
    fn a_software_counter_counts_what_runs_between() {
        let counter = match Counter::open(Event::TaskClock) {
            Ok(counter) => counter,
            // perf_event_paranoid 3 (some distributions) refuses even this.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return,
            Err(e) => panic!("perf_event_open(task clock): {e}"),
        };
        let spin = |ms: u64| {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        };
        let long = counter.count(&mut || spin(20)).expect("count");
        let short = counter.count(&mut || spin(2)).expect("count");
        assert!(long >= 10_000_000, "20 ms of spinning counted {long} ns");
        assert!(short < long, "2 ms counted {short} ns, 20 ms {long} ns");
    }
}
