//! One module per subcommand.
pub mod data;
pub mod eval;
pub mod main_job;
pub mod train;
