//! `cacheprobe top`: refreshes a live view of servers, processes, hot keys and queues from the
//! daemon's control socket (or from a private `run` child when no daemon runs), in the terminal
//! or as `--batch` text snapshots.

use std::{
    collections::VecDeque,
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::{
    clock::unix_now,
    commands::record::PrivateDaemon,
    config::Config,
    control::{self, ControlError, DEFAULT_SOCKET_PATH},
    diagnose::DiagnoseThresholds,
    history::HistorySnapshot,
    keystats::{KeyDisplay, KeysReport},
    top::{
        counters::Counters,
        model::{self, Inputs, Model},
        render::{self, Status},
        tty::{TtyWait, Wake},
        view::{Action, Key, ViewState},
    },
};

/// Seconds of history kept in memory: the sparkline minute plus room for late seconds.
const KEEP_S: u64 = 120;
/// Merged snapshots accumulate label strings; past this many, start over from a fresh fetch.
const MAX_LABELS: usize = 8192;
/// How long one control request may take before the refresh counts as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest and longest refresh interval.
const MIN_INTERVAL: Duration = Duration::from_millis(200);
const MAX_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct TopArgs {
    pub config_path: PathBuf,
    pub config_explicit: bool,
    /// `--socket`; None means the default path, where no daemon means attaching locally.
    pub socket: Option<PathBuf>,
    /// `--local`: attach the probes here even if a daemon runs.
    pub local: bool,
    /// `-d`: refresh interval.
    pub interval: Duration,
    pub service: Option<String>,
    pub batch: bool,
    /// `-n`: snapshots to print in batch mode (None: until interrupted).
    pub iterations: Option<u64>,
}

/// Parses `-d`: seconds, fractions allowed ("1", "0.5").
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !seconds.is_finite() {
        return Err(format!("{text:?} is not a number of seconds"));
    }
    let interval = Duration::from_secs_f64(seconds.max(0.0));
    if interval < MIN_INTERVAL || interval > MAX_INTERVAL {
        return Err(format!(
            "the refresh interval must be between {} and {} s",
            MIN_INTERVAL.as_secs_f64(),
            MAX_INTERVAL.as_secs()
        ));
    }
    Ok(interval)
}

/// The data of the last refreshes.
struct Feed {
    socket: PathBuf,
    /// Keeps a private daemon alive while top runs.
    local: Option<PrivateDaemon>,
    history: Option<HistorySnapshot>,
    counters: Option<(Counters, Instant)>,
    /// Earlier counters, oldest first: byte and queue rates are taken against the one a
    /// window before ([`baseline`]), not the last refresh, so they span what the header says.
    earlier_counters: VecDeque<(Counters, Instant)>,
    counters_supported: bool,
    keys: Option<(KeysReport, Instant)>,
    /// Earlier hot-key lists (only `servers`: splits and extremes are not rates), kept and
    /// chosen like `earlier_counters`: RATE/S spans the window too, not the last refresh.
    earlier_keys: VecDeque<(KeysReport, Instant)>,
    thresholds: DiagnoseThresholds,
    key_display: KeyDisplay,
    /// The last complete second when the history last came: the model ends there. Built from
    /// the wall clock instead, a daemon that stopped answering would scroll zeros over a
    /// history that stopped, the sparklines' gap later passing for a memcached outage.
    end_s: u64,
    /// Spans of seconds (inclusive, within [`KEEP_S`]) the daemon has no record of: before it
    /// (re)started. Drawn as such, not as seconds without requests.
    unrecorded: Vec<(u64, u64)>,
    status: Status,
}

/// Earlier counter samples kept at most (a minute of them at `-d 1`).
const MAX_EARLIER_COUNTERS: usize = 64;

/// Drops samples no window needs: all but the newest older than a minute, and the oldest
/// past [`MAX_EARLIER_COUNTERS`].
fn trim_earlier<T>(earlier: &mut VecDeque<(T, Instant)>, now: Instant) {
    let minute = Duration::from_secs(model::MINUTE_S);
    while earlier.len() > MAX_EARLIER_COUNTERS
        || (earlier.len() > 1 && now.saturating_duration_since(earlier[1].1) >= minute)
    {
        earlier.pop_front();
    }
}

/// The sample rates over `window_s` are taken against: the newest at least that old, else
/// (top started less than a window ago) the oldest.
fn baseline<T>(
    earlier: &VecDeque<(T, Instant)>,
    now: Instant,
    window_s: u64,
) -> Option<&(T, Instant)> {
    let window = Duration::from_secs(window_s);
    earlier
        .iter()
        .rev()
        .find(|(_, then)| now.saturating_duration_since(*then) >= window)
        .or_else(|| earlier.front())
}

/// Spans of unrecorded seconds kept at most (one per daemon restart within [`KEEP_S`]).
const MAX_UNRECORDED: usize = 16;

/// The seconds between what top has (up to `from - 1`) and the first second the daemon's
/// answer covers (`newer_start`): a daemon that restarted in between recorded none of them.
fn unrecorded_span(from: u64, newer_start: u64) -> Option<(u64, u64)> {
    (newer_start > from).then(|| (from, newer_start - 1))
}

impl Feed {
    fn refresh(&mut self) {
        if let Some(local) = &mut self.local {
            if let Err(err) = local.check_alive() {
                self.stale(format!("{err:#}"));
                return;
            }
        }
        let now = unix_now();
        let since = match &self.history {
            // The last seconds may have received late facts since: fetch them again.
            Some(history) if history.labels.len() <= MAX_LABELS => history.end_s.saturating_sub(2),
            _ => now.saturating_sub(KEEP_S),
        };
        // The first second top has no data for.
        let from = match &self.history {
            Some(history) if history.labels.len() <= MAX_LABELS => history.end_s + 1,
            _ => since,
        };
        match control::fetch_history(&self.socket, since, FETCH_TIMEOUT) {
            Ok(newer) => {
                if newer.start_s <= newer.end_s {
                    self.unrecorded.extend(unrecorded_span(from, newer.start_s));
                }
                self.unrecorded.retain(|&(_, to)| to + KEEP_S >= now);
                let excess = self.unrecorded.len().saturating_sub(MAX_UNRECORDED);
                self.unrecorded.drain(..excess);
                let merged = match self.history.take() {
                    Some(history) if history.labels.len() <= MAX_LABELS => {
                        history.merge_newer(newer)
                    }
                    _ => newer,
                };
                let end = merged.end_s.max(now);
                self.history = Some(model::trimmed(
                    &merged,
                    end.saturating_sub(KEEP_S),
                    merged.end_s,
                ));
                self.end_s = last_complete_second();
                self.status.error = None;
                self.status.stale_since = None;
            }
            Err(err) => {
                self.stale(err.to_string());
                return;
            }
        }
        if self.counters_supported {
            match control::fetch_counters(&self.socket, FETCH_TIMEOUT) {
                Ok(text) => {
                    let now = Instant::now();
                    self.earlier_counters.extend(self.counters.take());
                    trim_earlier(&mut self.earlier_counters, now);
                    self.counters = Some((Counters::parse(&text), now));
                }
                Err(ControlError::Daemon(message)) => {
                    // An older daemon: the history still gives most columns.
                    self.counters_supported = false;
                    self.status.note = Some(format!(
                        "no connection, byte, queue or fd counters: {message}"
                    ));
                }
                Err(err) => self.status.error = Some(err.to_string()),
            }
        }
        match control::fetch_keys(&self.socket, FETCH_TIMEOUT) {
            Ok(keys) => self.keys_arrived(keys, Instant::now()),
            Err(err) => self.status.error = Some(err.to_string()),
        }
    }

    fn keys_arrived(&mut self, keys: KeysReport, now: Instant) {
        if let Some((before, then)) = self.keys.take() {
            let servers = KeysReport {
                servers: before.servers,
                ..KeysReport::default()
            };
            self.earlier_keys.push_back((servers, then));
        }
        trim_earlier(&mut self.earlier_keys, now);
        self.keys = Some((keys, now));
    }

    /// No history this refresh: the model stays at the last data, and the header says since
    /// when.
    fn stale(&mut self, error: String) {
        self.status.error = Some(error);
        self.status.stale_since.get_or_insert_with(unix_now);
    }

    fn model(&self, window_s: u64) -> Model {
        let Some(history) = &self.history else {
            return Model {
                end_s: self.end_s,
                window_s,
                ..Model::default()
            };
        };
        let between =
            |now: &Instant, before: &Instant| now.saturating_duration_since(*before).as_secs_f64();
        let inputs = Inputs {
            counters: self.counters.as_ref().map(|(c, _)| c),
            counters_before: self.counters.as_ref().and_then(|(_, now)| {
                baseline(&self.earlier_counters, *now, window_s)
                    .map(|(before, then)| (before, between(now, then)))
            }),
            keys: self.keys.as_ref().map(|(k, _)| k),
            keys_before: self.keys.as_ref().and_then(|(_, now)| {
                baseline(&self.earlier_keys, *now, window_s)
                    .map(|(before, then)| (before, between(now, then)))
            }),
            key_display: self.key_display,
            thresholds: Some(&self.thresholds),
            unrecorded: &self.unrecorded,
        };
        model::build(history, self.end_s, window_s, &inputs)
    }
}

/// The latest second the daemon has finished recording. The current one is still being
/// filled, and the daemon drains a quiet ring every `wakeup::DRAIN_INTERVAL_MS` (100 ms), so
/// just after a second turns over the previous one may still miss its last facts: keep a
/// margin.
fn last_complete_second() -> u64 {
    let now = std::time::SystemTime::now()
        .checked_sub(Duration::from_millis(250))
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    now.saturating_sub(1)
}

fn connect(args: &TopArgs, config: &Config) -> anyhow::Result<Feed> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
    let daemon = if args.local {
        Err(ControlError::NoDaemon(socket.clone()))
    } else {
        control::call(
            &socket,
            &control::Request {
                version: control::PROTOCOL_VERSION,
                op: "ping".to_string(),
                since: None,
            },
            FETCH_TIMEOUT,
        )
    };
    let (socket, local, source) = match daemon {
        Ok(_) => (socket.clone(), None, format!("daemon {}", socket.display())),
        Err(ControlError::NoDaemon(_)) if args.socket.is_none() || args.local => {
            if !args.batch {
                eprintln!("cacheprobe top: no daemon; attaching the probes here...");
            }
            let config = args.config_explicit.then_some(args.config_path.as_path());
            let local = PrivateDaemon::start(config, "top")
                .context("no cacheprobe daemon runs and the probes cannot be attached here")?;
            (
                local.socket().to_path_buf(),
                Some(local),
                "local probes".to_string(),
            )
        }
        Err(err) => return Err(control::unreachable(err, "cannot reach the daemon")),
    };
    Ok(Feed {
        socket,
        local,
        history: None,
        counters: None,
        earlier_counters: VecDeque::new(),
        counters_supported: true,
        keys: None,
        earlier_keys: VecDeque::new(),
        thresholds: config.diagnose.clone(),
        key_display: config.keys,
        end_s: last_complete_second(),
        unrecorded: Vec::new(),
        status: Status {
            source,
            refresh_s: args.interval.as_secs_f64(),
            configured_services: config.services.iter().map(|s| s.name.clone()).collect(),
            ..Status::default()
        },
    })
}

/// SIGINT, SIGTERM and SIGHUP as a flag: in raw mode the terminal sends no SIGINT for Ctrl-C
/// (it arrives as a key), but `kill` and a closed terminal still do, and the default action
/// would leave the terminal raw.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, flag.clone())
            .context("cannot install the signal handlers")?;
    }
    Ok(flag)
}

pub fn top(args: &TopArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config_path, args.config_explicit)?;
    if !args.batch && !std::io::stdout().is_terminal() {
        anyhow::bail!("the output is not a terminal; use --batch for text snapshots");
    }
    let stop = stop_flag()?;
    let mut feed = connect(args, &config)?;
    let window_s = args.interval.as_secs_f64().ceil().max(1.0) as u64;
    let state = ViewState::new(args.service.clone());
    if args.batch {
        batch(args, &mut feed, &state, window_s, &stop)?;
    } else {
        interactive(args, &mut feed, state, window_s, &stop)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn batch(
    args: &TopArgs,
    feed: &mut Feed,
    state: &ViewState,
    window_s: u64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut printed = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        feed.refresh();
        let text = render::text(&feed.model(window_s), state, &feed.status);
        let mut out = stdout.lock();
        let written = if printed > 0 {
            out.write_all(b"\n")
        } else {
            Ok(())
        }
        .and_then(|()| out.write_all(text.as_bytes()))
        .and_then(|()| out.flush());
        if let Err(err) = written {
            // A closed pipe (`| head`) is the reader being done, not a failure.
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(err).context("cannot write the snapshot");
        }
        printed += 1;
        if args.iterations.is_some_and(|n| printed >= n) {
            break;
        }
        next += args.interval;
        while !stop.load(Ordering::Relaxed) {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
    Ok(())
}

/// Restores the terminal however the loop ends (error, return); a panic is covered by the hook
/// ratatui installs. Each step on its own, errors ignored: after a hangup none of them can
/// succeed, and reporting that would only write to the dead terminal.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        use ratatui::crossterm::{cursor, execute, terminal};
        let _ = terminal::disable_raw_mode();
        let _ = execute!(
            std::io::stdout(),
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
    }
}

fn key_of(event: &event::KeyEvent) -> Option<Key> {
    if event.kind == KeyEventKind::Release {
        return None;
    }
    Some(match event.code {
        KeyCode::Char('c') if event.modifiers.contains(KeyModifiers::CONTROL) => Key::CtrlC,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Tab => Key::Tab,
        KeyCode::BackTab => Key::BackTab,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        _ => return None,
    })
}

fn interactive(
    args: &TopArgs,
    feed: &mut Feed,
    mut state: ViewState,
    window_s: u64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut tty = TtyWait::new(&[
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGWINCH,
    ])
    .context("cannot watch the terminal")?;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let _guard = TerminalGuard;
    feed.refresh();
    let mut model = feed.model(window_s);
    let mut next = Instant::now() + args.interval;
    let mut dirty = true;
    while !stop.load(Ordering::Relaxed) {
        if dirty {
            let drawn =
                terminal.draw(|frame| render::draw(frame, &model, &state, &feed.status, colour));
            if let Err(err) = drawn {
                if tty.gone() {
                    tracing::debug!("the terminal hung up");
                    break;
                }
                return Err(err).context("cannot draw");
            }
            dirty = false;
        }
        match tty
            .wait(next.saturating_duration_since(Instant::now()))
            .context("cannot wait for the terminal")?
        {
            Wake::Gone => {
                tracing::debug!("the terminal hung up");
                break;
            }
            // A stop flag is looked at by the loop; a resize only needs the redraw.
            Wake::Signal => dirty = true,
            Wake::Timeout => {}
            Wake::Input => match read_keys(&mut state, &model, &mut tty) {
                Ok(Action::Quit) => break,
                Ok(Action::Redraw) => dirty = true,
                Ok(Action::None) => {}
                Err(_) if tty.gone() => break,
                Err(err) => return Err(err).context("cannot read the terminal"),
            },
        }
        if Instant::now() >= next {
            next = Instant::now() + args.interval;
            if !state.paused {
                feed.refresh();
                model = feed.model(window_s);
                dirty = true;
            }
        }
    }
    drop(terminal);
    Ok(())
}

/// Applies the keys waiting on the terminal: the strongest action wins (quit over redraw).
fn read_keys(state: &mut ViewState, model: &Model, tty: &mut TtyWait) -> std::io::Result<Action> {
    let mut action = Action::None;
    // The wait said input is there; the short timeout only bounds a hangup racing it (a
    // zero timeout would make crossterm's tty reader skip reading altogether).
    while event::poll(Duration::from_millis(5))? {
        match event::read()? {
            Event::Key(key) => {
                if let Some(key) = key_of(&key) {
                    match state.press(key, model) {
                        Action::Quit => return Ok(Action::Quit),
                        Action::Redraw => action = Action::Redraw,
                        Action::None => {}
                    }
                }
            }
            Event::Resize(_, _) => action = Action::Redraw,
            _ => {}
        }
        if tty.gone() {
            break;
        }
    }
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Fact, History, HistoryLimits};

    /// A feed of `history` (and whatever the daemon at `socket` answers) at `end_s`, with
    /// default thresholds and nothing read yet.
    fn test_feed(socket: PathBuf, history: Option<HistorySnapshot>, end_s: u64) -> Feed {
        Feed {
            socket,
            local: None,
            history,
            counters: None,
            earlier_counters: VecDeque::new(),
            counters_supported: true,
            keys: None,
            earlier_keys: VecDeque::new(),
            thresholds: DiagnoseThresholds::default(),
            key_display: KeyDisplay::Plain,
            end_s,
            unrecorded: Vec::new(),
            status: Status::default(),
        }
    }

    /// `-d 0.2` under "rates over 1 s": IN/S and OUT/S were the change since the last refresh
    /// (0.2 s, often none of the daemon's once-a-second updates, else five times too many).
    /// They are taken against the counters a window back.
    #[test]
    fn counter_rates_span_the_window_not_the_last_refresh() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut earlier = VecDeque::new();
        for ms in (0..=2_000).step_by(200) {
            earlier.push_back((ms, at(ms)));
            trim_earlier(&mut earlier, at(ms));
        }
        // Now is 2.2 s: one second back is the sample of 1.2 s, not the last refresh's 2.0 s.
        assert_eq!(baseline(&earlier, at(2_200), 1).map(|s| s.0), Some(1_200));
        // A window longer than top has run: as far back as there is.
        assert_eq!(baseline(&earlier, at(2_200), 10).map(|s| s.0), Some(0));
        assert_eq!(baseline(&VecDeque::<(u64, Instant)>::new(), at(0), 1), None);
        // Kept: no more than a minute's worth, nor more than the cap.
        for ms in (2_200..=200_000).step_by(200) {
            earlier.push_back((ms, at(ms)));
            trim_earlier(&mut earlier, at(ms));
        }
        assert!(earlier.len() <= MAX_EARLIER_COUNTERS, "{}", earlier.len());
        assert_eq!(
            baseline(&earlier, at(200_200), 1).map(|s| s.0),
            Some(199_200)
        );
    }

    /// `-d 0.2` under "rates over 1 s": a hot key's PER S was its count's change since the
    /// last refresh, over 0.2 s. It is taken against the report a window back, like IN/S.
    #[test]
    fn hot_key_rates_span_the_window_not_the_last_refresh() {
        use crate::keystats::{HotKey, ServerHotKeys};
        let report = |count: u64| KeysReport {
            servers: vec![ServerHotKeys {
                service: "memcached".into(),
                server: "10.0.0.1:11211".into(),
                role: crate::model::Role::Client,
                by_requests: vec![HotKey {
                    key: "hot".into(),
                    count,
                    error: 0,
                }],
                by_bytes: Vec::new(),
            }],
            ..KeysReport::default()
        };
        let end_s = last_complete_second();
        let mut feed = test_feed(
            PathBuf::from("/nonexistent"),
            Some(HistorySnapshot::empty(end_s - 60, end_s)),
            end_s,
        );
        let start = Instant::now();
        // The daemon's count jumps by 100 once a second (its keys are counted as they come,
        // but refreshes every 0.2 s catch 0 or 100 of them); top refreshes every 0.2 s.
        for ms in (0..=2_200).step_by(200) {
            let count = 1_000 + 100 * (ms / 1_000);
            feed.keys_arrived(report(count), start + Duration::from_millis(ms));
        }
        let per_s = feed.model(1).hot_keys[0].per_s.expect("a rate");
        // 2.2 s against 1.2 s: 1200 - 1100 over 1 s, not 0 over the last 0.2 s.
        assert!((per_s - 100.0).abs() < 1e-6, "{per_s}");
        let rows = crate::top::view::rows(&feed.model(1), crate::top::view::Pane::HotKeys);
        assert_eq!(rows[0].cells[5], "100");
        assert!(
            rows[0]
                .detail
                .iter()
                .any(|l| l == "100/s over the last 1 s"),
            "{:?}",
            rows[0].detail
        );
    }

    /// A daemon that restarted answers from its start on: the seconds before it, since the
    /// last top had, are unrecorded; a daemon that ran all along leaves none.
    #[test]
    fn a_restarted_daemon_leaves_its_down_time_unrecorded() {
        assert_eq!(unrecorded_span(100, 100), None);
        assert_eq!(unrecorded_span(100, 90), None);
        assert_eq!(unrecorded_span(100, 108), Some((100, 107)));
    }

    /// The audit's stopped daemon: top kept rebuilding its model from the wall clock over a
    /// history that had stopped, so it showed zeros with an advancing clock under "showing the
    /// last data". A failed refresh leaves the model as it was, and the header and the
    /// findings line say since when the data is stale.
    #[test]
    fn a_daemon_that_stops_answering_freezes_the_model() {
        let end_s = last_complete_second() - 5;
        let mut history = History::new(900, HistoryLimits::default());
        for t in end_s - 59..=end_s {
            for _ in 0..10 {
                history.record(
                    t,
                    Fact::Request {
                        service: "memcached".into(),
                        server: "10.0.0.1:11211".into(),
                        role: crate::model::Role::Client,
                        comm: Some("php".into()),
                        command: "get".into(),
                        status: crate::model::Status::Hit,
                        latency_us: Some(200),
                    },
                );
            }
        }
        let gone = std::env::temp_dir().join(format!("cacheprobe-top-gone-{}", std::process::id()));
        let mut feed = test_feed(gone, Some(history.snapshot(0)), end_s);
        let before = feed.model(1);
        assert_eq!(before.servers[0].requests_per_s, 10.0);
        feed.refresh();
        let after = feed.model(1);
        assert_eq!(
            after, before,
            "the last data, not zeros at the wall clock's second"
        );
        let since = feed.status.stale_since.expect("stale");
        assert!(since >= end_s);
        let text = render::text(&after, &ViewState::new(None), &feed.status);
        let stale = format!("STALE since {} UTC", crate::diagnose::util::clock(since));
        assert!(text.contains(&stale), "{text}");
        let mut terminal =
            ratatui::Terminal::new(ratatui::backend::TestBackend::new(100, 24)).unwrap();
        terminal
            .draw(|frame| render::draw(frame, &after, &ViewState::new(None), &feed.status, false))
            .unwrap();
        let header: String = (0..100)
            .map(|x| terminal.backend().buffer()[(x, 0)].symbol().to_string())
            .collect();
        assert!(header.contains(&stale), "{header}");
        // Another failure keeps the first time it went stale.
        feed.refresh();
        assert_eq!(feed.status.stale_since, Some(since));
        assert_eq!(feed.model(1), before);
    }
}
