//! The request latency histogram: bucket counts and one request-id exemplar slot per bucket behind one lock, so an exemplar costs no second lock.
//!
//! A slot keeps, of the requests offered since the last scrape read it, the one of highest
//! [`crate::model::exemplar_rank`], not merely the latest: the rank is the same at the client's
//! and the server's agent, so where one request of a client competes for the server's bucket
//! with every other client's, the server shows the very id the client shows, and
//! `diagnose --prometheus` can join them (issue 18). Once read, any newer offer replaces it.
//!
//! prometheus-client's `HistogramWithExemplars` wraps its `Histogram` (one lock) in a second
//! lock, 9 ns more per observation whether or not an exemplar is set (issue 18), and the crate
//! lets no other type hand exemplars to its encoder (`Exemplar`'s fields are crate-private).
//! This type keeps counts and exemplars under one mutex and encodes the counts through the
//! crate's histogram encoder; its exemplars travel to [`crate::export::encode`] in a marker
//! line written right after the series' buckets, which the encoder turns into OpenMetrics
//! exemplars (or drops, for text format 0.0.4). The marker never leaves the agent.

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{MetricType, TypedMetric},
};

/// Resolves 50 us (a fast local hit) to 1 s (a timeout in all but name).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Bucket lines per series: the bounds above and +Inf.
pub const BUCKET_LINES: usize = LATENCY_BUCKETS.len() + 1;

/// The label of the marker line that carries a series' exemplars from its `encode` to
/// [`crate::export::encode`]: `<name>_info{cacheprobe_exemplars="...",<series labels>} 1`.
pub const MARKER_LABEL: &str = "cacheprobe_exemplars";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    /// [`crate::model::request_id`].
    pub request_id: u64,
    /// The observed latency in seconds.
    pub value: f64,
}

/// A request offered as its bucket's exemplar, with its [`crate::model::exemplar_rank`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub request_id: u64,
    pub rank: u64,
}

/// One bucket's exemplar and whether a scrape has read it since it was set.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    exemplar: Exemplar,
    rank: u64,
    shown: bool,
}

/// Whether an offer of `rank` takes a bucket's slot: an empty one or one a scrape already read
/// (Prometheus keeps one exemplar per bucket per scrape, so each scrape interval gets its own
/// choice), else only by ranking higher. Both ends apply the same order to the same ids.
fn takes_slot(slot: Option<&Slot>, rank: u64) -> bool {
    slot.is_none_or(|slot| slot.shown || rank > slot.rank)
}

#[derive(Debug, Default)]
struct Inner {
    sum: f64,
    count: u64,
    /// Per bucket (not cumulative), +Inf last.
    buckets: [u64; BUCKET_LINES],
    /// Per bucket, the highest-ranked offer since the last scrape (see [`takes_slot`]).
    exemplars: [Option<Slot>; BUCKET_LINES],
}

#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<Mutex<Inner>>,
}

impl LatencyHistogram {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; a poisoned one still holds valid counts.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds one observation of `seconds`; `offer` (when given) becomes its bucket's exemplar if
    /// it takes the slot ([`takes_slot`]), under the same lock as the count.
    pub fn observe(&self, seconds: f64, offer: Option<Offer>) {
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let mut inner = self.lock();
        inner.sum += seconds;
        inner.count += 1;
        inner.buckets[bucket] += 1;
        if let Some(offer) = offer {
            let slot = &mut inner.exemplars[bucket];
            if takes_slot(slot.as_ref(), offer.rank) {
                *slot = Some(Slot {
                    exemplar: Exemplar {
                        request_id: offer.request_id,
                        value: seconds,
                    },
                    rank: offer.rank,
                    shown: false,
                });
            }
        }
    }

    /// The counts as the crate's encoder takes them, and the exemplars, which `mark_shown`
    /// marks as shown: the next offer in their bucket replaces them whatever its rank.
    fn snapshot(&self, mark_shown: bool) -> Snapshot {
        let mut inner = self.lock();
        let exemplars = inner.exemplars.map(|slot| slot.map(|slot| slot.exemplar));
        if mark_shown {
            for slot in inner.exemplars.iter_mut().flatten() {
                slot.shown = true;
            }
        }
        let buckets = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(inner.buckets)
            .collect();
        Snapshot {
            sum: inner.sum,
            count: inner.count,
            buckets,
            exemplars,
        }
    }
}

thread_local! {
    /// Whether the encode running on this thread shows exemplars (OpenMetrics, what Prometheus
    /// asks for). Only such a read marks them shown: an operator's `curl /metrics` gets text
    /// format without exemplars and must not make Prometheus' next scrape miss them.
    static SHOWING_EXEMPLARS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `encode` as a read that shows exemplars (`shows`) or not.
pub fn encoding_with_exemplars<T>(shows: bool, encode: impl FnOnce() -> T) -> T {
    let before = SHOWING_EXEMPLARS.replace(shows);
    let out = encode();
    SHOWING_EXEMPLARS.set(before);
    out
}

struct Snapshot {
    sum: f64,
    count: u64,
    /// (upper bound, count) per bucket, not cumulative, +Inf as `f64::MAX`.
    buckets: Vec<(f64, u64)>,
    exemplars: [Option<Exemplar>; BUCKET_LINES],
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

/// The marker's one label: `BUCKET_LINES` then `bucket:request id:value` per exemplar.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExemplarMarker {
    cacheprobe_exemplars: String,
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let Snapshot {
            sum,
            count,
            buckets,
            exemplars,
        } = self.snapshot(SHOWING_EXEMPLARS.get());
        encoder.encode_histogram::<()>(sum, count, &buckets, None)?;
        if exemplars.iter().all(Option::is_none) {
            return Ok(());
        }
        let mut marker = BUCKET_LINES.to_string();
        for (bucket, exemplar) in exemplars.iter().enumerate() {
            if let Some(exemplar) = exemplar {
                marker.push_str(&format!(
                    " {bucket}:{:016x}:{}",
                    exemplar.request_id, exemplar.value
                ));
            }
        }
        encoder.encode_info(&ExemplarMarker {
            cacheprobe_exemplars: marker,
        })
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One exemplar read back from a marker: which of the series' bucket lines, and the text that
/// follows that line's value (` # {request_id="..."} value`).
#[derive(Debug, PartialEq)]
pub struct MarkedExemplar {
    pub bucket: usize,
    pub suffix: String,
}

/// Parses a marker's label value; None when it is not one this version writes.
pub fn parse_marker(value: &str) -> Option<(usize, Vec<MarkedExemplar>)> {
    let mut fields = value.split(' ');
    let lines: usize = fields.next()?.parse().ok()?;
    let exemplars = fields
        .map(|field| {
            let mut parts = field.splitn(3, ':');
            let bucket: usize = parts.next()?.parse().ok()?;
            let id = parts.next()?;
            let value: f64 = parts.next()?.parse().ok()?;
            let valid =
                bucket < lines && id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
            valid.then(|| MarkedExemplar {
                bucket,
                suffix: format!(" # {{request_id=\"{id}\"}} {value}"),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((lines, exemplars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_with_their_exemplar() {
        let histogram = LatencyHistogram::default();
        let offer = |request_id| {
            Some(Offer {
                request_id,
                rank: 1,
            })
        };
        histogram.observe(0.00004, None);
        histogram.observe(0.03, offer(0xab));
        histogram.observe(0.04, None);
        histogram.observe(5.0, offer(0xcd));
        let Snapshot {
            sum,
            count,
            buckets,
            exemplars,
        } = histogram.snapshot(true);
        assert_eq!(count, 4);
        assert!((sum - 5.07004).abs() < 1e-9);
        assert_eq!(buckets.len(), BUCKET_LINES);
        assert_eq!(buckets[0], (0.00005, 1));
        assert_eq!(buckets[9], (0.05, 2));
        assert_eq!(buckets[BUCKET_LINES - 1], (f64::MAX, 1));
        // An observation without an id leaves the bucket's exemplar alone.
        assert_eq!(
            exemplars[9],
            Some(Exemplar {
                request_id: 0xab,
                value: 0.03
            })
        );
        assert_eq!(exemplars[BUCKET_LINES - 1].unwrap().request_id, 0xcd);
        assert_eq!(exemplars.iter().flatten().count(), 2);
    }

    /// The slot rule: an empty slot takes any offer; an unread one only a higher rank; once a
    /// scrape read it, the next offer whatever its rank.
    #[test]
    fn a_slot_keeps_the_highest_rank_until_a_scrape_reads_it() {
        let slot = |rank, shown| Slot {
            exemplar: Exemplar {
                request_id: 1,
                value: 0.1,
            },
            rank,
            shown,
        };
        assert!(takes_slot(None, 0));
        assert!(!takes_slot(Some(&slot(5, false)), 4));
        assert!(!takes_slot(Some(&slot(5, false)), 5));
        assert!(takes_slot(Some(&slot(5, false)), 6));
        assert!(takes_slot(Some(&slot(5, true)), 0));

        let histogram = LatencyHistogram::default();
        let offer = |request_id, rank| Some(Offer { request_id, rank });
        histogram.observe(0.0001, offer(1, 10));
        histogram.observe(0.0001, offer(2, 3));
        histogram.observe(0.0001, offer(3, 12));
        histogram.observe(0.0001, offer(4, 11));
        assert_eq!(histogram.snapshot(true).exemplars[1].unwrap().request_id, 3);
        // Read: the next, lower-ranked offer replaces it; unread, it stays shown.
        assert_eq!(histogram.snapshot(true).exemplars[1].unwrap().request_id, 3);
        histogram.observe(0.0001, offer(5, 1));
        assert_eq!(histogram.snapshot(true).exemplars[1].unwrap().request_id, 5);
    }

    /// The lossy-link case of issue 18, with real request ids. Three clients send requests that
    /// are all fast at the server (one shared bucket there); at client A some of them are slow
    /// (another bucket: a lost segment). Between two scrapes, whenever the server's exemplar is
    /// one of A's requests, A shows that same id, in whatever bucket it landed at A: the server
    /// ranked it first among everyone's requests, so A ranks it first among its own. The
    /// latest-per-bucket rule it replaces joined only when that request was also the last one.
    #[test]
    fn the_server_shows_the_id_its_client_shows_for_that_clients_request() {
        use crate::model::{exemplar_rank, flow_id, request_id};
        let server_addr = "10.0.0.2:11211".parse().unwrap();
        let flows: Vec<u64> = ["10.0.0.1:40000", "10.0.0.3:40001", "10.0.0.4:40002"]
            .iter()
            .map(|client| flow_id(client.parse().unwrap(), server_addr).unwrap())
            .collect();
        let (server, client_a) = (LatencyHistogram::default(), LatencyHistogram::default());
        let offer = |id| {
            Some(Offer {
                request_id: id,
                rank: exemplar_rank(id, 1),
            })
        };
        let (mut server_shows_a, mut slow_joined) = (0, 0);
        let mut seq = [1_000u32, 50_000, 900_000];
        for round in 0..300u32 {
            let mut a_ids = Vec::new();
            for i in 0..12u32 {
                let client = ((i + round) % 3) as usize;
                seq[client] = seq[client].wrapping_add(31);
                let id = request_id(flows[client], seq[client]);
                server.observe(0.00008, offer(id));
                if client == 0 {
                    // One of A's four requests a round met a lost segment: 210 ms at A.
                    let lost = a_ids.len() as u32 == round % 4;
                    a_ids.push(id);
                    client_a.observe(if lost { 0.21 } else { 0.0003 }, offer(id));
                }
            }
            let shown = server.snapshot(true).exemplars[1].unwrap().request_id;
            let at_a = client_a.snapshot(true).exemplars;
            if a_ids.contains(&shown) {
                server_shows_a += 1;
                let same = at_a.iter().flatten().any(|e| e.request_id == shown);
                assert!(same, "round {round}");
                // The 0.25 s bucket: slow at A, fast at the server.
                slow_joined += usize::from(at_a[11].is_some_and(|e| e.request_id == shown));
            }
        }
        assert!((60..=140).contains(&server_shows_a), "{server_shows_a}");
        assert!(slow_joined >= 10, "{slow_joined} of {server_shows_a}");
    }

    #[test]
    fn markers_round_trip_and_bad_ones_are_refused() {
        let (lines, exemplars) =
            parse_marker("15 9:00000000000000ab:0.03 14:00000000000000cd:5").unwrap();
        assert_eq!(lines, 15);
        assert_eq!(
            exemplars,
            vec![
                MarkedExemplar {
                    bucket: 9,
                    suffix: " # {request_id=\"00000000000000ab\"} 0.03".into()
                },
                MarkedExemplar {
                    bucket: 14,
                    suffix: " # {request_id=\"00000000000000cd\"} 5".into()
                },
            ]
        );
        for bad in [
            "",
            "x",
            "15 15:00000000000000ab:1",
            "15 1:ab:1",
            "15 1:0000000000000zab:1",
            "15 1:00000000000000ab:x",
        ] {
            assert_eq!(parse_marker(bad), None, "{bad}");
        }
    }
}
