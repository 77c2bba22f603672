//! `cacheprobe top` against a real daemon, real memcached and a real client: the interactive
//! view inside tmux (rows and numbers on screen, sort letters, `/` filter, panes, detail,
//! pause, resizes, `q` and SIGTERM restoring the terminal) and `--batch` snapshots, with a
//! daemon and with local probes.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cacheprobe_tests::*;

/// The tests measure rates: one load at a time on this small machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Requests per second the load generator aims at on the busy server (A); it also sends a
/// tenth of that to B. Bounded in time: it stops by itself after `seconds`.
const RATE_A: f64 = 200.0;

/// A paced pymemcache client named "loadgen": per tick, three gets of a key that exists and
/// one of a key that does not on server A (75% hits), and every tenth tick one hit on B.
fn start_load(port_a: u16, port_b: u16, seconds: u32) -> Guard {
    let script = format!(
        "import ctypes, time\n\
         from pymemcache.client.base import Client\n\
         ctypes.CDLL(None).prctl(15, b'loadgen', 0, 0, 0)\n\
         a = Client(('127.0.0.1', {port_a}))\n\
         b = Client(('127.0.0.1', {port_b}))\n\
         a.set('top-hot-key', 'x' * 100, noreply=False)\n\
         b.set('b-key', 'y', noreply=False)\n\
         tick = 4.0 / {RATE_A}\n\
         start = time.monotonic()\n\
         n = 0\n\
         while time.monotonic() - start < {seconds}:\n\
         \x20   for _ in range(3):\n\
         \x20       a.get('top-hot-key')\n\
         \x20   a.get('top-missing-key')\n\
         \x20   if n % 10 == 0:\n\
         \x20       for _ in range(2):\n\
         \x20           b.get('b-key')\n\
         \x20   n += 1\n\
         \x20   delay = start + n * tick - time.monotonic()\n\
         \x20   if delay > 0:\n\
         \x20       time.sleep(delay)\n"
    );
    Guard(
        Command::new(PYTHON)
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the load generator"),
    )
}

struct Setup {
    port_a: u16,
    port_b: u16,
    agent: Agent,
    /// memcached on A and B (the backlog test stops A).
    servers: [Guard; 2],
}

/// The daemon watches both servers; `extra` goes at the top of its config.
fn setup(name: &str, extra: &str) -> Setup {
    require_root();
    let (port_a, port_b) = (unique_port(), unique_port());
    let servers = [
        start_memcached(None, "127.0.0.1", port_a, &[]).unwrap(),
        start_memcached(None, "127.0.0.1", port_b, &[]).unwrap(),
    ];
    let agent = Agent::start_with_config(
        name,
        &format!(
            "{extra}sample_interval_seconds = 1\n\n\
             [[services]]\nname = \"mc-a\"\nport = {port_a}\nprotocol = \"memcache\"\n\n\
             [[services]]\nname = \"mc-b\"\nport = {port_b}\nprotocol = \"memcache\"\n"
        ),
    )
    .unwrap();
    Setup {
        port_a,
        port_b,
        agent,
        servers,
    }
}

/// A tmux session removed on drop.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(name: &str, command: &str) -> Tmux {
        let name = format!("cacheprobe-{name}-{}", std::process::id());
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &name])
            .output();
        // Tests run in parallel, and two tmux clients that both find no server each start one:
        // the loser fails ("server exited unexpectedly"). Retrying then finds the winner's.
        let mut errors = Vec::new();
        for _ in 0..5 {
            let output = Command::new("tmux")
                .args(["new-session", "-d", "-s", &name, "-x", "120", "-y", "40"])
                .arg(command)
                .output()
                .expect("tmux is installed (cargo xtask setup)");
            if output.status.success() {
                return Tmux { name };
            }
            errors.push(String::from_utf8_lossy(&output.stderr).trim().to_string());
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("tmux new-session failed 5 times: {errors:?}");
    }

    fn tmux(&self, args: &[&str]) -> String {
        let output = Command::new("tmux").args(args).output().unwrap();
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        for key in keys {
            self.tmux(&["send-keys", "-t", &self.name, key]);
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn literal(&self, text: &str) {
        self.tmux(&["send-keys", "-t", &self.name, "-l", text]);
        std::thread::sleep(Duration::from_millis(150));
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", &self.name])
    }

    /// Polls the screen until `check` holds; panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("{what}: not on screen after {timeout:?}:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn resize(&self, width: u16, height: u16) {
        self.tmux(&[
            "resize-window",
            "-t",
            &self.name,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
        ]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .output();
    }
}

/// The first screen or batch line of the table for `server` and `role`, split into fields:
/// service, server, role, req/s, hit%, p50, p99, err/s, ...
fn row<'a>(text: &'a str, server: &str, role: &str) -> Option<Vec<&'a str>> {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() > 5 && fields[1] == server && fields[2] == role)
}

fn number(field: &str) -> f64 {
    field
        .parse()
        .unwrap_or_else(|_| panic!("{field:?} is not a number"))
}

/// Request rate and hit ratio on screen match what the client sends, within a tolerance
/// (pacing in Python on a busy 2-core machine drifts a little).
fn rates_match(fields: &[&str], expected_rate: f64, expected_hit: f64) -> bool {
    // A server row's rate is marked '^' while it holds a backlog (a paced client catching up
    // after a stall of its own reads like one): the number is still the rate.
    let rate = number(fields[3].trim_end_matches('^'));
    let hit = fields[4].parse::<f64>().unwrap_or(-1.0);
    (rate - expected_rate).abs() <= expected_rate * 0.2 && (hit - expected_hit).abs() <= 5.0
}

/// Index of the line showing `server` with `role` on the screen.
fn line_of(screen: &str, server: &str, role: &str) -> Option<usize> {
    screen.lines().position(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1] == server && fields[2] == role
    })
}

#[test]
fn top_in_tmux_shows_live_rates_and_follows_the_keys() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = setup("top-tmux", "");
    let _load = start_load(setup.port_a, setup.port_b, 90);
    let (a, b) = (
        format!("127.0.0.1:{}", setup.port_a),
        format!("127.0.0.1:{}", setup.port_b),
    );
    // After top exits the pane shows its exit code and the terminal modes: raw mode must be
    // off again (icanon, echo).
    let command = format!(
        "{} top --socket {} --config {}; echo \"top exited $?\"; stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '; echo; sleep 120",
        agent_binary().display(),
        setup.agent.control_socket.display(),
        setup.agent.config_path.display()
    );
    let tmux = Tmux::start("top", &command);

    let screen = tmux.wait_for(
        "A's client row at ~200 req/s, 75% hits",
        Duration::from_secs(30),
        |s| row(s, &a, "client").is_some_and(|f| rates_match(&f, RATE_A, 75.0)),
    );
    assert!(screen.contains("cacheprobe top"), "{screen}");
    assert!(screen.contains("REQ/S*"), "sorted by requests: {screen}");
    assert!(
        screen.contains("REQ/S LAST"),
        "sparkline column at 120 columns: {screen}"
    );
    let b_row = row(&screen, &b, "client").expect("B's client row");
    assert!(
        (number(b_row[3]) - RATE_A / 20.0).abs() <= RATE_A / 20.0 * 0.5,
        "B at ~10 req/s: {b_row:?}"
    );
    assert_eq!(b_row[4], "100", "B only hits: {b_row:?}");
    // The server side of the same traffic is a row of its own.
    assert!(row(&screen, &a, "server").is_some(), "{screen}");
    // The daemon's counters: connections open to A.
    let a_row = row(&screen, &a, "client").unwrap();
    assert!(number(a_row[10]) >= 1.0, "CONN column: {a_row:?}");

    // `/client` keeps client rows only; `h` sorts by hit ratio (B first), `r` by rate (A).
    tmux.keys(&["/"]);
    tmux.literal("client");
    tmux.keys(&["Enter", "h"]);
    let screen = tmux.wait_for(
        "filtered, sorted by hit ratio",
        Duration::from_secs(5),
        |s| s.contains("HIT%*") && line_of(s, &b, "client") < line_of(s, &a, "client"),
    );
    assert!(
        line_of(&screen, &a, "server").is_none(),
        "filtered: {screen}"
    );
    assert!(screen.contains("filter: client"), "{screen}");
    tmux.keys(&["r"]);
    tmux.wait_for("sorted by rate", Duration::from_secs(5), |s| {
        s.contains("REQ/S*") && line_of(s, &a, "client") < line_of(s, &b, "client")
    });

    // Enter opens the first row's detail, Esc closes it.
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("detail", Duration::from_secs(5), |s| {
        s.contains("latency p50")
    });
    assert!(screen.contains(&a), "{screen}");
    tmux.keys(&["Escape"]);
    tmux.wait_for("detail closed", Duration::from_secs(5), |s| {
        !s.contains("latency p50")
    });
    // Esc with a filter clears the filter (and does not quit).
    tmux.keys(&["Escape"]);
    tmux.wait_for("filter cleared", Duration::from_secs(5), |s| {
        line_of(s, &a, "server").is_some()
    });

    // Space pauses: the clock in the header stops.
    tmux.keys(&["Space"]);
    let paused = tmux.wait_for("paused", Duration::from_secs(5), |s| s.contains("PAUSED"));
    std::thread::sleep(Duration::from_millis(2500));
    let header = |s: &str| s.lines().next().unwrap_or("").to_string();
    assert_eq!(
        header(&paused),
        header(&tmux.screen()),
        "no refresh while paused"
    );
    tmux.keys(&["Space"]);
    tmux.wait_for("resumed", Duration::from_secs(5), |s| {
        !s.contains("[PAUSED]")
    });

    // Tab: processes (the client by name, with its connections), then hot keys.
    tmux.keys(&["Tab"]);
    let screen = tmux.wait_for("processes pane", Duration::from_secs(5), |s| {
        s.contains("loadgen") && s.contains("FD%")
    });
    let loadgen = screen
        .lines()
        .find(|l| l.trim_start().starts_with("loadgen"))
        .unwrap();
    assert!(
        loadgen.contains("mc-a:"),
        "connections by service: {screen}"
    );
    // Hot keys: the key on each side of this host, client and memcached's socket, by requests.
    tmux.keys(&["Tab"]);
    let hot_key = |s: &str, role: &str| {
        s.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 5 && fields[1..5] == [a.as_str(), role, "requests", "top-hot-key"]
        })
    };
    let screen = tmux.wait_for("hot keys pane", Duration::from_secs(5), |s| {
        hot_key(s, "client") && hot_key(s, "server")
    });
    assert!(
        screen.contains("ROLE") && screen.contains("KEY"),
        "{screen}"
    );
    tmux.keys(&["Tab", "Tab"]);
    tmux.wait_for("back on servers", Duration::from_secs(5), |s| {
        row(s, &a, "client").is_some()
    });

    // Resizes: 80x24 still shows the row (SERVICE gives way to the sparkline there), a tiny
    // terminal a message, then back.
    tmux.resize(80, 24);
    let screen = tmux.wait_for("80x24", Duration::from_secs(5), |s| {
        s.lines().count() <= 24
            && s.lines()
                .any(|line| line.split_whitespace().take(2).eq([a.as_str(), "client"]))
    });
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(
        screen.contains("REQ/S LAST"),
        "sparkline at 80 columns: {screen}"
    );
    tmux.resize(50, 12);
    tmux.wait_for("too small message", Duration::from_secs(5), |s| {
        s.contains("too small")
    });
    tmux.resize(120, 40);
    tmux.wait_for("back to 120x40", Duration::from_secs(5), |s| {
        s.contains("REQ/S LAST") && row(s, &a, "client").is_some()
    });

    // q quits; the terminal is back in cooked mode with echo.
    tmux.keys(&["q"]);
    // Wait for stty's line too: it comes a moment after top's exit line.
    let screen = tmux.wait_for("exit", Duration::from_secs(5), |s| {
        s.contains("top exited") && s.contains("icanon")
    });
    assert!(screen.contains("top exited 0"), "{screen}");
    assert!(
        !screen.contains("REQ/S"),
        "the alternate screen is gone: {screen}"
    );
    let modes = screen
        .lines()
        .find(|l| l.contains("icanon"))
        .unwrap_or_default();
    assert!(
        modes.split_whitespace().any(|m| m == "icanon")
            && modes.split_whitespace().any(|m| m == "echo"),
        "terminal restored: {screen}"
    );
}

#[test]
fn sigterm_and_sigint_restore_the_terminal() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = setup("top-signals", "");
    for signal in ["TERM", "INT"] {
        let command = format!(
            "{} top --socket {}; echo \"top exited $?\"; stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '; echo; sleep 60",
            agent_binary().display(),
            setup.agent.control_socket.display(),
        );
        let tmux = Tmux::start(&format!("top-{signal}"), &command);
        tmux.wait_for("top running", Duration::from_secs(15), |s| {
            s.contains("findings:")
        });
        // The pane runs sh, whose only child is top.
        let shell = tmux.tmux(&["display-message", "-p", "-t", &tmux.name, "#{pane_pid}"]);
        let shell = shell.trim();
        let children =
            std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        let top: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
        let number = if signal == "TERM" {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's child.
        assert_eq!(unsafe { libc::kill(top, number) }, 0, "signal sent");
        // Wait for stty's line too: it comes a moment after top's exit line.
        let screen = tmux.wait_for("exit", Duration::from_secs(5), |s| {
            s.contains("top exited") && s.contains("icanon")
        });
        assert!(screen.contains("top exited 0"), "SIG{signal}: {screen}");
        let modes = screen
            .lines()
            .find(|l| l.contains("icanon"))
            .unwrap_or_default()
            .to_string();
        assert!(
            modes.split_whitespace().any(|m| m == "icanon")
                && modes.split_whitespace().any(|m| m == "echo"),
            "SIG{signal}: terminal restored: {screen}"
        );
    }
    // Without a terminal and without --batch it refuses with a clear error.
    let output = Command::new(agent_binary())
        .args(["top", "--socket"])
        .arg(&setup.agent.control_socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--batch"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn batch(args: &[&str]) -> (String, Duration) {
    let started = Instant::now();
    let output = Command::new(agent_binary())
        .arg("top")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (stdout, started.elapsed())
}

/// A memcached SIGSTOPped 3 s under noreply sets (8 clients at ~100/s each, which do not wait
/// for it): at its socket it reads what they sent meanwhile in the second it resumes, a spike
/// of traffic no client sent. top marks that second on the server row (REQ/S ends in '^'
/// while it is in the window), not on the client row, whose requests are timed at the send.
#[test]
fn a_stalled_servers_backlog_is_marked_not_shown_as_traffic() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = setup("top-backlog", "");
    let port = setup.port_a;
    let script = format!(
        "import threading, time\n\
         from pymemcache.client.base import Client\n\
         def run(i):\n\
         \x20   c = Client(('127.0.0.1', {port}), default_noreply=True)\n\
         \x20   end = time.time() + 12\n\
         \x20   while time.time() < end:\n\
         \x20       c.set('k%d' % i, 'v')\n\
         \x20       time.sleep(0.01)\n\
         ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]\n\
         [t.start() for t in ts]\n\
         [t.join() for t in ts]\n"
    );
    let _load = Guard(
        Command::new(PYTHON)
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let memcached = setup.servers[0].0.id().to_string();
    let signal = |which: &str| {
        let status = Command::new("kill")
            .args([which, memcached.as_str()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    std::thread::sleep(Duration::from_secs(5));
    signal("-STOP");
    std::thread::sleep(Duration::from_secs(3));
    signal("-CONT");
    std::thread::sleep(Duration::from_secs(2));
    let socket = setup.agent.control_socket.display().to_string();
    // Rates over 5 s: the resumed second is in the window.
    let (text, _) = batch(&["--batch", "-n", "1", "-d", "5", "--socket", &socket]);
    let a = format!("127.0.0.1:{port}");
    let server = row(&text, &a, "server").unwrap_or_else(|| panic!("{text}"));
    let client = row(&text, &a, "client").unwrap_or_else(|| panic!("{text}"));
    assert!(server[3].ends_with('^'), "{text}");
    assert!(!client[3].ends_with('^'), "{text}");
}

#[test]
fn batch_mode_prints_n_snapshots_with_a_daemon_and_without() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = setup("top-batch", "keys = \"hash\"\n");
    let _load = start_load(setup.port_a, setup.port_b, 60);
    let a = format!("127.0.0.1:{}", setup.port_a);
    // Let a few seconds of traffic into the daemon's history.
    std::thread::sleep(Duration::from_secs(4));
    let socket = setup.agent.control_socket.display().to_string();
    let config = setup.agent.config_path.display().to_string();
    let (text, elapsed) = batch(&[
        "--batch", "-n", "3", "-d", "0.5", "--socket", &socket, "--config", &config,
    ]);
    assert_eq!(text.matches("cacheprobe top  ").count(), 3, "{text}");
    assert!(
        elapsed >= Duration::from_millis(1000),
        "two intervals: {elapsed:?}"
    );
    assert!(!text.contains('\u{1b}'), "plain text");
    // `keys = "hash"`: the hot key appears as the daemon's hash, on both sides, never plain.
    let hashed = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        b"top-hot-key".as_slice().hash(&mut hasher);
        format!("#{:016x}", hasher.finish())
    };
    assert!(!text.contains("top-hot-key"), "{text}");
    for snapshot in text.split("\ncacheprobe top  ").skip(1) {
        for heading in ["SERVERS", "PROCESSES", "HOT KEYS", "QUEUES"] {
            assert!(snapshot.contains(heading), "{snapshot}");
        }
        let hot_keys = snapshot.split("HOT KEYS").nth(1).unwrap();
        for role in ["client", "server"] {
            assert!(
                hot_keys.lines().any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.len() > 5 && fields[1..5] == [a.as_str(), role, "requests", &hashed]
                }),
                "{role} row of {hashed}: {snapshot}"
            );
        }
        let fields = row(snapshot, &a, "client").expect("A's client row");
        assert!(rates_match(&fields, RATE_A, 75.0), "{fields:?} in\n{text}");
    }
    // memcached's requests (made by its `mc-worker` threads) and its fds (from /proc) share
    // one process row: PROCESS FDS FD% CONN SERVERS REQ/S.
    let last = text.rsplit("cacheprobe top  ").next().unwrap();
    let processes = last.split("PROCESSES").nth(1).unwrap();
    let processes = processes.split("HOT KEYS").next().unwrap();
    assert!(!processes.contains("mc-worker"), "{processes}");
    let memcached: Vec<Vec<&str>> = processes
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.first() == Some(&"memcached"))
        .collect();
    assert_eq!(memcached.len(), 1, "{processes}");
    assert!(memcached[0][1].contains('/'), "fds: {processes}");
    assert!(number(memcached[0][5]) > 0.0, "requests: {processes}");
    // --service keeps one service.
    let (only_b, _) = batch(&[
        "--batch",
        "-n",
        "1",
        "--service",
        "mc-b",
        "--socket",
        &socket,
    ]);
    assert!(row(&only_b, &a, "client").is_none(), "{only_b}");
    assert!(
        row(&only_b, &format!("127.0.0.1:{}", setup.port_b), "client").is_some(),
        "{only_b}"
    );

    // Without a daemon: top attaches the probes itself. The running client's connection,
    // opened before the probes, is adopted at its first captured send and decoded, as is a
    // client that connects once the probes are up: the last snapshot sees both at full rate.
    let local = Command::new(agent_binary())
        .args([
            "top", "--local", "--batch", "-n", "8", "-d", "1", "--config", &config,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _fresh = start_load(setup.port_a, setup.port_b, 15);
    let output = local.wait_with_output().unwrap();
    let local = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{local}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(local.matches("cacheprobe top  ").count(), 8, "{local}");
    assert!(local.contains("local probes"), "{local}");
    let last = local.rsplit("cacheprobe top  ").next().unwrap();
    let fields = row(last, &a, "client").expect("A's client row from local probes");
    assert!(
        rates_match(&fields, 2.0 * RATE_A, 75.0),
        "{fields:?} in\n{last}"
    );
    assert!(
        number(fields[11]) >= 2.0,
        "both clients' connections: {fields:?}"
    );
}

/// Clock ticks of CPU (user + system) a process has used, and whether it is still running (a
/// zombie has exited); None once it is gone.
fn cpu_ticks(pid: i32) -> Option<(u64, bool)> {
    let fields = stat_fields(pid as u32)?;
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((ticks, fields[0] != "Z"))
}

/// The process under `root` (itself included) whose command line is `cacheprobe <command> ...`.
fn find_cacheprobe(root: i32, command: &str) -> Option<i32> {
    let cmdline = std::fs::read(format!("/proc/{root}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let binary = agent_binary();
    let name = binary.file_name().unwrap().as_encoded_bytes();
    if args.len() > 1 && args[0].ends_with(name) && args[1] == command.as_bytes() {
        return Some(root);
    }
    let children =
        std::fs::read_to_string(format!("/proc/{root}/task/{root}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find_map(|child| find_cacheprobe(child, command))
}

/// Waits until `pid` has exited; returns how long that took and the CPU ticks it used from
/// `since_ticks` to its last sample. Panics if it still runs after `timeout`.
fn wait_gone(pid: i32, since_ticks: u64, timeout: Duration, what: &str) -> (Duration, u64) {
    let started = Instant::now();
    let mut last = since_ticks;
    loop {
        match cpu_ticks(pid) {
            Some((ticks, true)) => last = ticks,
            Some((ticks, false)) => return (started.elapsed(), ticks - since_ticks),
            None => return (started.elapsed(), last - since_ticks),
        }
        if started.elapsed() > timeout {
            // SAFETY: kill has no memory-safety preconditions; the pid is this test's process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!(
                "{what}: pid {pid} still ran {timeout:?} later (killed now), {} ticks of CPU since",
                last - since_ticks
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The terminal disappears under top: with the pane's SIGHUP (top is the pane's process) and
/// without it (top in a session of its own, so only its reads see the hangup, with local probes
/// whose private daemon must go too). Top must exit within seconds without spinning: the
/// crossterm reader used to loop forever on the hung-up tty, ignoring SIGTERM.
#[test]
fn top_exits_when_its_terminal_goes_away() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = setup("top-hangup", "");
    let binary = agent_binary().display().to_string();
    let cases = [
        (
            "pane",
            format!(
                "exec {binary} top --socket {}",
                setup.agent.control_socket.display()
            ),
        ),
        (
            "setsid-local",
            format!(
                "setsid -w {binary} top --local --config {}",
                setup.agent.config_path.display()
            ),
        ),
    ];
    for (case, command) in cases {
        let tmux = Tmux::start(&format!("top-hangup-{case}"), &command);
        tmux.wait_for("top running", Duration::from_secs(30), |s| {
            s.contains("findings:")
        });
        let pane: i32 = tmux
            .tmux(&["display-message", "-p", "-t", &tmux.name, "#{pane_pid}"])
            .trim()
            .parse()
            .unwrap();
        let top = find_cacheprobe(pane, "top").expect("top's pid");
        let private_daemon = find_cacheprobe(top, "run");
        assert_eq!(
            private_daemon.is_some(),
            case.ends_with("local"),
            "{case}: a private daemon only with --local"
        );
        let (before, _) = cpu_ticks(top).unwrap();
        tmux.tmux(&["kill-session", "-t", &tmux.name]);
        let (took, ticks) = wait_gone(top, before, Duration::from_secs(10), case);
        eprintln!("{case}: top exited {took:?} after the hangup, {ticks} ticks of CPU");
        // With local probes top first stops its private daemon (SIGTERM, probes detached).
        let limit = Duration::from_secs(if private_daemon.is_some() { 6 } else { 3 });
        assert!(took < limit, "{case}: top took {took:?} to exit");
        // 100 ticks a second: a spinning loop would burn its whole share of a core.
        assert!(ticks <= 30, "{case}: {ticks} ticks of CPU while exiting");
        if let Some(daemon) = private_daemon {
            let (took, _) = wait_gone(daemon, 0, Duration::from_secs(10), "private daemon");
            eprintln!("{case}: the private daemon exited {took:?} after top");
        }
    }
}
