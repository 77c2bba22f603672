//! cacheprobe: watches memcache/queue sockets from the kernel and explains what goes wrong
//! between hosts. The binary (`main.rs`) only parses arguments and calls `commands`.
pub mod capture;
pub mod capture_budget;
pub mod clock;
pub mod commands;
pub mod config;
pub mod control;
pub mod dead_writes;
pub mod diagnose;
pub mod events;
pub mod fd_arming;
pub mod fleet;
pub mod history;
pub mod http;
pub mod keys;
pub mod memcache;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod probes;
pub mod ring_view;
pub mod sampler;
pub mod sampling;
pub mod services;
pub mod top;
pub mod tracking;
