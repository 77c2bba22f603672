//! Unit tests of the view model: rates, ratios, windows, sorting and filtering, keys, and
//! drawing into ratatui's test backend at the smallest supported size and below it.

use ratatui::{backend::TestBackend, Terminal};

use super::{
    counters::Counters,
    model::{build, Inputs, Model, ServerRow, MINUTE_S},
    render,
    view::{arrange, rows, Action, Key, Pane, ViewState},
};
use crate::{
    diagnose::DiagnoseThresholds,
    history::{Fact, History, HistoryLimits, HistorySnapshot},
    keystats::{HotKey, KeyDisplay, KeysReport, ServerHotKeys},
    model::{DeadWriteOutcome, RetransmitKind, Role, Status as RequestStatus},
};

const NOW: u64 = 1_700_000_000;
const A: &str = "10.0.0.1:11211";
const B: &str = "10.0.0.2:11211";

fn request(server: &str, comm: &str, status: RequestStatus, latency_us: u32) -> Fact {
    Fact::Request {
        service: "memcached".into(),
        server: server.into(),
        role: Role::Client,
        comm: Some(comm.into()),
        command: "get".into(),
        status,
        latency_us: Some(latency_us),
    }
}

/// Server A: 30 requests/s (20 hits, 10 misses) at 200 us for the whole minute, except one
/// silent second. Server B: 3 requests/s, one error reply each second, at 5 ms, plus a dead
/// write and a retransmit.
fn history() -> HistorySnapshot {
    let mut history = History::new(900, HistoryLimits::default());
    for t in NOW - 70..=NOW {
        if t == NOW - 30 {
            continue;
        }
        for i in 0..30 {
            let status = if i < 20 {
                RequestStatus::Hit
            } else {
                RequestStatus::Miss
            };
            history.record(t, request(A, "php-fpm", status, 200));
        }
        for status in [
            RequestStatus::Hit,
            RequestStatus::Hit,
            RequestStatus::ServerError,
        ] {
            history.record(t, request(B, "worker", status, 5000));
        }
    }
    history.record(
        NOW - 5,
        Fact::DeadWrite {
            service: "memcached".into(),
            server: B.into(),
            role: Role::Client,
            comm: "worker".into(),
            command: Some("set".into()),
            outcome: DeadWriteOutcome::Eof,
        },
    );
    history.record(
        NOW - 90,
        Fact::DeadWrite {
            service: "memcached".into(),
            server: A.into(),
            role: Role::Client,
            comm: "php-fpm".into(),
            command: None,
            outcome: DeadWriteOutcome::Eof,
        },
    );
    history.record(
        NOW - 3,
        Fact::Retransmit {
            service: "memcached".into(),
            server: B.into(),
            role: Role::Client,
            kind: RetransmitKind::Data,
        },
    );
    history.record(
        NOW - 2,
        Fact::ProcessFds {
            comm: "worker".into(),
            pid: 42,
            open_fds: 900,
            limit: 1000,
        },
    );
    history.record(
        NOW - 1,
        Fact::FdExhausted {
            comm: "worker".into(),
            syscall: "accept4".into(),
            errno: "EMFILE".into(),
        },
    );
    history.snapshot(0)
}

fn model(window_s: u64) -> Model {
    build(&history(), NOW, window_s, &Inputs::default())
}

#[test]
fn server_rates_ratios_and_latency() {
    let model = model(1);
    assert_eq!(model.end_s, NOW);
    assert_eq!(model.window_s, 1);
    let a = model.servers.iter().find(|r| r.server == A).unwrap();
    assert_eq!(a.requests_per_s, 30.0);
    assert!((a.hit_ratio.unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(a.errors_per_s, 0.0);
    let p50 = a.p50_ms.unwrap();
    assert!((0.15..0.25).contains(&p50), "p50 {p50} ms near 0.2");
    // The dead write 90 s ago is outside the minute.
    assert_eq!(a.dead_writes, 0);
    let b = model.servers.iter().find(|r| r.server == B).unwrap();
    assert_eq!(b.requests_per_s, 3.0);
    assert_eq!(b.hit_ratio, Some(1.0), "errors are not lookups");
    assert_eq!(b.errors_per_s, 1.0);
    let p99 = b.p99_ms.unwrap();
    assert!((4.0..6.5).contains(&p99), "p99 {p99} ms near 5");
    assert_eq!((b.dead_writes, b.retransmits), (1, 1));
    assert_eq!(b.connections, None, "no counters given");
}

/// A server that stops answering had p99 `-`, like an idle one: it shows how long it has
/// been without an answer, and sorts with latencies that long.
#[test]
fn a_stalled_servers_p99_shows_how_long_it_has_not_answered() {
    let model = build(&history(), NOW + 7, 1, &Inputs::default());
    let a = model.servers.iter().find(|r| r.server == A).unwrap();
    assert_eq!((a.p99_ms, a.unanswered_for_s), (None, Some(7)));
    let state = ViewState::new(None);
    let row = state
        .arranged(&model)
        .into_iter()
        .find(|r| r.cells[1] == A)
        .unwrap();
    assert_eq!(row.cells[6], "none 7s");
    assert!(row.detail.iter().any(|l| l.contains("no answer for 7 s")));
    // Answering: the p99, no age.
    let a = model_row(&self::model(1), A);
    assert_eq!(a.unanswered_for_s, None);
    assert!(a.p99_ms.is_some());
}

fn model_row(model: &Model, server: &str) -> ServerRow {
    model
        .servers
        .iter()
        .find(|r| r.server == server)
        .unwrap()
        .clone()
}

#[test]
fn a_wider_window_averages_and_the_sparkline_shows_the_gap() {
    let model = model(60);
    let a = model.servers.iter().find(|r| r.server == A).unwrap();
    // 59 busy seconds of 30 in the last 60.
    assert!((a.requests_per_s - 59.0 * 30.0 / 60.0).abs() < 1e-9);
    assert_eq!(a.requests_spark.len(), MINUTE_S as usize);
    assert_eq!(a.requests_spark[MINUTE_S as usize - 1], 30, "newest last");
    let gap = (MINUTE_S - 1 - 30) as usize;
    assert_eq!(a.requests_spark[gap], 0, "the silent second");
    let line = render::sparkline(&a.requests_spark, &model.unrecorded, &[], 60);
    assert!(!model.unrecorded.contains(&true));
    assert_eq!(line.chars().nth(gap), Some(' '));
    assert_eq!(line.chars().filter(|c| *c == '█').count(), 59);
    // p99 per second: about 200 us each busy second.
    assert!(a.p99_spark[gap] == 0 && (150..260).contains(&a.p99_spark[0]));
}

/// After the daemon was down, the seconds it has no record of read as an outage of the
/// servers (a gap) in the sparkline; they are drawn as unrecorded instead, and the detail's
/// low is over the seconds recorded.
#[test]
fn seconds_the_daemon_did_not_record_are_not_a_gap() {
    let down = [(NOW - 35, NOW - 30)];
    let inputs = Inputs {
        unrecorded: &down,
        ..Inputs::default()
    };
    let model = build(&history(), NOW, 1, &inputs);
    let slot = |t: u64| (t - (NOW + 1 - MINUTE_S)) as usize;
    assert_eq!(
        model.unrecorded.iter().filter(|u| **u).count(),
        6,
        "{:?}",
        model.unrecorded
    );
    assert!(model.unrecorded[slot(NOW - 30)] && !model.unrecorded[slot(NOW - 29)]);
    let row = &rows(&model, Pane::Servers)[0];
    assert_eq!(row.cells[1], A);
    let line = render::sparkline(
        row.spark.as_ref().unwrap(),
        &row.unrecorded,
        &row.backlog,
        60,
    );
    let chars: Vec<char> = line.chars().collect();
    assert_eq!(chars[slot(NOW - 30)], render::UNRECORDED, "{line}");
    assert_eq!(chars[slot(NOW - 36)], '█', "{line}");
    assert!(!line.contains(' '), "no gap: {line}");
    assert!(
        row.detail
            .iter()
            .any(|l| l.contains("requests per second 30-30")),
        "{:?}",
        row.detail
    );
    let mut state = ViewState::new(None);
    state.press(Key::Enter, &model);
    let detail = render::detail_lines(&state, &state.arranged(&model), &model);
    assert!(detail.iter().any(|l| l.contains("no record")), "{detail:?}");
}

#[test]
fn processes_from_history() {
    let model = model(1);
    let worker = model.processes.iter().find(|p| p.comm == "worker").unwrap();
    assert_eq!((worker.open_fds, worker.fd_limit), (Some(900), Some(1000)));
    assert_eq!(worker.fd_ratio(), Some(0.9));
    assert_eq!(worker.fd_errors, 1);
    assert_eq!(worker.dead_writes, 1);
    assert_eq!(worker.servers_reached, 1);
    assert_eq!(worker.requests_per_s, 3.0);
    let php = model
        .processes
        .iter()
        .find(|p| p.comm == "php-fpm")
        .unwrap();
    assert_eq!(php.open_fds, None);
    assert_eq!(php.requests_per_s, 30.0);
}

const METRICS_BEFORE: &str = r#"cacheprobe_connections_active{service="memcached",server="10.0.0.1:11211",role="client"} 8
cacheprobe_memcache_bytes_total{service="memcached",server="10.0.0.1:11211",role="client",direction="sent"} 1000
cacheprobe_memcache_bytes_total{service="memcached",server="10.0.0.1:11211",role="client",direction="received"} 10000
cacheprobe_queue_operations_total{service="kestrel",server="127.0.0.1:22133",role="client",queue="jobs",op="enqueue"} 100
cacheprobe_queue_operations_total{service="kestrel",server="127.0.0.1:22133",role="server",queue="jobs",op="enqueue"} 100
cacheprobe_queue_operations_total{service="kestrel",server="127.0.0.1:22133",role="server",queue="jobs",op="empty_poll"} 10
cacheprobe_process_open_fds{comm="php-fpm"} 50
cacheprobe_process_fd_limit{comm="php-fpm"} 1024
cacheprobe_process_connections{comm="php-fpm",service="memcached"} 8
"#;

#[test]
fn counters_give_connections_bytes_queues_and_fds() {
    let before = Counters::parse(METRICS_BEFORE);
    let after = Counters::parse(
        &METRICS_BEFORE
            .replace("\"sent\"} 1000", "\"sent\"} 3000")
            .replace("\"received\"} 10000", "\"received\"} 30000")
            .replace("op=\"enqueue\"} 100", "op=\"enqueue\"} 140")
            .replace("} 8\n", "} 9\n"),
    );
    let inputs = Inputs {
        counters: Some(&after),
        counters_before: Some((&before, 2.0)),
        ..Inputs::default()
    };
    let model = build(&history(), NOW, 1, &inputs);
    let a = model.servers.iter().find(|r| r.server == A).unwrap();
    assert_eq!(a.connections, Some(9));
    assert_eq!(a.bytes_out_per_s, Some(1000.0));
    assert_eq!(a.bytes_in_per_s, Some(10000.0));
    // The producer and the queue server on this host each counted the 40 enqueues: one row
    // per end, each at 20/s, not one row at 40/s.
    let queues: Vec<(Role, &str, f64, f64, f64)> = model
        .queues
        .iter()
        .map(|q| {
            (
                q.role,
                q.queue.as_str(),
                q.enqueue_per_s,
                q.dequeue_per_s,
                q.empty_polls_per_s,
            )
        })
        .collect();
    assert_eq!(
        queues,
        [
            (Role::Client, "jobs", 20.0, 0.0, 0.0),
            (Role::Server, "jobs", 20.0, 0.0, 0.0)
        ]
    );
    let php = model
        .processes
        .iter()
        .find(|p| p.comm == "php-fpm")
        .unwrap();
    assert_eq!((php.open_fds, php.fd_limit), (Some(50), Some(1024)));
    assert_eq!(php.total_connections(), 9);

    // The first refresh has no earlier counters: gauges yes, rates not yet.
    let first = build(
        &history(),
        NOW,
        1,
        &Inputs {
            counters: Some(&before),
            ..Inputs::default()
        },
    );
    let a = first.servers.iter().find(|r| r.server == A).unwrap();
    assert_eq!((a.connections, a.bytes_in_per_s), (Some(8), None));
}

/// Hot keys of server A as seen from both sides of this host: its clients (`user:1` hot, at
/// `count`) and memcached's own socket (the same key, a tenth as often).
fn keys(count: u64) -> KeysReport {
    let hot = |key: &str, count: u64| HotKey {
        key: key.into(),
        count,
        error: 0,
    };
    KeysReport {
        servers: vec![
            ServerHotKeys {
                service: "memcached".into(),
                server: A.into(),
                role: Role::Client,
                by_requests: vec![hot("user:1", count), hot("user:2", 5)],
                by_bytes: vec![hot("blob", 4096)],
            },
            ServerHotKeys {
                service: "memcached".into(),
                server: A.into(),
                role: Role::Server,
                by_requests: vec![hot("user:1", count / 10)],
                by_bytes: Vec::new(),
            },
        ],
        splits: Vec::new(),
        extremes: Vec::new(),
    }
}

#[test]
fn hot_key_rates_come_from_successive_reports() {
    let (before, after) = (keys(100), keys(400));
    let inputs = Inputs {
        keys: Some(&after),
        keys_before: Some((&before, 3.0)),
        ..Inputs::default()
    };
    let model = build(&history(), NOW, 1, &inputs);
    assert_eq!(model.hot_keys.len(), 4);
    let hot = &model.hot_keys[0];
    assert_eq!(
        (hot.key.as_str(), hot.role, hot.total, hot.per_s),
        ("user:1", Role::Client, 400, Some(100.0))
    );
    assert_eq!(model.hot_keys[1].per_s, Some(0.0), "unchanged");
    // The same key on the server's side is a row of its own with its own rate: the sides are
    // never mixed up when finding the previous count.
    let server_side = model
        .hot_keys
        .iter()
        .find(|h| h.role == Role::Server)
        .unwrap();
    assert_eq!(
        (
            server_side.key.as_str(),
            server_side.total,
            server_side.per_s
        ),
        ("user:1", 40, Some(10.0))
    );
    let mut state = ViewState::new(None);
    state.pane = Pane::HotKeys;
    let shown = state.arranged(&model);
    assert_eq!(
        shown
            .iter()
            .map(|r| (
                r.cells[2].as_str(),
                r.cells[3].as_str(),
                r.cells[4].as_str()
            ))
            .collect::<Vec<_>>(),
        [
            ("client", "requests", "user:1"),
            ("server", "requests", "user:1"),
            ("client", "requests", "user:2"),
            ("client", "bytes", "blob"),
        ],
        "ROLE, BY and KEY columns, sorted by rate within requests and bytes (ties by the cells)"
    );
    // `/server` keeps the server side's row only.
    state.filter = "server".into();
    let filtered = state.arranged(&model);
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].cells[2], "server");
    let text = render::text(&model, &ViewState::new(None), &render::Status::default());
    let header = text
        .lines()
        .find(|l| l.contains("KEY") && l.contains("BY"))
        .unwrap();
    assert!(header.contains("ROLE"), "{header}");
}

/// The audit's screen: a key that entered the space-saving table since the last refresh
/// inherited the count of the key it replaced (222, of which 221 error). It has no rate yet,
/// rather than 222 over one refresh, and does not outrank the key that is really hot; its
/// TOTAL is the guaranteed count, not the over-estimate; and bytes rates, in another unit, do
/// not push the requests rows down.
#[test]
fn a_key_new_to_the_table_has_no_rate_and_no_exact_total() {
    let hot = |key: &str, count: u64, error: u64| HotKey {
        key: key.into(),
        count,
        error,
    };
    let report = |hot_count: u64, newcomer: Option<HotKey>, blob: u64| KeysReport {
        servers: vec![ServerHotKeys {
            service: "memcached".into(),
            server: A.into(),
            role: Role::Client,
            by_requests: [hot("user:1", hot_count, 0)]
                .into_iter()
                .chain(newcomer)
                .collect(),
            by_bytes: vec![hot("blob", blob, 0)],
        }],
        ..KeysReport::default()
    };
    let before = report(1000, None, 1_000_000);
    let after = report(1120, Some(hot("rare", 222, 221)), 2_000_000);
    let inputs = Inputs {
        keys: Some(&after),
        keys_before: Some((&before, 1.0)),
        ..Inputs::default()
    };
    let model = build(&history(), NOW, 1, &inputs);
    let rare = model.hot_keys.iter().find(|h| h.key == "rare").unwrap();
    assert_eq!((rare.per_s, rare.total, rare.error), (None, 222, 221));
    // Evicted and back with another error: no rate either.
    let again = report(1240, Some(hot("rare", 300, 280)), 3_000_000);
    let inputs = Inputs {
        keys: Some(&again),
        keys_before: Some((&after, 1.0)),
        ..Inputs::default()
    };
    let later = build(&history(), NOW, 1, &inputs);
    assert_eq!(
        later
            .hot_keys
            .iter()
            .find(|h| h.key == "rare")
            .unwrap()
            .per_s,
        None
    );

    let mut state = ViewState::new(None);
    state.pane = Pane::HotKeys;
    let shown = state.arranged(&model);
    let cells: Vec<(&str, &str, &str, &str)> = shown
        .iter()
        .map(|r| {
            (
                r.cells[3].as_str(),
                r.cells[4].as_str(),
                r.cells[5].as_str(),
                r.cells[6].as_str(),
            )
        })
        .collect();
    assert_eq!(
        cells,
        [
            ("requests", "user:1", "120", "1120"),
            ("requests", "rare", "-", "1+"),
            ("bytes", "blob", "976.6K", "1.9M"),
        ]
    );
    let detail = shown[1].detail.join("\n");
    assert!(detail.contains("between 1 and 222"), "{detail}");
}

#[test]
fn keys_hash_keeps_plain_keys_off_the_screen() {
    let report = keys(400);
    let inputs = Inputs {
        keys: Some(&report),
        key_display: KeyDisplay::Hash,
        ..Inputs::default()
    };
    let model = build(&history(), NOW, 1, &inputs);
    let hashed = KeyDisplay::Hash.show(b"user:1");
    assert!(model.hot_keys.iter().all(|h| h.key.starts_with('#')));
    assert_eq!(
        model.hot_keys[0].key, hashed,
        "the daemon's own hash of the key"
    );
    // Keys the daemon already hashed are kept as they are, not hashed twice.
    let mut daemon_hashed = keys(400);
    for server in &mut daemon_hashed.servers {
        for key in server.by_requests.iter_mut().chain(&mut server.by_bytes) {
            key.key = KeyDisplay::Hash.show(key.key.as_bytes());
        }
    }
    let model_of_hashed = build(
        &history(),
        NOW,
        1,
        &Inputs {
            keys: Some(&daemon_hashed),
            key_display: KeyDisplay::Hash,
            ..Inputs::default()
        },
    );
    assert_eq!(model_of_hashed.hot_keys, model.hot_keys);
    let text = render::text(&model, &ViewState::new(None), &render::Status::default());
    assert!(!text.contains("user:1") && text.contains(&hashed), "{text}");
}

#[test]
fn findings_cover_only_the_last_minute() {
    let mut history = History::new(900, HistoryLimits::default());
    // A server that stopped answering 10 minutes ago and recovered: not a finding now.
    for t in NOW - 700..=NOW {
        for server in [A, B, "10.0.0.3:11211"] {
            let hung = server == B && t < NOW - 300;
            let status = if hung {
                RequestStatus::Timeout
            } else {
                RequestStatus::Hit
            };
            history.record(t, request(server, "php-fpm", status, 250));
        }
    }
    let thresholds = DiagnoseThresholds::default();
    let inputs = Inputs {
        thresholds: Some(&thresholds),
        ..Inputs::default()
    };
    let snapshot = history.snapshot(0);
    let whole = crate::diagnose::diagnose(&snapshot, &thresholds);
    assert!(!whole.is_empty(), "the whole history has the outage");
    let model = build(&snapshot, NOW, 1, &inputs);
    assert!(model.findings.is_empty(), "{:?}", model.findings);
    assert_eq!(
        render::findings_line(&model.findings),
        "findings: none in the last 60 s"
    );
}

#[test]
fn sorting_and_filtering() {
    let model = model(1);
    let servers = |sort: usize, filter: &str| -> Vec<String> {
        arrange(rows(&model, Pane::Servers), sort, filter, None)
            .into_iter()
            .map(|r| r.cells[1].clone())
            .collect()
    };
    // REQ/S (3) is the default: busiest first.
    assert_eq!(servers(Pane::Servers.default_sort(), ""), [A, B]);
    // P99 (6): slowest first; ERR/S (7): most errors first.
    assert_eq!(servers(6, ""), [B, A]);
    assert_eq!(servers(7, ""), [B, A]);
    // Name (0) ascending.
    assert_eq!(servers(0, ""), [A, B]);
    // The filter matches any cell, case-insensitively.
    assert_eq!(servers(3, "0.0.2"), [B]);
    assert_eq!(servers(3, "MEMCACHED"), [A, B]);
    assert!(servers(3, "nothing").is_empty());
    // --service keeps one service's rows.
    assert!(arrange(rows(&model, Pane::Servers), 3, "", Some("kestrel")).is_empty());
    assert_eq!(
        arrange(rows(&model, Pane::Processes), 3, "", Some("memcached")).len(),
        2
    );
    // Missing numbers sort last whatever the direction.
    let processes: Vec<String> = arrange(rows(&model, Pane::Processes), 2, "", None)
        .into_iter()
        .map(|r| r.cells[0].clone())
        .collect();
    assert_eq!(processes, ["worker", "php-fpm"]);
}

#[test]
fn keys_change_the_view() {
    let model = model(1);
    let mut state = ViewState::new(None);
    let count = state.arranged(&model).len();
    assert_eq!(state.key(Key::Char('p'), count), Action::Redraw);
    assert_eq!(state.arranged(&model)[0].cells[1], B, "p sorts by p99");
    assert_eq!(state.key(Key::Char('r'), count), Action::Redraw);
    assert_eq!(state.arranged(&model)[0].cells[1], A);
    assert_eq!(state.key(Key::Char('z'), count), Action::None, "no column");

    assert_eq!(state.key(Key::Char('/'), count), Action::Redraw);
    for c in "0.0.2".chars() {
        state.key(Key::Char(c), count);
    }
    // While typing, letters are filter text, not sort keys or quit.
    state.key(Key::Char('q'), count);
    assert_eq!(state.filter, "0.0.2q");
    state.key(Key::Backspace, count);
    state.key(Key::Enter, count);
    assert!(!state.editing_filter);
    let shown = state.arranged(&model);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].cells[1], B);
    // Esc clears the filter first, then quits.
    assert_eq!(state.key(Key::Esc, 1), Action::Redraw);
    assert!(state.filter.is_empty());

    assert_eq!(state.key(Key::Char(' '), 2), Action::Redraw);
    assert!(state.paused);
    state.key(Key::Down, 2);
    state.key(Key::Down, 2);
    assert_eq!(state.selected, 1, "stops at the last row");
    state.key(Key::Enter, 2);
    assert!(state.detail);
    assert_eq!(
        state.key(Key::Char('r'), 2),
        Action::None,
        "detail is modal"
    );
    state.key(Key::Esc, 2);
    assert!(!state.detail);

    state.key(Key::Tab, 2);
    assert_eq!((state.pane, state.selected), (Pane::Processes, 0));
    state.key(Key::Char('f'), 2);
    assert_eq!(
        state.arranged(&model)[0].cells[0],
        "worker",
        "f sorts by fd usage"
    );
    state.key(Key::BackTab, 2);
    assert_eq!(state.pane, Pane::Servers);
    assert_eq!(state.sort_column(), 3, "each pane keeps its sort");

    assert_eq!(state.key(Key::Char('q'), 2), Action::Quit);
    assert_eq!(ViewState::new(None).key(Key::CtrlC, 0), Action::Quit);
    assert_eq!(ViewState::new(None).key(Key::Esc, 0), Action::Quit);
}

/// The audit's popup alternated between two servers: the selection was an index into rows that
/// every refresh re-sorts. It follows the row: across a refresh that swaps the busiest server,
/// the highlight and Enter's detail stay on the server chosen, and a row that has gone says so
/// instead of showing whichever row took its place.
#[test]
fn the_selection_follows_its_row_across_refreshes() {
    let first = model(1);
    let mut state = ViewState::new(None);
    assert_eq!(state.press(Key::Down, &first), Action::Redraw);
    assert_eq!(state.press(Key::Enter, &first), Action::Redraw);
    let shown = state.arranged(&first);
    assert_eq!(shown[state.selected_index(&shown)].cells[1], B);
    let detail = render::detail_lines(&state, &shown, &first);
    assert!(detail[0].contains(B), "{detail:?}");

    // The next refresh: B is now the busiest, first by REQ/S.
    let mut second = first.clone();
    for server in &mut second.servers {
        server.requests_per_s = if server.server == B { 50.0 } else { 1.0 };
    }
    let shown = state.arranged(&second);
    assert_eq!(shown[0].cells[1], B);
    assert_eq!(
        state.selected_index(&shown),
        0,
        "the highlight moved with B"
    );
    let detail = render::detail_lines(&state, &shown, &second);
    assert!(
        detail[0].contains(B) && !detail[0].contains(A),
        "{detail:?}"
    );
    assert!(screen(&second, &state, 100, 30).contains(&format!("memcached {B} (client)")));

    // Closing the detail and moving goes from where B is now.
    state.press(Key::Esc, &second);
    state.press(Key::Down, &second);
    let shown = state.arranged(&second);
    assert_eq!(shown[state.selected_index(&shown)].cells[1], A);

    // The selected row gone: the detail says so.
    state.press(Key::Enter, &second);
    let mut third = second.clone();
    third.servers.retain(|s| s.server != A);
    let shown = state.arranged(&third);
    let detail = render::detail_lines(&state, &shown, &third);
    assert_eq!(detail.len(), 1);
    assert!(
        detail[0].contains(A) && detail[0].contains("no row"),
        "{detail:?}"
    );
}

/// `--service` with a name no service has showed an empty screen that read as "no traffic":
/// it says there is no such service and which there are, configured or seen.
#[test]
fn an_unknown_service_is_named_as_such() {
    let model = model(1);
    let status = render::Status {
        configured_services: vec!["sessions".into()],
        ..render::Status::default()
    };
    let typo = ViewState::new(Some("memcahced".into()));
    let said = render::unknown_service(&model, &typo, &status);
    assert_eq!(
        said.as_deref(),
        Some("no service named \"memcahced\" (services: memcached, sessions)")
    );
    let mut terminal = Terminal::new(TestBackend::new(100, 24)).unwrap();
    terminal
        .draw(|frame| render::draw(frame, &model, &typo, &status, false))
        .unwrap();
    let buffer = terminal.backend().buffer().clone();
    let text: String = (0..24)
        .flat_map(|y| (0..100).map(move |x| (x, y)))
        .map(|xy| buffer[xy].symbol().to_string())
        .collect();
    assert!(text.contains("no service named \"memcahced\""), "{text}");
    assert!(!text.contains("no traffic"), "{text}");
    assert!(render::text(&model, &typo, &status).contains("no service named"));
    // A configured service without traffic yet, and a service seen in the data, are known.
    for known in ["sessions", "memcached"] {
        let state = ViewState::new(Some(known.into()));
        assert_eq!(render::unknown_service(&model, &state, &status), None);
    }
    assert_eq!(
        render::unknown_service(&Model::default(), &typo, &render::Status::default()).as_deref(),
        Some("no service named \"memcahced\" (services: none configured or seen yet)")
    );
}

#[test]
fn filter_length_is_bounded() {
    let mut state = ViewState::new(None);
    state.key(Key::Char('/'), 0);
    for _ in 0..1000 {
        state.key(Key::Char('x'), 0);
    }
    assert_eq!(state.filter.len(), 64);
}

fn screen(model: &Model, state: &ViewState, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    let status = render::Status {
        source: "daemon /tmp/x.sock".into(),
        refresh_s: 1.0,
        ..Default::default()
    };
    terminal
        .draw(|frame| render::draw(frame, model, state, &status, false))
        .unwrap();
    let buffer = terminal.backend().buffer().clone();
    let mut text = String::new();
    for y in 0..height {
        for x in 0..width {
            text.push_str(buffer[(x, y)].symbol());
        }
        text.push('\n');
    }
    text
}

#[test]
fn draws_at_80x24_and_wider_and_refuses_tiny_terminals() {
    let model = model(1);
    let state = ViewState::new(None);
    let small = screen(&model, &state, 80, 24);
    assert!(small.contains("10.0.0.1:11211"), "{small}");
    assert!(small.contains("REQ/S*"), "{small}");
    assert!(small.contains("findings:"), "{small}");
    assert!(small.contains("q quit"), "{small}");
    let row = small.lines().find(|l| l.contains(A)).unwrap();
    assert!(row.contains(" 30 ") && row.contains(" 67 "), "{row}");
    // The sparkline has a place at 80 columns (SERVICE gives way).
    assert!(small.contains("REQ/S LAST 1"), "{small}");
    let wide = screen(&model, &state, 200, 40);
    assert!(wide.contains("REQ/S LAST 60 S"), "{wide}");
    assert!(wide.contains("RETX/m"), "{wide}");
    for (w, h) in [(79, 24), (80, 23), (10, 3), (1, 1), (0, 0)] {
        let tiny = screen(&model, &state, w, h);
        if w >= 20 {
            assert!(tiny.contains("too small"), "{w}x{h}: {tiny}");
        }
    }
    let mut detail = state.clone();
    detail.detail = true;
    let popup = screen(&model, &detail, 80, 24);
    assert!(popup.contains("detail"), "{popup}");
    assert!(popup.contains("latency p50"), "{popup}");
    // Every pane draws, with and without rows.
    let mut other = state.clone();
    for _ in 0..4 {
        other.key(Key::Tab, 0);
        let text = screen(&model, &other, 80, 24);
        assert!(text.contains(other.pane.title()), "{text}");
    }
    other.pane = Pane::Queues;
    assert!(screen(&model, &other, 80, 24).contains("no queue traffic"));
}

#[test]
fn batch_text_has_every_pane() {
    let model = model(1);
    let state = ViewState::new(None);
    let status = render::Status {
        source: "daemon /tmp/x.sock".into(),
        ..Default::default()
    };
    let text = render::text(&model, &state, &status);
    assert!(text.starts_with("cacheprobe top  22:13:20 UTC"), "{text}");
    for heading in ["SERVERS", "PROCESSES", "HOT KEYS", "QUEUES"] {
        assert!(text.contains(&format!("\n{heading}\n")), "{text}");
    }
    let a = text.lines().find(|l| l.contains(A)).unwrap();
    let fields: Vec<&str> = a.split_whitespace().collect();
    // service server role req/s hit% p50 p99 err/s ...
    assert_eq!(&fields[..5], ["memcached", A, "client", "30", "67"]);
    assert!(!text.contains('\u{1b}'), "no escape sequences");
}

#[test]
fn column_fitting_keeps_the_important_columns() {
    let columns = Pane::Servers.columns();
    let at_80 = render::fit_columns(columns, 80);
    let titles: Vec<&str> = at_80.iter().map(|&i| columns[i].title).collect();
    for needed in ["SERVER", "REQ/S", "HIT%", "P99", "ERR/S"] {
        assert!(titles.contains(&needed), "{titles:?}");
    }
    let used: u16 = at_80.iter().map(|&i| columns[i].width + 1).sum();
    assert!(used <= 80, "{used}");
    assert_eq!(render::fit_columns(columns, 500).len(), columns.len());
}

#[test]
fn the_daemons_counter_registry_parses_whole() {
    use crate::export::{
        encode::{encode, Format},
        metrics::{CommLabels, CommServiceLabels, EndpointLabels, FdErrorLabels, Metrics},
    };
    let (metrics, _) = Metrics::new();
    let endpoint = EndpointLabels {
        service: "memcached".into(),
        server: A.into(),
        role: "client",
    };
    metrics.connections_active.get_or_create(&endpoint).set(3);
    metrics
        .memcache_bytes
        .get_or_create(&endpoint.clone().bytes("received"))
        .inc_by(1234);
    metrics
        .queue_operations
        .get_or_create(
            &EndpointLabels {
                service: "kestrel".into(),
                server: "127.0.0.1:22133".into(),
                role: "server",
            }
            // Not a name with quotes: prometheus-client 0.22 writes label values unescaped
            // (found here; a queue named with '"' breaks the exposition text, also for
            // Prometheus), and the parser rightly skips such a line.
            .queue("jobs".into(), "dequeue"),
        )
        .inc_by(5);
    let comm = CommLabels {
        comm: "php-fpm".into(),
    };
    metrics.process_open_fds.get_or_create(&comm).set(10);
    metrics.process_fd_limit.get_or_create(&comm).set(20);
    metrics
        .process_connections
        .get_or_create(&CommServiceLabels {
            comm: "php-fpm".into(),
            service: "memcached".into(),
        })
        .set(2);
    metrics
        .fd_exhaustion_errors
        .get_or_create(&FdErrorLabels {
            comm: "php-fpm".into(),
            errno: "EMFILE",
        })
        .inc();
    // A family top does not read stays out of its registry.
    metrics
        .memcache_duration
        .get_or_create(&endpoint.clone().command("get"))
        .observe(0.001, None);
    let text = encode(&metrics.top_registry(), Format::OpenMetrics).unwrap();
    assert!(!text.contains("request_duration"), "{text}");
    let counters = Counters::parse(&text);
    assert_eq!(counters.malformed_lines, 0, "{text}");
    assert_eq!(
        counters.connections_active("memcached", A, Role::Client),
        Some(3)
    );
    assert_eq!(
        counters.bytes("memcached", A, Role::Client, "received"),
        Some(1234.0)
    );
    assert_eq!(
        counters.queue_ops(
            "kestrel",
            "127.0.0.1:22133",
            Role::Server,
            "jobs",
            "dequeue"
        ),
        Some(5.0)
    );
    assert_eq!(counters.fds("php-fpm"), Some((10, 20)));
    assert_eq!(
        counters.process_connections("php-fpm"),
        [("memcached".to_string(), 2)]
    );
    assert_eq!(counters.fd_errors("php-fpm"), 1);
}

/// The live stall (memcached SIGSTOPped 3 s under noreply sets, 8 clients, ~720/s): at the
/// server's socket requests count when memcached reads them, so the second it resumed read
/// 2043, a spike of traffic no client sent (its clients' rows, timed at the send, stayed
/// flat). That second is a backlog: a '^' in the sparkline, out of its scale and of the
/// detail's peak, and REQ/S carries the mark while it is in the window. A batch job's burst
/// after idle seconds is traffic, and the client row is not marked.
#[test]
fn a_stalled_servers_backlog_is_marked_not_drawn_as_traffic() {
    let stored = |server: &str, role| Fact::Request {
        service: "memcached".into(),
        server: server.into(),
        role,
        comm: Some("memcached".into()),
        command: "set".into(),
        status: RequestStatus::Stored,
        latency_us: Some(20),
    };
    let mut history = History::new(900, HistoryLimits::default());
    let stalled: [u64; 8] = [725, 746, 727, 518, 0, 0, 2043, 697];
    let start = NOW - stalled.len() as u64 + 1;
    for (i, &count) in stalled.iter().enumerate() {
        let t = start + i as u64;
        for role in [Role::Server, Role::Client] {
            // The clients sent at their pace all along.
            let count = if role == Role::Client { 720 } else { count };
            for _ in 0..count {
                history.record(t, stored(A, role));
            }
        }
        // A batch job against B: idle, then a burst far past what idleness held back.
        let batch = [5, 5, 5, 5, 0, 0, 2000, 5][i];
        for _ in 0..batch {
            history.record(t, stored(B, Role::Server));
        }
    }
    let slot = |t: u64| (t - (NOW + 1 - MINUTE_S)) as usize;
    let resumed = slot(start + 6);
    let at = |end_s: u64| build(&history.snapshot(0), end_s, 1, &Inputs::default());
    let model = at(start + 6);
    let row = |model: &Model, server: &str, role: Role| {
        model
            .servers
            .iter()
            .find(|r| r.server == server && r.role == role)
            .unwrap()
            .clone()
    };
    let server = row(&model, A, Role::Server);
    let backlog: Vec<usize> = (0..server.backlog.len())
        .filter(|&i| server.backlog[i])
        .collect();
    // `at(start + 6)` ends at the resumed second: its slot is the last.
    assert_eq!(
        backlog,
        [MINUTE_S as usize - 1],
        "{:?}",
        server.requests_spark
    );
    assert!(row(&model, A, Role::Client).backlog.iter().all(|b| !b));
    assert!(row(&model, B, Role::Server).backlog.iter().all(|b| !b));

    let shown = rows(&model, Pane::Servers);
    let a_server = shown
        .iter()
        .find(|r| r.cells[1] == A && r.cells[2] == "server")
        .unwrap();
    assert_eq!(a_server.cells[3], format!("2043{}", render::BACKLOG));
    let line = render::sparkline(
        a_server.spark.as_ref().unwrap(),
        &a_server.unrecorded,
        &a_server.backlog,
        60,
    );
    assert_eq!(line.chars().last(), Some(render::BACKLOG), "{line}");
    // The seconds before it keep their height: full bars, not squashed under 2043.
    assert_eq!(line.chars().rev().nth(4), Some('█'), "{line}");
    assert!(
        a_server
            .detail
            .iter()
            .any(|l| l.contains("requests per second 0-746")),
        "{:?}",
        a_server.detail
    );
    // A second later the rate is the resumed traffic's, unmarked; the sparkline keeps the mark.
    let later = at(start + 7);
    let next = rows(&later, Pane::Servers);
    let a_server = next
        .iter()
        .find(|r| r.cells[1] == A && r.cells[2] == "server")
        .unwrap();
    assert_eq!(a_server.cells[3], "697");
    assert!(a_server.backlog[resumed], "{:?}", a_server.backlog);
}
