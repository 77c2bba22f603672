//! Retransmit and reset hot spots per server, and failed connection attempts. A server whose
//! path loses packets shows retransmits far above its peers long before anyone calls it down.

use std::collections::{BTreeMap, BTreeSet};

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::{
    history::{HistorySnapshot, TcpEvent},
    model::Role,
};

#[derive(Default)]
struct Trouble {
    events: BTreeMap<TcpEvent, u64>,
    /// Resets by the role of the socket that counted them (see [`Trouble::local_resets`]).
    resets: BTreeMap<(Role, TcpEvent), u64>,
    first_t: BTreeMap<&'static str, u64>,
    last_t: BTreeMap<&'static str, u64>,
}

/// Resets whose two ends are both sockets of this host, one event each.
struct LocalResets {
    /// Sent by a client here, received by the server here.
    to_server: u64,
    /// Sent by the server here, received by a client here.
    to_client: u64,
}

impl Trouble {
    fn sum(&self, pick: impl Fn(TcpEvent) -> bool) -> u64 {
        self.events
            .iter()
            .filter(|(e, _)| pick(**e))
            .map(|(_, n)| n)
            .sum()
    }
    fn get(&self, event: TcpEvent) -> u64 {
        self.events.get(&event).copied().unwrap_or(0)
    }
    fn reset(&self, role: Role, event: TcpEvent) -> u64 {
        self.resets.get(&(role, event)).copied().unwrap_or(0)
    }

    /// A reset between a client and its server both on this host (loopback, or namespaces on
    /// one bridge) is recorded twice: sent by one socket, received by its peer. A client here
    /// whose server is also here talks to that server's own socket, so what one of them sends
    /// the other receives: the smaller count of each such pair is the resets the two share;
    /// the rest came from or went to other hosts.
    fn local_resets(&self) -> LocalResets {
        let pair = |sender: Role, receiver: Role| {
            self.reset(sender, TcpEvent::ResetSent)
                .min(self.reset(receiver, TcpEvent::ResetReceived))
        };
        LocalResets {
            to_server: pair(Role::Client, Role::Server),
            to_client: pair(Role::Server, Role::Client),
        }
    }

    /// Every reset once, wherever its ends are.
    fn resets_once(&self) -> u64 {
        let local = self.local_resets();
        self.sum(TcpEvent::is_reset) - local.to_server - local.to_client
    }

    /// Retransmits are counted by the sending socket only, so one per retransmission whether
    /// or not the receiver is on this host too.
    fn retransmits(&self) -> u64 {
        self.sum(TcpEvent::is_retransmit)
    }
    fn span(&self, class: &str) -> Option<Span> {
        Some(Span {
            start_s: *self.first_t.get(class)?,
            end_s: *self.last_t.get(class)?,
        })
    }
}

fn class(event: TcpEvent) -> &'static str {
    if event.is_retransmit() {
        "retransmit"
    } else if event.is_reset() {
        "reset"
    } else {
        "connect"
    }
}

/// A kind of trouble judged against the server's peers: retransmits or resets.
struct HotSpot {
    /// Starts the finding with its id (also the name of its count in `values`) and severity.
    start: fn(String) -> Finding,
    /// What is counted, for the title.
    what: &'static str,
    class: &'static str,
    /// Each event once.
    count: fn(&Trouble) -> u64,
    min: fn(&DiagnoseThresholds) -> u64,
    /// The count broken down by event, for the evidence.
    breakdown: fn(&Trouble) -> String,
    advice: &'static str,
}

const RETRANSMITS: HotSpot = HotSpot {
    start: |title| Finding::new("retransmits", Severity::Warning, title),
    what: "TCP retransmits",
    class: "retransmit",
    count: Trouble::retransmits,
    min: |th| th.retransmit_min,
    breakdown: |trouble| {
        format!(
            "{} data, {} SYN, {} SYN-ACK retransmits",
            trouble.get(TcpEvent::RetransmitData),
            trouble.get(TcpEvent::RetransmitSyn),
            trouble.get(TcpEvent::RetransmitSynack),
        )
    },
    advice: "Packets to or from this server are being lost: every \
        retransmit adds at least 200 ms to a request. Check interface errors \
        and drops on both hosts (ip -s link, ethtool -S), the switch ports and \
        any firewall or traffic shaping on the path.",
};

const RESETS: HotSpot = HotSpot {
    start: |title| Finding::new("resets", Severity::Warning, title),
    what: "TCP resets",
    class: "reset",
    count: Trouble::resets_once,
    min: |th| th.reset_min,
    breakdown: |trouble| {
        let local = trouble.local_resets();
        let both = local.to_server + local.to_client;
        let received = trouble.get(TcpEvent::ResetReceived) - both;
        let sent = trouble.get(TcpEvent::ResetSent) - both;
        if both == 0 {
            return format!("{received} received, {sent} sent");
        }
        [
            (
                local.to_server,
                "sent by clients on this host to the server here",
            ),
            (
                local.to_client,
                "sent by the server here to clients on this host",
            ),
            (received, "received from other hosts"),
            (sent, "sent to other hosts"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect::<Vec<_>>()
        .join(", ")
            + " (a reset between two sockets here is seen at both ends, counted once)"
    },
    advice: "Connections to this server are being torn down: a \
        restarting or crashing server, a connection limit (memcached -c), a \
        load balancer or firewall timing out idle flows, or clients closing \
        with unread data. Check the server's logs and connection counts.",
};

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let services = collect(snap);
    // Every server with traffic is a peer, even with zero trouble.
    let known = util::servers_by_service(snap, false);
    for (service, troubles) in &services {
        let known = known.get(service);
        for (server, trouble) in troubles {
            for kind in [&RETRANSMITS, &RESETS] {
                out.extend(hot_spot(
                    kind, service, server, trouble, troubles, known, th,
                ));
            }
            out.extend(connect_failures(service, server, trouble, th));
        }
    }
}

/// Trouble per service and server.
fn collect(snap: &HistorySnapshot) -> BTreeMap<String, BTreeMap<String, Trouble>> {
    let mut services: BTreeMap<String, BTreeMap<String, Trouble>> = BTreeMap::new();
    for second in &snap.seconds {
        for row in &second.tcp {
            let trouble = util::by_server(&mut services, snap, row.service, row.server);
            *trouble.events.entry(row.event).or_default() += row.count as u64;
            if row.event.is_reset() {
                *trouble.resets.entry((row.role, row.event)).or_default() += row.count as u64;
            }
            let class = class(row.event);
            trouble.first_t.entry(class).or_insert(second.t);
            trouble.last_t.insert(class, second.t);
        }
    }
    services
}

/// The `count` at every other server of the service, trouble-free ones as 0.
fn peer_counts(
    server: &str,
    troubles: &BTreeMap<String, Trouble>,
    known: Option<&BTreeSet<String>>,
    count: fn(&Trouble) -> u64,
) -> Vec<f64> {
    let mut names: BTreeSet<&String> = troubles.keys().collect();
    if let Some(k) = known {
        names.extend(k.iter());
    }
    names
        .into_iter()
        .filter(|n| n.as_str() != server)
        .map(|n| troubles.get(n).map_or(0, count) as f64)
        .collect()
}

fn hot_spot(
    kind: &HotSpot,
    service: &str,
    server: &str,
    trouble: &Trouble,
    troubles: &BTreeMap<String, Trouble>,
    known: Option<&BTreeSet<String>>,
    th: &DiagnoseThresholds,
) -> Option<Finding> {
    let count = (kind.count)(trouble);
    if count < (kind.min)(th) {
        return None;
    }
    let peers = peer_counts(server, troubles, known, kind.count);
    let peer = hot(count, &peers, th)?;
    let mut finding = (kind.start)(format!(
        "{server} ({service}): {} {}{}",
        count,
        kind.what,
        versus(peer, peers.len())
    ));
    finding.evidence.push(format!(
        "{}, {}",
        (kind.breakdown)(trouble),
        clock_span_of(trouble.span(kind.class))
    ));
    finding.advice = kind.advice.to_string();
    finish(
        &mut finding,
        service,
        server,
        count,
        peer,
        trouble.span(kind.class),
    );
    let id = finding.id.clone();
    finding.value(&id, count as f64);
    if id == "retransmits" {
        // What a full accept queue elsewhere in the report explains (`listen`).
        finding.value(
            "syn_retransmits",
            trouble.get(TcpEvent::RetransmitSyn) as f64,
        );
    }
    Some(finding)
}

fn connect_failures(
    service: &str,
    server: &str,
    trouble: &Trouble,
    th: &DiagnoseThresholds,
) -> Option<Finding> {
    let failures = trouble.sum(TcpEvent::is_connect_failure);
    if failures < th.connect_failure_min {
        return None;
    }
    let refused = trouble.get(TcpEvent::ConnectRefused);
    let timeout = trouble.get(TcpEvent::ConnectTimeout);
    // Refusals and timeouts mean requests to this server fail outright.
    let severity = if refused + timeout > 0 {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let mut finding = Finding::new(
        "connect-failures",
        severity,
        format!(
            "{} to {server} ({service}) failed",
            util::plural(failures, "connection attempt")
        ),
    );
    finding.evidence.push(format!(
        "{refused} refused, {timeout} timed out, {} reset, {}",
        trouble.get(TcpEvent::ConnectReset),
        clock_span_of(trouble.span("connect"))
    ));
    let mut advice = Vec::new();
    if refused > 0 {
        advice.push(
            "Refused means nothing listens on that port: the server is down, \
             restarting, or the clients have a wrong address.",
        );
    }
    if timeout > 0 {
        advice.push(
            "Timed out means SYNs got no answer: the host is down or unreachable, \
             or a firewall drops the traffic.",
        );
    }
    advice.push("Remove dead servers from the clients' lists until they are back.");
    finding.advice = advice.join(" ");
    finish(
        &mut finding,
        service,
        server,
        failures,
        None,
        trouble.span("connect"),
    );
    finding.value("connect_failures", failures as f64);
    Some(finding)
}

fn clock_span_of(span: Option<Span>) -> String {
    span.map_or(String::new(), |s| util::clock_span(s.start_s, s.end_s))
}

/// Whether `count` stands out from its peers; returns the peer median when it does (None when
/// there are no peers to compare with, which also counts as standing out).
fn hot(count: u64, peers: &[f64], th: &DiagnoseThresholds) -> Option<Option<f64>> {
    match util::median(peers) {
        None => Some(None),
        Some(median) if count as f64 >= th.hotspot_peer_ratio * median.max(1.0) => {
            Some(Some(median))
        }
        Some(_) => None,
    }
}

fn versus(peer: Option<f64>, peers: usize) -> String {
    match peer {
        Some(median) => format!(" (median of {peers} peers: {median:.0})"),
        None => String::new(),
    }
}

fn finish(
    finding: &mut Finding,
    service: &str,
    server: &str,
    count: u64,
    peer: Option<f64>,
    span: Option<Span>,
) {
    finding.subjects.services.push(service.to_string());
    finding.subjects.servers.push(server.to_string());
    finding.span = span;
    finding.magnitude = count as f64 / peer.unwrap_or(0.0).max(1.0);
}
