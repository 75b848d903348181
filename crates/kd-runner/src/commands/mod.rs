//! One module per subcommand.
pub mod data;
pub mod main_job;
