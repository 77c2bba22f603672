pub mod loader;
pub mod offsets_bootstrap;
