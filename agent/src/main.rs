//! The command line: parses arguments, sets up logging and hands over to `commands`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use cacheprobe::{commands, config::DEFAULT_CONFIG_PATH};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Watches memcache and queue sockets from the kernel and explains what goes wrong between hosts.
#[derive(Parser)]
#[command(name = "cacheprobe", version, about, long_about = None)]
struct Cli {
    /// Log filter, e.g. "info" or "cacheprobe=debug" (overrides RUST_LOG).
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach probes and serve Prometheus metrics.
    Run {
        /// Configuration file (a missing default file means built-in defaults).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to serve /metrics on (overrides `listen` in the config).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Root-only Unix socket where `cacheprobe diagnose` reads the recent history.
        #[arg(long, value_name = "PATH", default_value = cacheprobe::control::DEFAULT_SOCKET_PATH)]
        control_socket: PathBuf,
    },
    /// Print the running daemon's hottest keys per server and recent key splits (JSON).
    ///
    /// Keys are shown only here and in diagnose, never in metrics; set `keys = "hash"` in the
    /// config to show hashes instead.
    Keys {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH", default_value = cacheprobe::control::DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
    },
    /// A live view of servers, processes, hot keys and queues, refreshed every second.
    ///
    /// Reads the running daemon's history (without a daemon, attaches the probes itself).
    /// Keys: letters sort (shown in the footer), / filters, space pauses, Tab switches panes,
    /// Enter shows a row's detail, q / Esc / Ctrl-C quit.
    Top {
        /// The daemon's control socket [default: /run/cacheprobe/cacheprobe.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Configuration file (detector thresholds; services for local probes).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Refresh interval in seconds.
        #[arg(short = 'd', long = "delay", value_name = "SECONDS", default_value = "1",
              value_parser = commands::top::parse_interval)]
        interval: Duration,
        /// Show only this service's rows.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Print plain-text snapshots instead of the interactive view (like `top -b`).
        #[arg(short = 'b', long)]
        batch: bool,
        /// With --batch: print this many snapshots, then exit (default: until interrupted).
        #[arg(short = 'n', long = "iterations", value_name = "N", requires = "batch")]
        iterations: Option<u64>,
        /// Attach the probes here even if a daemon is running.
        #[arg(long, conflicts_with = "socket")]
        local: bool,
    },
    /// Write the man page and shell completions into DIR (used to build packages).
    #[command(hide = true)]
    GenerateAssets {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Report which probes and features work on this host and what is missing.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The config to check with: its services and limits, and the TLS files its metrics
        /// endpoint would load [default: /etc/cacheprobe/config.toml, built-in defaults when
        /// that is missing].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Report what is wrong between this host and its cache servers, with evidence.
    ///
    /// Reads a running daemon's recent history and watches live for --duration (without a
    /// daemon, attaches the probes itself). Exit code: 0 nothing found, 1 findings, 2 could
    /// not run.
    Diagnose(DiagnoseArgs),
}

// `cacheprobe diagnose`'s arguments. A plain comment: a doc comment here would become the
// command's help, which is its variant's.
#[derive(Args)]
struct DiagnoseArgs {
    /// How long to watch live, e.g. 30s, 2m, 1m30s (0 with a daemon: history only).
    #[arg(long, value_name = "DURATION", default_value = "30s",
          value_parser = commands::diagnose::parse_duration)]
    duration: Duration,
    /// Print the report as JSON (schema: docs/diagnose-schema.json).
    #[arg(long, conflicts_with = "graph")]
    json: bool,
    /// Print the process -> server graph instead of the report.
    #[arg(long, value_name = "FORMAT", value_enum)]
    graph: Option<GraphFormat>,
    /// Configuration file (a missing default file means built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The daemon's control socket [default: /run/cacheprobe/cacheprobe.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Attach the probes here for --duration even if a daemon is running.
    #[arg(long, conflicts_with = "socket")]
    local: bool,
    /// Diagnose the whole fleet from a Prometheus-compatible query API (Prometheus, Thanos,
    /// Mimir, VictoriaMetrics) that scrapes every host's agent, instead of this host.
    #[arg(long, value_name = "URL", conflicts_with_all = ["graph", "socket", "local", "config"])]
    prometheus: Option<String>,
    /// With --prometheus: how far back to look, e.g. 30m, 2h.
    #[arg(long, value_name = "DURATION", default_value = "30m", requires = "prometheus",
          value_parser = parse_since)]
    since: Duration,
    /// With --prometheus: evaluate as of this unix time instead of now (a past incident).
    #[arg(long, value_name = "UNIX_SECONDS", requires = "prometheus")]
    at: Option<u64>,
    /// With --prometheus: only this service (its `service` label).
    #[arg(long, value_name = "NAME", requires = "prometheus")]
    service: Option<String>,
    /// With --prometheus: basic-auth user; the password comes from
    /// --basic-auth-password-file or $CACHEPROBE_PROMETHEUS_PASSWORD.
    #[arg(long, value_name = "USER", requires = "prometheus")]
    basic_auth_user: Option<String>,
    /// With --basic-auth-user: a file holding the password (trailing newline ignored).
    #[arg(long, value_name = "FILE", requires = "basic_auth_user")]
    basic_auth_password_file: Option<PathBuf>,
    /// With --prometheus: a file holding a bearer token.
    #[arg(
        long,
        value_name = "FILE",
        requires = "prometheus",
        conflicts_with = "basic_auth_user"
    )]
    bearer_token_file: Option<PathBuf>,
    /// With --prometheus: PEM CA certificate(s) to verify an https:// URL with.
    #[arg(long, value_name = "FILE", requires = "prometheus")]
    ca_file: Option<PathBuf>,
    /// With --prometheus: timeout of each query.
    #[arg(long, value_name = "DURATION", default_value = "15s", requires = "prometheus",
          value_parser = commands::diagnose::parse_duration)]
    query_timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    /// Graphviz: pipe into `dot -Tsvg`.
    Dot,
}

/// `--since`: like --duration but up to 31 days (a fleet window, not a live watch).
fn parse_since(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30m, 2h or 1d"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use s, m, h or d)"
            ))
        }
    };
    if !(60..=31 * 86_400).contains(&seconds) {
        return Err(format!("{text:?}: --since must be between 1m and 31d"));
    }
    Ok(Duration::from_secs(seconds))
}

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(filter) => EnvFilter::new(filter),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn config_arg(config: Option<PathBuf>) -> (PathBuf, bool) {
    match config {
        Some(path) => (path, true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    }
}

/// The man page and completions come from the same clap definitions as the parser, so they
/// cannot drift from the real flags.
fn generate_assets(out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use clap::CommandFactory;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let command = Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut man)?;
    std::fs::write(out.join("cacheprobe.1"), man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut command.clone(), "cacheprobe", out)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match execute(cli.command, &runtime) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one command; an error is printed by `main` with exit code 2.
fn execute(command: Command, runtime: &tokio::runtime::Runtime) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            listen,
            control_socket,
        } => {
            let (config_path, config_explicit) = config_arg(config);
            runtime
                .block_on(commands::run::run(commands::run::RunArgs {
                    config_path,
                    config_explicit,
                    listen,
                    control_socket,
                }))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Keys { socket } => {
            cacheprobe::control::fetch_keys(&socket, std::time::Duration::from_secs(5))
                .map_err(anyhow::Error::from)
                .and_then(|keys| Ok(serde_json::to_string_pretty(&keys)?))
                .map(|json| {
                    println!("{json}");
                    ExitCode::SUCCESS
                })
        }
        Command::Top {
            socket,
            config,
            interval,
            service,
            batch,
            iterations,
            local,
        } => {
            let (config_path, config_explicit) = config_arg(config);
            commands::top::top(&commands::top::TopArgs {
                config_path,
                config_explicit,
                socket,
                local,
                interval,
                service,
                batch,
                iterations,
            })
        }
        Command::GenerateAssets { out } => generate_assets(&out).map(|()| ExitCode::SUCCESS),
        Command::Check { json, config } => {
            let (config_path, config_explicit) = config_arg(config);
            commands::check::check(&config_path, config_explicit, json)
        }
        Command::Diagnose(args) => diagnose(args),
    }
}

/// `diagnose`: of the fleet through Prometheus with `--prometheus`, else of this host.
fn diagnose(args: DiagnoseArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = args.prometheus {
        return commands::fleet::fleet(&commands::fleet::FleetArgs {
            url,
            since: args.since,
            at: args.at,
            service: args.service,
            json: args.json,
            basic_auth_user: args.basic_auth_user,
            basic_auth_password_file: args.basic_auth_password_file,
            bearer_token_file: args.bearer_token_file,
            ca_file: args.ca_file,
            query_timeout: args.query_timeout.max(Duration::from_secs(1)),
        });
    }
    let recorder = commands::record::ChildRecorder {
        config_path: args.config.clone(),
    };
    let (config_path, config_explicit) = config_arg(args.config);
    let output = match (args.json, args.graph) {
        (true, _) => commands::diagnose::Output::Json,
        (false, Some(GraphFormat::Dot)) => commands::diagnose::Output::GraphDot,
        (false, None) => commands::diagnose::Output::Text,
    };
    commands::diagnose::diagnose(
        &commands::diagnose::DiagnoseArgs {
            config_path,
            config_explicit,
            duration: args.duration,
            output,
            socket: args.socket,
            local: args.local,
        },
        &recorder,
    )
}
