//! Project tasks: `cargo xtask setup | build | test | run | ...`. Every task installs what it is
//! missing first, so a fresh machine goes from clone to green with these commands alone.

mod bench;
mod fuzz;
mod package;
mod setup;
mod util;
mod vm;
mod vm_fleet;
mod vm_systemd;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "cacheprobe build, setup and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (nightly rust-src, bpf-linker, Debian test peers) and mount tracefs.
    Setup,
    /// Build target/release/cacheprobe with the kernel object embedded.
    Build {
        /// Build the debug profile instead (target/debug/cacheprobe).
        #[arg(long)]
        debug: bool,
    },
    /// Set up, build, then run unit tests and the root integration tests.
    Test {
        /// Only unit tests (no root, no kernel).
        #[arg(long)]
        unit: bool,
    },
    /// Fuzz the memcache decoder with libFuzzer for a while (`cargo xtask test` runs 60 s).
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Set up, build and run the agent in the foreground (arguments go to `cacheprobe run`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build and measure the agent's overhead against real memcached (root; see BENCHMARKS.md).
    Bench {
        /// Smoke run for CI (about a minute): one repeat, short runs, 1k connections, no criterion.
        #[arg(long)]
        quick: bool,
        /// Where to write the report. Default: a full run replaces the generated part of
        /// BENCHMARKS.md (its hand-written sections stay); --quick writes
        /// target/bench/BENCHMARKS.quick.md and --only target/bench/BENCHMARKS.only-<names>.md.
        /// An existing file's text before its generated part is always kept.
        #[arg(long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// Run only these measures: attach, toggle (the overhead goals under continuous load,
        /// the agent toggled in windows, both ends watched), toggle-one (the same, one end),
        /// ab, modes, bpf, frame-cost, percall, account (the same goals by accounting: the
        /// agent's added CPU per op under the toggled windows' load; runs percall too), loss,
        /// tshark, idle, decoder, scrape, fleet, top (comma-separated); `budget` (accuracy of the scaled counters
        /// against memcached's stats per decoding budget, about 10 minutes) runs only when named.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Interleaved off/on rounds of `ab` (default 10; 2 with --quick), and cycles of
        /// `toggle`/`toggle-one` (default 16; 2 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
        /// An earlier build of the agent (a copy of target/release/cacheprobe): `ab` runs its
        /// modes in the same interleaved rounds instead of the port-check twins, and reports
        /// this build against it per round (before and after a change, side by side); `percall`
        /// times it, sockets only, as one more arm of its rounds; `budget` pairs each of its
        /// runs with one of the baseline.
        #[arg(long, value_name = "BINARY")]
        baseline: Option<std::path::PathBuf>,
        /// Extra `capture + decoding` arms of `ab` and `account` at these
        /// limits.capture_records_per_second (e.g. 10000,5000): the loss curve against the
        /// default decoding budget; for `budget`,
        /// the budgets measured (default 0,25000,10000,5000,2500).
        #[arg(long, value_delimiter = ',', value_name = "RECORDS")]
        budgets: Vec<u32>,
        /// `ab` with memcached's threads pinned to the first CPU and the load generator to the
        /// last (the agent runs anywhere), to take the scheduler's placement out of the rounds'
        /// scatter. On this machine it did not narrow it (BENCHMARKS.md, 2026-12-05).
        #[arg(long)]
        pin: bool,
        /// Instead: soak the agent for MINUTES (default 30) under steady load, connection churn,
        /// idle timeouts and dead writes; fails if memory or fds grow, events are lost or its
        /// counters disagree with the load generator's.
        #[arg(long, value_name = "MINUTES", num_args = 0..=1, default_missing_value = "30")]
        soak: Option<f64>,
        /// With --soak: the agent decodes every connection (capture_records_per_second = 0)
        /// instead of sampling above its budget; payload records lost to a full ring then pass
        /// as degradation if its loss counter covers every request it missed.
        #[arg(long, requires = "soak")]
        decode_all: bool,
    },
    /// Internal to `bench`: hold idle connections open until stdin closes.
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        source: std::net::Ipv4Addr,
    },
    /// Build the .deb (binary, systemd unit, default config, man page, completions) and test
    /// that it installs and removes cleanly in a throwaway dpkg root.
    Package,
    /// Build, then boot each kernel under QEMU and run the agent's scenarios inside it.
    VmTest {
        /// Which kernel: Debian's 6.1 or 6.12, this machine's (if its vmlinuz is readable), or all
        /// (the default; with --systemd the default is 6.12 and `all` means 6.12 and 6.1).
        #[arg(long, value_enum)]
        kernel: Option<vm::KernelChoice>,
        /// Instead: install the .deb on a Debian 12 VM booted with systemd and prove start,
        /// crash restart, reload, upgrade, purge and logs through systemctl, dpkg and apt.
        #[arg(long)]
        systemd: bool,
    },
    /// Build, then boot a fleet of four VMs (a memcached pool host and three client hosts) on a
    /// private network with a real Prometheus, and assert what `cacheprobe diagnose
    /// --prometheus` names: idle timeouts, ring disagreement, a hung server, a lossy link.
    FleetTest {
        /// Use target/release/cacheprobe as it is instead of building it first.
        #[arg(long)]
        no_build: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Build { debug } => setup::setup_build_tools().and_then(|()| build(!debug)),
        Task::Test { unit } => test(unit),
        Task::Run { args } => run(args),
        Task::Fuzz { seconds } => {
            setup::setup_build_tools().and_then(|()| fuzz::run_decoder(seconds))
        }
        Task::Bench {
            quick,
            output,
            only,
            rounds,
            baseline,
            budgets,
            pin,
            soak,
            decode_all,
        } => setup::setup().and_then(|()| build(true)).and_then(|()| {
            if let Some(minutes) = soak {
                return bench::soak(minutes, decode_all);
            }
            bench::bench(bench::BenchOptions {
                quick,
                output,
                only,
                rounds,
                baseline,
                budgets,
                pin,
            })
        }),
        Task::BenchHold {
            target,
            count,
            source,
        } => bench::hold_connections(target, count, source),
        Task::Package => setup::setup_build_tools()
            .and_then(|()| build(true))
            .and_then(|()| package::package())
            .and_then(|deb| package::install_test(&deb)),
        Task::VmTest { kernel, systemd } => setup::setup_build_tools()
            .and_then(|()| build(true))
            .and_then(|()| {
                if systemd {
                    vm_systemd::vm_test_systemd(&vm_systemd::kernels(kernel)?)
                } else {
                    vm::vm_test(&kernel.unwrap_or(vm::KernelChoice::All).kernels())
                }
            }),
        Task::FleetTest { no_build } => setup::setup_build_tools()
            .and_then(|()| if no_build { Ok(()) } else { build(true) })
            .and_then(|()| vm_fleet::fleet_test()),
    };
    util::print_step_times();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--package", "cacheprobe"];
    if release {
        args.push("--release");
    }
    util::cargo(&args)?;
    let profile = if release { "release" } else { "debug" };
    eprintln!("xtask: built target/{profile}/cacheprobe");
    Ok(())
}

/// The unit-test step's package set. The host-layout step reuses it, so cargo reuses that build
/// (another set unifies features differently and rebuilds the agent, eBPF object included).
const UNIT_TESTS: [&str; 8] = [
    "test",
    "--package",
    "cacheprobe",
    "--package",
    "agent-common",
    "--package",
    "cacheprobe-tests",
    "--lib",
];

fn test(unit_only: bool) -> anyhow::Result<()> {
    util::step("setup (installs what is missing)");
    if unit_only {
        setup::setup_build_tools()?;
    } else {
        setup::setup()?;
    }
    util::step("release build");
    build(true)?;
    util::step("unit tests");
    util::cargo(&UNIT_TESTS)?;
    util::cargo(&["test", "--package", "xtask"])?;
    if unit_only {
        return Ok(());
    }
    util::require_root("integration tests load eBPF programs and create network namespaces")?;
    util::step("packaging: alert rules and their unit tests, metric names");
    packaging_checks()?;
    util::step("package: build the .deb and install it into a throwaway dpkg root");
    let deb = package::package()?;
    package::install_test(&deb)?;
    util::step("host layout tests (this kernel's tracefs and BTF)");
    util::cargo(&[&UNIT_TESTS[..], &["--", "--ignored", "host_"]].concat())?;
    let binary = vm::target_dir().join("release/cacheprobe");
    util::step("integration tests: build");
    util::cargo(&[
        "test",
        "--package",
        "cacheprobe-tests",
        "--tests",
        "--no-run",
    ])?;
    // One step per file (cargo runs the files one after another anyway), so the step times say
    // which file costs what.
    for file in integration_test_files()? {
        util::step(&format!("integration tests (root, real peers): {file}"));
        util::cargo_with_env(
            &[
                "test",
                "--package",
                "cacheprobe-tests",
                "--test",
                &file,
                "--",
                "--test-threads=4",
            ],
            &[("CACHEPROBE_BIN", binary.to_str().unwrap_or_default())],
        )?;
    }
    util::step("fuzz the memcache decoder (bounded)");
    fuzz::run_decoder(60)?;
    util::step("kernel matrix (QEMU)");
    vm::vm_test(&vm::Kernel::ALL)?;
    // The package as users run it: real systemd, the unit's own sandbox, crash/reload/upgrade/
    // purge (issue #22). About 1.5 min warm, 5 min more when the Debian root filesystem is built.
    vm_systemd::vm_test_systemd(&vm_systemd::kernels(None)?)?;
    // The fleet view end to end (issue #18): four VMs on a private bridge, a real Prometheus,
    // `diagnose --prometheus` naming idle timeouts, ring disagreement, a hung server, a lossy
    // link with the request seen from both ends, and coverage. 4-6 minutes.
    vm_fleet::fleet_test()?;
    // About 2.5 minutes: leaks, losses and counters against the load generators (BENCHMARKS.md,
    // "Soak"); the 30-minute soak stays a bench.
    util::step("soak (cargo xtask bench --soak 2)");
    bench::soak(2.0, false)?;
    util::step("benchmark smoke test (cargo xtask bench --quick; no timing assertions)");
    bench::bench(bench::BenchOptions {
        quick: true,
        output: None,
        only: Vec::new(),
        rounds: None,
        baseline: None,
        budgets: Vec::new(),
        pin: false,
    })?;
    Ok(())
}

/// The root integration test files under tests/tests, by name, sorted.
fn integration_test_files() -> anyhow::Result<Vec<String>> {
    let dir = util::workspace_root().join("tests/tests");
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "rs") {
            if let Some(stem) = path.file_stem().and_then(|stem| stem.to_str()) {
                files.push(stem.to_string());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// promtool validates the rules and runs their unit tests; every metric the rules and the
/// dashboard use must be in the metric contract (the integration tests check the contract
/// against a live scrape).
fn packaging_checks() -> anyhow::Result<()> {
    let root = util::workspace_root();
    let rules = root.join("packaging/prometheus/cacheprobe.rules.yml");
    let rule_tests = root.join("packaging/prometheus/cacheprobe.rules.test.yml");
    util::run_command(
        std::process::Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules),
    )?;
    util::run_command(
        std::process::Command::new("promtool")
            .arg("test")
            .arg("rules")
            .arg(&rule_tests),
    )?;
    util::run_command(
        std::process::Command::new("/usr/bin/python3")
            .arg(root.join("packaging/check-metrics.py"))
            .current_dir(&root),
    )?;
    // The unit as shipped, pointed at the binary just built (verify insists the ExecStart
    // binary exists), must verify and score an exposure of at most 3.0.
    let unit = std::fs::read_to_string(root.join("packaging/systemd/cacheprobe.service"))?;
    let binary = vm::target_dir().join("release/cacheprobe");
    let checked = vm::target_dir().join("cacheprobe.service");
    std::fs::write(
        &checked,
        unit.replace("/usr/bin/cacheprobe", binary.to_str().unwrap_or_default()),
    )?;
    util::run_command(
        std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&checked),
    )?;
    util::run_command(
        std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=30"])
            .arg(&checked),
    )
}

fn run(args: Vec<String>) -> anyhow::Result<()> {
    setup::setup()?;
    build(true)?;
    util::require_root("the agent loads eBPF programs")?;
    let binary = util::workspace_root().join("target/release/cacheprobe");
    let mut command = std::process::Command::new(binary);
    command.arg("run").args(args);
    util::run_command(&mut command)
}
