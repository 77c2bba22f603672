//! Builders for recorded query results in the fleet detectors' tests.

use std::collections::BTreeMap;

use super::prom::{parse_vector, Sample, Series};

/// A sample with these labels and value.
pub fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
    Sample {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        value,
    }
}

/// A series with these labels and points.
pub fn series(labels: &[(&str, &str)], points: &[(u64, f64)]) -> Series {
    Series {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        points: points.to_vec(),
    }
}

/// An instant-query answer body as Prometheus sends it.
pub fn recorded(body: &str) -> Vec<Sample> {
    parse_vector("http://recorded", "recorded", body)
        .expect("recorded answer parses")
        .data
}
