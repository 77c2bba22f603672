//! cacheprobe: watches memcache/queue sockets from the kernel and explains what goes wrong
//! between hosts. The binary (`main.rs`) only wires these modules together.
pub mod config;
pub mod events;
pub mod tracking;
