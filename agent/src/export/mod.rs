//! What leaves the agent for Prometheus: the metric definitions and recorder, the host gauges, and the HTTP endpoint.

pub mod encode;
pub mod exemplar_budget;
pub mod host_metrics;
pub mod http;
pub mod latency;
pub mod metrics;
pub mod recorder;
