//! `cacheprobe diagnose`: a one-shot incident report. Asks a running daemon for its history
//! over the control socket and keeps watching live for `--duration`; without a daemon, records
//! locally through a [`LocalRecorder`] for that long. Then runs the detectors and prints text,
//! JSON or a Graphviz graph. Exit codes: 0 nothing found, 1 findings, 2 could not run (the
//! caller maps errors to 2).

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    config::Config,
    control::{self, ControlError, DEFAULT_SOCKET_PATH},
    diagnose::{render, Report, Source, SourceKind},
    history::HistorySnapshot,
};

/// How long to wait for the daemon to hand over its history.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// The edge table's window when there was no live watch (`--duration 0`).
const DEFAULT_EDGE_WINDOW_S: u64 = 60;
/// Longest `--duration` accepted.
const MAX_DURATION: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
    GraphDot,
}

#[derive(Debug, Clone)]
pub struct DiagnoseArgs {
    pub config_path: PathBuf,
    pub config_explicit: bool,
    pub duration: Duration,
    pub output: Output,
    /// `--socket`; None means the default path, where no daemon means recording locally.
    pub socket: Option<PathBuf>,
    /// `--local`: attach probes here even if a daemon answers.
    pub local: bool,
}

/// Whether anything was found; the binary turns it into the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    Findings,
}

impl From<Verdict> for ExitCode {
    fn from(verdict: Verdict) -> ExitCode {
        match verdict {
            Verdict::Clean => ExitCode::SUCCESS,
            Verdict::Findings => ExitCode::from(1),
        }
    }
}

/// Records a history with diagnose's own probes when no daemon runs: attach the probes, feed
/// a `History` from the pipeline for `duration`, calling `progress(elapsed)` about once a
/// second, and return `history.snapshot(start)`.
pub trait LocalRecorder {
    fn record_for(
        &self,
        duration: Duration,
        config: &Config,
        progress: &mut dyn FnMut(Duration),
    ) -> anyhow::Result<HistorySnapshot>;
}

impl<F> LocalRecorder for F
where
    F: Fn(Duration, &Config, &mut dyn FnMut(Duration)) -> anyhow::Result<HistorySnapshot>,
{
    fn record_for(
        &self,
        duration: Duration,
        config: &Config,
        progress: &mut dyn FnMut(Duration),
    ) -> anyhow::Result<HistorySnapshot> {
        self(duration, config, progress)
    }
}

/// Runs diagnose and prints to stdout.
pub fn diagnose(args: &DiagnoseArgs, recorder: &dyn LocalRecorder) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut progress = Progress::new(std::io::stderr().is_terminal());
    let verdict = diagnose_to(args, recorder, &mut stdout.lock(), colour, &mut progress)?;
    Ok(verdict.into())
}

/// The testable core: `out` receives the report, `progress` the watch progress.
pub fn diagnose_to(
    args: &DiagnoseArgs,
    recorder: &dyn LocalRecorder,
    out: &mut dyn Write,
    colour: bool,
    progress: &mut Progress,
) -> anyhow::Result<Verdict> {
    let config = Config::load(&args.config_path, args.config_explicit)?;
    let thresholds = config.diagnose.clone();
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));

    let daemon = if args.local {
        Err(ControlError::NoDaemon(socket.clone()))
    } else {
        control::fetch_history(&socket, 0, FETCH_TIMEOUT)
    };
    let (snapshot, source) = match daemon {
        Ok(first) => from_daemon(first, &socket, args, progress),
        Err(ControlError::NoDaemon(_)) if args.socket.is_none() || args.local => {
            if args.duration.is_zero() {
                anyhow::bail!(
                    "no cacheprobe daemon at {}: give a --duration to watch locally",
                    socket.display()
                );
            }
            record_locally(args, recorder, &config, progress)?
        }
        Err(err) => {
            return Err(control::unreachable(
                err,
                "cannot read the daemon's history",
            ))
        }
    };
    progress.clear();

    let edge_window_s = match args.duration.as_secs() {
        0 => DEFAULT_EDGE_WINDOW_S,
        s => s,
    };
    let report = Report::build(&snapshot, &thresholds, source, unix_now(), edge_window_s);
    out.write_all(rendered(&report, args.output, colour).as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the report")?;
    Ok(if report.findings.is_empty() {
        Verdict::Clean
    } else {
        Verdict::Findings
    })
}

/// The daemon's history, watched for `--duration` and fetched again for what came in since.
fn from_daemon(
    first: HistorySnapshot,
    socket: &Path,
    args: &DiagnoseArgs,
    progress: &mut Progress,
) -> (HistorySnapshot, Source) {
    let watched = watch(args.duration, first.span_seconds(), progress);
    let snapshot = match control::fetch_history(socket, first.start_s, FETCH_TIMEOUT) {
        Ok(second) => first.merge_newer(second),
        Err(err) => {
            progress.clear();
            eprintln!(
                "warning: the daemon stopped answering ({err}); using the history fetched at the start"
            );
            first
        }
    };
    let source = Source {
        kind: SourceKind::Daemon,
        watched_s: watched.as_secs(),
        prometheus: None,
        hosts: None,
        partial: false,
    };
    (snapshot, source)
}

/// No daemon: attach probes here for `--duration` and record a history of our own.
fn record_locally(
    args: &DiagnoseArgs,
    recorder: &dyn LocalRecorder,
    config: &Config,
    progress: &mut Progress,
) -> anyhow::Result<(HistorySnapshot, Source)> {
    let started = Instant::now();
    let mut report_progress = |elapsed: Duration| progress.show(elapsed, args.duration, None);
    let snapshot = recorder.record_for(args.duration, config, &mut report_progress)?;
    let source = Source {
        kind: SourceKind::Local,
        watched_s: started.elapsed().as_secs_f64().round() as u64,
        prometheus: None,
        hosts: None,
        partial: false,
    };
    Ok((snapshot, source))
}

fn rendered(report: &Report, output: Output, colour: bool) -> String {
    match output {
        Output::Json => {
            let mut json = render::json(report);
            json.push('\n');
            json
        }
        Output::GraphDot => render::dot(report),
        Output::Text => render::text(report, render::TextOptions { colour }),
    }
}

/// Sleeps through the live watch, updating the progress line; returns the time watched.
fn watch(duration: Duration, history_s: u64, progress: &mut Progress) -> Duration {
    let started = Instant::now();
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration {
            return elapsed;
        }
        progress.show(elapsed, duration, Some(history_s));
        std::thread::sleep((duration - elapsed).min(Duration::from_millis(250)));
    }
}

use crate::clock::unix_now;

/// The "watching" line on stderr, rewritten in place; silent unless stderr is a terminal.
pub struct Progress {
    enabled: bool,
    shown: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            shown: false,
        }
    }

    fn show(&mut self, elapsed: Duration, total: Duration, history_s: Option<u64>) {
        if !self.enabled {
            return;
        }
        let history = history_s.map_or(String::new(), |s| format!(" (+{s} s of daemon history)"));
        eprint!(
            "\r\x1b[Kcacheprobe diagnose: watching {}/{} s{history}",
            elapsed.as_secs(),
            total.as_secs()
        );
        let _ = std::io::stderr().flush();
        self.shown = true;
    }

    fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
            let _ = std::io::stderr().flush();
            self.shown = false;
        }
    }
}

/// Parses "30s", "2m", "1m30s", "500ms", "1h" or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return checked(Duration::from_secs(seconds), text);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{text:?} is not a duration like 30s, 2m or 1m30s"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use ms, s, m or h)"
                ))
            }
        };
        rest = &rest[unit_len..];
        let part = u32::try_from(number)
            .ok()
            .and_then(|n| unit.checked_mul(n))
            .ok_or_else(|| format!("{text:?} is too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("{text:?} is too long"))?;
    }
    checked(total, text)
}

fn checked(duration: Duration, text: &str) -> Result<Duration, String> {
    if duration > MAX_DURATION {
        Err(format!("{text:?} is longer than the 1 h maximum"))
    } else {
        Ok(duration)
    }
}

/// Test double for runs where a daemon must answer: local recording is an error.
#[cfg(test)]
pub struct NoLocalRecorder;

#[cfg(test)]
impl LocalRecorder for NoLocalRecorder {
    fn record_for(
        &self,
        _duration: Duration,
        _config: &Config,
        _progress: &mut dyn FnMut(Duration),
    ) -> anyhow::Result<HistorySnapshot> {
        anyhow::bail!("local recording is not available in this test")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::history::{Fact, History, HistoryLimits};

    use crate::model::{Role, Status};

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cacheprobe-diagnose-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn args(dir: &std::path::Path, socket: Option<PathBuf>, output: Output) -> DiagnoseArgs {
        DiagnoseArgs {
            config_path: dir.join("missing-config.toml"),
            config_explicit: false,
            duration: Duration::from_secs(1),
            output,
            socket,
            local: false,
        }
    }

    /// A history where one of three servers stopped answering.
    fn hung_server_history(now: u64) -> History {
        let mut history = History::new(900, HistoryLimits::default());
        for t in now - 60..=now {
            for server in ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"] {
                let hung = server == "10.0.0.3:11211" && t > now - 30;
                history.record(
                    t,
                    Fact::Request {
                        service: "memcached".into(),
                        server: server.into(),
                        role: Role::Client,
                        comm: Some("php-fpm".into()),
                        command: "get".into(),
                        status: if hung { Status::Timeout } else { Status::Hit },
                        latency_us: (!hung).then_some(250),
                    },
                );
            }
        }
        history
    }

    #[test]
    fn reads_a_running_daemon_and_reports_findings() {
        let dir = temp_path("daemon");
        let socket = dir.join("cacheprobe.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let history = Arc::new(Mutex::new(hung_server_history(unix_now())));
        let listener = runtime.block_on(async { control::bind(&socket) }).unwrap();
        runtime.spawn(control::serve(listener, history));

        let mut out = Vec::new();
        let verdict = diagnose_to(
            &args(&dir, Some(socket.clone()), Output::Json),
            &NoLocalRecorder,
            &mut out,
            false,
            &mut Progress::new(false),
        )
        .unwrap();
        assert_eq!(verdict, Verdict::Findings);
        let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(report["source"]["kind"], "daemon");
        assert!(report["source"]["watched_s"].as_u64().unwrap() >= 1);
        let finding = &report["findings"][0];
        assert_eq!(finding["id"], "server-not-answering");
        assert_eq!(finding["subjects"]["servers"][0], "10.0.0.3:11211");

        let mut out = Vec::new();
        diagnose_to(
            &args(&dir, Some(socket), Output::GraphDot),
            &NoLocalRecorder,
            &mut out,
            false,
            &mut Progress::new(false),
        )
        .unwrap();
        assert!(String::from_utf8(out).unwrap().starts_with("digraph"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_locally_without_a_daemon() {
        let dir = temp_path("local");
        let missing = dir.join("absent.sock");
        let recorder = |duration: Duration, _: &Config, progress: &mut dyn FnMut(Duration)| {
            progress(duration);
            let now = unix_now();
            let mut history = History::new(900, HistoryLimits::default());
            history.advance_to(now - 30);
            history.advance_to(now);
            Ok(history.snapshot(0))
        };
        let mut out = Vec::new();
        // Only the default socket path falls back to local recording, so this case needs a
        // host without a running daemon.
        let mut local_args = args(&dir, None, Output::Text);
        if std::path::Path::new(DEFAULT_SOCKET_PATH).exists() {
            eprintln!("a daemon socket exists at {DEFAULT_SOCKET_PATH}; skipping the local case");
            return;
        }
        let verdict = diagnose_to(
            &local_args,
            &recorder,
            &mut out,
            false,
            &mut Progress::new(false),
        )
        .unwrap();
        assert_eq!(verdict, Verdict::Clean);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("no problems found"), "{text}");
        assert!(text.contains("s watched)"), "{text}");

        // When local recording fails, no daemon is an error (exit code 2 in the binary).
        let err = diagnose_to(
            &local_args,
            &NoLocalRecorder,
            &mut Vec::new(),
            false,
            &mut Progress::new(false),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("local recording is not available"),
            "{err}"
        );

        // An explicit socket that does not answer is an error, not a silent local run.
        local_args.socket = Some(missing);
        let err = diagnose_to(
            &local_args,
            &recorder,
            &mut Vec::new(),
            false,
            &mut Progress::new(false),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no cacheprobe daemon"),
            "{err:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
