//! The panes as tables of text cells with sort values, and the interactive state (pane, sort
//! column, filter, selection, pause): what the keys change, kept apart from drawing so sorting
//! and filtering are unit-tested without a terminal.

use std::cmp::Ordering;

use super::model::{HotKeyKind, HotKeyRow, Model, ProcessRow, QueueRow, ServerRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Servers,
    Processes,
    HotKeys,
    Queues,
}

impl Pane {
    pub const ALL: [Pane; 4] = [Pane::Servers, Pane::Processes, Pane::HotKeys, Pane::Queues];

    pub fn title(self) -> &'static str {
        match self {
            Pane::Servers => "Servers",
            Pane::Processes => "Processes",
            Pane::HotKeys => "Hot keys",
            Pane::Queues => "Queues",
        }
    }

    fn index(self) -> usize {
        Pane::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }

    pub fn next(self) -> Pane {
        Pane::ALL[(self.index() + 1) % Pane::ALL.len()]
    }

    pub fn previous(self) -> Pane {
        Pane::ALL[(self.index() + Pane::ALL.len() - 1) % Pane::ALL.len()]
    }

    pub fn columns(self) -> &'static [Column] {
        match self {
            Pane::Servers => SERVER_COLUMNS,
            Pane::Processes => PROCESS_COLUMNS,
            Pane::HotKeys => HOT_KEY_COLUMNS,
            Pane::Queues => QUEUE_COLUMNS,
        }
    }

    /// The column sorted on when the pane is first shown.
    pub fn default_sort(self) -> usize {
        match self {
            Pane::Servers => 3,
            Pane::Processes => 3,
            Pane::HotKeys => 5,
            Pane::Queues => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub title: &'static str,
    /// The key that sorts by this column (mctop style), shown in the footer.
    pub letter: Option<char>,
    pub width: u16,
    pub right: bool,
    /// Lower is kept longer when the terminal is narrow.
    pub priority: u8,
}

const fn col(title: &'static str, letter: char, width: u16, right: bool, priority: u8) -> Column {
    Column {
        title,
        letter: if letter == ' ' { None } else { Some(letter) },
        width,
        right,
        priority,
    }
}

pub const SERVER_COLUMNS: &[Column] = &[
    // SERVICE gives way to the sparkline at 80 columns: the server address already names the
    // row, and the last seconds' requests show a stall or a spike no other column does.
    col("SERVICE", 'n', 10, false, 2),
    col("SERVER", ' ', 21, false, 0),
    col("ROLE", ' ', 6, false, 1),
    col("REQ/S", 'r', 8, true, 0),
    col("HIT%", 'h', 6, true, 0),
    col("P50", ' ', 7, true, 2),
    col("P99", 'p', 8, true, 0),
    col("ERR/S", 'e', 6, true, 0),
    col("TMO/m", 't', 5, true, 2),
    col("DEAD/m", 'd', 6, true, 2),
    col("RETX/m", 'x', 6, true, 3),
    col("CONN", 'c', 5, true, 1),
    col("IN/S", 'b', 7, true, 3),
    col("OUT/S", ' ', 7, true, 3),
];

pub const PROCESS_COLUMNS: &[Column] = &[
    col("PROCESS", 'n', 16, false, 0),
    col("FDS", ' ', 13, true, 0),
    col("FD%", 'f', 5, true, 0),
    col("CONN", 'c', 6, true, 0),
    col("SERVERS", 's', 7, true, 1),
    col("REQ/S", 'r', 8, true, 0),
    col("DEAD/m", 'd', 6, true, 1),
    col("EMFILE", 'e', 6, true, 1),
    col("CONNECTIONS BY SERVICE", ' ', 30, false, 2),
];

pub const HOT_KEY_COLUMNS: &[Column] = &[
    col("SERVICE", ' ', 10, false, 2),
    col("SERVER", 's', 21, false, 0),
    col("ROLE", ' ', 6, false, 1),
    col("BY", ' ', 8, false, 0),
    col("KEY", 'n', 28, false, 0),
    // Per second over the header's window, like every X/S column.
    col("RATE/S", 'r', 9, true, 0),
    col("TOTAL", 't', 10, true, 1),
];

pub const QUEUE_COLUMNS: &[Column] = &[
    col("SERVICE", ' ', 10, false, 1),
    col("SERVER", 's', 21, false, 0),
    col("ROLE", ' ', 6, false, 1),
    col("QUEUE", 'n', 20, false, 0),
    col("ENQ/S", 'e', 9, true, 0),
    col("DEQ/S", 'd', 9, true, 0),
    col("EMPTY/S", 'p', 9, true, 0),
];

/// How a cell sorts: numbers largest first, text alphabetically; missing values last.
#[derive(Debug, Clone, PartialEq)]
pub enum SortValue {
    Number(Option<f64>),
    Text(String),
}

fn compare(a: &SortValue, b: &SortValue) -> Ordering {
    match (a, b) {
        (SortValue::Number(a), SortValue::Number(b)) => match (a, b) {
            (Some(a), Some(b)) => b.total_cmp(a),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        },
        (SortValue::Text(a), SortValue::Text(b)) => a.cmp(b),
        (SortValue::Number(_), SortValue::Text(_)) => Ordering::Less,
        (SortValue::Text(_), SortValue::Number(_)) => Ordering::Greater,
    }
}

/// One row of a pane, ready to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    pub cells: Vec<String>,
    pub sort: Vec<SortValue>,
    /// Requests per second over the last minute (servers only).
    pub spark: Option<Vec<u64>>,
    /// Which seconds of `spark` the daemon has no record of (empty: all recorded).
    pub unrecorded: Vec<bool>,
    /// Which seconds of `spark` are a server's backlog (empty: none).
    pub backlog: Vec<bool>,
    /// Lines shown by Enter.
    pub detail: Vec<String>,
    /// Alerting cells (errors, dead writes, fd pressure) for colour.
    pub alert: bool,
    /// The service the row belongs to, for `--service`; None matches every service.
    pub services: Vec<String>,
    /// Rows sort within their group first (lower groups first): rows whose sort column holds
    /// different units.
    pub group: u8,
    /// What the row is about (service, server and role; process; key; queue): the selection
    /// follows it, since refreshes re-sort the rows.
    pub id: Vec<String>,
}

pub fn rate(value: f64) -> String {
    if value == 0.0 {
        "0".to_string()
    } else if value < 10.0 {
        format!("{value:.1}")
    } else if value < 100_000.0 {
        format!("{value:.0}")
    } else if value < 100_000_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else {
        format!("{:.0}M", value / 1e6)
    }
}

pub fn bytes_rate(value: f64) -> String {
    if value < 1024.0 {
        format!("{value:.0}")
    } else if value < 1024.0 * 1024.0 {
        format!("{:.1}K", value / 1024.0)
    } else if value < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1}M", value / 1024.0 / 1024.0)
    } else {
        format!("{:.1}G", value / 1024.0 / 1024.0 / 1024.0)
    }
}

pub fn millis(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}us", ms * 1000.0)
    } else if ms < 10.0 {
        format!("{ms:.1}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

pub fn percent(ratio: f64) -> String {
    let p = ratio * 100.0;
    if p > 99.0 && p < 100.0 {
        format!("{p:.1}")
    } else {
        format!("{p:.0}")
    }
}

fn or_dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".to_string())
}

/// The p99, or for a server that stopped answering how long ago its last answer came ("none
/// 7s"): during a stall there is no latency to show, and a blank would hide it.
fn p99_cell(row: &ServerRow) -> String {
    match (row.p99_ms, row.unanswered_for_s) {
        (Some(p99), _) => millis(p99),
        (None, Some(s)) => format!("none {s}s"),
        (None, None) => "-".to_string(),
    }
}

fn server_row(row: &ServerRow, unrecorded: &[bool], window_s: u64) -> TableRow {
    let bytes_total = match (row.bytes_in_per_s, row.bytes_out_per_s) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    };
    let backlog_in_window = row.backlog.iter().rev().take(window_s as usize).any(|b| *b);
    // Read, not sent, at that rate: the mark says so (the detail spells it out).
    let requests = match backlog_in_window {
        true => format!("{}{}", rate(row.requests_per_s), super::render::BACKLOG),
        false => rate(row.requests_per_s),
    };
    let cells = vec![
        row.service.clone(),
        row.server.clone(),
        row.role.as_str().to_string(),
        requests.clone(),
        or_dash(row.hit_ratio.map(percent)),
        or_dash(row.p50_ms.map(millis)),
        p99_cell(row),
        rate(row.errors_per_s),
        row.timeouts.to_string(),
        row.dead_writes.to_string(),
        row.retransmits.to_string(),
        or_dash(row.connections.map(|c| c.to_string())),
        or_dash(row.bytes_in_per_s.map(bytes_rate)),
        or_dash(row.bytes_out_per_s.map(bytes_rate)),
    ];
    let sort = vec![
        SortValue::Text(format!("{}/{}", row.service, row.server)),
        SortValue::Text(row.server.clone()),
        SortValue::Text(row.role.as_str().to_string()),
        SortValue::Number(Some(row.requests_per_s)),
        SortValue::Number(row.hit_ratio),
        SortValue::Number(row.p50_ms),
        // A server silent for seconds sorts with latencies that long.
        SortValue::Number(
            row.p99_ms
                .or(row.unanswered_for_s.map(|s| s as f64 * 1000.0)),
        ),
        SortValue::Number(Some(row.errors_per_s)),
        SortValue::Number(Some(row.timeouts as f64)),
        SortValue::Number(Some(row.dead_writes as f64)),
        SortValue::Number(Some(row.retransmits as f64)),
        SortValue::Number(row.connections.map(|c| c as f64)),
        SortValue::Number(bytes_total),
        SortValue::Number(row.bytes_out_per_s),
    ];
    // Over the seconds recorded: one the daemon missed is no low, and a backlog no peak.
    let recorded = || {
        row.requests_spark
            .iter()
            .enumerate()
            .filter(|(i, _)| !unrecorded.get(*i).copied().unwrap_or(false))
            .filter(|(i, _)| !row.backlog.get(*i).copied().unwrap_or(false))
            .map(|(_, v)| *v)
    };
    let peak = recorded().max().unwrap_or(0);
    let low = recorded().min().unwrap_or(0);
    let p99_peak = row.p99_spark.iter().max().copied().unwrap_or(0);
    let detail = vec![
        format!("{} {} ({})", row.service, row.server, row.role.as_str()),
        format!(
            "requests/s {}   hit ratio {}   errors/s {}{}",
            requests,
            or_dash(row.hit_ratio.map(|r| format!("{}%", percent(r)))),
            rate(row.errors_per_s),
            if backlog_in_window {
                "   (read at once after a silence: sent by the clients during it)"
            } else {
                ""
            }
        ),
        format!(
            "latency p50 {}   p99 {}   worst 1 s p99 in the last minute {}",
            or_dash(row.p50_ms.map(millis)),
            match row.unanswered_for_s {
                Some(s) => format!("- (no answer for {s} s)"),
                None => or_dash(row.p99_ms.map(millis)),
            },
            if p99_peak == 0 {
                "-".to_string()
            } else {
                millis(p99_peak as f64 / 1000.0)
            }
        ),
        format!(
            "last minute: {} timeouts, {} dead writes, {} retransmits; requests per second {}-{}",
            row.timeouts, row.dead_writes, row.retransmits, low, peak
        ),
        format!(
            "connections {}   bytes/s in {}   out {}",
            or_dash(row.connections.map(|c| c.to_string())),
            or_dash(row.bytes_in_per_s.map(bytes_rate)),
            or_dash(row.bytes_out_per_s.map(bytes_rate))
        ),
    ];
    TableRow {
        id: vec![
            row.service.clone(),
            row.server.clone(),
            row.role.as_str().to_string(),
        ],
        group: 0,
        alert: row.errors_per_s > 0.0 || row.timeouts > 0 || row.dead_writes > 0,
        services: vec![row.service.clone()],
        cells,
        sort,
        spark: Some(row.requests_spark.clone()),
        unrecorded: unrecorded.to_vec(),
        backlog: row.backlog.clone(),
        detail,
    }
}

fn process_row(row: &ProcessRow) -> TableRow {
    let fds = match (row.open_fds, row.fd_limit) {
        (Some(open), Some(limit)) => format!("{open}/{limit}"),
        (Some(open), None) => open.to_string(),
        _ => "-".to_string(),
    };
    let by_service = row
        .connections
        .iter()
        .map(|(service, count)| format!("{service}:{count}"))
        .collect::<Vec<_>>()
        .join(" ");
    let connections = (!row.connections.is_empty()).then(|| row.total_connections());
    let cells = vec![
        row.comm.clone(),
        fds.clone(),
        or_dash(row.fd_ratio().map(percent)),
        or_dash(connections.map(|c| c.to_string())),
        row.servers_reached.to_string(),
        rate(row.requests_per_s),
        row.dead_writes.to_string(),
        row.fd_errors.to_string(),
        by_service.clone(),
    ];
    let sort = vec![
        SortValue::Text(row.comm.clone()),
        SortValue::Number(row.open_fds.map(|v| v as f64)),
        SortValue::Number(row.fd_ratio()),
        SortValue::Number(connections.map(|c| c as f64)),
        SortValue::Number(Some(row.servers_reached as f64)),
        SortValue::Number(Some(row.requests_per_s)),
        SortValue::Number(Some(row.dead_writes as f64)),
        SortValue::Number(Some(row.fd_errors as f64)),
        SortValue::Text(by_service.clone()),
    ];
    TableRow {
        id: vec![row.comm.clone()],
        group: 0,
        alert: row.fd_ratio().is_some_and(|r| r >= 0.8) || row.fd_errors > 0 || row.dead_writes > 0,
        services: row.services.iter().cloned().collect(),
        cells,
        sort,
        spark: None,
        unrecorded: Vec::new(),
        backlog: Vec::new(),
        detail: vec![
            format!("process {}", row.comm),
            format!(
                "file descriptors {fds} ({})",
                or_dash(
                    row.fd_ratio()
                        .map(|r| format!("{}% of the limit", percent(r)))
                )
            ),
            format!(
                "connections by service: {}",
                if by_service.is_empty() {
                    "-"
                } else {
                    &by_service
                }
            ),
            format!(
                "servers sent requests in the last minute: {}   requests/s {}",
                row.servers_reached,
                rate(row.requests_per_s)
            ),
            format!(
                "dead writes in the last minute: {}   EMFILE/ENFILE: {}",
                row.dead_writes, row.fd_errors
            ),
        ],
    }
}

fn hot_key_row(row: &HotKeyRow, window_s: u64) -> TableRow {
    let amount = |value: u64| match row.kind {
        HotKeyKind::Requests => value.to_string(),
        HotKeyKind::Bytes => bytes_rate(value as f64),
    };
    // The guaranteed count, never space-saving's over-estimate; "+" when the key may have had
    // up to `error` more.
    let shown_total = if row.error == 0 {
        amount(row.total)
    } else {
        format!("{}+", amount(row.at_least()))
    };
    let shown_rate = row.per_s.map(|r| match row.kind {
        HotKeyKind::Requests => rate(r),
        HotKeyKind::Bytes => bytes_rate(r),
    });
    let unit = match row.kind {
        HotKeyKind::Requests => "requests",
        HotKeyKind::Bytes => "bytes",
    };
    let counted = if row.error == 0 {
        format!("{} {unit} since the daemon started", amount(row.total))
    } else {
        format!(
            "between {} and {} {unit} since the daemon started (space-saving estimate: up to {} \
             may belong to keys it replaced)",
            amount(row.at_least()),
            amount(row.total),
            amount(row.error)
        )
    };
    // The row's identity is its first five columns.
    let id = vec![
        row.service.clone(),
        row.server.clone(),
        row.role.as_str().to_string(),
        row.kind.as_str().to_string(),
        row.key.clone(),
    ];
    TableRow {
        cells: id
            .iter()
            .cloned()
            .chain([or_dash(shown_rate.clone()), shown_total])
            .collect(),
        sort: id
            .iter()
            .cloned()
            .map(SortValue::Text)
            .chain([
                SortValue::Number(row.per_s),
                SortValue::Number(Some(row.at_least() as f64)),
            ])
            .collect(),
        id,
        // Requests and bytes are different units: sorted in one column, any bytes rate would
        // outrank every request rate.
        group: match row.kind {
            HotKeyKind::Requests => 0,
            HotKeyKind::Bytes => 1,
        },
        spark: None,
        unrecorded: Vec::new(),
        backlog: Vec::new(),
        detail: vec![
            format!("key {}", row.key),
            format!(
                "{} {} as {} (hot by {})",
                row.service,
                row.server,
                row.role,
                row.kind.as_str()
            ),
            counted,
            match row.per_s {
                Some(_) => format!("{}/s over the last {window_s} s", or_dash(shown_rate)),
                None => format!(
                    "-/s: not in the table with this count's error at the window's start (new, \
                     or evicted and back), so no rate over the last {window_s} s"
                ),
            },
        ],
        alert: false,
        services: vec![row.service.clone()],
    }
}

fn queue_row(row: &QueueRow) -> TableRow {
    TableRow {
        id: vec![
            row.service.clone(),
            row.server.clone(),
            row.role.as_str().to_string(),
            row.queue.clone(),
        ],
        group: 0,
        cells: vec![
            row.service.clone(),
            row.server.clone(),
            row.role.as_str().to_string(),
            row.queue.clone(),
            rate(row.enqueue_per_s),
            rate(row.dequeue_per_s),
            rate(row.empty_polls_per_s),
        ],
        sort: vec![
            SortValue::Text(row.service.clone()),
            SortValue::Text(row.server.clone()),
            SortValue::Text(row.role.as_str().to_string()),
            SortValue::Text(row.queue.clone()),
            SortValue::Number(Some(row.enqueue_per_s)),
            SortValue::Number(Some(row.dequeue_per_s)),
            SortValue::Number(Some(row.empty_polls_per_s)),
        ],
        spark: None,
        unrecorded: Vec::new(),
        backlog: Vec::new(),
        detail: vec![
            format!(
                "queue {} on {} {}, counted at the {} end",
                row.queue,
                row.service,
                row.server,
                row.role.as_str()
            ),
            format!(
                "enqueue/s {}   dequeue/s {}   empty polls/s {}",
                rate(row.enqueue_per_s),
                rate(row.dequeue_per_s),
                rate(row.empty_polls_per_s)
            ),
        ],
        alert: row.enqueue_per_s > row.dequeue_per_s * 2.0 && row.enqueue_per_s > 1.0,
        services: vec![row.service.clone()],
    }
}

/// The unsorted, unfiltered rows of a pane.
pub fn rows(model: &Model, pane: Pane) -> Vec<TableRow> {
    match pane {
        Pane::Servers => model
            .servers
            .iter()
            .map(|row| server_row(row, &model.unrecorded, model.window_s))
            .collect(),
        Pane::Processes => model.processes.iter().map(process_row).collect(),
        Pane::HotKeys => model
            .hot_keys
            .iter()
            .map(|row| hot_key_row(row, model.window_s))
            .collect(),
        Pane::Queues => model.queues.iter().map(queue_row).collect(),
    }
}

/// Keeps rows whose cells contain `filter` (case-insensitive) and, with `service`, rows of that
/// service; then sorts by group, then by column `sort` (ties by the first cells, so the order
/// is stable).
pub fn arrange(
    mut rows: Vec<TableRow>,
    sort: usize,
    filter: &str,
    service: Option<&str>,
) -> Vec<TableRow> {
    let needle = filter.to_lowercase();
    rows.retain(|row| {
        let text_ok = needle.is_empty()
            || row
                .cells
                .iter()
                .any(|cell| cell.to_lowercase().contains(&needle));
        let service_ok = service.is_none_or(|s| row.services.iter().any(|r| r == s));
        text_ok && service_ok
    });
    rows.sort_by(|a, b| {
        let by = |row: &TableRow, i: usize| row.sort.get(i).cloned();
        a.group
            .cmp(&b.group)
            .then_with(|| match (by(a, sort), by(b, sort)) {
                (Some(x), Some(y)) => compare(&x, &y),
                _ => Ordering::Equal,
            })
            .then_with(|| a.cells.cmp(&b.cells))
    });
    rows
}

/// What the keys change.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewState {
    pub pane: Pane,
    /// Sort column per pane, by [`Pane::ALL`] order.
    pub sort: [usize; 4],
    pub filter: String,
    /// Typing a filter after `/`.
    pub editing_filter: bool,
    pub paused: bool,
    /// Selected row index in the current pane's arranged rows, as of the last key or
    /// [`ViewState::follow`].
    pub selected: usize,
    /// The selected row's [`TableRow::id`]: what Enter's detail shows, wherever refreshes
    /// move the row. None until a row is chosen.
    pub selected_id: Option<Vec<String>>,
    pub detail: bool,
    pub service: Option<String>,
}

/// What a key press asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Redraw,
    Quit,
}

/// A key, reduced to what top handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Tab,
    BackTab,
    Backspace,
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    CtrlC,
}

impl ViewState {
    pub fn new(service: Option<String>) -> ViewState {
        ViewState {
            pane: Pane::Servers,
            sort: Pane::ALL.map(Pane::default_sort),
            filter: String::new(),
            editing_filter: false,
            paused: false,
            selected: 0,
            selected_id: None,
            detail: false,
            service,
        }
    }

    pub fn sort_column(&self) -> usize {
        self.sort[self.pane.index()]
    }

    /// The rows of the current pane as shown.
    pub fn arranged(&self, model: &Model) -> Vec<TableRow> {
        arrange(
            rows(model, self.pane),
            self.sort_column(),
            &self.filter,
            self.service.as_deref(),
        )
    }

    /// Where the selected row is in `rows` (the current pane as arranged): found by its id,
    /// else (a row gone, or none chosen yet) the last index within the rows.
    pub fn selected_index(&self, rows: &[TableRow]) -> usize {
        self.selected_id
            .as_ref()
            .and_then(|id| rows.iter().position(|row| &row.id == id))
            .unwrap_or_else(|| self.selected.min(rows.len().saturating_sub(1)))
    }

    /// The selected row in `rows`; None when it has no row there (the detail of a row that
    /// vanished says so rather than showing whichever row took its place).
    pub fn selected_row<'a>(&self, rows: &'a [TableRow]) -> Option<&'a TableRow> {
        match &self.selected_id {
            Some(id) => rows.iter().find(|row| &row.id == id),
            None => rows.get(self.selected_index(rows)),
        }
    }

    /// Moves the selection index to where the selected row now is, after a refresh re-sorted.
    pub fn follow(&mut self, rows: &[TableRow]) {
        self.selected = self.selected_index(rows);
    }

    /// Applies a key to the rows shown from `model` and records which row is selected after.
    pub fn press(&mut self, key: Key, model: &Model) -> Action {
        let rows = self.arranged(model);
        self.follow(&rows);
        let in_detail = self.detail;
        let action = self.key(key, rows.len());
        if action == Action::Redraw && !in_detail {
            // The key may have moved, re-sorted, filtered, switched panes or opened the
            // detail: the selection is whatever row now sits at the index. Closing the detail
            // keeps it, even when its row has gone.
            let rows = self.arranged(model);
            self.selected_id = rows.get(self.selected).map(|row| row.id.clone());
        }
        action
    }

    /// Applies a key; `row_count` is the number of rows the current pane shows. Use
    /// [`ViewState::press`], which keeps the selection on its row.
    pub fn key(&mut self, key: Key, row_count: usize) -> Action {
        if key == Key::CtrlC {
            return Action::Quit;
        }
        if self.editing_filter {
            match key {
                Key::Enter => self.editing_filter = false,
                Key::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                Key::Backspace => {
                    self.filter.pop();
                }
                // Bounded: a filter is a word or two, not a paste of a log.
                Key::Char(c) if !c.is_control() && self.filter.chars().count() < 64 => {
                    self.filter.push(c)
                }
                _ => return Action::None,
            }
            self.selected = 0;
            return Action::Redraw;
        }
        if self.detail {
            return match key {
                Key::Char('q') => Action::Quit,
                Key::Esc | Key::Enter => {
                    self.detail = false;
                    Action::Redraw
                }
                _ => Action::None,
            };
        }
        let last = row_count.saturating_sub(1);
        match key {
            Key::Char('q') => return Action::Quit,
            Key::Esc if self.filter.is_empty() => return Action::Quit,
            Key::Esc => self.filter.clear(),
            Key::Char('/') => {
                self.editing_filter = true;
                self.filter.clear();
            }
            Key::Char(' ') => self.paused = !self.paused,
            Key::Tab => {
                self.pane = self.pane.next();
                self.selected = 0;
            }
            Key::BackTab => {
                self.pane = self.pane.previous();
                self.selected = 0;
            }
            Key::Enter if row_count > 0 => self.detail = true,
            Key::Up | Key::Char('k') => self.selected = self.selected.saturating_sub(1),
            Key::Down | Key::Char('j') => self.selected = (self.selected + 1).min(last),
            Key::PageUp => self.selected = self.selected.saturating_sub(10),
            Key::PageDown => self.selected = (self.selected + 10).min(last),
            Key::Home => self.selected = 0,
            Key::End => self.selected = last,
            Key::Char(c) => {
                let Some(column) = self
                    .pane
                    .columns()
                    .iter()
                    .position(|col| col.letter == Some(c))
                else {
                    return Action::None;
                };
                self.sort[self.pane.index()] = column;
                self.selected = 0;
            }
            _ => return Action::None,
        }
        Action::Redraw
    }
}
