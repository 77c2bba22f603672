//! The VM's serial console read as results: one row per scenario, a kernel death named, and
//! the result table.

use super::{qemu::VmEnd, Row, Verdict};

/// Turns a console log into one row per scenario, plus a failure row when the VM did not reach
/// the end of the scenarios. Kernel messages may share the console, so markers are found
/// anywhere in a line.
pub fn parse_console(release: &str, console: &str, end: VmEnd, scenarios: &[&str]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut done = false;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        let Some(at) = line.find("CPTEST") else {
            continue;
        };
        let marker = &line[at..];
        if marker.starts_with("CPTEST-DONE") {
            done = true;
            continue;
        }
        let Some(rest) = marker.strip_prefix("CPTEST ") else {
            continue;
        };
        let (scenario, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let (status, detail) = rest.split_once(' ').unwrap_or((rest, ""));
        let verdict = match status {
            "PASS" => Verdict::Pass,
            _ => Verdict::Fail,
        };
        let detail = if matches!(status, "PASS" | "FAIL") {
            truncate(detail.trim(), MAX_DETAIL)
        } else {
            truncate(&format!("unreadable result line: {marker}"), MAX_DETAIL)
        };
        rows.push(Row {
            kernel: release.to_string(),
            scenario: scenario.to_string(),
            verdict,
            detail,
        });
    }
    for scenario in scenarios {
        if !rows.iter().any(|row| row.scenario == *scenario) {
            rows.push(Row {
                kernel: release.to_string(),
                scenario: scenario.to_string(),
                verdict: Verdict::Fail,
                detail: "no result".into(),
            });
        }
    }
    if !done {
        rows.push(Row {
            kernel: release.to_string(),
            scenario: "vm".into(),
            verdict: Verdict::Fail,
            detail: match end {
                VmEnd::TimedOut(after) => {
                    format!("did not finish: killed after {} s", after.as_secs())
                }
                VmEnd::Exited => match kernel_death(console) {
                    Some(why) => truncate(
                        &format!("VM stopped before the scenarios finished: {why}"),
                        MAX_DETAIL,
                    ),
                    None => "VM stopped before the scenarios finished".into(),
                },
            },
        });
    }
    rows
}

/// The first line of a kernel death on the console (CI keeps only the table, not the log).
pub(super) fn kernel_death(console: &str) -> Option<&str> {
    const SIGNS: [&str; 4] = ["Kernel panic", "Oops", "BUG:", "general protection fault"];
    console
        .lines()
        .map(|line| line.trim_end_matches('\r'))
        .find_map(|line| {
            let at = SIGNS.iter().filter_map(|sign| line.find(sign)).min()?;
            Some(&line[at..])
        })
}

/// Longest detail shown in the table; the console log has everything.
pub(super) const MAX_DETAIL: usize = 600;

pub(super) fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}... (truncated; see the console log)", &text[..cut]),
        None => text.to_string(),
    }
}

pub fn render_table(rows: &[Row]) -> String {
    let headers = ["kernel", "scenario", "result", "detail"];
    let kernel_width = rows
        .iter()
        .map(|row| row.kernel.len())
        .chain([headers[0].len()])
        .max()
        .unwrap_or(0);
    let scenario_width = rows
        .iter()
        .map(|row| row.scenario.len())
        .chain([headers[1].len()])
        .max()
        .unwrap_or(0);
    let mut table = format!(
        "{:<kernel_width$}  {:<scenario_width$}  {:<6}  {}\n",
        headers[0], headers[1], headers[2], headers[3]
    );
    for row in rows {
        table.push_str(&format!(
            "{:<kernel_width$}  {:<scenario_width$}  {:<6}  {}\n",
            row.kernel,
            row.scenario,
            row.verdict.to_string(),
            row.detail
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::super::{SCENARIOS, VM_TIMEOUT};
    use super::*;

    #[test]
    fn console_rows_per_scenario() {
        let console = "\
\x1b[2J SeaBIOS noise
CPTEST-START 6.1.0-56-cloud-amd64 2 cpus\r
CPTEST check PASS 24 ok, missing as expected: sock/sock_send_length (needs 6.4+)\r
[    9.1] random: crng init done CPTEST idle-disconnect PASS idle_before_close=4.5s
CPTEST dead-socket-write FAIL dead_socket_writes_total=2, want 1
CPTEST shutdown MAYBE x
CPTEST-DONE 6.1.0-56-cloud-amd64
";
        let rows = parse_console("6.1.0-56", console, VmEnd::Exited, SCENARIOS);
        let summary: Vec<(&str, Verdict, &str)> = rows
            .iter()
            .map(|r| (r.scenario.as_str(), r.verdict, r.detail.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "check",
                    Verdict::Pass,
                    "24 ok, missing as expected: sock/sock_send_length (needs 6.4+)"
                ),
                ("idle-disconnect", Verdict::Pass, "idle_before_close=4.5s"),
                (
                    "dead-socket-write",
                    Verdict::Fail,
                    "dead_socket_writes_total=2, want 1"
                ),
                (
                    "shutdown",
                    Verdict::Fail,
                    "unreadable result line: CPTEST shutdown MAYBE x"
                ),
                ("memcache-decoding", Verdict::Fail, "no result"),
                ("preexisting-connection", Verdict::Fail, "no result"),
                ("on-demand", Verdict::Fail, "no result"),
            ]
        );
    }

    #[test]
    fn unfinished_vm_fails_every_missing_scenario() {
        let console = "CPTEST-START 6.12\nCPTEST check PASS 26 ok, nothing missing\n";
        let rows = parse_console("6.12", console, VmEnd::TimedOut(VM_TIMEOUT), SCENARIOS);
        assert_eq!(rows.len(), SCENARIOS.len() + 1);
        assert_eq!(rows[0].verdict, Verdict::Pass);
        assert!(rows[1..].iter().all(|r| r.verdict == Verdict::Fail));
        assert_eq!(rows[1].detail, "no result");
        let last = rows.last().unwrap();
        assert_eq!(last.scenario, "vm");
        assert_eq!(last.detail, "did not finish: killed after 240 s");

        let rows = parse_console("6.12", "", VmEnd::Exited, SCENARIOS);
        assert_eq!(
            rows.last().unwrap().detail,
            "VM stopped before the scenarios finished"
        );

        let console = "CPTEST-START 6.12\n[   21.5] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n\
                       [   21.6] Kernel panic - not syncing: Fatal exception\n";
        let rows = parse_console("6.12", console, VmEnd::Exited, SCENARIOS);
        assert_eq!(
            rows.last().unwrap().detail,
            "VM stopped before the scenarios finished: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
        );
    }

    #[test]
    fn long_details_are_cut_on_a_character_boundary() {
        let console = format!("CPTEST check FAIL {}\nCPTEST-DONE\n", "é".repeat(700));
        let rows = parse_console("6.1", &console, VmEnd::Exited, SCENARIOS);
        assert_eq!(
            rows[0].detail,
            format!(
                "{}... (truncated; see the console log)",
                "é".repeat(MAX_DETAIL)
            )
        );
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            Row {
                kernel: "6.1.0-56-cloud-amd64".into(),
                scenario: "check".into(),
                verdict: Verdict::Pass,
                detail: "ok".into(),
            },
            Row {
                kernel: "host 6.18".into(),
                scenario: "-".into(),
                verdict: Verdict::Skip,
                detail: "no vmlinuz".into(),
            },
        ];
        assert_eq!(
            render_table(&rows),
            "kernel                scenario  result  detail\n\
             6.1.0-56-cloud-amd64  check     PASS    ok\n\
             host 6.18             -         SKIP    no vmlinuz\n"
        );
    }
}
