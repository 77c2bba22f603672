//! Where the pipeline's results go: the metrics recorder, the sinks that want every observation
//! (history for diagnose, tests), and the facts and reports written to history directly.

use std::sync::{Arc, Mutex};

use crate::{
    clock::unix_now,
    conn::tracking::Observation,
    export::{metrics::Metrics, recorder::ObservationRecorder},
    history::{Fact, History},
    memcache::decoders::MemcacheEvent,
};

/// Ring views change when pools connect or age out, minutes apart: no need to look every tick.
const RING_VIEW_INTERVAL_S: u64 = 10;

/// Something that wants every observation as it happens (history for diagnose, tests).
pub trait ObservationSink {
    fn observation(&mut self, observation: &Observation);
    fn memcache(&mut self, event: &MemcacheEvent, comm: Option<&str>);
}

pub struct Outputs {
    pub recorder: ObservationRecorder,
    sinks: Vec<Box<dyn ObservationSink + Send>>,
    history: Option<Arc<Mutex<History>>>,
    /// When `service_servers_info` was last re-published (unix seconds).
    ring_views_published_s: u64,
}

impl Outputs {
    pub fn new(recorder: ObservationRecorder) -> Self {
        Outputs {
            recorder,
            sinks: Vec::new(),
            history: None,
            ring_views_published_s: 0,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        self.recorder.metrics()
    }

    pub fn add_sink(&mut self, sink: Box<dyn ObservationSink + Send>) {
        self.sinks.push(sink);
    }

    pub fn set_history(&mut self, history: Arc<Mutex<History>>) {
        self.history = Some(history);
    }

    pub fn has_history(&self) -> bool {
        self.history.is_some()
    }

    /// Runs `write` on the history, if there is one and it can be locked.
    pub fn with_history(&self, write: impl FnOnce(&mut History)) {
        if let Some(history) = &self.history {
            if let Ok(mut history) = history.lock() {
                write(&mut history);
            }
        }
    }

    /// A fact that does not flow through observations (key splits, ...), stamped now.
    pub fn fact(&self, fact: Fact) {
        self.with_history(|history| history.record(unix_now(), fact));
    }

    /// One observation to the metrics and every sink.
    pub fn observation(&mut self, observation: &Observation) {
        self.recorder.record(observation);
        for sink in &mut self.sinks {
            sink.observation(observation);
        }
    }

    /// One decoded event to the sinks (the recorder has it from
    /// [`ObservationRecorder::record_memcache`], with its weight).
    pub fn memcache_to_sinks(&mut self, event: &MemcacheEvent, comm: Option<&str>) {
        for sink in &mut self.sinks {
            sink.memcache(event, comm);
        }
    }

    /// Whether the ring views are due for re-publishing at `now_s`; if so they are published
    /// now, and the caller publishes what goes with them (the slab fit).
    pub fn publish_ring_views_if_due(&mut self, now_s: u64) -> bool {
        if now_s < self.ring_views_published_s + RING_VIEW_INTERVAL_S {
            return false;
        }
        self.recorder.publish_ring_views(now_s);
        self.ring_views_published_s = now_s;
        true
    }
}
