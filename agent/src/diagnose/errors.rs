//! Servers that answer a notable share of requests with errors (ERROR, CLIENT_ERROR,
//! SERVER_ERROR and their binary and meta statuses): unlike a miss or a slow reply, an error
//! reply is a failure the application saw. A proxy (twemproxy) answers its clients
//! SERVER_ERROR when a backend fails it or outlasts the proxy's `timeout`, so when the process
//! serving the errors on this host is itself a client of other servers, the finding names the
//! backends that failed it in the same seconds: that is the cause, the proxy only relays it.
//! The finding quotes what the replies said (the history keeps a few texts per server, cut
//! to plain words) and, for a proxy whose replies say it timed out and took about the same
//! time each, infers the proxy's timeout from their latency.

use std::collections::{BTreeMap, BTreeSet};

use super::{util, DiagnoseThresholds, Finding, QuotedReply, Severity, Span};
use crate::history::{
    latency::{self, LatencyHistogram},
    snapshot::ErrorReplyRow,
    HistorySnapshot,
};
use crate::model::{Role, Status};

/// Texts quoted in a finding; the rest are summed.
const TEXTS_SHOWN: usize = 4;
/// Replies saying the proxy timed out needed before their latency says what its timeout is.
const TIMEOUT_MIN_REPLIES: u64 = 10;

/// Error replies that said one thing, and how long they took.
#[derive(Default)]
struct Said {
    count: u64,
    hist: LatencyHistogram,
}

/// Requests to one server and the error replies among them, from one side's rows.
#[derive(Default)]
struct Replies {
    requests: u64,
    errors_by_status: BTreeMap<Status, u64>,
    /// (requests, errors) per process ("" when unknown).
    by_comm: BTreeMap<String, (u64, u64)>,
    errors_by_t: BTreeMap<u64, u64>,
    /// By (status, text).
    said: BTreeMap<(Status, String), Said>,
}

impl Replies {
    fn add(&mut self, t: u64, comm: &str, status: Status, count: u64) {
        self.requests += count;
        let per_comm = self.by_comm.entry(comm.to_string()).or_default();
        per_comm.0 += count;
        if status.is_error() {
            per_comm.1 += count;
            *self.errors_by_status.entry(status).or_default() += count;
            *self.errors_by_t.entry(t).or_default() += count;
        }
    }

    fn said(&mut self, snap: &HistorySnapshot, row: &ErrorReplyRow) {
        let said = self
            .said
            .entry((row.status, snap.label(row.text).to_string()))
            .or_default();
        said.count += row.count as u64;
        said.hist.add_cells(&row.cells);
    }

    /// What the replies said, the most frequent first.
    fn texts(&self) -> Vec<(&(Status, String), &Said)> {
        let mut texts: Vec<_> = self.said.iter().collect();
        texts.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        texts
    }

    fn errors(&self) -> u64 {
        self.errors_by_status.values().sum()
    }

    fn span(&self) -> Option<Span> {
        Some(Span {
            start_s: *self.errors_by_t.keys().next()?,
            end_s: *self.errors_by_t.keys().next_back()?,
        })
    }
}

/// One server as both ends on this host saw it.
#[derive(Default)]
struct Server {
    /// What this host's clients of the server were answered.
    client: Replies,
    /// What the server (when it runs here) answered all its clients, local or not.
    server: Replies,
    /// The processes serving it on this host (server-role rows).
    serving: BTreeSet<String>,
}

/// A server another process (the proxy) sent requests to, in the seconds the proxy erred.
#[derive(Default)]
struct Backend {
    requests: u64,
    /// Requests the backend never answered (timeouts, connections closed first) or answered
    /// with an error.
    failed: u64,
    hist: LatencyHistogram,
    resets: u64,
}

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let servers = collect(snap);
    for ((service, server), seen) in &servers {
        // What this host's applications saw is what matters; a local server's own view stands
        // in when its clients are elsewhere.
        let (replies, local_clients) = if seen.client.requests > 0 {
            (&seen.client, true)
        } else {
            (&seen.server, false)
        };
        let errors = replies.errors();
        if errors < th.error_min_replies || replies.requests == 0 {
            continue;
        }
        let ratio = errors as f64 / replies.requests as f64;
        if ratio < th.error_min_ratio {
            continue;
        }
        let Some(span) = replies.span() else {
            continue;
        };
        let proxy = seen
            .serving
            .iter()
            .find(|comm| !comm.is_empty() && is_client_elsewhere(snap, comm, server));
        let backends = proxy.map(|comm| backends(snap, comm, server, span));
        out.push(finding(
            service,
            server,
            replies,
            local_clients,
            ratio,
            proxy.zip(backends.as_ref()),
            th,
        ));
    }
}

fn collect(snap: &HistorySnapshot) -> BTreeMap<(String, String), Server> {
    let mut servers: BTreeMap<(String, String), Server> = BTreeMap::new();
    for second in &snap.seconds {
        for row in &second.requests {
            let key = (
                snap.label(row.service).to_string(),
                snap.label(row.server).to_string(),
            );
            let seen = servers.entry(key).or_default();
            let comm = snap.label(row.comm);
            let count = row.count as u64;
            match row.role {
                Role::Client => seen.client.add(second.t, comm, row.status, count),
                Role::Server => {
                    seen.server.add(second.t, comm, row.status, count);
                    seen.serving.insert(comm.to_string());
                }
            }
        }
        for row in &second.error_replies {
            let key = (
                snap.label(row.service).to_string(),
                snap.label(row.server).to_string(),
            );
            let seen = servers.entry(key).or_default();
            match row.role {
                Role::Client => seen.client.said(snap, row),
                Role::Server => seen.server.said(snap, row),
            }
        }
    }
    servers
}

/// Whether `comm` on this host sent requests to a server other than `server`: a process that
/// serves one address and is a client of others is a proxy.
fn is_client_elsewhere(snap: &HistorySnapshot, comm: &str, server: &str) -> bool {
    snap.seconds.iter().any(|second| {
        second.requests.iter().any(|r| {
            r.role == Role::Client && snap.label(r.comm) == comm && snap.label(r.server) != server
        })
    })
}

/// The servers `proxy` sent requests to in `span` (the seconds it answered with errors), with
/// what they did to it then, the most failing first.
fn backends(
    snap: &HistorySnapshot,
    proxy: &str,
    front: &str,
    span: Span,
) -> Vec<(String, Backend)> {
    let mut found: BTreeMap<String, Backend> = BTreeMap::new();
    let seconds = snap
        .seconds
        .iter()
        .filter(|s| s.t >= span.start_s && s.t <= span.end_s);
    for second in seconds {
        let mine = |role: Role, comm: u32, server: u32| {
            role == Role::Client && snap.label(comm) == proxy && snap.label(server) != front
        };
        for row in second
            .requests
            .iter()
            .filter(|r| mine(r.role, r.comm, r.server))
        {
            let backend = found.entry(snap.label(row.server).to_string()).or_default();
            backend.requests += row.count as u64;
            if row.status.is_failure() {
                backend.failed += row.count as u64;
            }
        }
        for row in second
            .latency
            .iter()
            .filter(|r| mine(r.role, r.comm, r.server))
        {
            if let Some(backend) = found.get_mut(snap.label(row.server)) {
                backend.hist.add_cells(&row.cells);
            }
        }
        // TCP rows name no process: the backend's resets at the client ends on this host (the
        // proxy's among them). A backend running here records the same reset at its own end,
        // so its server-role rows would count each one twice.
        for row in second
            .tcp
            .iter()
            .filter(|r| r.event.is_reset() && r.role == Role::Client)
        {
            if let Some(backend) = found.get_mut(snap.label(row.server)) {
                backend.resets += row.count as u64;
            }
        }
    }
    let mut ranked: Vec<(String, Backend)> = found.into_iter().collect();
    ranked.sort_by(|a, b| {
        (b.1.failed, b.1.resets)
            .cmp(&(a.1.failed, a.1.resets))
            .then_with(|| a.0.cmp(&b.0))
    });
    ranked
}

/// A share of requests that failed: below 10% with one decimal, since 1.5% and 2.4% of
/// requests failing are different incidents.
fn share(ratio: f64) -> String {
    if ratio < 0.1 {
        format!("{:.1}%", ratio * 100.0)
    } else {
        util::percent(ratio)
    }
}

/// "server_error x127, client_error x3", the most frequent first.
fn statuses(replies: &Replies) -> String {
    let mut by_count: Vec<(&Status, &u64)> = replies.errors_by_status.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    by_count
        .iter()
        .map(|(status, n)| format!("{} x{n}", status.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn finding(
    service: &str,
    server: &str,
    replies: &Replies,
    local_clients: bool,
    ratio: f64,
    proxy: Option<(&String, &Vec<(String, Backend)>)>,
    th: &DiagnoseThresholds,
) -> Finding {
    let errors = replies.errors();
    let erring: Vec<(&String, &(u64, u64))> = replies
        .by_comm
        .iter()
        .filter(|(comm, (_, e))| !comm.is_empty() && *e > 0)
        .collect();
    let whose = match (local_clients, erring.as_slice()) {
        (true, [(comm, _)]) => format!("{comm}'s"),
        (true, _) => "this host's clients'".to_string(),
        (false, _) => "its clients'".to_string(),
    };
    let failing =
        proxy.and_then(|(_, backends)| backends.iter().find(|(_, b)| b.failed > 0 || b.resets > 0));
    let mut title = format!(
        "{service} {server} answered {} of {whose} requests with errors ({})",
        share(ratio),
        statuses(replies)
    );
    if let (Some((comm, _)), Some((backend, _))) = (proxy, failing) {
        title.push_str(&format!(
            "; its backend {backend} failed {comm} in those seconds"
        ));
    }
    let severity = if ratio >= th.error_critical_ratio {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let mut finding = Finding::new("error-replies", severity, title);
    let span = replies.span().expect("errors were counted");
    finding.evidence.push(format!(
        "{} of {} answered with errors, {}",
        errors,
        util::plural(replies.requests, "request"),
        util::clock_span(span.start_s, span.end_s)
    ));
    if local_clients {
        let listed: Vec<String> = erring
            .iter()
            .map(|(comm, (requests, e))| {
                format!(
                    "{comm}: {e} of {requests} ({})",
                    share(*e as f64 / *requests as f64)
                )
            })
            .collect();
        if !listed.is_empty() {
            finding
                .evidence
                .push(format!("by process: {}", util::truncated(&listed, 4)));
        }
        finding
            .subjects
            .processes
            .extend(erring.iter().map(|(comm, _)| comm.to_string()));
    }
    said_evidence(&mut finding, replies, proxy.map(|(comm, _)| comm.as_str()));
    finding.subjects.services.push(service.to_string());
    finding.subjects.servers.push(server.to_string());
    finding.advice = match proxy {
        Some((comm, backends)) => {
            proxy_evidence(&mut finding, comm, backends);
            format!(
                "{server} is a proxy ({comm} on this host, a client of other servers): an error \
                 it answers, server_error above all, is a backend failure relayed to the \
                 application. Look at the failing backend first (the slow-server, resets and \
                 retransmit findings for it). A proxy gives up on a backend after its own \
                 timeout (twemproxy: `timeout:` of the pool) and answers SERVER_ERROR: a timeout \
                 shorter than the backend's stalls turns every stall into errors, so fix the \
                 backend's stalls or give the proxy a timeout longer than them (and the \
                 application's longer still). With auto_eject_hosts the proxy moves the keys of \
                 a backend that keeps failing elsewhere."
            )
        }
        None => "The server answered these requests with errors: server_error is the server \
            failing (out of memory, a backend behind it failing, an item too large), error and \
            client_error are requests it did not understand or accept (an unsupported command, \
            a bad key or length: a client bug or a client library speaking another protocol \
            version). Check the server's log and stats and which commands failed."
            .to_string(),
    };
    finding.value("errors", errors as f64);
    finding.value("requests", replies.requests as f64);
    finding.value("error_ratio", ratio);
    for (status, count) in &replies.errors_by_status {
        finding.value(status.as_str(), *count as f64);
    }
    finding.span = Some(span);
    finding.magnitude = errors as f64;
    finding
}

/// One line per backend the proxy used while it answered with errors, the failing first.
fn proxy_evidence(finding: &mut Finding, comm: &str, backends: &[(String, Backend)]) {
    if backends.is_empty() {
        finding.evidence.push(format!(
            "{comm} sent no requests to backends in those seconds: the errors are the proxy's own \
             (its configuration, its connections to the backends: see its log)"
        ));
        return;
    }
    for (backend, b) in backends.iter().take(3) {
        let mut line = format!(
            "{comm} -> backend {backend}: {} of {} requests unanswered or failed",
            b.failed, b.requests
        );
        if let (Some(p99), Some(max)) = (b.hist.quantile_us(0.99), b.hist.max_us()) {
            line.push_str(&format!(
                ", p99 {}, slowest about {}",
                util::latency(p99),
                util::latency(max)
            ));
        }
        if b.resets > 0 {
            line.push_str(&format!(", {}", util::plural(b.resets, "TCP reset")));
        }
        finding.evidence.push(line);
        if (b.failed > 0 || b.resets > 0) && !finding.subjects.servers.contains(backend) {
            finding.subjects.servers.push(backend.clone());
        }
    }
    if !finding.subjects.processes.iter().any(|p| p == comm) {
        finding.subjects.processes.push(comm.to_string());
    }
}

/// What the replies said, quoted with counts (and latency where measured), into the evidence
/// and `error_texts`; for a proxy, its timeout when its replies say it timed out.
fn said_evidence(finding: &mut Finding, replies: &Replies, proxy: Option<&str>) {
    let texts = replies.texts();
    if texts.is_empty() {
        return;
    }
    let ms = |us: Option<f64>| us.map(|us| (us / 100.0).round() / 10.0);
    let mut quoted = Vec::new();
    for ((status, text), said) in texts.iter().take(TEXTS_SHOWN) {
        let words = match text.as_str() {
            "" => "(no text)".to_string(),
            other if other == crate::history::interner::OTHER_LABEL => "(other texts)".to_string(),
            text => format!("\"{text}\""),
        };
        let mut line = format!("{} {words} x{}", status.as_str(), said.count);
        let (p50, p90) = (said.hist.quantile_us(0.5), said.hist.quantile_us(0.9));
        if let (Some(p50), Some(p90)) = (p50, p90) {
            line.push_str(&format!(
                " (p50 {}, p90 {})",
                util::latency(p50),
                util::latency(p90)
            ));
        }
        quoted.push(line);
        finding.error_texts.push(QuotedReply {
            status: status.as_str().to_string(),
            text: text.clone(),
            count: said.count,
            p50_ms: ms(p50),
            p90_ms: ms(p90),
        });
    }
    let rest: u64 = texts.iter().skip(TEXTS_SHOWN).map(|(_, s)| s.count).sum();
    if rest > 0 {
        quoted.push(format!("{rest} more with other texts"));
    }
    finding
        .evidence
        .push(format!("the replies said: {}", quoted.join(", ")));
    let Some(comm) = proxy else {
        return;
    };
    if let Some((text, said, (low_us, high_us))) = texts
        .iter()
        .find_map(|((_, text), said)| Some((text, said, timeout_band(text, said)?)))
    {
        finding.evidence.push(format!(
            "{comm}'s timeout looks like about {}-{} (inferred: its {} \"{text}\" replies took \
             that long, p50 {}; check the pool's `timeout:`)",
            util::latency(low_us),
            util::latency(high_us),
            said.count,
            util::latency(said.hist.quantile_us(0.5).unwrap_or(low_us)),
        ));
        finding.value("proxy_timeout_ms", (low_us + high_us) / 2000.0);
    }
}

/// Where a proxy's "timed out" replies' latencies cluster: the bounds of the histogram
/// buckets from their 10th to their 90th percentile, when that is at most two neighbouring
/// buckets (within about 40%) and there were enough of them. A timeout is a fixed wait, so
/// spread-out latencies mean something else answered these errors.
fn timeout_band(text: &str, said: &Said) -> Option<(f64, f64)> {
    let lower = text.to_ascii_lowercase();
    if !(lower.contains("timed out") || lower.contains("timeout"))
        || said.count < TIMEOUT_MIN_REPLIES
    {
        return None;
    }
    let bucket = |q: f64| Some(latency::bucket_of(said.hist.quantile_us(q)? as u32));
    let (low, high) = (bucket(0.1)?, bucket(0.9)?);
    (high <= low + 1 && said.hist.count() >= TIMEOUT_MIN_REPLIES).then(|| {
        (
            latency::bucket_lower_us(low),
            latency::bucket_lower_us(high + 1),
        )
    })
}
