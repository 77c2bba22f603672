//! cacheprobe: watches memcache/queue sockets from the kernel and explains what goes wrong
//! between hosts. The binary (`main.rs`) only parses arguments and calls `commands`.
pub mod clock;
pub mod commands;
pub mod config;
pub mod conn;
pub mod control;
pub mod diagnose;
pub mod export;
pub mod fleet;
pub mod history;
pub mod host;
pub mod ingest;
pub mod kernel;
pub mod keystats;
pub mod memcache;
pub mod model;
pub mod services;
pub mod top;
