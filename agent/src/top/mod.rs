//! `cacheprobe top`'s view: the model built from the daemon's history and counters, the panes
//! and keys, and drawing (ratatui for the terminal, plain text for `--batch`).

pub mod counters;
pub mod model;
pub mod render;
pub mod tty;
pub mod view;

#[cfg(test)]
mod tests;
