//! From the kernel's rings to the consumers: the event pipeline and the budget that bounds payload decoding.

pub mod capture_budget;
pub mod pipeline;
