//! One module per subcommand.
pub mod bench;
pub mod data;
pub mod eval;
pub mod list;
pub mod main_job;
pub mod report;
pub mod selfcheck;
pub mod suite;
pub mod train;
