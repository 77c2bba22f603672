//! From the kernel's rings to the consumers: the merge of the two rings, the event pipeline
//! and the sides it composes (capture budget, keys, queues, kernel counters, outputs).

pub mod capture_budget;
pub mod kernel_stats;
pub mod keys;
pub mod merge;
pub mod outputs;
pub mod pipeline;
pub mod process_names;
pub mod queues;
