//! The bundled workload of `gmem run`: vCPUs converting their memory between
//! private and shared in rounds while host device threads pin and copy
//! through shared buffers in the same places.
//!
//! Each vCPU owns a region of guest memory cut into chunks. For every chunk,
//! every round, the guest: takes the chunk private, checks the pattern the
//! host's virtio device left there, writes its own pattern, gives the chunk
//! back (shared), and posts it as a virtio request on its own split
//! virtqueue ([`crate::virtio`]), notifying by port I/O, and goes on with
//! the next chunk. The notification's exit handler only rings the queue's
//! virtio device thread, which pops the chain, checks the guest's pattern,
//! rewrites the chunk with its own (the one the guest checks next round)
//! and adds the used entry. The guest waits for used entries only when its
//! queue's slots are all in flight, and at the end of each round
//! (`Complete`), before it converts those chunks again; every request's
//! status must be 0.
//! Meanwhile device threads pin small buffers in the chunk each vCPU will
//! convert next, write and read back their own bytes, and hold the pin until
//! the VMM asks them to let go (on `EAGAIN`) or a while passes.
//!
//! The virtio devices reach guest memory through gmem's vm-memory view
//! (`gmem::vm_memory::GuestMemoryGmem`), whose slices pin their pages and
//! whose accesses to private pages fail instead of faulting; they pin each
//! request's chain once for the whole request (`PinnedBuffers`, through
//! `GuestMemoryGmem::pin_ranges`) and copy through it, and pin their rings
//! for the run, so that no conversion lands between a request's check and
//! its reply.

use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use gmem::kvm::{
    ConversionOutcome, ConversionPolicy, ConversionRequest, ExitRegs, GuestIo, VcpuError, VcpuStop,
};
use gmem::vm_memory::{GuestMemoryGmem, PinnedChain};
use gmem::{Attribute, GuestMemfd, PAGE_SIZE};
use indicatif::ProgressBar;
use serde::Serialize;
use vm_memory::GuestAddress;

use crate::guest::{
    CHECK_PORT, Command, RESULT_PORT, RequestPath, VIRTIO_NOTIFY_PORT, VIRTIO_STATUS_PORT,
    VIRTIO_WAIT_PORT, VIRTIO_WAIT_SLICE, fill_page,
};
use crate::machine::{FIRMWARE_SIZE, MAX_COMMANDS, MAX_VCPUS, Machine, queue_layout};
use crate::virtio::{
    BufferAccess, DeviceStats, HeldBuffers, HoldRefused, PatternDevice, QueuePosition, reply_seed,
};

/// What `gmem run` runs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// Rounds over each vCPU's region.
    pub rounds: u32,
    /// Bytes converted by one guest request.
    pub chunk: u64,
    /// Host device threads.
    pub device_threads: usize,
    /// Count references per 2 MiB huge folio where uniform.
    pub huge_folios: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            memory: 64 << 20,
            vcpus: 2,
            rounds: RunFlags::DEFAULT_ROUNDS,
            chunk: 256 << 10,
            device_threads: 2,
            huge_folios: false,
        }
    }
}

/// The end of the guest's memory: the guest runs in 32-bit protected mode
/// with flat segments and no paging, and its address space holds the local
/// APIC's page at `0xFEE00000` (an access there is an MMIO exit, not
/// memory), so guest memory, which starts at 0, must end before it.
pub const GUEST_MEMORY_END: u64 = 0xFEE0_0000;

/// The most device threads: each owns 64 bytes (`DEVICE_SLOT`) of every page,
/// between the guest's patterns in the first and last dword.
pub const MAX_DEVICE_THREADS: usize = 32;
/// Bytes of each page a device thread writes and reads back.
const DEVICE_SLOT: usize = 64;
/// Where the device threads' slots begin in each page.
const DEVICE_AREA_START: usize = 1024;
// The slots stay clear of the patterns' first and last dwords.
const _: () = assert!(
    DEVICE_AREA_START >= 4
        && DEVICE_AREA_START + MAX_DEVICE_THREADS * DEVICE_SLOT <= PAGE_SIZE as usize - 4
);

/// Pages of the buffer a device thread pins (fewer in a smaller chunk).
const DEVICE_BUFFER_PAGES: u64 = 4;

/// A flag of `gmem run` out of its range: one line naming the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFlag(pub String);

impl std::fmt::Display for BadFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadFlag {}

/// The flags of `gmem run`, as given (in MiB and KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunFlags {
    /// `--memory-mib`.
    pub memory_mib: u64,
    /// `--vcpus`.
    pub vcpus: u64,
    /// `--rounds`; `None` asks for [`RunFlags::DEFAULT_ROUNDS`], or the most
    /// that fit where fewer do.
    pub rounds: Option<u32>,
    /// `--chunk-kib`.
    pub chunk_kib: u64,
    /// `--device-threads`.
    pub device_threads: usize,
    /// `--huge-folios`.
    pub huge_folios: bool,
}

impl RunFlags {
    /// The smallest `--memory-mib`: the firmware area and a page.
    pub const MIN_MEMORY_MIB: u64 = (FIRMWARE_SIZE >> 20) + 1;
    /// The largest `--memory-mib`: guest memory ends before the local APIC.
    pub const MAX_MEMORY_MIB: u64 = GUEST_MEMORY_END >> 20;
    /// The rounds of a run without `--rounds`, where that many fit.
    pub const DEFAULT_ROUNDS: u32 = 16;

    /// Checks every flag against what the workload and the guest can do and
    /// what this machine has (`available`: bytes of memory available, if
    /// known), and gives the run's configuration.
    pub fn validate(&self, available: Option<u64>) -> Result<RunConfig, BadFlag> {
        let bad = |message: String| Err(BadFlag(message));
        let (min, max) = (Self::MIN_MEMORY_MIB, Self::MAX_MEMORY_MIB);
        if !(min..=max).contains(&self.memory_mib) {
            return bad(format!(
                "--memory-mib {} is outside {min} to {max}: the guest needs its {} MiB firmware area and more, \
                 and its 32-bit address space ends at the local APIC at {GUEST_MEMORY_END:#x}",
                self.memory_mib,
                FIRMWARE_SIZE >> 20
            ));
        }
        let memory = self.memory_mib << 20;
        if let Some(available) = available
            && memory > available
        {
            return bad(format!(
                "--memory-mib {} is over the {} MiB of memory this machine has available (MemAvailable)",
                self.memory_mib,
                available >> 20
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return bad(format!(
                "--vcpus must be 1 to {MAX_VCPUS}: the firmware area holds the stacks and command lists of {MAX_VCPUS}"
            ));
        }
        if self.device_threads > MAX_DEVICE_THREADS {
            return bad(format!(
                "--device-threads {} is over {MAX_DEVICE_THREADS}: each device thread owns {DEVICE_SLOT} bytes \
                 of every page between the guest's patterns",
                self.device_threads
            ));
        }
        let page_kib = PAGE_SIZE >> 10;
        // Each vCPU's share of the memory past the firmware area, in KiB.
        let share_kib = ((memory - FIRMWARE_SIZE) / self.vcpus) >> 10;
        let share_kib = share_kib - share_kib % page_kib;
        if self.chunk_kib == 0 || self.chunk_kib % page_kib != 0 || self.chunk_kib > share_kib {
            return bad(format!(
                "--chunk-kib {} must be a multiple of the {page_kib} KiB page from {page_kib} to {share_kib}, \
                 the KiB each of {} vCPUs has past the firmware area of {} MiB guest memory",
                self.chunk_kib, self.vcpus, self.memory_mib
            ));
        }
        let chunk = self.chunk_kib << 10;
        let chunks = (share_kib << 10) / chunk;
        let rounds = self.rounds(chunks)?;
        Ok(RunConfig {
            memory,
            vcpus: self.vcpus,
            rounds,
            chunk,
            device_threads: self.device_threads,
            huge_folios: self.huge_folios,
        })
    }

    /// The rounds over `chunks` chunks a vCPU: `--rounds` if the command
    /// area holds them, else the default or the most that fit.
    fn rounds(&self, chunks: u64) -> Result<u32, BadFlag> {
        // The commands of each round, and the closing halt.
        let max_rounds = (MAX_COMMANDS as u64 - 1) / commands_per_round(chunks);
        let too_many = || {
            format!(
                "{chunks} chunks of {} KiB a vCPU need more guest commands than the {} a vCPU holds: \
                 use bigger chunks or less memory",
                self.chunk_kib,
                MAX_COMMANDS - 1
            )
        };
        match self.rounds {
            None if max_rounds == 0 => Err(BadFlag(too_many())),
            None => Ok(max_rounds.min(u64::from(Self::DEFAULT_ROUNDS)) as u32),
            Some(rounds) if rounds > 0 && u64::from(rounds) <= max_rounds => Ok(rounds),
            Some(rounds) if max_rounds == 0 => {
                Err(BadFlag(format!("--rounds {rounds} {}", too_many())))
            }
            Some(rounds) => Err(BadFlag(format!(
                "--rounds {rounds} must be 1 to {max_rounds}: each round of {chunks} chunks a vCPU takes {} \
                 guest commands of the {} a vCPU holds (bigger chunks allow more rounds)",
                commands_per_round(chunks),
                MAX_COMMANDS - 1
            ))),
        }
    }
}

/// The bytes of memory this machine has available (`MemAvailable` in
/// `/proc/meminfo`), if known.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// How the `EAGAIN`s of the run were met and resolved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EagainSummary {
    /// Conversions that met `EAGAIN` (every attempt counted).
    pub met: u64,
    /// Retries made after asking device threads to let go.
    pub retried: u64,
    /// Guest requests that succeeded after at least one `EAGAIN`.
    pub resolved: u64,
    /// Guest requests that failed in the end.
    pub failed: u64,
}

/// What the virtio devices did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VirtioSummary {
    /// Virtqueues (one a vCPU), each served by its own device thread.
    pub queues: u64,
    /// Requests served (popped, checked, rewritten, used).
    pub requests: u64,
    /// Payload bytes of the requests served.
    pub bytes: u64,
    /// Conversions of the requests' buffers by the guest (both directions).
    pub conversions: u64,
    /// Payload dwords without the guest's pattern (0 on success).
    pub data_errors: u64,
    /// Requests failed on a buffer the device could not hold (0 on success).
    pub access_errors: u64,
    /// Times a device dropped a request's buffers on a let-go request (a
    /// conversion met `EAGAIN` on them) and served it after.
    pub let_go_retries: u64,
    /// Chains that were not requests (0 on success).
    pub bad_chains: u64,
}

/// The result of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// vCPUs.
    pub vcpus: u64,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Rounds.
    pub rounds: u32,
    /// Bytes a guest request converts.
    pub chunk_bytes: u64,
    /// Device threads.
    pub device_threads: usize,
    /// How the guest asked for conversions: "hypercall" or "port-io".
    pub request_path: String,
    /// What backed guest memory: "kernel-guest-memfd", or "memfd" (a memfd
    /// slot, on a host without guest_memfd).
    pub backing: String,
    /// Seconds from the first vCPU start to the last halt.
    pub elapsed_s: f64,
    /// Conversions completed (both directions).
    pub conversions: u64,
    /// Conversions per second.
    pub conversions_per_sec: f64,
    /// `EAGAIN`s and how they resolved.
    pub eagain: EagainSummary,
    /// Drains of the threads' batches of released pins.
    pub drains: u64,
    /// Whether the file counted references per 2 MiB huge folio.
    pub huge_folios: bool,
    /// Huge folios split before a partial conversion.
    pub folio_splits: u64,
    /// Chunks merged back into huge folios.
    pub folio_merges: u64,
    /// Times the VMM asked device threads to let go.
    pub let_go_requests: u64,
    /// Pins taken by device threads and the device model.
    pub device_pins: u64,
    /// Device pins refused because the buffer had turned private (`EFAULT`).
    pub device_pins_refused: u64,
    /// Bytes the guest checked.
    pub guest_bytes_verified: u64,
    /// Bytes the host checked.
    pub host_bytes_verified: u64,
    /// The virtio devices' requests.
    pub virtio: VirtioSummary,
    /// Whether Ctrl-C stopped the run part-way: the counts are those so far,
    /// and only the invariants that hold at any moment were checked.
    pub interrupted: bool,
    /// The snapshot this run wrote or started from, if any
    /// ([`crate::run_snapshot`]).
    pub snapshot: Option<SnapshotNote>,
    /// Broken invariants; empty on success.
    pub broken: Vec<String>,
    /// Whether every invariant held.
    pub ok: bool,
}

/// What a run did with a snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotAction {
    /// The run stopped after the note's round and wrote the file.
    Saved,
    /// The run started from the file, after the note's round.
    Restored,
}

/// What a run did with a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotNote {
    /// Saved or restored.
    pub action: SnapshotAction,
    /// Rounds done before the snapshot.
    pub round: u32,
    /// The snapshot file.
    pub file: String,
    /// Its bytes.
    pub bytes: u64,
}

/// Which rounds a run runs, and from what: a whole run, or one side of a
/// snapshot ([`crate::run_snapshot`]).
pub struct Leg {
    /// The rounds run (0-based), of `RunConfig::rounds`.
    pub rounds: Range<u32>,
    /// Guest memory restored from a snapshot and where each virtio device
    /// resumes, or `None` for fresh memory holding round 0's host pattern.
    pub restored: Option<Restored>,
}

/// Guest memory and device state restored from a snapshot.
pub struct Restored {
    /// The guest's memory, with its rings, patterns and page states.
    pub mem: GuestMemfd,
    /// Where each vCPU's virtio device resumes in its queue.
    pub queues: Vec<QueuePosition>,
}

/// A run's end: its summary, and the machine at rest (every vCPU halted,
/// every device thread ended, no pin held) with each virtio device's place
/// in its queue (`None` where a device failed).
pub struct LegEnd {
    /// The summary.
    pub summary: Summary,
    /// The machine.
    pub machine: Machine,
    /// Each queue's device position.
    pub queues: Vec<Option<QueuePosition>>,
}

/// The seed of the guest's pattern in `round`.
fn guest_seed(round: u32) -> u32 {
    0x6000_0011 | round << 8
}

/// The seed of the host's pattern for `round`: the virtio device's reply to
/// the guest's pattern of the round before.
fn host_seed(round: u32) -> u32 {
    match round {
        0 => 0x4000_0022,
        _ => reply_seed(guest_seed(round - 1)),
    }
}

/// Where device thread `t` writes in each page: clear of the patterns'
/// first and last dwords, and of the other threads.
fn device_bytes(thread: usize) -> std::ops::Range<usize> {
    debug_assert!(thread < MAX_DEVICE_THREADS);
    let start = DEVICE_AREA_START + thread * DEVICE_SLOT;
    start..start + DEVICE_SLOT
}

/// State shared by the vCPU threads, the device threads and the let-go hook.
/// Its counters are statistics (Relaxed throughout: they order nothing);
/// `cursor` and `let_go` are hints for the device threads (where to pin, when
/// to let go and stay away): correctness rests on the pins, not on them.
struct RunState {
    mem: Arc<GuestMemfd>,
    regions: Vec<(u64, u64)>,
    chunk: u64,
    /// The chunk each vCPU notified last (device threads pin the next one).
    cursor: Vec<AtomicU64>,
    /// The range the VMM last asked device threads to let go of.
    /// The range the VMM asked device threads to let go of, until the
    /// conversion that asked is over: no new pins there meanwhile.
    let_go: Mutex<Option<(u64, u64)>>,
    let_go_requests: AtomicU64,
    device_pins: AtomicU64,
    device_pins_refused: AtomicU64,
    guest_bytes: AtomicU64,
    host_bytes: AtomicU64,
    /// The virtio devices' counts, added as each device thread ends.
    virtio: Mutex<DeviceStats>,
    /// The virtio devices resumed from a snapshot, checked before any vCPU
    /// ran, each taken by its thread (empty: each thread makes its own).
    resumed: Mutex<Vec<Option<PatternDevice>>>,
    /// Where each virtio device ended, set as its thread ends.
    ended_at: Mutex<Vec<Option<QueuePosition>>>,
    /// Conversions of virtio buffers the guest asked for and got.
    buffer_conversions: AtomicU64,
    stop: AtomicBool,
    /// Ctrl-C's flag: once set, each vCPU stops at its next port write.
    interrupt: &'static AtomicBool,
    broken: Mutex<Vec<String>>,
    progress: ProgressBar,
}

impl RunState {
    fn interrupted(&self) -> bool {
        // Relaxed: a request to stop; nothing else is read through it.
        self.interrupt.load(Ordering::Relaxed)
    }

    fn broke(&self, what: String) {
        let mut broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        if broken.len() < 32 {
            broken.push(what);
        }
    }

    fn asked_to_let_go(&self, gpa: u64, len: u64) -> bool {
        let fence = *self.let_go.lock().unwrap_or_else(|e| e.into_inner());
        fence.is_some_and(|(start, end)| gpa < end && start < gpa + len)
    }

    /// A conversion is over: lift its let-go request.
    fn conversion_over(&self, gpa: u64, len: u64) {
        let mut fence = self.let_go.lock().unwrap_or_else(|e| e.into_inner());
        if fence.is_some_and(|(start, end)| gpa < end && start < gpa + len) {
            *fence = None;
        }
    }
}

/// Runs the workload. `progress` counts chunks notified. Once `interrupt`
/// is set (Ctrl-C), the vCPUs stop at their next port write and the summary
/// says what was done so far.
pub fn run(
    config: &RunConfig,
    progress: ProgressBar,
    interrupt: &'static AtomicBool,
) -> anyhow::Result<Summary> {
    let whole = Leg {
        rounds: 0..config.rounds,
        restored: None,
    };
    Ok(run_leg(config, whole, progress, interrupt)?.summary)
}

/// Runs `leg.rounds` of the workload, on fresh memory or restored; as
/// [`run`] otherwise.
pub fn run_leg(
    config: &RunConfig,
    leg: Leg,
    progress: ProgressBar,
    interrupt: &'static AtomicBool,
) -> anyhow::Result<LegEnd> {
    let regions = plan(config)?;
    anyhow::ensure!(
        leg.rounds.start < leg.rounds.end && leg.rounds.end <= config.rounds,
        "rounds {}..{} are not part of the run's {}",
        leg.rounds.start + 1,
        leg.rounds.end,
        config.rounds
    );
    progress.set_message("setting up the VM");
    let (machine, resumed) = match leg.restored {
        None => {
            let options = gmem::Options::new().huge_folios(config.huge_folios);
            let machine = Machine::with_options(config.memory, Attribute::Shared, options)
                .context("setting up the VM")?;
            seed_host_pattern(&machine, &regions, &progress, interrupt)?;
            (machine, Vec::new())
        }
        Some(restored) => {
            anyhow::ensure!(
                restored.mem.size() == config.memory && restored.queues.len() == regions.len(),
                "the restored memory ({} bytes, {} queues) is not that of the run ({} bytes, {} vCPUs)",
                restored.mem.size(),
                restored.queues.len(),
                config.memory,
                regions.len()
            );
            let machine = Machine::restored(restored.mem).context("setting up the VM")?;
            // The devices resume here, before any vCPU runs: a vCPU posts
            // as soon as it starts, and the rings would no longer be at rest.
            let view = device_memory(&machine)?;
            let mut resumed = Vec::new();
            for (id, &at) in restored.queues.iter().enumerate() {
                let device = PatternDevice::resume(queue_layout(id as u64), &view, at)
                    .with_context(|| format!("virtio queue {id}"))?;
                resumed.push(Some(device));
            }
            (machine, resumed)
        }
    };
    let state = Arc::new(RunState::new(
        &machine,
        regions,
        config,
        (leg.rounds.len() as u64, resumed),
        progress,
        interrupt,
    ));
    // Device threads hold a pin for at most a few hundred microseconds, but on
    // a loaded host a descheduled thread holds it longer: allow up to about
    // half a second of retries before the guest sees EAGAIN.
    machine.vm.set_conversion_policy(ConversionPolicy {
        max_attempts: 128,
        ..ConversionPolicy::default()
    });
    let let_go = state.clone();
    machine
        .vm
        .set_let_go(Arc::new(move |gpa, len| let_go.let_go(gpa, len)));
    let mut vcpus = Vec::new();
    for (id, &(start, end)) in state.regions.iter().enumerate() {
        let list = commands(start, end, config, leg.rounds.clone());
        vcpus.push(machine.vcpu(id as u64, &list)?);
    }
    let device_memory = device_memory(&machine)?;
    let elapsed = if state.interrupted() {
        Duration::ZERO
    } else {
        run_threads(&state, &device_memory, vcpus, config.device_threads)?
    };
    state.progress.finish_and_clear();
    check_final_state(&state, leg.rounds.len() as u64);
    let summary = summarize(config, &machine, &state, elapsed);
    let queues = state
        .ended_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(LegEnd {
        summary,
        machine,
        queues,
    })
}

impl RunState {
    /// `(rounds, resumed)`: the rounds to run, and the virtio devices
    /// resumed from a snapshot (empty: each thread makes its own).
    fn new(
        machine: &Machine,
        regions: Vec<(u64, u64)>,
        config: &RunConfig,
        (rounds, resumed): (u64, Vec<Option<PatternDevice>>),
        progress: ProgressBar,
        interrupt: &'static AtomicBool,
    ) -> RunState {
        let chunks: u64 = regions.iter().map(|(s, e)| (e - s) / config.chunk).sum();
        progress.set_message("converting chunks");
        progress.set_position(0);
        progress.set_length(chunks * rounds);
        let queues = regions.len();
        RunState {
            mem: machine.mem.clone(),
            cursor: regions.iter().map(|_| AtomicU64::new(0)).collect(),
            regions,
            chunk: config.chunk,
            let_go: Mutex::new(None),
            let_go_requests: AtomicU64::new(0),
            device_pins: AtomicU64::new(0),
            device_pins_refused: AtomicU64::new(0),
            guest_bytes: AtomicU64::new(0),
            host_bytes: AtomicU64::new(0),
            virtio: Mutex::new(DeviceStats::default()),
            ended_at: Mutex::new(vec![None; queues]),
            resumed: Mutex::new(resumed),
            buffer_conversions: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            interrupt,
            broken: Mutex::new(Vec::new()),
            progress,
        }
    }

    /// Adds a virtio device's counts; a request it did not serve well
    /// breaks the run.
    fn add_virtio(&self, queue: u64, device: &PatternDevice) {
        let stats = device.stats();
        if stats.data_errors + stats.access_errors + stats.bad_chains != 0 {
            self.broke(format!(
                "virtio queue {queue}: {} data errors, {} access errors, {} bad chains; last: {}",
                stats.data_errors,
                stats.access_errors,
                stats.bad_chains,
                device.last_failure().unwrap_or("none")
            ));
        }
        let mut total = self.virtio.lock().unwrap_or_else(|e| e.into_inner());
        total.requests += stats.requests;
        total.served += stats.served;
        total.bytes += stats.bytes;
        total.data_errors += stats.data_errors;
        total.access_errors += stats.access_errors;
        total.let_go_retries += stats.let_go_retries;
        total.bad_chains += stats.bad_chains;
    }

    /// The VMM's let-go request on `EAGAIN`: device threads holding pins in
    /// the range drop them.
    fn let_go(&self, gpa: u64, len: u64) {
        *self.let_go.lock().unwrap_or_else(|e| e.into_inner()) = Some((gpa, gpa + len));
        self.let_go_requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// The virtio devices' view of guest memory: the file at guest
/// address 0 (its one slot), through gmem's vm-memory view.
fn device_memory(machine: &Machine) -> anyhow::Result<GuestMemoryGmem> {
    GuestMemoryGmem::from_regions([(GuestAddress(0), machine.mem.clone(), 0, machine.size())])
        .context("the virtio devices' view of guest memory")
}

/// Runs the vCPUs to their halt with the device threads beside them, and a
/// virtio device thread for each vCPU's queue over `device_memory`; returns
/// the time from start to the last halt. Fails if a thread cannot be
/// started (after joining those that were).
fn run_threads(
    state: &Arc<RunState>,
    device_memory: &GuestMemoryGmem,
    vcpus: Vec<gmem::kvm::Vcpu>,
    device_threads: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    std::thread::scope(|s| {
        let stop = || {
            // Release: the device threads' Acquire loads see the run is over.
            state.stop.store(true, Ordering::Release);
        };
        let mut devices = Vec::new();
        let mut failed = None;
        for t in 0..device_threads {
            let spawned = std::thread::Builder::new()
                .name(format!("device {t}"))
                .spawn_scoped(s, move || device_thread(state, t));
            match spawned {
                Ok(device) => devices.push(device),
                Err(e) => {
                    failed = Some(anyhow::anyhow!("starting device thread {t}: {e}"));
                    break;
                }
            }
        }
        let mut runners = Vec::new();
        for vcpu in vcpus {
            if failed.is_some() {
                break;
            }
            let id = vcpu.id();
            let doorbell = match spawn_virtio(s, state, device_memory, id) {
                Ok((device, doorbell)) => {
                    devices.push(device);
                    doorbell
                }
                Err(e) => {
                    failed = Some(anyhow::anyhow!("starting virtio device thread {id}: {e}"));
                    break;
                }
            };
            let mut io = WorkloadIo {
                state: state.clone(),
                doorbell,
            };
            let mut vcpu = vcpu;
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu {id}"))
                .spawn_scoped(s, move || run_vcpu(&mut vcpu, &mut io));
            match spawned {
                Ok(runner) => runners.push(runner),
                Err(e) => failed = Some(anyhow::anyhow!("starting the thread of vCPU {id}: {e}")),
            }
        }
        // vCPUs run their lists to the end on their own.
        let results: Vec<_> = runners.into_iter().map(|r| r.join()).collect();
        let elapsed = started.elapsed();
        stop();
        for device in devices {
            if device.join().is_err() {
                state.broke("a device thread panicked".into());
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        for result in results {
            match result {
                Ok(Ok(VcpuStop::Halted)) => {}
                Ok(Ok(VcpuStop::Stopped)) if state.interrupted() => {}
                Ok(other) => state.broke(format!("a vCPU ended with {other:?}")),
                Err(_) => state.broke("a vCPU thread panicked".into()),
            }
        }
        Ok(elapsed)
    })
}

/// Runs a vCPU until it halts or stops. A signal (Ctrl-C's lands on any
/// thread) interrupts `KVM_RUN` with `EINTR`: enter again; after Ctrl-C the
/// vCPU stops at its next port write.
fn run_vcpu(vcpu: &mut gmem::kvm::Vcpu, io: &mut WorkloadIo) -> Result<VcpuStop, VcpuError> {
    loop {
        match vcpu.run(io) {
            Err(VcpuError::Interrupted) => continue,
            other => return other,
        }
    }
}

/// Starts the virtio device thread of vCPU `id`'s queue; gives the
/// vCPU's doorbell to it.
fn spawn_virtio<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    state: &'scope RunState,
    device_memory: &'scope GuestMemoryGmem,
    id: u64,
) -> std::io::Result<(std::thread::ScopedJoinHandle<'scope, ()>, Doorbell)> {
    let (kick, kicks) = std::sync::mpsc::channel();
    let (answer, served) = std::sync::mpsc::sync_channel(1);
    let device = std::thread::Builder::new()
        .name(format!("virtio {id}"))
        .spawn_scoped(s, move || {
            virtio_thread(state, device_memory, id, kicks, answer)
        })?;
    Ok((device, Doorbell { kick, served }))
}

/// Each vCPU's region: an equal share of the memory past the firmware area,
/// in whole chunks.
fn plan(config: &RunConfig) -> anyhow::Result<Vec<(u64, u64)>> {
    anyhow::ensure!(
        (1..=MAX_VCPUS).contains(&config.vcpus),
        "--vcpus must be 1 to {MAX_VCPUS}"
    );
    anyhow::ensure!(
        config.memory <= GUEST_MEMORY_END,
        "guest memory must end by the local APIC at {GUEST_MEMORY_END:#x}"
    );
    anyhow::ensure!(
        config.device_threads <= MAX_DEVICE_THREADS,
        "at most {MAX_DEVICE_THREADS} device threads"
    );
    anyhow::ensure!(
        config.chunk >= PAGE_SIZE && config.chunk % PAGE_SIZE == 0,
        "the chunk must be a whole number of pages"
    );
    anyhow::ensure!(config.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        config.memory % PAGE_SIZE == 0,
        "the memory size must be a whole number of pages"
    );
    let share =
        config.memory.saturating_sub(FIRMWARE_SIZE) / config.vcpus / config.chunk * config.chunk;
    anyhow::ensure!(
        share > 0,
        "{} MiB leaves no chunk per vCPU past the {} MiB firmware area",
        config.memory >> 20,
        FIRMWARE_SIZE >> 20
    );
    let chunks = share / config.chunk;
    let needed = (commands_per_round(chunks) as usize).saturating_mul(config.rounds as usize);
    anyhow::ensure!(
        needed < MAX_COMMANDS,
        "{} rounds of {chunks} chunks need {needed} guest commands, over the {} a vCPU holds: fewer rounds or bigger chunks",
        config.rounds,
        MAX_COMMANDS - 1
    );
    Ok((0..config.vcpus)
        .map(|v| (FIRMWARE_SIZE + v * share, FIRMWARE_SIZE + (v + 1) * share))
        .collect())
}

/// The guest commands of one round over `chunks` chunks: five a chunk, and
/// the round's closing `Complete`.
fn commands_per_round(chunks: u64) -> u64 {
    5 * chunks + 1
}

/// The guest's command list for `rounds` over the region `[start, end)`.
fn commands(start: u64, end: u64, config: &RunConfig, rounds: Range<u32>) -> Vec<Command> {
    let pages = (config.chunk / PAGE_SIZE) as u32;
    let mut list = Vec::new();
    for round in rounds {
        for chunk in (start..end).step_by(config.chunk as usize) {
            let gpa = chunk as u32;
            list.extend([
                Command::Convert {
                    gpa,
                    pages,
                    to: Attribute::Private,
                },
                Command::Check {
                    gpa,
                    pages,
                    seed: host_seed(round),
                },
                Command::Fill {
                    gpa,
                    pages,
                    seed: guest_seed(round),
                },
                Command::Convert {
                    gpa,
                    pages,
                    to: Attribute::Shared,
                },
                Command::Post {
                    gpa,
                    pages,
                    seed: guest_seed(round),
                },
            ]);
        }
        // The next round converts these chunks again: their requests first.
        list.push(Command::Complete);
    }
    list
}

/// The host pattern of round 0 in every page the guests will check;
/// `progress` counts the pages. Stops early once `interrupt` is set.
fn seed_host_pattern(
    machine: &Machine,
    regions: &[(u64, u64)],
    progress: &ProgressBar,
    interrupt: &AtomicBool,
) -> anyhow::Result<()> {
    let pages: u64 = regions.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum();
    progress.set_message("writing the host's pattern (pages)");
    progress.set_position(0);
    progress.set_length(pages);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for &(start, end) in regions {
        for gpa in (start..end).step_by(PAGE_SIZE as usize) {
            // Relaxed: a request to stop, as in `RunState::interrupted`.
            if interrupt.load(Ordering::Relaxed) {
                return Ok(());
            }
            fill_page(&mut page, host_seed(0), gpa);
            machine.map.write(gpa, &page)?;
            progress.inc(1);
        }
    }
    Ok(())
}

/// A vCPU's line to its virtio device thread: a kick per notification, and
/// a word from the device after each round of serving.
struct Doorbell {
    kick: Sender<()>,
    served: Receiver<()>,
}

/// The VMM side of a vCPU: results, checks and virtio notifications.
struct WorkloadIo {
    state: Arc<RunState>,
    doorbell: Doorbell,
}

impl GuestIo for WorkloadIo {
    fn io_out(&mut self, vcpu: u64, port: u16, _data: &[u8], regs: &ExitRegs) -> ControlFlow<()> {
        let state = &*self.state;
        let (a, b) = (regs.rbx as u32 as u64, regs.rcx as u32 as u64);
        match port {
            RESULT_PORT if regs.rax as u32 != 0 => {
                // KVM's convention: the negative errno (in 32 bits here).
                state.broke(format!(
                    "vCPU {vcpu}: conversion at {a:#x} failed with errno {}",
                    (regs.rax as u32 as i32).unsigned_abs()
                ));
            }
            RESULT_PORT => {}
            CHECK_PORT => {
                state.guest_bytes.fetch_add(b * 8, Ordering::Relaxed);
                if regs.rax as u32 != 0 {
                    state.broke(format!(
                        "vCPU {vcpu}: {} dwords of the host's pattern wrong in {a:#x}+{} pages",
                        regs.rax as u32, b
                    ));
                }
            }
            VIRTIO_NOTIFY_PORT => self.notified(vcpu, a),
            VIRTIO_WAIT_PORT => {
                // Until the device has served, or a slice passes: the guest
                // looks again either way, and gives up after its own limit.
                let _ = self.doorbell.served.recv_timeout(VIRTIO_WAIT_SLICE);
            }
            VIRTIO_STATUS_PORT => state.broke(format!(
                "vCPU {vcpu}: the virtio request for {a:#x} ended with status {:#x}",
                regs.rax as u32
            )),
            other => state.broke(format!("vCPU {vcpu}: write to unknown port {other:#x}")),
        }
        if self.state.interrupted() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn converted(&mut self, request: &ConversionRequest, outcome: &ConversionOutcome) {
        // Guest-physical addresses are file offsets here (one slot at 0).
        self.state
            .conversion_over(request.gpa, request.pages * PAGE_SIZE);
        if outcome.result.is_ok() {
            self.state
                .buffer_conversions
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl WorkloadIo {
    /// The guest posted a request for the chunk at `gpa`: ring the device
    /// thread (which does the work on its own thread) and let the guest go
    /// on.
    fn notified(&mut self, vcpu: u64, gpa: u64) {
        let state = &*self.state;
        if self.doorbell.kick.send(()).is_err() {
            state.broke(format!("vCPU {vcpu}: the virtio device thread is gone"));
        }
        let (start, _) = state.regions[vcpu as usize];
        state.cursor[vcpu as usize].store((gpa - start) / state.chunk, Ordering::Relaxed);
        state.progress.inc(1);
    }
}

/// Holds a virtio request's buffers for the device by pinning the chain
/// once through gmem's view (`GuestMemoryGmem::pin_ranges`) for the whole
/// request; the VMM's let-go requests reach the device through it.
struct PinnedBuffers<'s> {
    state: &'s RunState,
    view: &'s GuestMemoryGmem,
}

impl BufferAccess for PinnedBuffers<'_> {
    type Held<'a>
        = PinnedChain<'a>
    where
        Self: 'a;

    fn hold(&self, buffers: &[(GuestAddress, u64)]) -> Result<PinnedChain<'_>, HoldRefused> {
        let ranges = buffers.iter().map(|&(gpa, len)| (gpa, len as usize));
        let chain = self.view.pin_ranges(ranges).map_err(|e| HoldRefused {
            why: format!("{buffers:x?}: {e}"),
        })?;
        self.state.device_pins.fetch_add(1, Ordering::Relaxed);
        Ok(chain)
    }

    fn asked_to_let_go(&self, gpa: GuestAddress, len: u64) -> bool {
        self.state.asked_to_let_go(gpa.0, len)
    }
}

impl HeldBuffers for PinnedChain<'_> {
    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        PinnedChain::read(self, index, offset, buf).map_err(|e| e.to_string())
    }

    fn write(&self, index: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        PinnedChain::write(self, index, offset, data).map_err(|e| e.to_string())
    }
}

/// A virtio device thread: serves vCPU `queue`'s virtqueue at each kick
/// (and says so on `served`, for a vCPU waiting), until the vCPU is done.
/// Holds a pin on the queue's rings throughout: they stay shared for the
/// run.
fn virtio_thread(
    state: &RunState,
    mem: &GuestMemoryGmem,
    queue: u64,
    kicks: Receiver<()>,
    served: SyncSender<()>,
) {
    let layout = queue_layout(queue);
    let access = PinnedBuffers { state, view: mem };
    let rings = access
        .hold(&[(GuestAddress(layout.base), layout.len())])
        .map_err(|e| format!("its rings: {e}"));
    let resumed = state
        .resumed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(queue as usize)
        .and_then(Option::take);
    let device = rings
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|_| match resumed {
            Some(device) => Ok(device),
            None => PatternDevice::new(layout, mem).map_err(|e| e.to_string()),
        });
    let mut device = device
        .map_err(|why| state.broke(format!("virtio queue {queue}: {why}")))
        .ok();
    while let Ok(()) = kicks.recv() {
        // One pass serves every chain published before it: the kicks that
        // came meanwhile are answered too.
        while kicks.try_recv().is_ok() {}
        if let Some(serving) = &mut device
            && let Err(e) = serving.serve(mem, &access)
        {
            state.broke(format!("virtio queue {queue}: {e}"));
            device = None;
        }
        // Full: the vCPU has a word it has not read yet, which will do.
        let _ = served.try_send(());
    }
    if let Some(device) = device {
        state.add_virtio(queue, &device);
        let mut ended_at = state.ended_at.lock().unwrap_or_else(|e| e.into_inner());
        ended_at[queue as usize] = Some(device.position());
    }
    drop(rings);
}

/// A device thread: DMA into the chunk each vCPU converts next.
fn device_thread(state: &RunState, thread: usize) {
    const HOLD: Duration = Duration::from_micros(200);
    // A buffer fits in a chunk, however small.
    let buffer_pages = DEVICE_BUFFER_PAGES.min(state.chunk / PAGE_SIZE);
    let bytes = device_bytes(thread);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ thread as u64;
    let mut token = vec![0u8; bytes.len()];
    let mut back = vec![0u8; bytes.len()];
    // Acquire pairs with the Release store at the end of the run.
    while !state.stop.load(Ordering::Acquire) {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let vcpu = (rng >> 33) as usize % state.regions.len();
        let (start, end) = state.regions[vcpu];
        let chunks = (end - start) / state.chunk;
        let next = (state.cursor[vcpu].load(Ordering::Relaxed) + 1) % chunks;
        let window = (rng >> 13) % (state.chunk / PAGE_SIZE - buffer_pages + 1);
        let gpa = start + next * state.chunk + window * PAGE_SIZE;
        let len = buffer_pages * PAGE_SIZE;
        if state.asked_to_let_go(gpa, len) {
            // A conversion there is waiting for pins to go: stay away.
            std::thread::sleep(Duration::from_micros(20));
            continue;
        }
        let pin = match state.mem.pin(gpa, len) {
            Ok(pin) => pin,
            Err(e) if e.errno() == 14 => {
                // EFAULT: the guest took it private first.
                state.device_pins_refused.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            Err(e) => return state.broke(format!("device {thread}: pin {gpa:#x}: {e}")),
        };
        state.device_pins.fetch_add(1, Ordering::Relaxed);
        token.fill((rng >> 40) as u8 | 1);
        for page in 0..buffer_pages {
            let at = page * PAGE_SIZE + bytes.start as u64;
            let copied = pin.write(at, &token).and_then(|()| pin.read(at, &mut back));
            match copied {
                Ok(()) if back == token => {}
                Ok(()) => state.broke(format!(
                    "device {thread}: bytes at {:#x} changed under a pin",
                    gpa + at
                )),
                Err(e) => state.broke(format!(
                    "device {thread}: copy through a pin at {:#x}: {e}",
                    gpa + at
                )),
            }
        }
        state
            .host_bytes
            .fetch_add(buffer_pages * bytes.len() as u64, Ordering::Relaxed);
        let held = Instant::now();
        while held.elapsed() < HOLD
            && !state.asked_to_let_go(gpa, len)
            && !state.stop.load(Ordering::Acquire)
        {
            std::hint::spin_loop();
        }
        drop(pin);
    }
}

/// After the run: no pin left, and (unless Ctrl-C stopped it part-way)
/// every request served and every region shared again.
fn check_final_state(state: &RunState, rounds: u64) {
    let stats = state.mem.stats();
    if stats.pins_live != 0 {
        state.broke(format!("{} pins still live after the run", stats.pins_live));
    }
    if state.interrupted() {
        return;
    }
    let chunks: u64 = state
        .regions
        .iter()
        .map(|(s, e)| (e - s) / state.chunk)
        .sum();
    let posted = chunks * rounds;
    let served = state
        .virtio
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .served;
    if served != posted {
        state.broke(format!(
            "the virtio devices served {served} of the {posted} requests posted"
        ));
    }
    for &(start, end) in &state.regions {
        for gpa in (start..end).step_by(state.chunk as usize) {
            if state.mem.attribute(gpa).ok() != Some(Attribute::Shared) {
                state.broke(format!("chunk {gpa:#x} is not shared at the end"));
            }
        }
    }
}

fn summarize(
    config: &RunConfig,
    machine: &Machine,
    state: &RunState,
    elapsed: Duration,
) -> Summary {
    let stats = machine.mem.stats();
    let totals = machine.vm.conversion_totals();
    let virtio = *state.virtio.lock().unwrap_or_else(|e| e.into_inner());
    let conversions = stats.conversions_to_private + stats.conversions_to_shared;
    let broken = state
        .broken
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Summary {
        vcpus: config.vcpus,
        memory_bytes: config.memory,
        rounds: config.rounds,
        chunk_bytes: config.chunk,
        device_threads: config.device_threads,
        request_path: match machine.path {
            RequestPath::Hypercall => "hypercall",
            RequestPath::PortIo => "port-io",
        }
        .into(),
        backing: machine.backing().into(),
        elapsed_s: elapsed.as_secs_f64(),
        conversions,
        conversions_per_sec: conversions as f64 / elapsed.as_secs_f64().max(1e-9),
        eagain: EagainSummary {
            met: stats.eagain,
            retried: totals.eagain_retries,
            resolved: totals.resolved_after_retry,
            failed: totals.failed,
        },
        drains: stats.drains,
        huge_folios: config.huge_folios,
        folio_splits: stats.folio_splits,
        folio_merges: stats.folio_merges,
        let_go_requests: state.let_go_requests.load(Ordering::Relaxed),
        device_pins: state.device_pins.load(Ordering::Relaxed),
        device_pins_refused: state.device_pins_refused.load(Ordering::Relaxed),
        guest_bytes_verified: state.guest_bytes.load(Ordering::Relaxed),
        host_bytes_verified: state.host_bytes.load(Ordering::Relaxed)
            + virtio.bytes / PAGE_SIZE * 8,
        virtio: VirtioSummary {
            queues: config.vcpus,
            requests: virtio.served,
            bytes: virtio.bytes,
            conversions: state.buffer_conversions.load(Ordering::Relaxed),
            data_errors: virtio.data_errors,
            access_errors: virtio.access_errors,
            let_go_retries: virtio.let_go_retries,
            bad_chains: virtio.bad_chains,
        },
        snapshot: None,
        ok: broken.is_empty(),
        interrupted: state.interrupted(),
        broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> RunFlags {
        RunFlags {
            memory_mib: 64,
            vcpus: 2,
            rounds: None,
            chunk_kib: 256,
            device_threads: 2,
            huge_folios: false,
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        let config = defaults().validate(None).unwrap();
        let want = RunConfig::default();
        assert_eq!(
            (config.memory, config.chunk, config.rounds, config.vcpus),
            (want.memory, want.chunk, want.rounds, want.vcpus)
        );
        assert!(plan(&config).is_ok());
    }

    #[test]
    fn memory_is_bounded_by_what_the_machine_has() {
        let err = defaults().validate(Some(63 << 20)).unwrap_err();
        assert!(
            err.0
                .contains("63 MiB of memory this machine has available"),
            "{err}"
        );
        assert!(defaults().validate(Some(64 << 20)).is_ok());
    }

    #[test]
    fn every_valid_configuration_plans() {
        // The largest memory, with chunks big enough for one round.
        let flags = RunFlags {
            memory_mib: RunFlags::MAX_MEMORY_MIB,
            chunk_kib: 32 << 10,
            rounds: Some(1),
            vcpus: 3,
            ..defaults()
        };
        let config = flags.validate(None).unwrap();
        let regions = plan(&config).unwrap();
        assert!(regions.iter().all(|&(_, end)| end <= GUEST_MEMORY_END));
        // The most rounds validate allows fit the command area.
        let max = (MAX_COMMANDS as u64 - 1) / commands_per_round(120);
        let flags = RunFlags {
            rounds: Some(max as u32),
            ..defaults()
        };
        assert!(plan(&flags.validate(None).unwrap()).is_ok());
        let flags = RunFlags {
            rounds: Some(max as u32 + 1),
            ..defaults()
        };
        assert!(flags.validate(None).is_err());
    }

    /// Without `--rounds`, every memory size and chunk in range runs: the
    /// default rounds, or the most that fit where fewer do.
    #[test]
    fn the_default_rounds_fit_the_memory() {
        let rounds = |memory_mib, chunk_kib| {
            let flags = RunFlags {
                memory_mib,
                chunk_kib,
                ..defaults()
            };
            let config = flags.validate(None).map_err(|e| e.0)?;
            plan(&config).map_err(|e| e.to_string())?;
            Ok::<_, String>(config.rounds)
        };
        assert_eq!(rounds(64, 256), Ok(RunFlags::DEFAULT_ROUNDS));
        assert_eq!(rounds(512, 256), Ok(12));
        assert_eq!(rounds(1024, 256), Ok(6));
        assert_eq!(rounds(RunFlags::MAX_MEMORY_MIB, 256), Ok(1));
        assert_eq!(rounds(64, 4), Ok(1));
        // No round fits at all: a one-line error that says what to change.
        let none = rounds(RunFlags::MAX_MEMORY_MIB, 4).unwrap_err();
        assert!(none.contains("use bigger chunks or less memory"), "{none}");
        assert!(!none.contains("--rounds"), "{none}");
        // An explicit count out of range stays an error.
        let flags = RunFlags {
            memory_mib: 512,
            rounds: Some(16),
            ..defaults()
        };
        let err = flags.validate(None).unwrap_err();
        assert!(err.0.starts_with("--rounds 16 must be 1 to 12"), "{err}");
    }

    #[test]
    fn device_slots_stay_clear_of_the_patterns() {
        for thread in 0..MAX_DEVICE_THREADS {
            let bytes = device_bytes(thread);
            assert!(bytes.start >= 4 && bytes.end <= PAGE_SIZE as usize - 4);
            if thread > 0 {
                assert!(device_bytes(thread - 1).end <= bytes.start);
            }
        }
    }
}
