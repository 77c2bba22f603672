//! The kernel side seen from user space: BTF and field offsets, loading and attaching the
//! probes, parsing the records they write (socket events, payload captures) and reading their
//! counters.

pub mod btf;
pub mod capture;
pub mod events;
pub mod format;
pub mod loader;
pub mod offsets;
pub mod probes;
pub mod readings;
