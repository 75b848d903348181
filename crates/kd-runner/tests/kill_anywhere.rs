//! Kill-anywhere: a tiny training run is SIGKILLed at pseudo-random moments (checkpoint writes
//! slowed by the `KD_FAULT_CHECKPOINT_DELAY_MS` fault hook so that many kills land inside one),
//! then resumed; the final weights and metrics must equal an uninterrupted run's.
//!
//! CI tries `KD_KILL_POINTS` (default 4) points; `tools/kill_anywhere.sh` runs more, e.g.
//! `KD_KILL_POINTS=25 KD_KILL_SEED=7 KD_KILL_DELAY_MS=500`.
use std::path::Path;
use std::time::Instant;

mod common;
use common::{kd, write_cifar10};

/// Milliseconds slept inside each checkpoint write (`KD_KILL_DELAY_MS`, default 120).
fn delay_ms() -> String {
    std::env::var("KD_KILL_DELAY_MS").unwrap_or_else(|_| "120".into())
}

fn train(data: &Path, run: &Path) -> std::process::Command {
    let mut c = kd();
    c.args([
        "train",
        "--width",
        "4",
        "--stem",
        "cifar-maxpool",
        "--batch-size",
        "25",
        "--lr",
        "0.02",
        "--epochs",
        "3",
        "--warmup-epochs",
        "0",
        "--seed",
        "3",
        "--data-dir",
    ])
    .arg(data)
    .arg("--run-dir")
    .arg(run)
    .env("KD_FAULT_CHECKPOINT_DELAY_MS", delay_ms())
    .env("RUST_LOG", "error")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    c
}

fn resume(run: &Path) -> std::process::Output {
    kd().arg("train")
        .arg("--resume")
        .arg(run)
        .env("KD_FAULT_CHECKPOINT_DELAY_MS", delay_ms())
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

/// Every tensor of a safetensors file as raw little-endian f32 bytes, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["seconds", "images_per_sec", "teacher_seconds"] {
                v[k] = 0.into();
            }
            v
        })
        .collect()
}

/// Where the kill landed, judged from what it left on disk.
#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum Phase {
    BeforeFirstCheckpoint,
    InCheckpointWrite,
    BetweenCheckpoints,
    AfterFinish,
}

fn phase(run: &Path) -> Phase {
    if run.join("summary.json").exists() {
        return Phase::AfterFinish;
    }
    let folders: Vec<String> = std::fs::read_dir(run)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("checkpoint-"))
                .collect()
        })
        .unwrap_or_default();
    let latest = std::fs::read_to_string(run.join("checkpoint.latest"))
        .ok()
        .map(|s| s.trim().to_string());
    match latest {
        // A folder newer than the pointer is a checkpoint that was being written.
        Some(l) if folders.iter().any(|f| *f > l) => Phase::InCheckpointWrite,
        Some(_) => Phase::BetweenCheckpoints,
        None if !folders.is_empty() => Phase::InCheckpointWrite,
        None => Phase::BeforeFirstCheckpoint,
    }
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() {
    let points: usize = std::env::var("KD_KILL_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut seed: u64 = std::env::var("KD_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let reference = tmp.path().join("reference");
    let t = Instant::now();
    assert!(train(tmp.path(), &reference).status().unwrap().success());
    let full = t.elapsed();
    let (ref_weights, ref_metrics) = (
        tensors(&reference.join("model.safetensors")),
        metrics(&reference),
    );
    let mut seen = std::collections::HashMap::new();
    for i in 0..points {
        // xorshift: kill points spread over the reference run's duration.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = full.mul_f64(0.05 + 0.9 * (seed % 10_000) as f64 / 10_000.0);
        let run = tmp.path().join(format!("kill-{i}"));
        let mut child = train(tmp.path(), &run).spawn().unwrap();
        std::thread::sleep(at);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let p = phase(&run);
        *seen.entry(p).or_insert(0) += 1;
        match p {
            Phase::BeforeFirstCheckpoint | Phase::InCheckpointWrite
                if !run.join("checkpoint.latest").exists() =>
            {
                // Nothing finished to resume from: start again, as `suite` does.
                std::fs::remove_dir_all(&run).ok();
                assert!(train(tmp.path(), &run).status().unwrap().success());
            }
            Phase::AfterFinish => {}
            _ => {
                // The checkpoint the pointer names is complete and loadable.
                let ckpt = kd_train::latest_checkpoint(&run).unwrap();
                for f in ["weights.safetensors", "optimizer.safetensors"] {
                    kd_models::checkpoint::read_safetensors(
                        &ckpt.join(f),
                        &candle_core::Device::Cpu,
                    )
                    .unwrap_or_else(|e| panic!("kill {i} at {at:?} ({p:?}): {e}"));
                }
                let out = resume(&run);
                assert!(
                    out.status.success(),
                    "kill {i} at {at:?} ({p:?}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        assert!(
            tensors(&run.join("model.safetensors")) == ref_weights,
            "kill {i} at {at:?} ({p:?}): final weights differ"
        );
        assert_eq!(
            metrics(&run),
            ref_metrics,
            "kill {i} at {at:?} ({p:?}): metrics differ"
        );
        std::fs::remove_dir_all(&run).ok();
    }
    eprintln!("kill-anywhere: {points} kill points over a {full:?} run, all resumed identically; by phase: {seen:?}");
}
