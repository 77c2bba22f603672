//! Retransmit and reset hot spots per server, and failed connection attempts. A server whose
//! path loses packets shows retransmits far above its peers long before anyone calls it down.

use std::collections::{BTreeMap, BTreeSet};

use super::{util, DiagnoseThresholds, Finding, Severity, Span};
use crate::history::{HistorySnapshot, TcpEvent};

#[derive(Default)]
struct Trouble {
    events: BTreeMap<TcpEvent, u64>,
    first_t: BTreeMap<&'static str, u64>,
    last_t: BTreeMap<&'static str, u64>,
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

pub(super) fn detect(snap: &HistorySnapshot, th: &DiagnoseThresholds, out: &mut Vec<Finding>) {
    let mut servers: BTreeMap<String, BTreeMap<String, Trouble>> = BTreeMap::new();
    // Every server with traffic is a peer, even with zero trouble.
    let mut known: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for second in &snap.seconds {
        for row in &second.tcp {
            let trouble = servers
                .entry(snap.label(row.service).to_string())
                .or_default()
                .entry(snap.label(row.server).to_string())
                .or_default();
            *trouble.events.entry(row.event).or_default() += row.count as u64;
            let class = class(row.event);
            trouble.first_t.entry(class).or_insert(second.t);
            trouble.last_t.insert(class, second.t);
        }
        for (service, server) in second
            .requests
            .iter()
            .map(|r| (r.service, r.server))
            .chain(second.opened.iter().map(|r| (r.service, r.server)))
        {
            known
                .entry(snap.label(service).to_string())
                .or_default()
                .insert(snap.label(server).to_string());
        }
    }

    for (service, troubles) in &servers {
        let peers_of = |server: &str, pick: &dyn Fn(TcpEvent) -> bool| -> Vec<f64> {
            let mut names: BTreeSet<&String> = troubles.keys().collect();
            if let Some(k) = known.get(service) {
                names.extend(k.iter());
            }
            names
                .into_iter()
                .filter(|n| n.as_str() != server)
                .map(|n| troubles.get(n).map_or(0, |t| t.sum(pick)) as f64)
                .collect()
        };
        for (server, trouble) in troubles {
            let retransmits = trouble.sum(TcpEvent::is_retransmit);
            if retransmits >= th.retransmit_min {
                let peers = peers_of(server, &TcpEvent::is_retransmit);
                if let Some(peer) = hot(retransmits, &peers, th) {
                    let mut finding = Finding::new(
                        "retransmits",
                        Severity::Warning,
                        format!(
                            "{server} ({service}): {} TCP retransmits{}",
                            retransmits,
                            versus(peer, peers.len())
                        ),
                    );
                    finding.evidence.push(format!(
                        "{} data, {} SYN, {} SYN-ACK retransmits, {}",
                        trouble.get(TcpEvent::RetransmitData),
                        trouble.get(TcpEvent::RetransmitSyn),
                        trouble.get(TcpEvent::RetransmitSynack),
                        trouble
                            .span("retransmit")
                            .map_or(String::new(), |s| util::clock_span(s.start_s, s.end_s))
                    ));
                    finding.advice = "Packets to or from this server are being lost: every \
                        retransmit adds at least 200 ms to a request. Check interface errors \
                        and drops on both hosts (ip -s link, ethtool -S), the switch ports and \
                        any firewall or traffic shaping on the path."
                        .to_string();
                    finish(
                        &mut finding,
                        service,
                        server,
                        retransmits,
                        peer,
                        trouble.span("retransmit"),
                    );
                    finding.value("retransmits", retransmits as f64);
                    out.push(finding);
                }
            }
            let resets = trouble.sum(TcpEvent::is_reset);
            if resets >= th.reset_min {
                let peers = peers_of(server, &TcpEvent::is_reset);
                if let Some(peer) = hot(resets, &peers, th) {
                    let mut finding = Finding::new(
                        "resets",
                        Severity::Warning,
                        format!(
                            "{server} ({service}): {} TCP resets{}",
                            resets,
                            versus(peer, peers.len())
                        ),
                    );
                    finding.evidence.push(format!(
                        "{} received, {} sent, {}",
                        trouble.get(TcpEvent::ResetReceived),
                        trouble.get(TcpEvent::ResetSent),
                        trouble
                            .span("reset")
                            .map_or(String::new(), |s| util::clock_span(s.start_s, s.end_s))
                    ));
                    finding.advice = "Connections to this server are being torn down: a \
                        restarting or crashing server, a connection limit (memcached -c), a \
                        load balancer or firewall timing out idle flows, or clients closing \
                        with unread data. Check the server's logs and connection counts."
                        .to_string();
                    finish(
                        &mut finding,
                        service,
                        server,
                        resets,
                        peer,
                        trouble.span("reset"),
                    );
                    finding.value("resets", resets as f64);
                    out.push(finding);
                }
            }
            let failures = trouble.sum(TcpEvent::is_connect_failure);
            if failures >= th.connect_failure_min {
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
                    trouble
                        .span("connect")
                        .map_or(String::new(), |s| util::clock_span(s.start_s, s.end_s))
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
                out.push(finding);
            }
        }
    }
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
