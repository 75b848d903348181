//! `kd-runner data`: the quickest way to see that a data set loaded right.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use kd_data::{Dataset, DatasetSpec};

/// Arguments of `data`.
#[derive(Clone, Debug, clap::Args)]
pub struct DataArgs {
    /// cifar10, cifar100 or folder:PATH (PATH/{train,test}/<class>/*.png|jpg).
    #[arg(long, default_value = "cifar10")]
    pub dataset: DatasetSpec,
    /// Data root (default: $KD_DATA_DIR or ./data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Loads a data set, explaining how to get it when it is missing.
pub fn load(spec: &DatasetSpec, data_dir: &std::path::Path) -> anyhow::Result<Dataset> {
    let path = spec.path(data_dir);
    if !path.exists() {
        let hint = match spec {
            DatasetSpec::Cifar10 => "cifar10",
            DatasetSpec::Cifar100 => "cifar100",
            DatasetSpec::Folder(_) => {
                anyhow::bail!("image folder {} does not exist", path.display())
            }
        };
        anyhow::bail!(
            "{} not found. Fetch it with `cargo xtask fetch {hint}` (or `kd-runner fetch {hint}`); \
             offline, install a downloaded archive with `kd-runner fetch {hint} --from DIR`",
            path.display()
        );
    }
    spec.load(data_dir)
        .with_context(|| format!("loading {spec} from {}", path.display()))
}

/// Prints the summary.
pub fn run(args: &DataArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(kd_fetch::default_data_dir);
    let t = Instant::now();
    let ds = load(&args.dataset, &data_dir)?;
    let secs = t.elapsed().as_secs_f64();
    print_summary(&ds);
    println!("loaded in {secs:.2} s");
    Ok(())
}

/// Writes the per-split and per-class counts and the training split's channel statistics.
pub fn print_summary(ds: &Dataset) {
    let k = ds.num_classes();
    println!(
        "dataset {}: {} classes, images {}x{}",
        ds.name, k, ds.train.width, ds.train.height
    );
    println!(
        "train: {} images, test: {} images",
        ds.train.len(),
        ds.test.len()
    );
    let (tr, te) = (ds.train.class_counts(k), ds.test.class_counts(k));
    println!("{:>4}  {:<20} {:>7} {:>7}", "id", "class", "train", "test");
    for (i, name) in ds.classes.iter().enumerate() {
        println!("{:>4}  {:<20} {:>7} {:>7}", i, name, tr[i], te[i]);
    }
    if let Some(coarse) = &ds.coarse_classes {
        let (ctr, cte) = (
            ds.train.coarse_counts(coarse.len()),
            ds.test.coarse_counts(coarse.len()),
        );
        if let (Some(ctr), Some(cte)) = (ctr, cte) {
            println!("coarse labels:");
            println!(
                "{:>4}  {:<32} {:>7} {:>7}",
                "id", "superclass", "train", "test"
            );
            for (i, name) in coarse.iter().enumerate() {
                println!("{:>4}  {:<32} {:>7} {:>7}", i, name, ctr[i], cte[i]);
            }
        }
    }
    match ds.train.channel_stats() {
        Ok((m, s)) => {
            println!("train mean (R, G, B): {:.4} {:.4} {:.4}", m[0], m[1], m[2]);
            println!("train std  (R, G, B): {:.4} {:.4} {:.4}", s[0], s[1], s[2]);
        }
        Err(e) => println!("channel statistics unavailable: {e}"),
    }
}
