//! The main job (`kd-runner` with no arguments): make sure CIFAR-10 is installed, fetching it if
//! missing, and show what was loaded. Training and the comparison report join it as the engine
//! and the distillation methods land.
use kd_data::DatasetSpec;
use kd_fetch::{fetch, Artifact, FetchOptions};

/// Runs the main job.
pub fn run() -> anyhow::Result<()> {
    let opts = FetchOptions::from_env(None);
    let done = fetch(Artifact::Cifar10, &opts)?;
    println!(
        "{}: {}",
        Artifact::Cifar10,
        if done.already {
            "already installed"
        } else {
            "installed"
        }
    );
    let ds = super::data::load(&DatasetSpec::Cifar10, &opts.data_dir)?;
    super::data::print_summary(&ds);
    Ok(())
}
