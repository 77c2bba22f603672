//! One module per subcommand (`run`, `check`, `diagnose`, `record`, `top`, `fleet`): each
//! wires the library together for its job; the work itself lives in the library modules.

pub mod check;
pub mod diagnose;
pub mod fleet;
pub mod record;
pub mod run;
pub mod top;
