//! Detector thresholds: the `[diagnose]` table of the config file. Every field has a default
//! chosen so that a healthy cache tier reports nothing; each is documented with what it
//! compares. Unknown keys are rejected so a typo never silently disables a detector.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnoseThresholds {
    // --- idle disconnects -----------------------------------------------------------------
    /// Server-initiated closes with a known idle time needed before inferring a timeout.
    pub idle_min_closes: u32,
    /// Idle times (10th to 90th percentile) may spread this many seconds and still count as
    /// one consistent timeout...
    pub idle_max_spread_s: f64,
    /// ...or this fraction of the median, whichever is larger.
    pub idle_max_spread_ratio: f64,
    /// Closes after less idle time than this are not idle timeouts (e.g. a server closing
    /// right after an error reply).
    pub idle_min_timeout_s: f64,

    // --- one slow or hung server ----------------------------------------------------------
    /// Requests a server needs in the window before its latency is compared with its peers.
    pub slow_min_requests: u64,
    /// A server is slow when its p99 is this many times the median p99 of its peers...
    pub slow_p99_ratio: f64,
    /// ...and at least this many milliseconds above it (so 50 us vs 300 us is not "slow").
    pub slow_min_p99_gap_ms: f64,
    /// Requests at least this slow (or with no answer) count as stalled.
    pub slow_stall_ms: f64,
    /// Stalled requests within 10 seconds on one server needed to report it, when its peers'
    /// worst 10 seconds had `slow_p99_ratio` times fewer.
    pub slow_min_stalled: u64,
    /// A server that answered before but not during the last this many seconds of the window,
    /// while requests to it went unanswered, has stopped answering.
    pub slow_stopped_after_s: u64,

    // --- error replies ---------------------------------------------------------------------
    /// Error replies (error, client_error, server_error) from one server in the window needed
    /// to report it: a handful of CLIENT_ERRORs from one malformed key is a bug report, not an
    /// incident...
    pub error_min_replies: u64,
    /// ...when they are at least this share of its requests (0-1): one request in a hundred
    /// failing already breaks a page making 20 cache calls one time in five...
    pub error_min_ratio: f64,
    /// ...and critical from this share (a third of such pages fail), where a healthy server
    /// answers with no errors at all.
    pub error_critical_ratio: f64,

    // --- cold cache / miss storm ----------------------------------------------------------
    /// Lookups (hits + misses) needed on each side of a hit-ratio drop.
    pub miss_min_lookups: u64,
    /// The hit ratio must fall by at least this much (absolute, 0-1).
    pub miss_min_drop: f64,
    /// Seconds of baseline before a candidate drop.
    pub miss_before_s: u64,
    /// Seconds after a candidate drop that must stay low.
    pub miss_after_s: u64,
    /// Client-side lookups of unknown outcome (a multi-key batch the capture cut counts once)
    /// in the window that make a service's client-side hit ratio worth a warning.
    pub unread_min_lookups: u64,

    // --- key routing ----------------------------------------------------------------------
    /// Keys seen going to two servers of one service before reporting inconsistent routing.
    pub key_split_min: u64,

    // --- file descriptors -----------------------------------------------------------------
    /// Open fds / soft limit of a process that is worth a warning.
    pub fd_warn_ratio: f64,
    /// ... and that is critical.
    pub fd_critical_ratio: f64,
    /// A process connected to at least this many servers of a service, and to (nearly) all
    /// of them, is reported even without fd pressure (a full mesh that will not scale).
    pub full_mesh_min_servers: u32,

    // --- SYNs, accept queues, churn -------------------------------------------------------
    /// Connection attempts at a local listener in one second that make a storm.
    pub syn_storm_per_s: u64,
    /// Accept queue length / limit that counts as full.
    pub listen_queue_full_ratio: f64,
    /// Host-wide listen drops (overflows included) in the window worth reporting.
    pub listen_overflow_min: u64,
    /// New connections per second to one service (averaged over the seconds with any) that
    /// is churn rather than pooling.
    pub churn_opens_per_s: f64,

    // --- retransmits, resets, connect failures --------------------------------------------
    /// Retransmits on one server in the window before it can be a hot spot.
    pub retransmit_min: u64,
    /// Resets on one server in the window before it can be a hot spot.
    pub reset_min: u64,
    /// A hot spot has this many times the median count of its peers (when it has peers).
    pub hotspot_peer_ratio: f64,
    /// Failed connection attempts to one server worth reporting.
    pub connect_failure_min: u64,

    // --- micro-outages --------------------------------------------------------------------
    /// Seconds with traffic needed to tell a spike from the normal level.
    pub spike_min_active_s: u64,
    /// Requests (or failures) in a second needed to judge it.
    pub spike_min_requests: u64,
    /// Failures in a second that make an error spike...
    pub spike_min_errors: u64,
    /// ...when they are at least this fraction of the second's requests.
    pub spike_error_ratio: f64,
    /// A second's p99 this many times the window's typical p99 is a latency spike...
    pub spike_latency_ratio: f64,
    /// ...if it is also at least this many milliseconds...
    pub spike_min_latency_ms: f64,
    /// ...and at least this many requests of the second were that slow (one slow request,
    /// e.g. a client's GC pause, is not an outage).
    pub spike_min_slow_requests: u64,
    /// Longer runs of bad seconds are outages, reported by the other detectors, not spikes.
    pub spike_max_len_s: u64,

    // --- memcached slab fit ---------------------------------------------------------------
    /// A local memcached whose stored items would lose at least this share of their chunk
    /// memory to rounding up to slab chunk sizes (0-1) is reported...
    pub slab_waste_ratio: f64,
    /// ...once this many stores have been seen on it.
    pub slab_min_items: u64,

    // --- memcache queues ------------------------------------------------------------------
    /// A queue whose oldest message not yet dequeued has waited this long (seconds) has
    /// consumers that fell behind.
    pub queue_backlog_s: f64,
}

impl Default for DiagnoseThresholds {
    fn default() -> Self {
        DiagnoseThresholds {
            idle_min_closes: 3,
            idle_max_spread_s: 3.0,
            idle_max_spread_ratio: 0.15,
            idle_min_timeout_s: 1.0,
            slow_min_requests: 50,
            slow_p99_ratio: 5.0,
            slow_min_p99_gap_ms: 2.0,
            slow_stall_ms: 200.0,
            slow_min_stalled: 2,
            slow_stopped_after_s: 5,
            error_min_replies: 10,
            error_min_ratio: 0.01,
            error_critical_ratio: 0.02,
            miss_min_lookups: 100,
            miss_min_drop: 0.3,
            miss_before_s: 60,
            miss_after_s: 10,
            unread_min_lookups: 1,
            key_split_min: 5,
            fd_warn_ratio: 0.8,
            fd_critical_ratio: 0.95,
            full_mesh_min_servers: 16,
            syn_storm_per_s: 500,
            listen_queue_full_ratio: 0.9,
            listen_overflow_min: 1,
            churn_opens_per_s: 50.0,
            retransmit_min: 20,
            reset_min: 10,
            hotspot_peer_ratio: 4.0,
            connect_failure_min: 5,
            spike_min_active_s: 20,
            spike_min_requests: 20,
            spike_min_errors: 5,
            spike_error_ratio: 0.05,
            spike_latency_ratio: 10.0,
            spike_min_latency_ms: 10.0,
            spike_min_slow_requests: 3,
            spike_max_len_s: 5,
            slab_waste_ratio: 0.15,
            slab_min_items: 1000,
            queue_backlog_s: 60.0,
        }
    }
}

impl DiagnoseThresholds {
    /// Checks ranges the detectors rely on; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let ratios = [
            ("idle_max_spread_ratio", self.idle_max_spread_ratio),
            ("miss_min_drop", self.miss_min_drop),
            ("error_min_ratio", self.error_min_ratio),
            ("error_critical_ratio", self.error_critical_ratio),
            ("fd_warn_ratio", self.fd_warn_ratio),
            ("fd_critical_ratio", self.fd_critical_ratio),
            ("listen_queue_full_ratio", self.listen_queue_full_ratio),
            ("spike_error_ratio", self.spike_error_ratio),
            ("slab_waste_ratio", self.slab_waste_ratio),
        ];
        for (name, value) in ratios {
            if !(value.is_finite() && value > 0.0 && value <= 1.0) {
                return Err(format!("diagnose.{name} = {value} must be in (0, 1]"));
            }
        }
        let positives = [
            ("idle_max_spread_s", self.idle_max_spread_s),
            ("idle_min_timeout_s", self.idle_min_timeout_s),
            ("slow_p99_ratio", self.slow_p99_ratio),
            ("slow_min_p99_gap_ms", self.slow_min_p99_gap_ms),
            ("slow_stall_ms", self.slow_stall_ms),
            ("churn_opens_per_s", self.churn_opens_per_s),
            ("hotspot_peer_ratio", self.hotspot_peer_ratio),
            ("spike_latency_ratio", self.spike_latency_ratio),
            ("spike_min_latency_ms", self.spike_min_latency_ms),
            ("queue_backlog_s", self.queue_backlog_s),
        ];
        for (name, value) in positives {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!(
                    "diagnose.{name} = {value} must be a positive number"
                ));
            }
        }
        if self.error_critical_ratio < self.error_min_ratio {
            return Err(
                "diagnose.error_critical_ratio must not be below error_min_ratio".to_string(),
            );
        }
        if self.fd_critical_ratio < self.fd_warn_ratio {
            return Err("diagnose.fd_critical_ratio must not be below fd_warn_ratio".to_string());
        }
        if self.miss_before_s == 0 || self.miss_after_s == 0 || self.spike_max_len_s == 0 {
            return Err(
                "diagnose.miss_before_s, miss_after_s and spike_max_len_s must be at least 1"
                    .to_string(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_parse_from_an_empty_table() {
        let parsed: DiagnoseThresholds = toml::from_str("").unwrap();
        assert_eq!(parsed, DiagnoseThresholds::default());
        assert!(parsed.validate().is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_ranges_are_rejected() {
        let err = toml::from_str::<DiagnoseThresholds>("idle_min_close = 3").unwrap_err();
        assert!(err.to_string().contains("idle_min_close"), "{err}");
        let parsed: DiagnoseThresholds = toml::from_str("fd_warn_ratio = 1.5").unwrap();
        assert!(parsed.validate().unwrap_err().contains("fd_warn_ratio"));
        let parsed: DiagnoseThresholds =
            toml::from_str("fd_warn_ratio = 0.9\nfd_critical_ratio = 0.5").unwrap();
        assert!(parsed.validate().is_err());
    }
}
