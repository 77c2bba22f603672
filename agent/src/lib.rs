//! cacheprobe: watches memcache/queue sockets from the kernel and explains what goes wrong
//! between hosts. The binary (`main.rs`) only parses arguments and calls `commands`.
pub mod clock;
pub mod commands;
pub mod config;
pub mod events;
pub mod http;
pub mod metrics;
pub mod probes;
pub mod sampler;
pub mod tracking;
