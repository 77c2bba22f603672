//! The request latency histogram: bucket counts and one request-id exemplar slot per bucket behind one lock, so an exemplar costs no second lock.
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

#[derive(Debug, Default)]
struct Inner {
    sum: f64,
    count: u64,
    /// Per bucket (not cumulative), +Inf last.
    buckets: [u64; BUCKET_LINES],
    /// The latest exemplar per bucket: Prometheus keeps one per bucket per scrape anyway.
    exemplars: [Option<Exemplar>; BUCKET_LINES],
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

    /// Adds one observation of `seconds`; `request_id` (when given) becomes its bucket's
    /// exemplar, under the same lock as the count.
    pub fn observe(&self, seconds: f64, request_id: Option<u64>) {
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let mut inner = self.lock();
        inner.sum += seconds;
        inner.count += 1;
        inner.buckets[bucket] += 1;
        if let Some(request_id) = request_id {
            inner.exemplars[bucket] = Some(Exemplar {
                request_id,
                value: seconds,
            });
        }
    }

    /// The counts as the crate's encoder takes them, and the exemplars.
    fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
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
            exemplars: inner.exemplars,
        }
    }
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
        } = self.snapshot();
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
        histogram.observe(0.00004, None);
        histogram.observe(0.03, Some(0xab));
        histogram.observe(0.04, None);
        histogram.observe(5.0, Some(0xcd));
        let Snapshot {
            sum,
            count,
            buckets,
            exemplars,
        } = histogram.snapshot();
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
