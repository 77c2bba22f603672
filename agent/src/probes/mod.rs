pub mod btf;
pub mod format;
pub mod loader;
pub mod offsets;
