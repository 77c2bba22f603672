pub mod check;
pub mod diagnose;
pub mod run;
