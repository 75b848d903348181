//! `--device cpu|cuda|cuda:N`, with the build hint a person needs when CUDA is not compiled in.
use anyhow::{bail, Context};
use candle_core::Device;

/// Opens the device named on the command line.
pub fn open(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let idx = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("--device {name}: expected cpu, cuda or cuda:N"))?,
                None => bail!("--device {name}: expected cpu, cuda or cuda:N"),
            };
            if !cfg!(feature = "cuda") {
                bail!("--device {name}: this kd-runner was built without CUDA; rebuild with `cargo build --release -p kd-runner --features cuda,cudnn`");
            }
            let device =
                Device::new_cuda(idx).with_context(|| format!("opening CUDA device {idx}"))?;
            // Freed activations stay in the pool from step to step instead of going back to
            // the OS at every synchronisation (`kd_kernels::device_memory`). A speed setting:
            // where the driver refuses it, the run goes on without it.
            if let Err(e) = kd_kernels::device_memory::retain_freed_memory(&device) {
                eprintln!(
                    "warning: CUDA device {idx}: could not make its memory pool keep freed memory ({e}); freed memory goes back to the driver at each synchronisation"
                );
            }
            // kd keeps to candle's one stream: the events cudarc makes per buffer go unused.
            kd_kernels::device_memory::skip_allocation_events(&device);
            Ok(device)
        }
    }
}
