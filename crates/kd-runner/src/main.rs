//! `kd-runner`: the kd command line.
//!
//! With no arguments it runs the main job; subcommands fetch data, inspect data sets and more.
// Doc comments here double as `--help` text, where `<name>` and `[:WIDTH]` are meant literally.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod commands;
mod config;
mod device;
mod experiment;
mod malloc;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kd-runner",
    version,
    about = "Knowledge-distillation workbench on candle",
    long_about = "Knowledge-distillation workbench on candle. With no command it runs the main job: the headline comparison on CIFAR-10 (pretrained ResNet50 teacher → ResNet18: baseline, offline KD, self KD, offline + self), fetching data and teacher if missing, at a scale that fits the device it finds, then prints the report."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download (or install from disk) CIFAR-10, CIFAR-100 and the pretrained teachers.
    Fetch(kd_fetch::cli::FetchArgs),
    /// Load a data set and print its images per split and class and its channel statistics.
    Data(commands::data::DataArgs),
    /// Test accuracy (top-1, top-5, per class) and throughput of saved weights.
    Eval(commands::eval::EvalArgs),
    /// Train one experiment (a TOML config, flags, --set overrides): baseline or any method; metrics, checkpoints, resume.
    Train(Box<commands::train::TrainArgs>),
    /// Run a suite of experiments (configs × variants × sweeps × seeds) one after another, resumable, then report.
    Suite(commands::suite::SuiteArgs),
    /// Compare finished runs: Markdown and CSV table, PNG and SVG plots.
    Report(commands::report::ReportArgs),
    /// List data sets, models, stems, methods, schedules and every config key.
    List,
    /// Images per second of a training step, inference and a KD step on synthetic batches.
    Bench(commands::bench::BenchArgs),
    /// Check every custom op and CUDA kernel on a device against the CPU path (forward, backward, each precision).
    Selfcheck(commands::selfcheck::SelfcheckArgs),
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: glibc then reuses the step's large blocks instead of faulting
    // them in anew (see malloc.rs; `KD_MALLOC=system` opts out).
    malloc::keep_freed_memory();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kd_fetch::cli::error_message(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().cmd {
        Some(Cmd::Fetch(args)) => args.run()?,
        Some(Cmd::Data(args)) => commands::data::run(&args)?,
        Some(Cmd::Eval(args)) => commands::eval::run(&args)?,
        Some(Cmd::Train(args)) => commands::train::run(&args)?,
        Some(Cmd::Suite(args)) => {
            commands::suite::run(&args)?;
        }
        Some(Cmd::Report(args)) => commands::report::run(&args)?,
        Some(Cmd::List) => commands::list::run()?,
        Some(Cmd::Bench(args)) => commands::bench::run(&args)?,
        Some(Cmd::Selfcheck(args)) => commands::selfcheck::run(&args)?,
        None => commands::main_job::run()?,
    }
    Ok(())
}
