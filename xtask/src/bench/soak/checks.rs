//! The soak's pass/fail checks: the agent's memory and fds after warm-up, and its counters
//! against what the generators and memcached counted themselves, within the tolerance its
//! sampling allows.

use std::collections::BTreeMap;

use super::super::observe::{self, Sample};
use super::{
    estimate_tolerance, estimate_variance, load::Counted, losses_account_for, sum, GetStats, Point,
    Steady, FD_SLACK, PAYLOAD_LOSS, RSS_SLACK_KB,
};

/// A check: whether it passed, and what it compared.
type Check = (bool, String);

/// RSS and open fds after warm-up stay within their slack.
fn memory_checks(points: &[Point], warmup_slices: usize) -> Vec<Check> {
    let mut checks: Vec<Check> = Vec::new();
    let steady_after = &points[warmup_slices.min(points.len().saturating_sub(1))..];
    let spread = |f: &dyn Fn(&Point) -> u64| {
        let max = steady_after.iter().map(f).max().unwrap_or(0);
        let min = steady_after.iter().map(f).min().unwrap_or(0);
        (min, max)
    };
    let (rss_min, rss_max) = spread(&|p| p.rss_kb);
    let (fd_min, fd_max) = spread(&|p| p.fds);
    checks.push((
        rss_max - rss_min <= RSS_SLACK_KB,
        format!(
            "RSS after warm-up ({} samples from {:.0} s): {:.1}..{:.1} MB, spread {:.1} MB (limit {:.0})",
            steady_after.len(),
            steady_after.first().map_or(0.0, |p| p.at.as_secs_f64()),
            rss_min as f64 / 1024.0,
            rss_max as f64 / 1024.0,
            (rss_max - rss_min) as f64 / 1024.0,
            RSS_SLACK_KB as f64 / 1024.0
        ),
    ));
    checks.push((
        fd_max - fd_min <= FD_SLACK,
        format!("open fds after warm-up: {fd_min}..{fd_max} (limit spread {FD_SLACK})"),
    ));
    checks
}

/// Everything the counter checks compare: what the generators and memcached counted, and the
/// agent's counters before and after the load.
pub(super) struct Ledger<'a> {
    pub(super) before: &'a [Sample],
    pub(super) after: &'a [Sample],
    pub(super) counts: &'a Counted,
    pub(super) steady: &'a Steady,
    /// The settled [`connection_counters`].
    pub(super) connections: [f64; 3],
    pub(super) generated_connections: u64,
    pub(super) losses: BTreeMap<String, u64>,
    pub(super) decode_all: bool,
    /// memcached's own get counters before and after.
    pub(super) stats: (GetStats, GetStats),
}

/// The request counts and how far each may be off (see [`Ledger::requests`]).
struct Requests {
    pub(super) steady: f64,
    churn: f64,
    generated_steady: u64,
    generated_churn: u64,
    missing: f64,
    /// Payload records lost while decoding everything, covering every request missed.
    degraded: bool,
    steady_tolerance: f64,
    churn_tolerance: f64,
    payload_lost: f64,
    how: String,
}

const CLIENT: (&str, &str) = ("role", "client");

impl Ledger<'_> {
    /// Every check, in the order printed.
    pub(super) fn checks(&self, warmup_slices: usize) -> Vec<Check> {
        let requests = self.requests();
        let mut checks = memory_checks(&self.steady.points, warmup_slices);
        self.loss_check(&requests, &mut checks);
        self.connection_checks(&mut checks);
        self.count_checks(&requests, &mut checks);
        self.status_checks(&requests, &mut checks);
        checks.push((
            self.steady.errors == 0,
            format!(
                "memcached errors seen by the steady generator: {}",
                self.steady.errors
            ),
        ));
        checks
    }

    /// The agent's client requests of `commands` over the soak.
    fn requests_of(&self, commands: &[&str]) -> f64 {
        commands
            .iter()
            .map(|command| {
                sum(
                    self.after,
                    "cacheprobe_memcache_requests_total",
                    &[CLIENT, ("command", command)],
                ) - sum(
                    self.before,
                    "cacheprobe_memcache_requests_total",
                    &[CLIENT, ("command", command)],
                )
            })
            .sum()
    }

    fn connection_checks(&self, checks: &mut Vec<Check>) {
        let counts = self.counts;
        let (generated_connections, steady) = (self.generated_connections, self.steady);
        let (steady_connections, steady_server_closes, steady_lost_in_flight) = (
            steady.connections,
            steady.server_closes,
            steady.lost_in_flight,
        );
        let [opened, peer_closed, dead] = self.connections;
        checks.push((
            opened as u64 == generated_connections,
            format!(
                "connections_opened_total{{role=client}} {opened} = generator {generated_connections} \
                 ({steady_connections} steady incl. {steady_server_closes} re-opened after memcached closed them + {} churn + {} idle)",
                counts.churn_connections,
                counts.idle_connections
            ),
        ));
        let idle_timeouts = counts.idle_closed_by_peer;
        let peer_range = (
            idle_timeouts + steady_server_closes - steady_lost_in_flight,
            idle_timeouts + steady_server_closes,
        );
        checks.push((
            (peer_range.0..=peer_range.1).contains(&(peer_closed as u64)),
            format!(
                "connections_closed_total{{role=client,closed_by=peer}} {peer_closed} = idle timeouts seen by the generator {idle_timeouts} \
                 + steady connections memcached closed {steady_server_closes} (less up to {steady_lost_in_flight} reset with a request in flight)",
            ),
        ));
        let dead_range = (
            counts.dead_writes,
            counts.dead_writes + steady_lost_in_flight,
        );
        checks.push((
            (dead_range.0..=dead_range.1).contains(&(dead as u64)),
            format!(
                "dead_socket_writes_total{{role=client}} {dead} = generator's writes after the close {} \
                 (+ up to {steady_lost_in_flight} steady requests in flight when memcached closed)",
                counts.dead_writes
            ),
        ));
    }

    /// The request counts against the generators' and their tolerances.
    fn requests(&self) -> Requests {
        let (counts, steady) = (self.counts, self.steady);
        let losses = &self.losses;
        let steady_requests = self.requests_of(&["get", "set"]);
        let churn_requests = self.requests_of(&["gets"]);
        // Requests lost in flight with a closed steady connection were sent, and are decoded.
        let generated_steady = steady.ops + counts.idle_sets + steady.lost_in_flight;
        let generated_churn = counts.churn_gets;
        let missing = (generated_steady as f64 - steady_requests).max(0.0)
            + (generated_churn as f64 - churn_requests).max(0.0);
        // Decoding everything, a full payload ring is the expected degradation, provided the
        // agent counted it and its count covers every request it missed.
        let degraded = self.decode_all && !losses.is_empty() && losses_account_for(losses, missing);
        let ratio = steady.lowest_ratio.clamp(1.0 / 1024.0, 1.0);
        let steady_tolerance =
            4.0 * (steady.variance + estimate_variance(ratio, [(counts.idle_sets, 1.0)])).sqrt();
        Requests {
            steady: steady_requests,
            churn: churn_requests,
            generated_steady,
            generated_churn,
            missing,
            degraded,
            steady_tolerance,
            churn_tolerance: churn_tolerance(
                ratio,
                generated_churn,
                generated_steady,
                steady.variance,
            ),
            payload_lost: losses.get(PAYLOAD_LOSS).copied().unwrap_or(0) as f64,
            how: if ratio >= 1.0 {
                "exact".to_string()
            } else {
                format!("a scaled estimate, sampled down to {ratio}: 4 standard deviations")
            },
        }
    }

    /// No events lost, or (decoding everything) only payload records covering every request
    /// missed.
    fn loss_check(&self, requests: &Requests, checks: &mut Vec<Check>) {
        let (losses, degraded, missing) = (&self.losses, requests.degraded, requests.missing);
        checks.push((
            losses.is_empty() || degraded,
            if degraded {
                format!(
                    "events lost: {} (expected degradation decoding everything: covers the {missing:.0} requests missed)",
                    observe::format_losses(losses)
                )
            } else {
                format!("events lost: {}", observe::format_losses(losses))
            },
        ));
    }

    /// get|set and churn gets against what the generators sent.
    fn count_checks(&self, requests: &Requests, checks: &mut Vec<Check>) {
        let (counts, degraded, how) = (self.counts, requests.degraded, &requests.how);
        let (steady_ops, unanswered) = (self.steady.ops, self.steady.unanswered);
        let (steady_requests, churn_requests) = (requests.steady, requests.churn);
        let (generated_steady, generated_churn) =
            (requests.generated_steady, requests.generated_churn);
        let allowance = |tolerance: f64, over: f64| {
            let under = tolerance + if degraded { requests.payload_lost } else { 0.0 };
            (under, tolerance + over)
        };
        // The steady generator stops at each slice's deadline with up to one request per
        // connection sent but unanswered; the agent counts those requests (each 1/ratio times
        // once sampled), the generator does not.
        let (under, over) = allowance(requests.steady_tolerance, unanswered);
        let extra = steady_requests - generated_steady as f64;
        checks.push((
            -under <= extra && extra <= over,
            format!(
                "memcache_requests_total{{role=client,command=get|set}} {steady_requests:.0} vs generator {generated_steady} \
                 ({steady_ops} steady + {} idle sets): {extra:+.0} ({:+.2}%), allowed -{under:.0}..+{over:.0} ({how}; \
                 + up to {unanswered:.0} for requests unanswered at slice ends{})",
                counts.idle_sets,
                100.0 * extra / generated_steady.max(1) as f64,
                if degraded { "; - the payload records lost" } else { "" },
            ),
        ));
        let (under, over) = allowance(requests.churn_tolerance, 0.0);
        let extra = churn_requests - generated_churn as f64;
        checks.push((
            -under <= extra && extra <= over,
            format!(
                "memcache_requests_total{{role=client,command=gets}} {churn_requests:.0} vs churn gets {generated_churn} \
                 (one per connection): {extra:+.0} ({:+.2}%), allowed -{under:.0}..+{over:.0} ({how}{})",
                100.0 * extra / generated_churn.max(1) as f64,
                if degraded { "; - the payload records lost" } else { "" },
            ),
        ));
    }

    /// Hits and misses against memcached's own counters. Requests the agent finished without
    /// an answer (unanswered at slice ends, timeouts) may be either at memcached.
    fn status_checks(&self, requests: &Requests, checks: &mut Vec<Check>) {
        let (degraded, how) = (requests.degraded, &requests.how);
        let (stats_before, stats_after) = self.stats;
        let statuses = |status: &str| -> f64 {
            ["get", "gets"]
                .iter()
                .map(|command| {
                    let labels = [CLIENT, ("command", command), ("status", status)];
                    sum(self.after, "cacheprobe_memcache_requests_total", &labels)
                        - sum(self.before, "cacheprobe_memcache_requests_total", &labels)
                })
                .sum()
        };
        let (agent_hits, agent_misses) = (statuses("hit"), statuses("miss"));
        let agent_unsettled = self.requests_of(&["get", "gets"]) - agent_hits - agent_misses;
        for (what, agent_count, memcached_count, tolerance) in [
            (
                "hit",
                agent_hits,
                stats_after.hits - stats_before.hits,
                requests.steady_tolerance,
            ),
            (
                "miss",
                agent_misses,
                stats_after.misses - stats_before.misses,
                requests.churn_tolerance,
            ),
        ] {
            // The agent's shortfall is memcached's surplus here: lost payload records on the
            // upper side.
            let under = tolerance;
            let over =
                tolerance + agent_unsettled + if degraded { requests.payload_lost } else { 0.0 };
            let extra = memcached_count as f64 - agent_count;
            checks.push((
                -under <= extra && extra <= over,
                format!(
                    "memcache_requests_total{{role=client,command=get|gets,status={what}}} {agent_count:.0} vs memcached get_{what}{} {memcached_count}: \
                     memcached {extra:+.0}, allowed -{under:.0}..+{over:.0} ({how}; + up to the {agent_unsettled:.0} gets the agent saw unanswered{})",
                    if what == "hit" { "s" } else { "es" },
                    if degraded { "; - the payload records lost" } else { "" },
                ),
            ));
        }
    }
}

/// Four standard deviations of the scaled churn `gets`. The agent weights a sampled request by
/// its service and role's calls seen / followed (a ratio estimator), and the churn shares its
/// service with the steady pool, whose calls dominate that ratio: to first order the estimate
/// is the churn's own draw (one request per connection, [`estimate_tolerance`]'s variance)
/// plus the churn times the ratio's relative error, which is the steady estimate's
/// (its requests are proportional to its calls): variance
/// `(1/p - 1) * churn + (churn / steady)^2 * steady variance`.
fn churn_tolerance(ratio: f64, churn: u64, steady: u64, steady_variance: f64) -> f64 {
    let share = churn as f64 / (steady.max(1) as f64);
    let own = estimate_tolerance(ratio, [(churn, 1.0)]);
    (own * own + 16.0 * share * share * steady_variance).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decoding everything, no tolerance; sampled, the steady pool's spread carries over to the
    /// churn in proportion to the churn's share, on top of its own draw.
    #[test]
    fn the_churn_tolerance_carries_the_steady_ratio_error() {
        assert_eq!(churn_tolerance(1.0, 60_000, 6_000_000, 0.0), 0.0);
        let own = estimate_tolerance(0.125, [(60_000, 1.0)]);
        assert_eq!(churn_tolerance(0.125, 60_000, 6_000_000, 0.0), own);
        // Steady: 256 connections of 23,437 requests at 1/8, sd about 16.5% of 6M.
        let steady_variance = estimate_variance(0.125, [(256, 23_437.5)]);
        let churn = churn_tolerance(0.125, 60_000, 6_000_000, steady_variance);
        let relative = churn / 4.0 / 60_000.0;
        assert!((0.16..0.17).contains(&relative), "{relative}");
    }
}
