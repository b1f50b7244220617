//! The `gmem` command: runs, tests, measures and shows guest memory with
//! in-place shared/private conversion on KVM.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use gmem_cli::info::{self, HidingInfo};
use gmem_cli::interrupt;
use gmem_cli::progress::{self, Ticker};
use gmem_cli::run_snapshot::{self, SavedRun, Stage};
use gmem_cli::workload::{self, RunFlags};
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
        /// Exit with 1 (after printing everything, and a table of the
        /// misses on stderr) when a measured goal is missed. Rows differ in
        /// what they depend on: the instruction counts (instructions-*) and
        /// sizes are the same on any host; the ratios against system calls
        /// (round trips, fragmented files, snapshots, the guest's round trip)
        /// move with the host's system-call cost, the cheaper the worse;
        /// the pin, copy and virtio rows with its CPU. Timings are noisy:
        /// re-run before reading a miss of a timed row.
        #[arg(long, conflicts_with = "study")]
        check: bool,
        /// Run only the instruction counts: gmem's own work per conversion
        /// in user space (single pages in order and scattered, and per page
        /// of a batched conversion), by the hardware counter; where the host
        /// has none the rows say so, and `scripts/instructions.sh` counts the
        /// same work under callgrind.
        #[arg(long, conflicts_with_all = ["only", "study", "from"])]
        instructions: bool,
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
    /// Be a backend process of a VMM's guest memory: listen on --socket,
    /// attach to the VMM that connects (gmem's backend protocol), map its
    /// file and serve its conversions until it goes away.
    Backend {
        /// The Unix socket to listen on (removed once a VMM connects).
        #[arg(long, value_name = "PATH")]
        socket: std::path::PathBuf,
        /// Echo messages instead, hiding and showing a page of a memfd
        /// for each: the benchmarks' cross-process floor.
        #[arg(long, hide = true, conflicts_with = "torture")]
        echo: bool,
        /// Pin, read and check random pages until the VMM goes away, and
        /// print what was done (`gmem stress --backends`).
        #[arg(long, hide = true)]
        torture: bool,
    },
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
    /// rounds with the default memory, vCPUs and chunk). Default: 16, or the
    /// most that fit where fewer do.
    #[arg(long)]
    rounds: Option<u32>,
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
    /// Stop after round --snapshot-at-round and write the run's snapshot to
    /// FILE: guest memory (page states and contents, private pages in
    /// clear) and the machine state the guest needs to go on.
    #[arg(long, value_name = "FILE")]
    snapshot: Option<std::path::PathBuf>,
    /// The round after which --snapshot stops: 1 to the run's rounds less
    /// one.
    #[arg(long, value_name = "N")]
    snapshot_at_round: Option<u32>,
    /// Finish the run saved in FILE by --snapshot: its flags (any given
    /// beside it must agree) and the rounds after the one it stopped at.
    #[arg(long, value_name = "FILE")]
    restore: Option<std::path::PathBuf>,
}

/// The machine flags given on `gmem run`'s command line (not defaults).
fn given_run_flags(matches: &ArgMatches) -> Vec<&'static str> {
    let Some(("run", run)) = matches.subcommand() else {
        return Vec::new();
    };
    run_snapshot::MACHINE_FLAGS
        .into_iter()
        .filter(|id| run.value_source(id) == Some(ValueSource::CommandLine))
        .collect()
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
    /// Backend processes, 0 to 4, attached to the file: each pins, reads
    /// and checks random pages of its replica while the workers convert.
    #[arg(long, default_value_t = 0)]
    backends: u64,
    /// Print one JSON object instead of the summary (progress lines still go
    /// to stderr every few seconds).
    #[arg(long)]
    json: bool,
}

/// A write to standard output failed: a full disk, or a closed pipe.
#[derive(Debug, thiserror::Error)]
#[error("writing the output")]
struct OutputError(#[source] io::Error);

/// Writes to standard output with `write`, and flushes it.
fn output(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<(), OutputError> {
    let mut out = io::stdout().lock();
    write(&mut out)
        .and_then(|()| out.flush())
        .map_err(OutputError)
}

/// The exit status of an error: a closed pipe (`gmem selftest | head`) ends
/// gmem quietly as `SIGPIPE` would (141, what shells expect; Rust ignores
/// the signal, so it surfaces as a write error); any other error is one
/// line on stderr and 2.
fn failed(e: &anyhow::Error) -> ExitCode {
    if let Some(OutputError(why)) = e.downcast_ref()
        && why.kind() == io::ErrorKind::BrokenPipe
    {
        return ExitCode::from(128 + 13);
    }
    // Nothing more to do if stderr is gone too.
    let _ = writeln!(io::stderr(), "gmem: {e:#}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = given_run_flags(&matches);
    // gmem's own events (conversions refused, EAGAINs, failed restores) go to
    // stderr at the level `RUST_LOG` asks for; warnings and errors by default.
    // `gmem stress` makes listeners panic and refuse on purpose, so the
    // rollbacks they break (after a panic) are expected, not logged.
    let default = match cli.command {
        Command::Stress(_) => "warn,gmem::kvm::gpa_map=off",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: no escape codes in a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args, &given),
        Command::Info { json } => info(json),
        Command::Bench {
            json,
            markdown,
            only,
            check,
            instructions,
            study,
            from,
            out,
        } => {
            let only = match instructions {
                true => Some("instructions-"),
                false => only.as_deref(),
            };
            if study {
                bench_study(markdown, &out)
            } else {
                bench(json, markdown, only, check, from.as_deref())
            }
        }
        Command::Selftest { filter } => selftest(filter.as_deref()),
        Command::Stress(args) => stress(args),
        Command::Backend {
            socket,
            echo,
            torture,
        } => backend(&socket, echo, torture),
    };
    result.unwrap_or_else(|e| failed(&e))
}

fn backend(socket: &std::path::Path, echo: bool, torture: bool) -> anyhow::Result<ExitCode> {
    if torture {
        let tortured = gmem_cli::backend::torture(socket).map_err(anyhow::Error::msg)?;
        println!("{}", tortured.line());
        return Ok(if tortured.violations == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if echo {
        gmem_cli::backend::echo(socket).map_err(anyhow::Error::msg)?;
    } else {
        let served = gmem_cli::backend::serve(socket).map_err(anyhow::Error::msg)?;
        eprintln!("gmem backend: the VMM went away after {served} requests");
    }
    Ok(ExitCode::SUCCESS)
}

/// `given`: the machine flags on the command line, which must agree with
/// a snapshot's under `--restore`.
fn run(args: RunArgs, given: &[&str]) -> anyhow::Result<ExitCode> {
    let flags = RunFlags {
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        rounds: args.rounds,
        chunk_kib: args.chunk_kib,
        device_threads: args.device_threads,
        huge_folios: args.huge_folios,
    };
    let stage = Stage::from_flags(args.snapshot, args.snapshot_at_round, args.restore)?;
    let (config, saved) = match &stage {
        Stage::Restore { file } => {
            let saved = SavedRun::open(file)?;
            saved.state.check_given(&flags, given)?;
            let config = saved.state.validate(workload::available_memory())?;
            (config, Some(saved))
        }
        _ => (flags.validate(workload::available_memory())?, None),
    };
    stage.check_rounds(config.rounds)?;
    require_kvm()?;
    interrupt::install().context("handling Ctrl-C")?;
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
    let summary = match (stage, saved) {
        (Stage::Save { file, at_round }, _) => {
            run_snapshot::save(&config, &file, at_round, progress, interrupt::flag())
        }
        (_, Some(saved)) => run_snapshot::restore(&config, saved, progress, interrupt::flag()),
        _ => workload::run(&config, progress, interrupt::flag()),
    };
    drop(ticker);
    let summary = summary?;
    if args.json {
        let json = serde_json::to_string_pretty(&summary)?;
        output(|out| writeln!(out, "{json}"))?;
    } else {
        output(|out| summary.write_to(out))?;
    }
    Ok(exit_status(summary.ok, summary.interrupted))
}

/// The exit status of a run or stress: 130 if Ctrl-C stopped it, else 1 if
/// an invariant broke.
fn exit_status(ok: bool, interrupted: bool) -> ExitCode {
    match (interrupted, ok) {
        (true, _) => ExitCode::from(interrupt::EXIT_STATUS),
        (false, true) => ExitCode::SUCCESS,
        (false, false) => ExitCode::FAILURE,
    }
}

fn stress(args: StressArgs) -> anyhow::Result<ExitCode> {
    use gmem_cli::stress::{self, StressFlags};
    let flags = StressFlags {
        threads: args.threads,
        seconds: args.seconds,
        size_mib: args.size_mib,
        huge_folios: args.huge_folios,
        backends: args.backends,
    }
    .validate(workload::available_memory())?;
    interrupt::install().context("handling Ctrl-C")?;
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
    let summary = stress::run(
        &flags,
        every,
        interrupt::flag(),
        |elapsed, live| match &bar {
            Some(bar) => {
                bar.set_position(elapsed.as_secs());
                bar.set_message(live.line());
            }
            None => eprintln!("gmem stress: {} s: {}", elapsed.as_secs(), live.line()),
        },
    );
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    if args.json {
        let json = serde_json::to_string_pretty(&summary)?;
        output(|out| writeln!(out, "{json}"))?;
    } else {
        output(|out| summary.write_to(out))?;
    }
    Ok(exit_status(summary.ok, summary.interrupted))
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
    output(|out| writeln!(out, "1..{}", scenarios.len()))?;
    if let Ok(hiding) = HidingInfo::probe() {
        output(|out| writeln!(out, "# {}", hiding.summary()))?;
    }
    for (number, scenario) in scenarios.iter().enumerate() {
        let number = number + 1;
        let line = match scenario.run() {
            Outcome::Pass => {
                passed += 1;
                format!("ok {number} - {}", scenario.name)
            }
            Outcome::Fail(why) => {
                failed += 1;
                format!("not ok {number} - {}: {why}", scenario.name)
            }
            Outcome::Skip(why) => {
                skipped += 1;
                format!("ok {number} - {} # SKIP {why}", scenario.name)
            }
        };
        output(|out| writeln!(out, "{line}"))?;
    }
    output(|out| writeln!(out, "{passed} passed, {failed} failed, {skipped} skipped"))?;
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
            let names = gmem_cli::bench::case_names();
            if let Some(only) = only
                && !names.iter().any(|name| name.contains(only))
            {
                anyhow::bail!(
                    "no bench case name contains {only:?}; the cases are {}",
                    names.join(", ")
                );
            }
            let mut progress = |name: &str| {
                if !json {
                    eprintln!("measuring {name} ...");
                }
            };
            gmem_cli::bench::run_all(&mut progress, only)
        }
    };
    let text = if json {
        let cases = serde_json::json!({ "cases": results });
        serde_json::to_string_pretty(&cases)? + "\n"
    } else if markdown {
        table::markdown_table(&results)
    } else {
        table::terminal_table(&results)
    };
    output(|out| out.write_all(text.as_bytes()))?;
    let missed = table::missed(&results);
    if check && !missed.is_empty() {
        let names: Vec<_> = missed.iter().map(|r| r.name.as_str()).collect();
        eprintln!("gmem: goals missed: {}", names.join(", "));
        eprint!("{}", gmem_cli::bench::check::missed_table(&results));
    }
    Ok(ExitCode::from(table::exit_status(&results, check)))
}

fn bench_study(markdown: bool, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    use gmem_cli::bench::study;
    // Open both files before the measuring, which takes a while: a bad
    // `--out` fails at once.
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (json, svg) = (out.join("study.json"), out.join("study.svg"));
    let (mut json_file, mut svg_file) = (open_output(&json)?, open_output(&svg)?);
    let study = study::run(&mut |line: &str| eprintln!("{line}"))?;
    let text = serde_json::to_string_pretty(&study)? + "\n";
    replace_contents(&mut json_file, text.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    replace_contents(&mut svg_file, study::plot(&study)?.as_bytes())
        .with_context(|| format!("writing {}", svg.display()))?;
    let table = if markdown {
        study::markdown_table(&study)
    } else {
        study::terminal_table(&study)
    };
    output(|out| out.write_all(table.as_bytes()))?;
    eprintln!("wrote {} and {}", json.display(), svg.display());
    Ok(ExitCode::SUCCESS)
}

/// Opens `path` for writing, made if missing but not yet emptied (an
/// earlier result stays until the new one is written).
fn open_output(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {} for writing", path.display()))
}

/// Makes `bytes` the whole contents of `file`.
fn replace_contents(file: &mut std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    file.set_len(0)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn info(json: bool) -> anyhow::Result<ExitCode> {
    require_kvm()?;
    let support = gmem::kvm::HostSupport::probe()?;
    let hiding = HidingInfo::probe()?;
    let lazy = gmem::snapshot::probe_lazy_restore();
    if json {
        let mut json = info::info_json(&support, &hiding);
        json["lazy_restore"] = info::lazy_restore_json(&lazy);
        let json = serde_json::to_string_pretty(&json)?;
        output(|out| writeln!(out, "{json}"))?;
    } else {
        output(|out| {
            info::write_support(&support, out)?;
            hiding.write_to(out)?;
            info::write_lazy_restore(&lazy, out)
        })?;
    }
    Ok(ExitCode::SUCCESS)
}
