pub mod btf;
pub mod capture;
pub mod events;
pub mod format;
pub mod loader;
pub mod offsets;
