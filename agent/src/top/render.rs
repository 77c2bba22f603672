//! Drawing: the ratatui screen (header, findings line, pane tabs, the table with sparklines,
//! footer of keys, detail popup) and the plain-text snapshot of `--batch`.

use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, TableState, Wrap},
    Frame,
};

use super::{
    model::{FindingLine, Model},
    view::{arrange, rows, Column, Pane, TableRow, ViewState},
};
use crate::diagnose::{util::clock, Severity};

/// Smallest terminal drawn; below it a message says so.
pub const MIN_WIDTH: u16 = 80;
pub const MIN_HEIGHT: u16 = 24;
/// A sparkline's second the daemon has no record of.
pub const UNRECORDED: char = '·';
/// A sparkline's backlog second ([`crate::top::model::backlog_seconds`]): drawn as no height,
/// since the clients did not send that much in it.
pub const BACKLOG: char = '^';
/// Narrowest useful sparkline.
const MIN_SPARK: u16 = 12;

/// Where the data comes from and how fresh it is, for the header.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// "daemon /run/cacheprobe/cacheprobe.sock" or "local probes".
    pub source: String,
    pub refresh_s: f64,
    /// The last refresh failed with this.
    pub error: Option<String>,
    /// When refreshes began failing to bring history (unix seconds): the model is frozen at
    /// its last data since.
    pub stale_since: Option<u64>,
    /// Data that is missing and why (an older daemon without `metrics`).
    pub note: Option<String>,
    /// The services top's config names: with those the data shows, what `--service` can be.
    pub configured_services: Vec<String>,
}

/// When `--service` names a service neither configured nor seen in the data, what to say
/// instead of an empty screen that reads as "no traffic".
pub fn unknown_service(model: &Model, state: &ViewState, status: &Status) -> Option<String> {
    let wanted = state.service.as_deref()?;
    let mut known: std::collections::BTreeSet<&str> = status
        .configured_services
        .iter()
        .map(String::as_str)
        .collect();
    known.extend(model.servers.iter().map(|r| r.service.as_str()));
    known.extend(model.hot_keys.iter().map(|r| r.service.as_str()));
    known.extend(model.queues.iter().map(|r| r.service.as_str()));
    known.extend(
        model
            .processes
            .iter()
            .flat_map(|r| r.services.iter().map(String::as_str)),
    );
    if known.contains(wanted) {
        return None;
    }
    let services = if known.is_empty() {
        "none configured or seen yet".to_string()
    } else {
        known.into_iter().collect::<Vec<_>>().join(", ")
    };
    Some(format!(
        "no service named {wanted:?} (services: {services})"
    ))
}

/// Block characters for a sparkline scaled to its own peak; a second with nothing is a space,
/// so a micro-outage shows as a gap however busy the rest of the minute was. A second the
/// daemon has no record of (`unrecorded`, aligned with `values`; empty: none) is
/// [`UNRECORDED`], not a gap: the daemon was down, not the servers. A backlog second
/// (`backlog`, likewise) is [`BACKLOG`] and left out of the scale: a bar for it would be a
/// spike of traffic that never was, flattening the minute's real bars.
pub fn sparkline(values: &[u64], unrecorded: &[bool], backlog: &[bool], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let skip = values.len().saturating_sub(width);
    let shown = &values[skip..];
    let is_backlog = |i: usize| backlog.get(skip + i).copied().unwrap_or(false);
    let peak = shown
        .iter()
        .enumerate()
        .filter(|(i, _)| !is_backlog(*i))
        .map(|(_, v)| *v)
        .max()
        .unwrap_or(0);
    shown
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if unrecorded.get(skip + i).copied().unwrap_or(false) {
                UNRECORDED
            } else if is_backlog(i) {
                BACKLOG
            } else if v == 0 || peak == 0 {
                ' '
            } else {
                let level = ((v as f64 / peak as f64) * (BARS.len() - 1) as f64).round() as usize;
                BARS[level.min(BARS.len() - 1)]
            }
        })
        .collect()
}

/// The columns that fit `width`: everything of the lowest priorities that fits, in the pane's
/// order, always at least the priority-0 ones.
pub fn fit_columns(columns: &[Column], width: u16) -> Vec<usize> {
    let mut chosen: Vec<usize> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.priority == 0)
        .map(|(i, _)| i)
        .collect();
    for priority in 1..=u8::MAX {
        let candidate: Vec<usize> = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.priority <= priority)
            .map(|(i, _)| i)
            .collect();
        let needed: u16 = candidate.iter().map(|&i| columns[i].width + 1).sum();
        if needed > width {
            break;
        }
        let done = candidate.len() == columns.len();
        chosen = candidate;
        if done {
            break;
        }
    }
    chosen
}

fn severity_word(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "CRITICAL",
        Severity::Warning => "WARNING",
        Severity::Info => "INFO",
    }
}

/// The one-line findings summary.
pub fn findings_line(findings: &[FindingLine]) -> String {
    match findings.first() {
        None => "findings: none in the last 60 s".to_string(),
        Some(first) => {
            let more = match findings.len() - 1 {
                0 => String::new(),
                n => format!(" (+{n} more)"),
            };
            format!(
                "findings: {} {}{more}",
                severity_word(first.severity),
                first.title
            )
        }
    }
}

struct Palette {
    colour: bool,
}

impl Palette {
    fn fg(&self, colour: Color) -> Style {
        if self.colour {
            Style::default().fg(colour)
        } else {
            Style::default()
        }
    }

    fn header(&self) -> Style {
        Style::default().add_modifier(Modifier::REVERSED)
    }
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, model: &Model, state: &ViewState, status: &Status, colour: bool) {
    let area = frame.area();
    let palette = Palette { colour };
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let text = format!(
            "terminal too small ({}x{}): cacheprobe top needs {MIN_WIDTH}x{MIN_HEIGHT}. q quits.",
            area.width, area.height
        );
        frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), area);
        return;
    }
    let [header, findings, tabs, table, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(2),
    ])
    .areas(area);

    let head = header_line(model, state, status);
    frame.render_widget(Paragraph::new(head).style(palette.header()), header);
    let (line, style) = findings_status(model, status, &palette);
    frame.render_widget(Paragraph::new(line).style(style), findings);
    frame.render_widget(Paragraph::new(tabs_line(state, status, &palette)), tabs);

    let shown = state.arranged(model);
    let empty = unknown_service(model, state, status).unwrap_or_else(|| empty_message(state));
    draw_table(frame, table, &shown, state, &empty, &palette);
    frame.render_widget(Paragraph::new(footer_lines(state)), footer);

    if state.detail {
        draw_detail(frame, area, state, &shown, model);
    }
}

fn header_line(model: &Model, state: &ViewState, status: &Status) -> String {
    // What changes what is shown comes first: a long socket path may be cut at 80 columns.
    let mut head = format!("cacheprobe top  {} UTC", clock(model.end_s));
    if let Some(since) = status.stale_since {
        head.push_str(&stale(since));
    }
    if state.paused {
        head.push_str("  PAUSED");
    }
    if let Some(service) = &state.service {
        head.push_str(&format!("  service={service}"));
    }
    head.push_str(&format!(
        "  refresh {} s  rates over {} s  {}",
        status.refresh_s, model.window_s, status.source
    ));
    head
}

/// What the header says while no history comes: the clock before it is the data's last second.
fn stale(since: u64) -> String {
    format!("  STALE since {} UTC", clock(since))
}

/// The findings line, or the daemon's error, coloured by the worst severity.
fn findings_status(model: &Model, status: &Status, palette: &Palette) -> (String, Style) {
    match (&status.error, model.findings.first()) {
        (Some(error), _) => (
            format!(
                "daemon not answering: {error} (showing the data up to {} UTC)",
                clock(model.end_s)
            ),
            palette.fg(Color::Red),
        ),
        (None, Some(first)) => (
            findings_line(&model.findings),
            match first.severity {
                Severity::Critical => palette.fg(Color::Red).add_modifier(Modifier::BOLD),
                Severity::Warning => palette.fg(Color::Yellow),
                Severity::Info => palette.fg(Color::Cyan),
            },
        ),
        (None, None) => (findings_line(&model.findings), palette.fg(Color::Green)),
    }
}

fn tabs_line(state: &ViewState, status: &Status, palette: &Palette) -> Line<'static> {
    let mut spans = Vec::new();
    for pane in Pane::ALL {
        let style = if pane == state.pane {
            palette.header().add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        spans.push(Span::styled(format!(" {} ", pane.title()), style));
        spans.push(Span::raw(" "));
    }
    if let Some(note) = &status.note {
        spans.push(Span::styled(format!(" {note}"), palette.fg(Color::Yellow)));
    }
    Line::from(spans)
}

/// The sort keys (the current one starred) and the key help with the filter.
fn footer_lines(state: &ViewState) -> Vec<Line<'static>> {
    let columns = state.pane.columns();
    let sort: Vec<String> = columns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let letter = c.letter?;
            let mark = if i == state.sort_column() { "*" } else { "" };
            Some(format!("{letter}:{}{mark}", c.title.to_lowercase()))
        })
        .collect();
    let filter = if state.editing_filter {
        format!("  filter: {}_", state.filter)
    } else if !state.filter.is_empty() {
        format!("  filter: {}", state.filter)
    } else {
        String::new()
    };
    let keys =
        format!("Tab pane  / filter  Enter detail  space pause  arrows move  q quit{filter}");
    vec![
        Line::from(format!("sort {}", sort.join(" "))),
        Line::from(keys),
    ]
}

fn draw_table(
    frame: &mut Frame,
    area: Rect,
    shown: &[TableRow],
    state: &ViewState,
    empty_text: &str,
    palette: &Palette,
) {
    let columns = state.pane.columns();
    let mut chosen = fit_columns(columns, area.width);
    let spark_width = spark_width(&chosen, state, area.width);
    chosen.sort_unstable();
    let mut widths: Vec<Constraint> = chosen
        .iter()
        .map(|&i| Constraint::Length(columns[i].width))
        .collect();
    let mut titles: Vec<Cell> = chosen
        .iter()
        .map(|&i| {
            let c = &columns[i];
            let title = if i == state.sort_column() {
                format!("{}*", c.title)
            } else {
                c.title.to_string()
            };
            Cell::from(align(&title, c.width, c.right))
        })
        .collect();
    if spark_width > 0 {
        widths.push(Constraint::Length(spark_width));
        titles.push(Cell::from(format!("REQ/S LAST {spark_width} S")));
    }
    let body: Vec<Row> = shown
        .iter()
        .map(|row| table_row(row, &chosen, columns, spark_width, palette))
        .collect();
    let empty = shown.is_empty();
    let table = Table::new(body, widths)
        .header(Row::new(titles).style(Style::default().add_modifier(Modifier::BOLD)))
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .column_spacing(1);
    let mut table_state =
        TableState::default().with_selected((!empty).then(|| state.selected_index(shown)));
    frame.render_stateful_widget(table, area, &mut table_state);
    if empty {
        let inner = Rect {
            y: area.y + 2,
            height: 1,
            ..area
        };
        if inner.y < area.y + area.height {
            frame.render_widget(Paragraph::new(empty_text.to_string()), inner);
        }
    }
}

/// The servers pane's sparkline column takes what the chosen columns leave (up to 60), or
/// nothing when that is too narrow to read.
fn spark_width(chosen: &[usize], state: &ViewState, width: u16) -> u16 {
    let columns = state.pane.columns();
    let used: u16 = chosen.iter().map(|&i| columns[i].width + 1).sum();
    let spark_width = if state.pane == Pane::Servers {
        width.saturating_sub(used).min(60)
    } else {
        0
    };
    if spark_width >= MIN_SPARK {
        spark_width
    } else {
        0
    }
}

fn table_row<'a>(
    row: &'a TableRow,
    chosen: &[usize],
    columns: &[Column],
    spark_width: u16,
    palette: &Palette,
) -> Row<'a> {
    let mut cells: Vec<Cell> = chosen
        .iter()
        .map(|&i| {
            let c = &columns[i];
            let text = row.cells.get(i).map(String::as_str).unwrap_or("");
            Cell::from(align(text, c.width, c.right))
        })
        .collect();
    if spark_width > 0 {
        let spark = row
            .spark
            .as_deref()
            .map(|s| sparkline(s, &row.unrecorded, &row.backlog, spark_width as usize))
            .unwrap_or_default();
        cells.push(Cell::from(spark).style(palette.fg(Color::Cyan)));
    }
    let style = if row.alert {
        palette.fg(Color::Red)
    } else {
        Style::default()
    };
    Row::new(cells).style(style)
}

/// What an empty table says: nothing seen yet, or nothing matching the filter.
fn empty_message(state: &ViewState) -> String {
    if state.filter.is_empty() {
        match state.pane {
            Pane::Queues => "no queue traffic seen (memcache-queue services)",
            Pane::HotKeys => "no hot keys yet (decoded requests on this host only)",
            _ => "no traffic to watched services yet",
        }
        .to_string()
    } else {
        format!("no rows match the filter {:?}", state.filter)
    }
}

/// The selected row's detail, or, when the row has gone from this refresh, a line saying so.
pub fn detail_lines(state: &ViewState, shown: &[TableRow], model: &Model) -> Vec<String> {
    let Some(row) = state.selected_row(shown) else {
        let what = state.selected_id.as_deref().unwrap_or_default().join(" ");
        return vec![format!(
            "{what}: no row in the refresh of {} UTC",
            clock(model.end_s)
        )];
    };
    let mut lines = row.detail.clone();
    if let Some(spark) = &row.spark {
        lines.push(String::new());
        lines.push(format!(
            "requests/s, last 60 s to {} UTC:",
            clock(model.end_s)
        ));
        lines.push(sparkline(spark, &row.unrecorded, &row.backlog, 60));
        if row.unrecorded.contains(&true) {
            lines.push(format!(
                "{UNRECORDED}: seconds the daemon has no record of (it was not running)"
            ));
        }
        if row.backlog.contains(&true) {
            lines.push(format!(
                "{BACKLOG}: a backlog: the server read at once what its clients sent while it \
                 was silent"
            ));
        }
    }
    lines
}

fn draw_detail(
    frame: &mut Frame,
    area: Rect,
    state: &ViewState,
    shown: &[TableRow],
    model: &Model,
) {
    let lines: Vec<Line> = detail_lines(state, shown, model)
        .into_iter()
        .map(Line::from)
        .collect();
    let width = (area.width - 4).min(100);
    let height = (lines.len() as u16 + 2).min(area.height - 2);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" detail (Esc closes) "),
        ),
        popup,
    );
}

fn align(text: &str, width: u16, right: bool) -> String {
    let width = width as usize;
    let count = text.chars().count();
    let text: String = if count > width {
        // Keep the end of long keys and addresses: ports and key suffixes tell them apart.
        let skip = count - width + 1;
        format!("~{}", text.chars().skip(skip).collect::<String>())
    } else {
        text.to_string()
    };
    if right {
        format!("{text:>width$}")
    } else {
        text
    }
}

/// One `--batch` snapshot: every pane with every column, as plain text.
pub fn text(model: &Model, state: &ViewState, status: &Status) -> String {
    let mut out = format!(
        "cacheprobe top  {} UTC{}  {}  rates over {} s\n{}\n",
        clock(model.end_s),
        status.stale_since.map(stale).unwrap_or_default(),
        status.source,
        model.window_s,
        findings_line(&model.findings)
    );
    for finding in model.findings.iter().skip(1) {
        out.push_str(&format!(
            "  also: {} {}\n",
            severity_word(finding.severity),
            finding.title
        ));
    }
    if let Some(error) = &status.error {
        out.push_str(&format!(
            "daemon not answering: {error} (showing the data up to {} UTC)\n",
            clock(model.end_s)
        ));
    }
    if let Some(note) = &status.note {
        out.push_str(&format!("note: {note}\n"));
    }
    if let Some(unknown) = unknown_service(model, state, status) {
        out.push_str(&format!("{unknown}\n"));
    }
    for pane in Pane::ALL {
        let sort = state.sort[Pane::ALL.iter().position(|p| *p == pane).unwrap_or(0)];
        let shown = arrange(
            rows(model, pane),
            sort,
            &state.filter,
            state.service.as_deref(),
        );
        out.push('\n');
        out.push_str(&format!("{}\n", pane.title().to_uppercase()));
        if shown.is_empty() {
            out.push_str("  (none)\n");
            continue;
        }
        let columns = pane.columns();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                shown
                    .iter()
                    .map(|r| r.cells.get(i).map_or(0, |s| s.chars().count()))
                    .chain([c.title.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    let width = widths[i];
                    if columns[i].right {
                        format!("{cell:>width$}")
                    } else {
                        format!("{cell:<width$}")
                    }
                })
                .collect();
            format!("{}\n", parts.join("  ").trim_end())
        };
        out.push_str(&line(columns.iter().map(|c| c.title).collect()));
        for row in &shown {
            out.push_str(&line(row.cells.iter().map(String::as_str).collect()));
        }
    }
    out
}
