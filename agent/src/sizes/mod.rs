//! Value-size and keys-per-request histograms: bucket bounds a person can map to memcached's
//! slab classes and the samples a request gives; [`slab`] turns the item sizes stored on a local memcached into its slab fit.

pub mod slab;

use prometheus_client::metrics::histogram::Histogram;

use crate::memcache::RequestObservation;

/// Upper bounds of `cacheprobe_memcache_value_size_bytes`. From 96 B on these are every second
/// chunk size of memcached 1.6's default slab classes (`-f 1.25 -n 48`: 96, 120, 152, 192, ...
/// 524288), so a bucket covers two default classes and a value's class is readable from its
/// `le` (an item also holds its key and about 60 bytes of header, see README). 16-64 B split
/// the small values memcached keeps in its first class; 1 MiB is memcached's default item
/// limit. 24 buckets in all.
pub const VALUE_SIZE_BUCKETS: &[f64] = &[
    16.0, 32.0, 64.0, 96.0, 152.0, 240.0, 384.0, 600.0, 944.0, 1480.0, 2320.0, 3632.0, 5680.0,
    8880.0, 13880.0, 21696.0, 33904.0, 52984.0, 82792.0, 129376.0, 202152.0, 315872.0, 524288.0,
    1048576.0,
];

/// Upper bounds of `cacheprobe_memcache_keys_per_request`: a single-key request, small batches
/// and the large multi-gets some clients build (pymemcache `get_many`, dalli `get_multi`).
pub const KEYS_PER_REQUEST_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

pub fn value_size_histogram() -> Histogram {
    Histogram::new(VALUE_SIZE_BUCKETS.iter().copied())
}

pub fn keys_per_request_histogram() -> Histogram {
    Histogram::new(KEYS_PER_REQUEST_BUCKETS.iter().copied())
}

/// Which size histogram a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SizeKind {
    Value,
    Keys,
}

/// What a request says about sizes: its value length (stores, and hits) and, once per request,
/// how many keys it named. Sizes are distributions, so they are not scaled by the capture
/// sample.
pub fn size_samples(request: &RequestObservation) -> [(SizeKind, Option<f64>); 2] {
    [
        (SizeKind::Value, request.value_len.map(f64::from)),
        (
            SizeKind::Keys,
            (request.keys_in_request > 0).then_some(f64::from(request.keys_in_request)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_buckets_are_every_second_default_slab_class() {
        let classes =
            crate::sizes::slab::chunk_sizes(&crate::sizes::slab::MemcachedSettings::default());
        let expected: Vec<f64> = classes.iter().step_by(2).map(|&c| c as f64).collect();
        let ours: Vec<f64> = VALUE_SIZE_BUCKETS
            .iter()
            .copied()
            .filter(|&b| (96.0..=524288.0).contains(&b))
            .collect();
        assert_eq!(ours, expected);
        assert!(VALUE_SIZE_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(VALUE_SIZE_BUCKETS.len() <= 24);
    }
}
