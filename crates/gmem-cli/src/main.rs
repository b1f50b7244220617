//! The `gmem` command: runs, tests, measures and shows guest memory with
//! in-place shared/private conversion on KVM.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gmem_cli::progress::{self, Ticker};
use gmem_cli::workload::{self, RunFlags, Summary};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "gmem",
    version,
    about = "Guest memory with in-place shared/private conversion, on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the bundled workload: vCPUs converting their memory in rounds
    /// while device threads pin and copy through shared buffers.
    Run(RunArgs),
    /// Run the kernel-parity scenarios, host side and guest side.
    Selftest {
        /// Run only scenarios whose name contains this.
        filter: Option<String>,
    },
    /// Measure the headline costs against floors measured in the same run.
    Bench {
        /// Print one JSON object `{"cases": [...]}`.
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// Print the table as Markdown (for BENCHMARKS.md).
        #[arg(long)]
        markdown: bool,
        /// Run only cases whose name contains this.
        #[arg(long, value_name = "NAME", conflicts_with = "study")]
        only: Option<String>,
        /// Exit with 1 (after printing everything) when a measured goal is
        /// missed. Timings are noisy: re-run before reading a miss.
        #[arg(long, conflicts_with = "study")]
        check: bool,
        /// Run the conversion-latency study instead: median and p99 by size
        /// and case, beside the floor; writes `study.json` and `study.svg`
        /// into `--out` and prints the table.
        #[arg(long, conflicts_with = "json")]
        study: bool,
        /// Print the table (and `--check`) of the rows of an earlier
        /// `--json` run from this file instead of measuring.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["study", "only"])]
        from: Option<std::path::PathBuf>,
        /// Where `--study` writes its files.
        #[arg(long, value_name = "DIR", default_value = ".", requires = "study")]
        out: std::path::PathBuf,
    },
    /// Torture one file from many threads against a shadow model: pins,
    /// conversions, punches and copies; exit 1 on any violation.
    Stress(StressArgs),
    /// Show what this host's KVM supports.
    Info {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// The flags of `gmem run`. The ranges in the help are those of
/// `RunFlags::validate` (a test keeps them in step).
#[derive(clap::Args)]
struct RunArgs {
    /// Guest memory in MiB: 5 to 4078 (the guest's 32-bit address space ends
    /// at the local APIC at 0xFEE00000), and no more than this machine has
    /// available.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// vCPUs: 1 to 4.
    #[arg(long, default_value_t = 2)]
    vcpus: u64,
    /// Rounds over each vCPU's memory: at least 1, and each round takes 5
    /// guest commands a chunk and 1 more of the 64511 a vCPU holds (up to 107
    /// rounds with the default memory, vCPUs and chunk).
    #[arg(long, default_value_t = 16)]
    rounds: u32,
    /// KiB the guest converts per request: a multiple of 4 (the page), up to
    /// each vCPU's share of the memory past the 4 MiB firmware area.
    #[arg(long, default_value_t = 256)]
    chunk_kib: u64,
    /// Host device threads pinning shared buffers: 0 to 32 (each owns 64
    /// bytes of every page).
    #[arg(long, default_value_t = 2)]
    device_threads: usize,
    /// Count references per 2 MiB huge folio where a range is uniform.
    #[arg(long)]
    huge_folios: bool,
    /// Print one JSON object instead of the progress and summary (progress
    /// lines still go to stderr every few seconds).
    #[arg(long)]
    json: bool,
}

/// The flags of `gmem stress`. The ranges in the help are those of
/// `StressFlags::validate`.
#[derive(clap::Args)]
struct StressArgs {
    /// Worker threads: 1 to 64 (each owns a stripe of the file's pages).
    #[arg(long, default_value_t = 5)]
    threads: u64,
    /// How long to run: 1 to 86400 seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// File size in MiB: 1 to 65536, and no more than this machine has
    /// available.
    #[arg(long, default_value_t = 16)]
    size_mib: u64,
    /// Count references per 2 MiB huge folio where a range is uniform.
    #[arg(long)]
    huge_folios: bool,
    /// Print one JSON object instead of the summary (progress lines still go
    /// to stderr every few seconds).
    #[arg(long)]
    json: bool,
}

/// `gmem selftest | head` closes the pipe early: end as a program killed by
/// `SIGPIPE` would (status 141, what shells expect), not with a panic's
/// message. Rust ignores `SIGPIPE`, so a closed pipe surfaces as a panic in
/// `println!`.
fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(128 + 13);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    // gmem's own events (conversions refused, EAGAINs, failed restores) go to
    // stderr at the level `RUST_LOG` asks for; warnings and errors by default.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: no escape codes in a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Info { json } => info(json),
        Command::Bench {
            json,
            markdown,
            only,
            check,
            study,
            from,
            out,
        } => {
            if study {
                bench_study(markdown, &out)
            } else {
                bench(json, markdown, only.as_deref(), check, from.as_deref())
            }
        }
        Command::Selftest { filter } => selftest(filter.as_deref()),
        Command::Stress(args) => stress(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gmem: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let flags = RunFlags {
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        rounds: args.rounds,
        chunk_kib: args.chunk_kib,
        device_threads: args.device_threads,
        huge_folios: args.huge_folios,
    };
    let config = flags.validate(workload::available_memory())?;
    require_kvm()?;
    // A bar on a terminal; elsewhere (or with --json) a line every few
    // seconds, so that a long run is never silent.
    let (progress, ticker) = if !args.json && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {bar:40} {pos}/{len} {elapsed_precise}")
                .context("the progress template")?,
        );
        (bar, None)
    } else {
        let bar = ProgressBar::hidden();
        let ticker = Ticker::start(bar.clone(), progress::INTERVAL, std::io::stderr())
            .context("starting the progress thread")?;
        (bar, Some(ticker))
    };
    let summary = workload::run(&config, progress);
    drop(ticker);
    let summary = summary?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn stress(args: StressArgs) -> anyhow::Result<ExitCode> {
    use gmem_cli::stress::{self, StressFlags};
    let flags = StressFlags {
        threads: args.threads,
        seconds: args.seconds,
        size_mib: args.size_mib,
        huge_folios: args.huge_folios,
    }
    .validate(workload::available_memory())?;
    // A bar on a terminal; elsewhere (or with --json) a line every few
    // seconds.
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(flags.seconds);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {bar:20} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    let every = if bar.is_some() {
        std::time::Duration::from_millis(500)
    } else {
        progress::INTERVAL
    };
    let summary = stress::run(&flags, every, |elapsed, live| match &bar {
        Some(bar) => {
            bar.set_position(elapsed.as_secs());
            bar.set_message(live.line());
        }
        None => eprintln!("gmem stress: {} s: {}", elapsed.as_secs(), live.line()),
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        summary.print();
    }
    Ok(if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_summary(s: &Summary) {
    println!(
        "gmem run: {} vCPUs, {} MiB {}, {} rounds of {} KiB conversions, {} device threads, requests by {}",
        s.vcpus,
        s.memory_bytes >> 20,
        s.backing,
        s.rounds,
        s.chunk_bytes >> 10,
        s.device_threads,
        s.request_path
    );
    println!(
        "  conversions      {} in {:.2} s ({:.0}/s)",
        s.conversions, s.elapsed_s, s.conversions_per_sec
    );
    println!(
        "  EAGAIN           {} met, {} retried after let-go requests, {} requests resolved, {} failed",
        s.eagain.met, s.eagain.retried, s.eagain.resolved, s.eagain.failed
    );
    println!("  drains           {}", s.drains);
    if s.huge_folios {
        println!(
            "  huge folios      {} splits, {} merges",
            s.folio_splits, s.folio_merges
        );
    }
    println!(
        "  device pins      {} taken, {} refused (buffer already private), {} let-go requests",
        s.device_pins, s.device_pins_refused, s.let_go_requests
    );
    println!(
        "  verified         {} bytes by the guest, {} bytes by the host",
        s.guest_bytes_verified, s.host_bytes_verified
    );
    let v = &s.virtio;
    println!(
        "  virtio           {} requests on {} queues, {} bytes, {} buffer conversions, {} let-go retries",
        v.requests, v.queues, v.bytes, v.conversions, v.let_go_retries
    );
    println!(
        "  virtio errors    {} data, {} access, {} bad chains",
        v.data_errors, v.access_errors, v.bad_chains
    );
    if s.ok {
        println!("  invariants       all held");
    } else {
        println!("  invariants       {} BROKEN:", s.broken.len());
        for what in &s.broken {
            println!("    {what}");
        }
    }
}

/// Fails with what to do when `/dev/kvm` cannot be used.
fn require_kvm() -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .context(
            "cannot use /dev/kvm: gmem runs real KVM guests. Enable virtualisation (VT-x/AMD-V, or nested \
             virtualisation in a VM), load the kvm module (`modprobe kvm_intel` or `kvm_amd`), and give \
             this user access (`sudo usermod -aG kvm $USER`, then log in again)",
        )
}

fn selftest(filter: Option<&str>) -> anyhow::Result<ExitCode> {
    use gmem_cli::scenarios::{Outcome, all};
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let scenarios: Vec<_> = all()
        .into_iter()
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        .collect();
    if let (Some(filter), true) = (filter, scenarios.is_empty()) {
        anyhow::bail!(
            "no self-test scenario name contains {filter:?} (names are host/memfd/<rule>, host/kvm/<rule> \
             and guest/<rule>; `gmem selftest` lists them all)"
        );
    }
    println!("1..{}", scenarios.len());
    if let Ok(hiding) = HidingInfo::probe() {
        println!("# {}", hiding.summary());
    }
    for (number, scenario) in scenarios.iter().enumerate() {
        let number = number + 1;
        match scenario.run() {
            Outcome::Pass => {
                passed += 1;
                println!("ok {number} - {}", scenario.name);
            }
            Outcome::Fail(why) => {
                failed += 1;
                println!("not ok {number} - {}: {why}", scenario.name);
            }
            Outcome::Skip(why) => {
                skipped += 1;
                println!("ok {number} - {} # SKIP {why}", scenario.name);
            }
        }
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench(
    json: bool,
    markdown: bool,
    only: Option<&str>,
    check: bool,
    from: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use gmem_cli::bench::{CaseResult, table};
    let results = match from {
        Some(path) => {
            #[derive(serde::Deserialize)]
            struct Rows {
                cases: Vec<CaseResult>,
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<Rows>(&text)
                .with_context(|| {
                    format!("{}: not the JSON of `gmem bench --json`", path.display())
                })?
                .cases
        }
        None => {
            let mut progress = |name: &str| {
                if !json {
                    eprintln!("measuring {name} ...");
                }
            };
            gmem_cli::bench::run_all(&mut progress, only)
        }
    };
    if json {
        let cases = serde_json::json!({ "cases": results });
        println!("{}", serde_json::to_string_pretty(&cases)?);
    } else if markdown {
        print!("{}", table::markdown_table(&results));
    } else {
        print!("{}", table::terminal_table(&results));
    }
    let missed = table::missed(&results);
    if check && !missed.is_empty() {
        let names: Vec<_> = missed.iter().map(|r| r.name.as_str()).collect();
        eprintln!("gmem: goals missed: {}", names.join(", "));
    }
    Ok(ExitCode::from(table::exit_status(&results, check)))
}

fn bench_study(markdown: bool, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    use gmem_cli::bench::study;
    let study = study::run(&mut |line: &str| eprintln!("{line}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("study.json");
    std::fs::write(&json, serde_json::to_string_pretty(&study)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = out.join("study.svg");
    std::fs::write(&svg, study::plot(&study)?)
        .with_context(|| format!("writing {}", svg.display()))?;
    if markdown {
        print!("{}", study::markdown_table(&study));
    } else {
        print!("{}", study::terminal_table(&study));
    }
    eprintln!("wrote {} and {}", json.display(), svg.display());
    Ok(ExitCode::SUCCESS)
}

fn info(json: bool) -> anyhow::Result<ExitCode> {
    require_kvm()?;
    let support = gmem::kvm::HostSupport::probe()?;
    let hiding = HidingInfo::probe()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info_json(&support, &hiding))?
        );
    } else {
        print_info(&support);
        hiding.print();
    }
    Ok(ExitCode::SUCCESS)
}

/// The names of the guest_memfd flags in `mask`.
fn flag_names(mask: u64) -> Vec<&'static str> {
    let known = [(1, "MMAP"), (2, "INIT_SHARED")];
    let mut names: Vec<_> = known
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if mask & !3 != 0 {
        names.push("unknown bits");
    }
    names
}

/// The VM types in a `KVM_CAP_VM_TYPES` mask.
fn vm_types(mask: u64) -> Vec<u32> {
    (0..64).filter(|t| mask & (1 << t) != 0).collect()
}

/// How a new host mapping of each backing hides private pages here.
struct HidingInfo {
    memfd: gmem::Hiding,
    kernel_guest_memfd: Option<gmem::Hiding>,
    limits: gmem::VmaLimits,
}

impl HidingInfo {
    fn probe() -> anyhow::Result<HidingInfo> {
        use gmem::{Flags, GuestMemfd, PAGE_SIZE};
        let flags = Flags::MMAP | Flags::INIT_SHARED;
        let memfd = GuestMemfd::new(PAGE_SIZE, flags)?.mmap()?.hiding();
        let kernel_guest_memfd = gmem::kvm::Vm::new()
            .ok()
            .and_then(|vm| vm.create_guest_memfd(PAGE_SIZE, flags).ok())
            .and_then(|mem| mem.mmap().ok())
            .map(|map| map.hiding());
        Ok(HidingInfo {
            memfd,
            kernel_guest_memfd,
            limits: gmem::vma_limits(),
        })
    }

    fn name(hiding: gmem::Hiding) -> &'static str {
        match hiding {
            gmem::Hiding::GuardMarkers => "guard markers",
            gmem::Hiding::EmptyFileRemap => "empty-file remap (one VMA per private run)",
        }
    }

    /// One line: which mechanism, so which fault, on each backing.
    fn summary(&self) -> String {
        let fault = |hiding: gmem::Hiding| match hiding {
            gmem::Hiding::GuardMarkers => "guard markers, SIGSEGV",
            gmem::Hiding::EmptyFileRemap => "empty-file remap, SIGBUS",
        };
        let kernel = self.kernel_guest_memfd.map_or("unavailable", fault);
        format!(
            "private pages hidden by: memfd {}; kernel guest_memfd {kernel}",
            fault(self.memfd)
        )
    }

    fn json(&self) -> serde_json::Value {
        let key = |hiding: gmem::Hiding| match hiding {
            gmem::Hiding::GuardMarkers => "guard_markers",
            gmem::Hiding::EmptyFileRemap => "empty_file_remap",
        };
        serde_json::json!({
            "memfd": key(self.memfd),
            "kernel_guest_memfd": self.kernel_guest_memfd.map(key),
            "max_map_count": self.limits.max_map_count,
            "process_vma_budget": self.limits.process_budget,
            "default_file_vma_budget": self.limits.default_file_budget,
        })
    }

    fn print(&self) {
        println!(
            "private pages hidden by      {} (memfd)",
            Self::name(self.memfd)
        );
        let kernel = self.kernel_guest_memfd.map_or("unavailable", Self::name);
        println!("                             {kernel} (kernel guest_memfd)");
        let limits = &self.limits;
        println!(
            "fallback VMA budget          {} a file, {} the process (vm.max_map_count {})",
            limits.default_file_budget, limits.process_budget, limits.max_map_count
        );
    }
}

fn info_json(support: &gmem::kvm::HostSupport, hiding: &HidingInfo) -> serde_json::Value {
    serde_json::json!({
        "hiding": hiding.json(),
        "kvm_api_version": support.api_version,
        "guest_memfd": support.guest_memfd,
        "guest_memfd_flags": flag_names(support.guest_memfd_flags),
        "guest_memory": gmem_cli::machine::backing_name(support.memory_backing()),
        "memory_attributes": support.memory_attributes,
        "vm_types": vm_types(support.vm_types),
        "user_memory2": support.user_memory2,
        "exit_hypercall_mask": support.exit_hypercall,
        "hypercall_exit_delivered": support.hypercall_exit_delivered,
        "per_page_attributes": support.per_page_attributes,
        "attribute_sync": format!("{:?}", support.attribute_sync()),
        "recommended_vcpus": support.recommended_vcpus,
    })
}

fn print_info(support: &gmem::kvm::HostSupport) {
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("KVM API version              {}", support.api_version);
    println!("guest_memfd                  {}", yes(support.guest_memfd));
    println!(
        "guest_memfd flags            {:#x} ({})",
        support.guest_memfd_flags,
        flag_names(support.guest_memfd_flags).join(" | ")
    );
    println!(
        "VM memory attributes         {:#x}",
        support.memory_attributes
    );
    println!(
        "VM types                     {:?}",
        vm_types(support.vm_types)
    );
    println!("KVM_SET_USER_MEMORY_REGION2  {}", yes(support.user_memory2));
    let memory = match support.memory_backing() {
        gmem::BackingKind::KernelGuestMemfd => "kernel guest_memfd",
        gmem::BackingKind::Memfd => {
            "memfd slots (no usable guest_memfd; gmem's map guards the host)"
        }
    };
    println!("guest memory                 {memory}");
    println!(
        "hypercall exits              mask {:#x}; KVM_HC_MAP_GPA_RANGE delivered: {}",
        support.exit_hypercall,
        yes(support.hypercall_exit_delivered)
    );
    let per_page = if support.per_page_attributes {
        "yes (KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd)"
    } else {
        "no (gmem's attribute map decides what the host may touch)"
    };
    println!("per-page attributes          {per_page}");
    let in_step = match support.attribute_sync() {
        gmem::kvm::AttributeSyncMode::GmemOnly => "none (gmem's map alone)",
        gmem::kvm::AttributeSyncMode::VmAttributes => "KVM_SET_MEMORY_ATTRIBUTES per slot",
        gmem::kvm::AttributeSyncMode::InPlaceAttributes => "KVM_SET_MEMORY_ATTRIBUTES2 in place",
    };
    println!("KVM attributes kept in step  {in_step}");
    let path = if support.hypercall_exit_delivered {
        "hypercall"
    } else {
        "port I/O"
    };
    println!("guest conversion requests    {path}");
    println!("recommended vCPUs            {}", support.recommended_vcpus);
}
