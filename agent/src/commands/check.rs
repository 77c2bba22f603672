//! `cacheprobe check`: what this kernel and these privileges let the agent do, one line each,
//! with what a missing piece costs. It really loads and attaches the programs, so "ok" means ok.

use std::{path::Path, process::ExitCode};

use serde::Serialize;

use agent_common::ProbeOffsets;

use crate::{
    config::Config,
    kernel::{
        loader::Probes,
        offsets::{resolve_offsets, SystemLayout},
        probes::{
            self, missing_length_probes, perf_event_paranoid, perf_event_refused, AttachKind,
            ProbeSpec, ProbeStatus, PAYLOAD_CAPTURE, PAYLOAD_CAPTURE_IMPACT, PERF_PARANOID_FIX,
            PROBES,
        },
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Missing,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckItem {
    pub name: String,
    pub status: Status,
    /// What was found, or why it is missing.
    pub detail: String,
    /// What the user loses without it (empty when ok).
    pub impact: String,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub schema_version: u32,
    pub kernel: String,
    pub items: Vec<CheckItem>,
    /// False when nothing useful can run (no connection-lifecycle probe), or `run` would stop
    /// at start (its metrics endpoint's TLS files do not load).
    pub usable: bool,
}

fn item(
    name: impl Into<String>,
    status: Status,
    detail: impl Into<String>,
    impact: &str,
) -> CheckItem {
    CheckItem {
        name: name.into(),
        status,
        detail: detail.into(),
        impact: if status == Status::Ok {
            String::new()
        } else {
            impact.to_string()
        },
    }
}

/// Effective capability bits from /proc/self/status.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub fn privileges_item(caps: Option<u64>) -> CheckItem {
    let has = |cap: u32| caps.is_some_and(|caps| caps & (1 << cap) != 0);
    let impact = "the kernel programs cannot be loaded: nothing can be observed";
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        item(
            "privileges",
            Status::Ok,
            "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) are effective",
            impact,
        )
    } else {
        item(
            "privileges",
            Status::Missing,
            "needs root, or CAP_BPF + CAP_PERFMON",
            impact,
        )
    }
}

/// The `perf_event_paranoid` line, only when the kernel would refuse one of `probes` (those
/// attempted, with how each attaches) to a process without CAP_SYS_ADMIN: only classic
/// tracepoints go through `perf_event_open`, which Debian's 3 gates; tp_btf and raw tracepoints
/// are bpf() links it does not. Failed when this run itself was refused, missing when it has
/// CAP_SYS_ADMIN (so its probes attached) but the shipped unit, which lacks it, would not.
pub fn paranoid_item(
    paranoid: Option<i64>,
    has_sys_admin: bool,
    probes: &[(&str, AttachKind)],
) -> Option<CheckItem> {
    let value = paranoid?;
    // Asked for a process without CAP_SYS_ADMIN, e.g. the unit.
    let classic: Vec<&str> = probes
        .iter()
        .filter(|&&(_, kind)| perf_event_refused(paranoid, false, kind))
        .map(|&(name, _)| name)
        .collect();
    if classic.is_empty() {
        return None;
    }
    let who = if has_sys_admin {
        "this run has CAP_SYS_ADMIN, so they attached above; processes without it (e.g. the \
         shipped systemd unit) cannot attach"
    } else {
        "this run lacks CAP_SYS_ADMIN, so these cannot attach (the shipped systemd unit lacks it \
         too)"
    };
    let status = if perf_event_refused(paranoid, has_sys_admin, AttachKind::Classic) {
        Status::Failed
    } else {
        Status::Missing
    };
    Some(CheckItem {
        name: "perf_event_paranoid".into(),
        status,
        detail: format!(
            "{value}: this kernel refuses perf_event_open (classic tracepoints) without \
             CAP_SYS_ADMIN (Debian patch; upstream treats >2 as 2); {who}: {}; fix: {PERF_PARANOID_FIX}",
            classic.join(", ")
        ),
        impact: "every classic-tracepoint probe's metrics (see each probe's line); raw \
                 tracepoints and tp_btf are not affected"
            .into(),
    })
}

pub fn run_checks(config: &Config) -> CheckReport {
    let caps = effective_capabilities();
    let has_sys_admin = caps.is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0);
    let mut items = vec![
        privileges_item(caps),
        tracefs_item(),
        btf_item(),
        ring_buffer_item(),
    ];

    let resolution = resolve_offsets(&SystemLayout::discover());
    for missing in &resolution.missing {
        items.push(CheckItem {
            name: missing.subject.clone(),
            status: Status::Missing,
            detail: missing.reason.clone(),
            impact: String::new(),
        });
    }
    let mut usable = false;
    match Probes::load(config, &resolution) {
        Ok(probes) => {
            usable = PROBES.iter().any(|spec| {
                spec.program == "inet_sock_set_state"
                    && matches!(probes.status.get(spec.program), Some(ProbeStatus::Attached))
            });
            items.extend(loaded_items(
                config,
                &probes,
                &resolution.offsets,
                has_sys_admin,
            ));
        }
        Err(err) => items.push(item(
            "kernel programs",
            Status::Failed,
            format!("{err:#}"),
            "nothing can be observed",
        )),
    }
    if let Some(tls) = tls_item(config) {
        // `run` stops at start when its TLS files do not load.
        usable &= tls.status == Status::Ok;
        items.push(tls);
    }

    CheckReport {
        schema_version: 1,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string()),
        items,
        usable,
    }
}

/// The name of [`tls_item`]'s line, which the verdict looks for.
const TLS_ITEM: &str = "metrics TLS";

/// The metrics endpoint's TLS files, loaded as `run` loads them; None without `[tls]`.
fn tls_item(config: &Config) -> Option<CheckItem> {
    let files = config.tls.as_ref()?;
    Some(match files.acceptor() {
        Ok(_) => item(
            TLS_ITEM,
            Status::Ok,
            format!(
                "{} and {} load",
                files.cert_file.display(),
                files.key_file.display()
            ),
            "",
        ),
        Err(err) => item(
            TLS_ITEM,
            Status::Failed,
            format!("{err:#}"),
            "the agent does not start: `run` loads these files first",
        ),
    })
}

fn tracefs_item() -> CheckItem {
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .find(|dir| Path::new(dir).join("events").is_dir());
    // Without root the directory reads as absent although it is mounted: say which it is.
    let mounted = std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|mounts| {
            mounts
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split_whitespace().skip(1);
                    fields.next().zip(fields.next())
                })
                .find(|(_, kind)| *kind == "tracefs")
                .map(|(dir, _)| dir.to_string())
        });
    match (tracefs, mounted) {
        (Some(dir), _) => item("tracefs", Status::Ok, format!("mounted at {dir}"), ""),
        (None, Some(dir)) => item(
            "tracefs",
            Status::Missing,
            format!("mounted at {dir} but not readable by this user: run as root"),
            "tracepoint field offsets cannot be read: no probe can attach",
        ),
        (None, None) => item(
            "tracefs",
            Status::Missing,
            "not mounted: run `mount -t tracefs nodev /sys/kernel/tracing`",
            "tracepoint field offsets cannot be read: no probe can attach",
        ),
    }
}

fn btf_item() -> CheckItem {
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if btf.exists() {
        item("btf", Status::Ok, "/sys/kernel/btf/vmlinux present", "")
    } else {
        item(
            "btf",
            Status::Missing,
            "/sys/kernel/btf/vmlinux not found (kernel built without CONFIG_DEBUG_INFO_BTF)",
            "connections opened before the agent started are only seen when they change state",
        )
    }
}

fn ring_buffer_item() -> CheckItem {
    match aya::sys::is_map_supported(aya::maps::MapType::RingBuf) {
        Ok(true) => item(
            "ring buffer",
            Status::Ok,
            "BPF_MAP_TYPE_RINGBUF supported",
            "",
        ),
        Ok(false) => item(
            "ring buffer",
            Status::Missing,
            "BPF_MAP_TYPE_RINGBUF not supported (needs Linux 5.8+)",
            "no events can reach the agent",
        ),
        Err(err) => item(
            "ring buffer",
            Status::Failed,
            format!("cannot probe map support: {err}"),
            "no events can reach the agent",
        ),
    }
}

/// The lines about loaded programs: one per probe, then perf_event_paranoid, payload capture,
/// the per-socket state path and the adoption of existing connections.
fn loaded_items(
    config: &Config,
    probes: &Probes,
    offsets: &ProbeOffsets,
    has_sys_admin: bool,
) -> Vec<CheckItem> {
    let mut items: Vec<CheckItem> = PROBES.iter().map(|spec| probe_item(probes, spec)).collect();
    let attempted: Vec<(&str, AttachKind)> = PROBES
        .iter()
        .filter(|spec| {
            !matches!(
                probes.status.get(spec.program),
                Some(ProbeStatus::Unavailable(_)) | None
            )
        })
        .map(|spec| (spec.event, probes.attach_kind(spec)))
        .collect();
    items.extend(paranoid_item(
        perf_event_paranoid(),
        has_sys_admin,
        &attempted,
    ));
    // Without the send/receive probes there is no capture either; their own lines say
    // so, with what it costs.
    if missing_length_probes(&probes.status).is_empty() {
        items.push(capture_item(probes));
        // Which per-call path the send/receive probes take: degradation as data.
        items.push(socket_state_item(probes));
        items.push(on_demand_item(config, probes.on_demand_blocker(offsets)));
    }
    items.push(if offsets.can_learn_sockets() {
        item(
            "existing connections",
            Status::Ok,
            "struct sock_common layout known: connections from before start are adopted from the start-up socket dump or their first send or receive",
            "",
        )
    } else {
        item(
            "existing connections",
            Status::Missing,
            "struct sock_common layout unknown",
            "connections opened before the agent started are only seen when they change state",
        )
    });
    items
}

/// One probe's line: how it attached, or why it did not.
fn probe_item(probes: &Probes, spec: &ProbeSpec) -> CheckItem {
    let name = format!("tracepoint {}/{}", spec.category, spec.event);
    match probes.status.get(spec.program) {
        Some(ProbeStatus::Attached) => {
            item(name, Status::Ok, attached_how(probes, spec), spec.impact)
        }
        Some(ProbeStatus::Unavailable(reason)) => {
            item(name, Status::Missing, reason.clone(), spec.impact)
        }
        Some(ProbeStatus::Failed(error)) => item(name, Status::Failed, error.clone(), spec.impact),
        None => item(name, Status::Failed, "not attempted", spec.impact),
    }
}

/// Through which kind of attachment an attached probe runs, and why not a cheaper one.
fn attached_how(probes: &Probes, spec: &ProbeSpec) -> String {
    let storage = probes::STORAGE_PROGRAMS
        .iter()
        .any(|&(p, _)| p == spec.program);
    if storage && probes.socket_storage.is_ok() {
        "attached (tp_btf, a bpf() link; per-socket state in socket-local \
         storage)"
            .to_owned()
    } else if probes.btf.contains(&spec.program) {
        "attached (tp_btf, a bpf() link: no perf_event_open)".to_owned()
    } else if probes.raw.contains(&spec.program)
        && spec.link_program == Some(probes::FD_RAW_PROGRAM)
    {
        "attached (raw tracepoint sys_exit, a bpf() link: no \
         perf_event_open; one program for the six fd syscalls, attached \
         only under descriptor pressure)"
            .to_owned()
    } else if probes.raw.contains(&spec.program) {
        "attached (raw tracepoint, a bpf() link: no perf_event_open)".to_owned()
    } else {
        match probes.link_fallback.get(spec.program) {
            Some(reason) => format!(
                "attached (classic tracepoint through perf_event_open; \
                 bpf() link variant not used: {reason})"
            ),
            None => "attached (classic tracepoint through perf_event_open)".to_owned(),
        }
    }
}

fn capture_item(probes: &Probes) -> CheckItem {
    match probes.status.get(PAYLOAD_CAPTURE) {
        Some(ProbeStatus::Attached) => item(
            "payload capture",
            Status::Ok,
            "copied inside the send/receive probes from the running syscall's buffer \
                     (no syscall tracepoints); up to limits.capture_bytes of request and reply \
                     headers per call: a multi-get larger than that is read in part, its \
                     unread keys counted as unknown and named by diagnose (unread-lookups)",
            PAYLOAD_CAPTURE_IMPACT,
        ),
        Some(ProbeStatus::Unavailable(reason) | ProbeStatus::Failed(reason)) => item(
            "payload capture",
            Status::Missing,
            reason.clone(),
            PAYLOAD_CAPTURE_IMPACT,
        ),
        None => item(
            "payload capture",
            Status::Failed,
            "not attempted",
            PAYLOAD_CAPTURE_IMPACT,
        ),
    }
}

fn socket_state_item(probes: &Probes) -> CheckItem {
    match &probes.socket_storage {
        Ok(()) => item(
            "per-socket state",
            Status::Ok,
            "socket-local storage (tp_btf): each send/receive first reads its socket's \
             ports and state by direct loads, no helper call; unwatched sockets and \
             healthy ones of services without capture stop there, only captured or \
             unhealthy connections look up their storage; existing connections adopted \
             by a tcp iterator at start (in the agent's network namespace; those of other \
             namespaces, e.g. containers', at their first send or receive)",
            "",
        ),
        // Nothing is lost on the older path, it only costs more per call: ok, with
        // the path and the reason in the detail.
        Err(reason) => item(
            "per-socket state",
            Status::Ok,
            format!(
                "{}: every send/receive reads its socket's ports (more BPF time per \
                 call); socket-local storage not used: {reason}",
                if probes.raw.is_empty() {
                    "classic tracepoints"
                } else {
                    "raw tracepoints"
                }
            ),
            "",
        ),
    }
}

/// Whether the send/receive programs may come off while nothing needs them, as `run` decides
/// (`limits.socket_probes_on_demand`, [`Probes::on_demand_blocker`]). Only what they cost
/// changes, never what is seen: ok either way, with the reason in the detail.
fn on_demand_item(config: &Config, blocker: Option<String>) -> CheckItem {
    const ALWAYS: &str = "the send/receive programs stay attached, a program run on every TCP \
                          send and receive on the host";
    let detail = match (config.limits.socket_probes_on_demand, blocker) {
        (false, _) => format!("off (limits.socket_probes_on_demand = false): {ALWAYS}"),
        (true, Some(why)) => format!("not on this kernel: {ALWAYS}; {why}"),
        (true, None) if config.any_captured() => "possible here, but a service is captured: the \
                                     send/receive programs stay attached while one is"
            .to_owned(),
        (true, None) => "on: with nothing captured, the send/receive programs are attached \
                         only while a watched connection's peer has closed (its writes are \
                         dead writes)"
            .to_owned(),
    };
    item("send/receive probes on demand", Status::Ok, detail, "")
}

pub fn render_text(report: &CheckReport) -> String {
    let mut text = format!("cacheprobe check on Linux {}\n", report.kernel);
    for item in &report.items {
        let status = match item.status {
            Status::Ok => "ok",
            Status::Missing => "MISSING",
            Status::Failed => "FAILED",
        };
        text.push_str(&format!("{status:<8} {:<36} {}\n", item.name, item.detail));
        if !item.impact.is_empty() {
            text.push_str(&format!("{:<8} {:<36} costs: {}\n", "", "", item.impact));
        }
    }
    let tls_failed = report
        .items
        .iter()
        .any(|item| item.name == TLS_ITEM && item.status != Status::Ok);
    text.push_str(if report.usable {
        "result: usable\n"
    } else if tls_failed {
        "result: NOT usable: the metrics endpoint's TLS files do not load\n"
    } else {
        "result: NOT usable: the connection-lifecycle probe cannot run\n"
    });
    text
}

pub fn check(config_path: &Path, explicit: bool, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path, explicit)?;
    let report = run_checks(&config);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(if report.usable {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileges_need_bpf_and_perfmon_or_sys_admin() {
        assert_eq!(privileges_item(Some(0)).status, Status::Missing);
        assert_eq!(privileges_item(None).status, Status::Missing);
        assert_eq!(privileges_item(Some(1 << CAP_BPF)).status, Status::Missing);
        assert_eq!(
            privileges_item(Some((1 << CAP_BPF) | (1 << CAP_PERFMON))).status,
            Status::Ok
        );
        assert_eq!(privileges_item(Some(1 << CAP_SYS_ADMIN)).status, Status::Ok);
    }

    #[test]
    fn paranoid_line_only_when_the_kernel_refuses_perf_events() {
        use AttachKind::*;
        let classic = [
            ("inet_sock_set_state", Classic),
            ("sock_send_length", Btf),
            ("tcp_send_reset", Classic),
            ("sys_exit_socket", Raw),
        ];
        // Upstream values (and unreadable): no line, whatever the caps.
        for paranoid in [None, Some(-1), Some(0), Some(1), Some(2)] {
            for sys_admin in [false, true] {
                assert!(paranoid_item(paranoid, sys_admin, &classic).is_none());
            }
        }
        // Nothing attaches classically: nothing to warn about.
        assert!(paranoid_item(Some(3), false, &[]).is_none());
        // A kernel with BTF: every probe through a bpf() link (tp_btf or raw), which
        // perf_event_paranoid does not gate, so no refusal is predicted, as root or not.
        let links = [
            ("inet_sock_set_state", Btf),
            ("sock_send_length", Btf),
            ("tcp_send_reset", Btf),
            ("sys_exit_socket", Raw),
        ];
        for sys_admin in [false, true] {
            for paranoid in [Some(3), Some(4)] {
                assert!(paranoid_item(paranoid, sys_admin, &links).is_none());
            }
        }
        // Root predicts the unit's failure; without CAP_SYS_ADMIN this run itself failed.
        let root = paranoid_item(Some(3), true, &classic).unwrap();
        assert_eq!(root.status, Status::Missing);
        let unit = paranoid_item(Some(4), false, &classic).unwrap();
        assert_eq!(unit.status, Status::Failed);
        for line in [&root, &unit] {
            // Only the classic ones are named.
            assert!(line
                .detail
                .contains(": inet_sock_set_state, tcp_send_reset; fix"));
            assert!(line.detail.contains("kernel.perf_event_paranoid = 2"));
            assert!(line.detail.contains("CAP_SYS_ADMIN"));
            assert!(!line.impact.is_empty());
        }
    }

    #[test]
    fn the_on_demand_line_says_why_the_programs_stay_attached() {
        let mut config = Config::default();
        let line = |config: &Config, blocker: Option<&str>| {
            let item = on_demand_item(config, blocker.map(String::from));
            assert_eq!(item.status, Status::Ok);
            item.detail
        };
        // The default services capture.
        assert!(line(&config, None).starts_with("possible here, but a service is captured"));
        for service in &mut config.services {
            service.capture = false;
        }
        assert!(line(&config, None).starts_with("on: with nothing captured"));
        let kernel = line(&config, Some("tcp_sock write_seq is unknown"));
        assert!(kernel.starts_with("not on this kernel: the send/receive programs stay"));
        assert!(
            kernel.ends_with("; tcp_sock write_seq is unknown"),
            "{kernel}"
        );
        config.limits.socket_probes_on_demand = false;
        for blocker in [None, Some("no storage")] {
            assert!(line(&config, blocker)
                .starts_with("off (limits.socket_probes_on_demand = false): the send/receive"));
        }
    }

    #[test]
    fn text_report_explains_costs() {
        let report = CheckReport {
            schema_version: 1,
            kernel: "6.1.0".into(),
            items: vec![item(
                "tracepoint sock/sock_send_length",
                Status::Missing,
                "not on this kernel",
                "no send stamps",
            )],
            usable: true,
        };
        let text = render_text(&report);
        assert!(
            text.contains("MISSING  tracepoint sock/sock_send_length"),
            "{text}"
        );
        assert!(text.contains("costs: no send stamps"), "{text}");
        assert!(text.ends_with("result: usable\n"));
    }

    /// A `[tls]` whose files do not load fails the check: `run` would stop at start (it said
    /// "usable"). Without `[tls]` there is no item.
    #[test]
    fn tls_files_that_do_not_load_fail_the_check() {
        assert!(tls_item(&Config::default()).is_none());
        let config = Config::parse(
            "[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
            "test",
        )
        .unwrap();
        let tls = tls_item(&config).unwrap();
        assert_eq!(tls.status, Status::Failed);
        assert!(
            tls.detail.contains("/nonexistent/cert.pem"),
            "{}",
            tls.detail
        );
        let report = CheckReport {
            schema_version: 1,
            kernel: "test".into(),
            items: vec![tls],
            usable: false,
        };
        assert!(
            render_text(&report)
                .contains("NOT usable: the metrics endpoint's TLS files do not load"),
            "{}",
            render_text(&report)
        );
    }
}
