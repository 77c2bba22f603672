pub mod check;
pub mod diagnose;
pub mod fleet;
pub mod record;
pub mod run;
pub mod top;
