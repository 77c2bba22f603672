//! The agent's JSON answers in tests: `diagnose` and `keys` run against a daemon or locally, and
//! the findings picked apart by id, subject and value.

use std::{
    path::Path,
    process::{Command, Output},
};

use crate::{agent_binary, Agent};

/// The JSON `what` printed on stdout; panics with its stdout and stderr when there is none.
pub fn json_output(what: &str, output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "{what} printed no JSON ({err}): {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Runs `command`, asserts it succeeded (showing its stderr when not) and returns the JSON
/// it printed as `what`.
pub fn succeeded_json(what: &str, command: &mut Command) -> serde_json::Value {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    json_output(what, &output)
}

/// `cacheprobe diagnose --json --duration <duration>`: against `agent`'s daemon (its control
/// socket and config) or, without one, `--local` with `config`. The exit status says whether
/// there were findings, so the output comes back with the report.
pub fn diagnose(
    agent: Option<&Agent>,
    config: Option<&Path>,
    duration: &str,
) -> (Output, serde_json::Value) {
    let mut command = Command::new(agent_binary());
    command.args(["diagnose", "--json", "--duration", duration]);
    if let Some(agent) = agent {
        command.arg("--socket").arg(&agent.control_socket);
        command.arg("--config").arg(&agent.config_path);
    } else if let Some(config) = config {
        // --local: a daemon installed on the host must not answer for this test.
        command.arg("--local").arg("--config").arg(config);
    }
    let output = command.output().unwrap();
    let report = json_output("diagnose", &output);
    (output, report)
}

/// The daemon's report of its history so far. `--duration 0` (no live watch): the traffic is
/// over by now, and the edge table then covers the last minute instead of a quiet live second.
pub fn daemon_report(agent: &Agent) -> (Output, serde_json::Value) {
    diagnose(Some(agent), None, "0s")
}

/// `cacheprobe keys --socket`: the daemon's hot keys and extremes.
pub fn keys_report(agent: &Agent) -> serde_json::Value {
    succeeded_json(
        "keys",
        Command::new(agent_binary())
            .args(["keys", "--socket"])
            .arg(&agent.control_socket),
    )
}

/// The first finding with this id.
pub fn finding<'a>(report: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    report["findings"]
        .as_array()?
        .iter()
        .find(|f| f["id"] == id)
}

/// Every finding whose id is one of `ids`, in report order.
pub fn findings<'a>(report: &'a serde_json::Value, ids: &[&str]) -> Vec<&'a serde_json::Value> {
    report["findings"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|f| ids.iter().any(|id| f["id"] == *id))
                .collect()
        })
        .unwrap_or_default()
}

/// A finding's subjects of one kind ("servers", "processes", "services", "commands"...).
pub fn subjects(finding: &serde_json::Value, kind: &str) -> Vec<String> {
    strings(&finding["subjects"][kind])
}

/// The strings of a JSON array (none when it is not an array).
pub fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A finding's numeric value; panics naming the finding when it has none.
pub fn finding_value(finding: &serde_json::Value, name: &str) -> f64 {
    finding["values"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no value {name}: {finding:#}"))
}
