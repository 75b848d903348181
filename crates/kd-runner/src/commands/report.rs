//! `kd-runner report RUNS…`: the comparison table of finished runs — per method (label): runs,
//! trainable parameters during training, deployable student parameters, teacher parameters,
//! training time, best and last test top-1 as mean ± std over seeds, Δ against the baseline and
//! a paired t-test against the baseline's runs of the same seeds ([`crate::stats`]) — as
//! Markdown and CSV, and three plots as PNG and SVG: test top-1 per epoch, accuracy against
//! training time, accuracy against trainable parameters.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kd_train::{Calibration, EpochMetrics, Summary};
use plotters::prelude::*;

use crate::experiment::RunInfo;
use crate::stats::{paired_t_test, PairedTest};

/// Arguments of `report`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// Run folders, or folders of run folders (a suite's output).
    #[arg(value_name = "RUNS", required = true)]
    pub runs: Vec<PathBuf>,
    /// Where report.md, report.csv and the plots go (default: the first RUNS folder if it is a suite's, else ./report).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// One finished run.
#[derive(Clone, Debug)]
pub struct RunRecord {
    /// Row label.
    pub label: String,
    /// Variant (empty if none).
    pub variant: String,
    /// `summary.json`.
    pub summary: Summary,
    /// `metrics.jsonl`.
    pub epochs: Vec<EpochMetrics>,
    /// Test images evaluated (0 if not recorded).
    pub test_images: usize,
    /// Epochs of the method's init phase (`init_metrics.jsonl`; 0 for one-stage methods).
    pub init_epochs: usize,
    /// Seed (from `run.json`, else the folder's `-s<seed>`), which pairs a run with the
    /// baseline's run of the same seed.
    pub seed: Option<u64>,
    /// The values a suite's sweeps gave it (`run.json`), in the sweeps' order.
    pub swept: Vec<crate::experiment::SweptValue>,
    /// Who taught it (`run.json`; empty without a teacher or in runs of older kd).
    pub teacher: Vec<crate::experiment::TeacherName>,
}

/// One row of the table: the runs of one label.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Label.
    pub label: String,
    /// Method.
    pub method: String,
    /// Variant.
    pub variant: String,
    /// Runs (seeds).
    pub runs: usize,
    /// Trainable parameters during training.
    pub trainable_params: usize,
    /// Deployable student parameters.
    pub deploy_params: usize,
    /// Frozen teacher parameters.
    pub teacher_params: usize,
    /// Multiply-accumulates of one test image through the deployed student (none in runs of
    /// older kd).
    pub deploy_macs: Option<u64>,
    /// Through the frozen teacher (none without one).
    pub teacher_macs: Option<u64>,
    /// Mean training time (s).
    pub train_seconds: f64,
    /// Of which teacher forward (s).
    pub teacher_seconds: f64,
    /// Epochs of each run.
    pub epochs: usize,
    /// Of which in a two-stage method's init phase, before `epochs` (0 for the others).
    pub init_epochs: usize,
    /// Mean seconds of that phase (part of `train_seconds`).
    pub init_seconds: f64,
    /// Test images each epoch was evaluated on (0 if not recorded).
    pub test_images: usize,
    /// Best top-1 mean and std (%).
    pub best: (f64, f64),
    /// Last top-1 mean and std (%).
    pub last: (f64, f64),
    /// Best-top-1 difference to the baseline's mean, in points.
    pub delta_best: Option<f64>,
    /// Last top-1 against the baseline's run of the same seed: paired t-test over the seeds
    /// both rows have (at least two, and not for the baseline itself).
    pub paired_last: Option<PairedTest>,
    /// Mean test top-1 per epoch.
    pub curve: Vec<f64>,
    /// Calibration and fidelity to the teacher at the last epoch.
    pub last_eval: LastEval,
    /// The peers an online method trained beside the student, by name (empty for the others).
    pub peers: Vec<PeerRow>,
    /// The most GPU memory any of the row's runs held at once (MiB; `None` for CPU runs).
    pub gpu_peak_mib: Option<f64>,
    /// The last epoch's confidence bins, summed over the runs that recorded them: the
    /// reliability diagram's data.
    pub calibration: Option<Calibration>,
    /// The values a suite's sweeps gave its runs, in the sweeps' order (none outside a sweep).
    pub swept: Vec<crate::experiment::SweptValue>,
    /// Who taught its runs ([`row_teacher`]; empty without a teacher).
    pub teacher: String,
    /// The values its method reports beside the losses, by name (empty for most methods).
    pub values: Vec<ValueRow>,
}

/// A value a method reports beside its losses (`values` in `metrics.jsonl`, not minimised:
/// CTKD's temperature, the branch methods' `kd_weight`, SwitOKD's share of steps its teacher
/// sat out), over the runs of a row.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueRow {
    /// Its name (`switokd_expert`).
    pub name: String,
    /// Its last epoch's mean, over the runs.
    pub last: Spread,
    /// Its mean over each run's epochs, over the runs.
    pub run: Spread,
}

/// Every value the runs report, by name: its last epoch's and its whole run's mean, each over
/// the runs that reported it.
fn value_rows(runs: &[&RunRecord]) -> Vec<ValueRow> {
    let names: std::collections::BTreeSet<&String> = runs
        .iter()
        .flat_map(|r| r.epochs.iter().flat_map(|e| e.values.keys()))
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let last = mean_std_present(
                runs.iter()
                    .map(|r| r.epochs.last().and_then(|e| e.values.get(name).copied())),
            )?;
            let run = mean_std_present(runs.iter().map(|r| {
                let v: Vec<f64> = r
                    .epochs
                    .iter()
                    .filter_map(|e| e.values.get(name).copied())
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            }))?;
            Some(ValueRow {
                name: name.clone(),
                last,
                run,
            })
        })
        .collect()
}

/// The teacher of a row's runs, as one name: each network's label, with `@seed` where its
/// seed is the same in every run and not each run's own (`baseline@0`, one network teaching
/// every seed) and without where it is each run's own (`baseline`, seed paired with seed);
/// networks joined by ` + `. Runs taught differently give each distinct name, joined by `, `.
pub fn row_teacher(runs: &[&RunRecord]) -> String {
    use crate::experiment::TeacherName;
    let Some(first) = runs.first() else {
        return String::new();
    };
    let same_labels = runs.iter().all(|r| {
        r.teacher.len() == first.teacher.len()
            && r.teacher
                .iter()
                .zip(&first.teacher)
                .all(|(a, b)| a.label == b.label)
    });
    if same_labels {
        return (0..first.teacher.len())
            .map(|i| {
                let label = &first.teacher[i].label;
                let own = runs.iter().all(|r| r.teacher[i].seed == r.seed);
                let constant = runs
                    .iter()
                    .all(|r| r.teacher[i].seed == first.teacher[i].seed);
                match first.teacher[i].seed {
                    Some(s) if !own && constant => format!("{label}@{s}"),
                    _ => label.clone(),
                }
            })
            .collect::<Vec<_>>()
            .join(" + ");
    }
    let mut distinct: Vec<String> = Vec::new();
    for r in runs {
        let name = TeacherName::render(&r.teacher, r.seed);
        if !name.is_empty() && !distinct.contains(&name) {
            distinct.push(name);
        }
    }
    distinct.join(", ")
}

/// A row's last-epoch calibration and fidelity, mean and std over the runs that recorded each
/// (runs written before kd recorded them have none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LastEval {
    /// Test cross-entropy (NLL, nats).
    pub nll: Option<Spread>,
    /// Expected calibration error (%).
    pub ece: Option<Spread>,
    /// The teacher's own test top-1 (%).
    pub teacher_top1: Option<Spread>,
    /// Top-1 agreement with the teacher (%).
    pub agreement: Option<Spread>,
    /// KL(teacher ‖ student) (nats).
    pub kl: Option<Spread>,
    /// Each auxiliary head's top-1 (%), shallowest first (empty without heads).
    pub head_top1: Vec<Spread>,
    /// The heads' ensemble with the final classifier: top-1 (%).
    pub head_ensemble: Option<Spread>,
    /// The online cohort's ensemble (the student and its peers): top-1 (%).
    pub cohort_ensemble: Option<Spread>,
}

impl LastEval {
    fn of(runs: &[&RunRecord]) -> Self {
        let stat =
            |f: &dyn Fn(&RunRecord) -> Option<f64>| mean_std_present(runs.iter().map(|r| f(r)));
        LastEval {
            nll: stat(&|r| r.epochs.last().map(|e| e.test_loss)),
            ece: stat(&|r| r.summary.last_ece),
            teacher_top1: stat(&|r| r.summary.teacher_top1),
            agreement: stat(&|r| r.summary.last_teacher_agreement),
            kl: stat(&|r| r.summary.last_teacher_kl),
            head_top1: (0..runs
                .iter()
                .map(|r| r.summary.last_head_top1.len())
                .max()
                .unwrap_or(0))
                .filter_map(|k| stat(&|r| r.summary.last_head_top1.get(k).copied()))
                .collect(),
            head_ensemble: stat(&|r| r.summary.last_head_ensemble_top1),
            cohort_ensemble: stat(&|r| r.summary.last_cohort_ensemble_top1),
        }
    }

    /// Whether the row has an exit or an ensemble beside its deployed classifier.
    fn has_exits(&self) -> bool {
        !self.head_top1.is_empty() || self.head_ensemble.is_some() || self.cohort_ensemble.is_some()
    }
}

/// A peer of an online method (DML), over the runs of its row.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerRow {
    /// The peer's name (`peer1`, …).
    pub name: String,
    /// Its architecture.
    pub model: String,
    /// Its parameters.
    pub params: usize,
    /// Best test top-1 mean and std (%).
    pub best: (f64, f64),
    /// Last test top-1 mean and std (%).
    pub last: (f64, f64),
    /// Last epoch's expected calibration error (%), over the runs that recorded it.
    pub ece: Option<Spread>,
    /// Last epoch's top-1 agreement with the student (%).
    pub agreement: Option<Spread>,
    /// Last epoch's KL(student ‖ peer) (nats).
    pub kl: Option<Spread>,
}

/// A sweep's rows by value ([`Report::sweep_grids_of`]).
struct SweepGrid<'a> {
    /// The swept key.
    key: &'a str,
    /// Its values, in the order of their values.
    values: Vec<&'a str>,
    /// Each line's name and its row at each value (none where that run was not made).
    lines: Vec<(String, Vec<Option<&'a Row>>)>,
}

/// The runs' last-epoch confidence bins added up (the seeds pooled); none if no run has them.
fn pooled_calibration(runs: &[&RunRecord]) -> Option<Calibration> {
    runs.iter()
        .filter_map(|r| r.summary.last_calibration.clone())
        .reduce(|mut sum, c| {
            sum.merge(&c);
            sum
        })
}

/// The peers of a row's runs, matched by name, in the first run's order.
fn peer_rows(runs: &[&RunRecord]) -> Vec<PeerRow> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .summary
        .peers
        .iter()
        .map(|p| {
            let of_runs: Vec<_> = runs
                .iter()
                .filter_map(|r| r.summary.peers.iter().find(|q| q.name == p.name))
                .collect();
            let stat = |f: fn(&kd_train::PeerSummary) -> f64| {
                mean_std(&of_runs.iter().map(|q| f(q)).collect::<Vec<_>>())
            };
            let stat_opt = |f: fn(&kd_train::PeerSummary) -> Option<f64>| {
                mean_std_present(of_runs.iter().map(|q| f(q)))
            };
            PeerRow {
                name: p.name.clone(),
                model: p.model.clone(),
                params: p.params,
                best: stat(|q| q.best_top1),
                last: stat(|q| q.last_top1),
                ece: stat_opt(|q| q.last_ece),
                agreement: stat_opt(|q| q.last_student_agreement),
                kl: stat_opt(|q| q.last_student_kl),
            }
        })
        .collect()
}

/// The report.
#[derive(Clone, Debug)]
pub struct Report {
    /// Rows in order: baselines first, then by label.
    pub rows: Vec<Row>,
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, std)
}

/// Mean and sample std of the values present (runs of older kd lack the newer figures); none
/// without any.
fn mean_std_present(values: impl Iterator<Item = Option<f64>>) -> Option<Spread> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| {
        let (mean, std) = mean_std(&v);
        Spread {
            mean,
            std,
            n: v.len(),
        }
    })
}

/// Mean and sample std of a figure over the runs of a row that recorded it, and how many did
/// (fewer than the row's runs where some were written by an older kd).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one value).
    pub std: f64,
    /// Values it was computed from.
    pub n: usize,
}

fn read_run(dir: &Path) -> anyhow::Result<RunRecord> {
    let sp = dir.join("summary.json");
    let summary: Summary = serde_json::from_str(
        &std::fs::read_to_string(&sp).with_context(|| format!("reading {}", sp.display()))?,
    )
    .with_context(|| format!("{} is not a kd summary", sp.display()))?;
    let mp = dir.join("metrics.jsonl");
    let epochs = kd_train::read_metrics(&mp)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let folder_seed = name
        .rsplit_once("-s")
        .and_then(|(l, s)| Some((l, s.parse::<u64>().ok()?)));
    // Runs of an early kd have no run.json; one that is there must parse.
    let rp = dir.join("run.json");
    let parsed = match std::fs::read_to_string(&rp) {
        Ok(t) => Some(
            serde_json::from_str::<RunInfo>(&t)
                .with_context(|| format!("{} is not a kd run.json", rp.display()))?,
        ),
        Err(_) => None,
    };
    let (info, seed): (RunInfo, Option<u64>) = match parsed {
        Some(i) => {
            let seed = i.seed;
            (i, Some(seed))
        }
        None => {
            // Runs made without a run.json label: the folder name without its -s<seed>.
            let label = folder_seed.map_or(name.clone(), |(l, _)| l.to_string());
            let info = RunInfo {
                label,
                ..Default::default()
            };
            (info, folder_seed.map(|(_, s)| s))
        }
    };
    // A two-stage method's init phase: one row per epoch.
    let init_epochs = std::fs::read_to_string(dir.join("init_metrics.jsonl"))
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0);
    Ok(RunRecord {
        init_epochs,
        label: info.label,
        variant: info.variant,
        summary,
        epochs,
        test_images: info.test_images,
        seed,
        swept: info.swept,
        teacher: info.teacher,
    })
}

/// Finds the finished runs under `paths` and builds the table.
pub fn build(paths: &[PathBuf]) -> anyhow::Result<Report> {
    let mut runs = Vec::new();
    for p in paths {
        if !p.is_dir() {
            bail!("{} is not a folder", p.display());
        }
        if p.join("summary.json").exists() {
            runs.push(read_run(p)?);
            continue;
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("listing {}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|d| d.is_dir())
            .collect();
        subs.sort();
        for d in subs {
            if d.join("summary.json").exists() {
                runs.push(read_run(&d)?);
            } else if d.join("metrics.jsonl").exists() {
                tracing::warn!("{}: not finished, left out of the report", d.display());
            }
        }
    }
    if runs.is_empty() {
        bail!(
            "no finished run (a folder with summary.json) under {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(table(&runs))
}

/// Groups runs by label into rows.
pub fn table(runs: &[RunRecord]) -> Report {
    let mut groups: BTreeMap<&str, Vec<&RunRecord>> = BTreeMap::new();
    for r in runs {
        groups.entry(&r.label).or_default().push(r);
    }
    let mut rows: Vec<Row> = groups
        .into_values()
        .map(|g| {
            let first = g[0];
            let best: Vec<f64> = g.iter().map(|r| r.summary.best_top1).collect();
            let last: Vec<f64> = g.iter().map(|r| r.summary.last_top1).collect();
            let n_epochs = g.iter().map(|r| r.epochs.len()).min().unwrap_or(0);
            let curve = (0..n_epochs)
                .map(|e| mean_std(&g.iter().map(|r| r.epochs[e].test_top1).collect::<Vec<_>>()).0)
                .collect();
            Row {
                label: first.label.clone(),
                method: first.summary.method.clone(),
                variant: first.variant.clone(),
                runs: g.len(),
                trainable_params: first.summary.trainable_params,
                deploy_params: first.summary.deploy_params,
                teacher_params: first.summary.teacher_params,
                deploy_macs: first.summary.deploy_macs,
                teacher_macs: first.summary.teacher_macs,
                train_seconds: mean_std(
                    &g.iter()
                        .map(|r| r.summary.train_seconds)
                        .collect::<Vec<_>>(),
                )
                .0,
                teacher_seconds: mean_std(
                    &g.iter()
                        .map(|r| r.summary.teacher_seconds)
                        .collect::<Vec<_>>(),
                )
                .0,
                epochs: n_epochs,
                init_epochs: g.iter().map(|r| r.init_epochs).min().unwrap_or(0),
                init_seconds: mean_std(
                    &g.iter().map(|r| r.summary.init_seconds).collect::<Vec<_>>(),
                )
                .0,
                test_images: g.iter().map(|r| r.test_images).min().unwrap_or(0),
                best: mean_std(&best),
                last: mean_std(&last),
                delta_best: None,
                paired_last: None,
                curve,
                last_eval: LastEval::of(&g),
                peers: peer_rows(&g),
                gpu_peak_mib: g
                    .iter()
                    .filter_map(|r| r.summary.gpu_peak_mib)
                    .reduce(f64::max),
                calibration: pooled_calibration(&g),
                swept: first.swept.clone(),
                teacher: row_teacher(&g),
                values: value_rows(&g),
            }
        })
        .collect();
    // Δ against the baseline (method none) of the same variant, else any baseline; the paired
    // test over the seeds both have.
    let last_by_seed = |label: &str| -> BTreeMap<u64, f64> {
        runs.iter()
            .filter(|r| r.label == label)
            .filter_map(|r| Some((r.seed?, r.summary.last_top1)))
            .collect()
    };
    let baselines: Vec<(String, f64, BTreeMap<u64, f64>)> = rows
        .iter()
        .filter(|r| r.method == "none")
        .map(|r| (r.variant.clone(), r.best.0, last_by_seed(&r.label)))
        .collect();
    for r in &mut rows {
        // The baseline of the row's variant, or of the variant a sweep extended
        // (`subset10-noaug` for `subset10-noaug-temperature4`): the longest that matches, the
        // first by name among equals; else the first baseline.
        let base = baselines
            .iter()
            .rev()
            .filter(|(v, ..)| {
                v.is_empty() || *v == r.variant || r.variant.starts_with(&format!("{v}-"))
            })
            .max_by_key(|(v, ..)| v.len())
            .or(baselines.first());
        r.delta_best = base.map(|(_, b, _)| r.best.0 - b);
        if r.method != "none" {
            if let Some((.., base_last)) = base {
                let (ours, theirs): (Vec<f64>, Vec<f64>) = last_by_seed(&r.label)
                    .into_iter()
                    .filter_map(|(seed, v)| Some((v, *base_last.get(&seed)?)))
                    .unzip();
                r.paired_last = paired_t_test(&ours, &theirs);
            }
        }
    }
    rows.sort_by(|a, b| {
        natural_cmp(&a.variant, &b.variant)
            .then((a.method != "none").cmp(&(b.method != "none")))
            .then_with(|| natural_cmp(&a.label, &b.label))
    });
    Report { rows }
}

/// Orders names with numbers by the numbers' values, as a sweep's runs are read
/// (`temperature2` before `temperature16`, `subset0.05` before `subset0.1`): a number (digits,
/// and a fraction after a point) compares by value, everything else character by character.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    /// The number at the start of `s`: its integer digits without leading zeros, its fraction's
    /// digits, and its length in `s`.
    fn number(s: &str) -> (&str, &str, usize) {
        let digits = |t: &str| t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let int = digits(s);
        let frac = match s[int..].strip_prefix('.') {
            Some(rest) => digits(rest),
            None => 0,
        };
        let (fraction, len) = if frac > 0 {
            (&s[int + 1..int + 1 + frac], int + 1 + frac)
        } else {
            ("", int)
        };
        (s[..int].trim_start_matches('0'), fraction, len)
    }
    let (mut a, mut b) = (a, b);
    loop {
        let (Some(ca), Some(cb)) = (a.chars().next(), b.chars().next()) else {
            return a.len().cmp(&b.len());
        };
        if ca.is_ascii_digit() && cb.is_ascii_digit() {
            let ((ia, fa, na), (ib, fb, nb)) = (number(a), number(b));
            // Integer parts by length, then digits; fractions digit by digit (0.05 < 0.1).
            let by_value = ia
                .len()
                .cmp(&ib.len())
                .then_with(|| ia.cmp(ib))
                .then_with(|| fa.cmp(fb));
            if by_value != Ordering::Equal {
                return by_value;
            }
            (a, b) = (&a[na..], &b[nb..]);
        } else {
            if ca != cb {
                return ca.cmp(&cb);
            }
            (a, b) = (&a[ca.len_utf8()..], &b[cb.len_utf8()..]);
        }
    }
}

fn pm(v: (f64, f64), runs: usize) -> String {
    pm_digits(v, runs, 2)
}

/// `mean ± std` with `digits` decimals (the mean alone for one run).
fn pm_digits(v: (f64, f64), runs: usize, digits: usize) -> String {
    if runs > 1 {
        format!("{:.digits$} ± {:.digits$}", v.0, v.1)
    } else {
        format!("{:.digits$}", v.0)
    }
}

/// [`pm_digits`] of a figure some runs may lack: `–` where none has it, ± only where two or
/// more runs have it.
fn pm_opt(v: Option<Spread>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |v| pm_digits((v.mean, v.std), v.n, digits))
}

/// `p = …` to two significant digits, `p < 0.001` below that.
fn p_value(p: f64) -> String {
    match p {
        p if p < 0.001 => "p < 0.001".into(),
        p if p < 0.01 => format!("p = {p:.4}"),
        p if p < 0.1 => format!("p = {p:.3}"),
        p => format!("p = {p:.2}"),
    }
}

/// `mean,std` CSV cells of a figure some runs may lack (two empty cells where none has it).
/// A free-text CSV cell: quoted (quotes doubled) when it holds a comma, a quote or a line break.
fn csv_text(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// The sweeps' values of a row as one cell: `key=value`, space-separated; a value holding a
/// space, a quote, a backslash or a comma is written as a TOML basic string (`key="a b"`), so
/// that every value survives and the cell splits back unambiguously.
fn swept_cell(swept: &[crate::experiment::SweptValue]) -> String {
    swept
        .iter()
        .map(|v| {
            let plain = !v.value.is_empty()
                && !v.value.contains(|c: char| {
                    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | ',')
                });
            if !plain {
                format!("{}={}", v.key, toml_basic_string(&v.value))
            } else {
                format!("{}={}", v.key, v.value)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `v` as a TOML basic string: quoted, with `"`, `\` and control characters escaped.
fn toml_basic_string(v: &str) -> String {
    let mut s = String::from('"');
    for c in v.chars() {
        match c {
            '"' => s += "\\\"",
            '\\' => s += "\\\\",
            '\n' => s += "\\n",
            '\t' => s += "\\t",
            '\r' => s += "\\r",
            c if c.is_control() => s += &format!("\\u{:04X}", c as u32),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

fn csv_pair(v: Option<Spread>, digits: usize) -> String {
    v.map_or_else(
        || ",".into(),
        |v| format!("{:.digits$},{:.digits$}", v.mean, v.std),
    )
}

/// Multiply-accumulates in G (from 0.1 G) or M: "0.56 G", "35.05 M".
pub(crate) fn macs(m: u64) -> String {
    match m as f64 {
        g if g >= 1e8 => format!("{:.2} G", g / 1e9),
        m => format!("{:.2} M", m / 1e6),
    }
}

/// Thousands separated by commas.
pub(crate) fn count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Report {
    /// The Markdown table.
    pub fn markdown(&self) -> String {
        // The memory column only where some run was on a GPU.
        let gpu = self.rows.iter().any(|r| r.gpu_peak_mib.is_some());
        let mut s = String::from("| method | runs | epochs | test images | trainable params | deployed params | teacher params | deployed MACs / image | teacher MACs / image | train time (s) | of which teacher (s) | best top-1 (%) | last top-1 (%) | Δ best vs baseline | Δ last vs baseline, same seeds (p) |");
        s += if gpu {
            " peak GPU memory (MiB) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        } else {
            "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        };
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} |{}\n",
                r.label,
                r.runs,
                if r.init_epochs > 0 {
                    format!("{} + {} init", r.epochs, r.init_epochs)
                } else {
                    r.epochs.to_string()
                },
                if r.test_images == 0 {
                    "–".into()
                } else {
                    count(r.test_images)
                },
                count(r.trainable_params),
                count(r.deploy_params),
                if r.teacher_params == 0 {
                    "–".into()
                } else {
                    count(r.teacher_params)
                },
                r.deploy_macs.map_or_else(|| "–".into(), macs),
                r.teacher_macs.map_or_else(|| "–".into(), macs),
                r.train_seconds,
                r.teacher_seconds,
                pm(r.best, r.runs),
                pm(r.last, r.runs),
                match r.delta_best {
                    Some(d) if r.method == "none" => format!("{d:+.2} (baseline)"),
                    Some(d) => format!("{d:+.2}"),
                    None => "–".into(),
                },
                match r.paired_last {
                    Some(p) => format!("{:+.2} ({}, {} seeds)", p.mean, p_value(p.p), p.n),
                    None => "–".into(),
                },
                match (gpu, r.gpu_peak_mib) {
                    (false, _) => String::new(),
                    (true, Some(m)) => format!(" {} |", count(m.round() as usize)),
                    (true, None) => " – |".into(),
                }
            );
        }
        s += &self.sweep_grids();
        s += &self.method_kinds();
        if self.rows.iter().any(|r| r.last_eval.ece.is_some()) {
            s += "\nCalibration and fidelity to the teacher on the test split, last epoch (NLL and KL in nats); the teacher by its run's label (`@seed` when one run taught every seed, `+` between an ensemble's members) or its architecture:\n\n| method | test NLL | ECE (%) | teacher | teacher top-1 (%) | agreement with teacher (%) | KL(teacher ‖ student) |\n|---|---|---|---|---|---|---|\n";
            for r in &self.rows {
                let e = &r.last_eval;
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} |\n",
                    r.label,
                    pm_opt(e.nll, 4),
                    pm_opt(e.ece, 2),
                    if r.teacher.is_empty() {
                        "–"
                    } else {
                        &r.teacher
                    },
                    pm_opt(e.teacher_top1, 2),
                    pm_opt(e.agreement, 2),
                    pm_opt(e.kl, 4)
                );
            }
        }
        if self.rows.iter().any(|r| r.last_eval.has_exits()) {
            s += "\nExits and ensembles beside the deployed classifier (not deployed), test top-1 (%) at the last epoch: each auxiliary head, shallowest first (BYOT), or each extra branch (ONE, CL-ILR, OKDDip); their ensemble with the final classifier; an online cohort's ensemble (the student and its peers). An ensemble averages its members' softmax, except ONE's, which its gate weighs (ONE-E):\n\n| method | heads or branches | with the final classifier | student + peers |\n|---|---|---|---|\n";
            for r in self.rows.iter().filter(|r| r.last_eval.has_exits()) {
                let e = &r.last_eval;
                let heads: Vec<String> = e.head_top1.iter().map(|h| pm_opt(Some(*h), 2)).collect();
                s += &format!(
                    "| {} | {} | {} | {} |\n",
                    r.label,
                    if heads.is_empty() {
                        "–".into()
                    } else {
                        heads.join(" / ")
                    },
                    pm_opt(e.head_ensemble, 2),
                    pm_opt(e.cohort_ensemble, 2)
                );
            }
        }
        if self.rows.iter().any(|r| !r.peers.is_empty()) {
            s += "\nPeers trained beside the student (online methods; not deployed), last epoch's calibration and agreement with the student on the test split:\n\n| method | peer | model | params | best top-1 (%) | last top-1 (%) | ECE (%) | agreement with student (%) | KL(student ‖ peer) |\n|---|---|---|---|---|---|---|---|---|\n";
            for r in &self.rows {
                for p in &r.peers {
                    s += &format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                        r.label,
                        p.name,
                        p.model,
                        count(p.params),
                        pm(p.best, r.runs),
                        pm(p.last, r.runs),
                        pm_opt(p.ece, 2),
                        pm_opt(p.agreement, 2),
                        pm_opt(p.kl, 4)
                    );
                }
            }
        }
        if self.rows.iter().any(|r| !r.values.is_empty()) {
            s += "\nValues the methods report beside their losses (`values` in metrics.jsonl, not minimised), at the last epoch and averaged over the run's epochs; SwitOKD's `switokd_expert` over the run is the share of its steps the teacher sat out:\n\n| method | value | last epoch | over the run |\n|---|---|---|---|\n";
            for r in &self.rows {
                for v in &r.values {
                    s += &format!(
                        "| {} | {} | {} | {} |\n",
                        r.label,
                        v.name,
                        pm_opt(Some(v.last), 4),
                        pm_opt(Some(v.run), 4)
                    );
                }
            }
        }
        s
    }

    /// Each sweep's grid ([`Report::sweep_grids_of`]) as a Markdown table, its values as
    /// columns, the last top-1 in the cells. Empty without sweeps.
    fn sweep_grids(&self) -> String {
        let mut s = String::new();
        for g in self.sweep_grids_of() {
            s += &format!(
                "\nThe sweep of `{}`, last top-1 (%) by value:\n\n| run | {} |\n|---|{}\n",
                g.key,
                g.values
                    .iter()
                    .map(|v| format!("{} = {v}", g.key))
                    .collect::<Vec<_>>()
                    .join(" | "),
                "---|".repeat(g.values.len())
            );
            for (line, cells) in &g.lines {
                let row: Vec<String> = cells
                    .iter()
                    .map(|c| c.map_or_else(|| "–".into(), |r| pm(r.last, r.runs)))
                    .collect();
                s += &format!("| {line} | {} |\n", row.join(" | "));
            }
        }
        s
    }

    /// The rows each first sweep varied, as grids: one per swept key, its values in the order
    /// of their values, and on each line the rows that differ only in that value (named by
    /// their label without it: `kd-temperature4-alpha0.9` on line `kd-alpha0.9`).
    fn sweep_grids_of(&self) -> Vec<SweepGrid<'_>> {
        // Key → line name → (value, row), in order of appearance.
        type Line<'a> = (String, Vec<(&'a str, &'a Row)>);
        let mut found: Vec<(&str, Vec<Line>)> = Vec::new();
        for r in &self.rows {
            let Some(first) = r.swept.first() else {
                continue;
            };
            let part = format!("-{}", first.name);
            let line = match r.label.match_indices(&part).find(|(i, _)| {
                let rest = &r.label[i + part.len()..];
                rest.is_empty() || rest.starts_with('-')
            }) {
                Some((i, _)) => format!("{}{}", &r.label[..i], &r.label[i + part.len()..]),
                None => r.label.clone(),
            };
            let grid = match found.iter_mut().find(|(k, _)| *k == first.key) {
                Some((_, g)) => g,
                None => {
                    found.push((&first.key, Vec::new()));
                    &mut found.last_mut().expect("pushed").1
                }
            };
            match grid.iter_mut().find(|(l, _)| *l == line) {
                Some((_, cells)) => cells.push((&first.value, r)),
                None => grid.push((line, vec![(&first.value, r)])),
            }
        }
        found
            .into_iter()
            .map(|(key, lines)| {
                let mut values: Vec<&str> = lines
                    .iter()
                    .flat_map(|(_, cells)| cells.iter().map(|(v, _)| *v))
                    .collect();
                values.sort_by(|a, b| natural_cmp(a, b));
                values.dedup();
                let lines = lines
                    .into_iter()
                    .map(|(line, cells)| {
                        let row = values
                            .iter()
                            .map(|v| cells.iter().find(|(c, _)| c == v).map(|(_, r)| *r))
                            .collect();
                        (line, row)
                    })
                    .collect();
                SweepGrid { key, values, lines }
            })
            .collect()
    }

    /// Each method in the report once, with the rows that ran it, its scheme and knowledge
    /// (offline, online or self; response, feature or relation) and what it is, as
    /// `kd-runner list` describes it: what a reader needs to compare the rows by kind.
    fn method_kinds(&self) -> String {
        let mut methods: Vec<(&str, Vec<&str>)> = Vec::new();
        for r in &self.rows {
            match methods.iter_mut().find(|(m, _)| *m == r.method) {
                Some((_, labels)) => labels.push(&r.label),
                None => methods.push((&r.method, vec![&r.label])),
            }
        }
        if methods.is_empty() {
            return String::new();
        }
        let mut s = String::from("\nWhat each method is (`kd-runner list`): the scheme (offline, online or self) and the knowledge it transfers (response, feature or relation):\n\n| method | rows | scheme, knowledge | what it is |\n|---|---|---|---|\n");
        for (method, labels) in methods {
            let (kind, what) = super::list::describe(method)
                .split_once(": ")
                .unwrap_or(("–", "–"));
            s += &format!("| {method} | {} | {kind} | {what} |\n", labels.join(", "));
        }
        s
    }

    /// The CSV table.
    pub fn csv(&self) -> String {
        let mut s = String::from("label,method,variant,runs,epochs,init_epochs,test_images,trainable_params,deploy_params,teacher_params,deploy_macs,teacher_macs,train_seconds,teacher_seconds,init_seconds,best_top1_mean,best_top1_std,last_top1_mean,last_top1_std,test_nll_mean,test_nll_std,ece_mean,ece_std,teacher_top1_mean,teacher_agreement_mean,teacher_agreement_std,teacher_kl_mean,teacher_kl_std,head_top1_means,head_ensemble_top1_mean,head_ensemble_top1_std,cohort_ensemble_top1_mean,cohort_ensemble_top1_std,delta_best,paired_seeds,paired_delta_last,paired_t,paired_p,gpu_peak_mib,swept,teacher,values_last\n");
        for r in &self.rows {
            s += &format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                r.label,
                r.method,
                r.variant,
                r.runs,
                r.epochs,
                r.init_epochs,
                r.test_images,
                r.trainable_params,
                r.deploy_params,
                r.teacher_params,
                r.deploy_macs.map(|m| m.to_string()).unwrap_or_default(),
                r.teacher_macs.map(|m| m.to_string()).unwrap_or_default(),
                r.train_seconds,
                r.teacher_seconds,
                r.init_seconds,
                r.best.0,
                r.best.1,
                r.last.0,
                r.last.1,
                csv_pair(r.last_eval.nll, 6),
                csv_pair(r.last_eval.ece, 4),
                r.last_eval
                    .teacher_top1
                    .map(|v| format!("{:.4}", v.mean))
                    .unwrap_or_default(),
                csv_pair(r.last_eval.agreement, 4),
                csv_pair(r.last_eval.kl, 6),
                // One cell, the heads' means shallowest first, space-separated.
                r.last_eval
                    .head_top1
                    .iter()
                    .map(|h| format!("{:.4}", h.mean))
                    .collect::<Vec<_>>()
                    .join(" "),
                csv_pair(r.last_eval.head_ensemble, 4),
                csv_pair(r.last_eval.cohort_ensemble, 4),
                r.delta_best.map(|d| format!("{d:.4}")).unwrap_or_default(),
                match r.paired_last {
                    Some(p) => format!("{},{:.4},{:.4},{:.6}", p.n, p.mean, p.t, p.p),
                    None => ",,,".into(),
                },
                r.gpu_peak_mib.map(|m| format!("{m:.1}")).unwrap_or_default(),
                csv_text(&swept_cell(&r.swept)),
                csv_text(&r.teacher),
                // One cell, each value's last-epoch mean as `name=mean`, space-separated.
                r.values
                    .iter()
                    .map(|v| format!("{}={:.6}", v.name, v.last.mean))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        s
    }

    /// The reliability diagram's data as CSV, one line per (row, non-empty bin): the bin's
    /// confidence range, images, mean confidence and accuracy (%), the seeds pooled; none
    /// without confidence bins.
    pub fn reliability_csv(&self) -> Option<String> {
        let mut s = String::from(
            "label,method,variant,bin,confidence_low,confidence_high,images,mean_confidence,accuracy\n",
        );
        let width = 100.0 / Calibration::BINS as f64;
        let mut any = false;
        for r in &self.rows {
            let Some(cal) = &r.calibration else { continue };
            any = true;
            for (k, b) in cal.bins.iter().enumerate().filter(|(_, b)| b.count > 0) {
                s += &format!(
                    "{},{},{},{k},{:.4},{:.4},{},{:.4},{:.4}\n",
                    r.label,
                    r.method,
                    r.variant,
                    k as f64 * width,
                    (k + 1) as f64 * width,
                    b.count,
                    b.mean_confidence_pct(),
                    b.accuracy_pct()
                );
            }
        }
        any.then_some(s)
    }

    /// The peers' table as CSV, one line per (row, peer); none without online methods.
    pub fn peers_csv(&self) -> Option<String> {
        if self.rows.iter().all(|r| r.peers.is_empty()) {
            return None;
        }
        let mut s = String::from("label,method,variant,runs,peer,model,params,best_top1_mean,best_top1_std,last_top1_mean,last_top1_std,ece_mean,ece_std,student_agreement_mean,student_agreement_std,student_kl_mean,student_kl_std\n");
        for r in &self.rows {
            for p in &r.peers {
                s += &format!(
                    "{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{},{},{}\n",
                    r.label,
                    r.method,
                    r.variant,
                    r.runs,
                    p.name,
                    p.model,
                    p.params,
                    p.best.0,
                    p.best.1,
                    p.last.0,
                    p.last.1,
                    csv_pair(p.ece, 4),
                    csv_pair(p.agreement, 4),
                    csv_pair(p.kl, 6)
                );
            }
        }
        Some(s)
    }
}

/// Removes `path`, a file an earlier report wrote that this one has no data for; absent is fine.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the stale {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Writes report.md, report.csv (report_peers.csv with online methods, report_reliability.csv
/// with confidence bins) and the plots (PNG and SVG) into `out`; each file under a
/// temporary name first, then renamed.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let mut tables = vec![
        ("report.md", report.markdown()),
        ("report.csv", report.csv()),
    ];
    match report.peers_csv() {
        Some(peers) => tables.push(("report_peers.csv", peers)),
        // A peers' table from an earlier report over other runs would describe none of these.
        None => remove_stale(&out.join("report_peers.csv"))?,
    }
    match report.reliability_csv() {
        Some(bins) => tables.push(("report_reliability.csv", bins)),
        None => remove_stale(&out.join("report_reliability.csv"))?,
    }
    for (name, text) in tables {
        let p = out.join(name);
        kd_models::write_atomic(&p, text.as_bytes())?;
        written.push(p);
    }
    register_font();
    let mut plots = vec![Plot::PerEpoch, Plot::VsTime, Plot::VsParams];
    // The reliability diagram where some run recorded its confidence bins; else none, not an
    // earlier report's.
    if report.rows.iter().any(|r| r.calibration.is_some()) {
        plots.push(Plot::Reliability);
    } else {
        for ext in ["png", "svg"] {
            remove_stale(&out.join(format!("{}.{ext}", Plot::Reliability.file())))?;
        }
    }
    // The first sweep's values against accuracy, where a suite swept a key.
    // A row with sweep values makes a grid ([`Report::sweep_grids_of`]).
    if report.rows.iter().all(|r| r.swept.is_empty()) {
        for ext in ["png", "svg"] {
            remove_stale(&out.join(format!("{}.{ext}", Plot::Sweep.file())))?;
        }
    } else {
        plots.push(Plot::Sweep);
    }
    for plot in plots {
        for ext in ["png", "svg"] {
            let p = out.join(format!("{}.{ext}", plot.file()));
            let tmp = out.join(format!(".{}.part.{ext}", plot.file()));
            let res = if ext == "png" {
                draw(
                    report,
                    plot,
                    BitMapBackend::new(&tmp, (960, 600)).into_drawing_area(),
                )
            } else {
                draw(
                    report,
                    plot,
                    SVGBackend::new(&tmp, (960, 600)).into_drawing_area(),
                )
            };
            res.with_context(|| format!("drawing {}", p.display()))?;
            std::fs::rename(&tmp, &p)
                .with_context(|| format!("renaming {} to {}", tmp.display(), p.display()))?;
            written.push(p);
        }
    }
    Ok(written)
}

/// The charts.
#[derive(Clone, Copy, Debug)]
enum Plot {
    PerEpoch,
    VsTime,
    VsParams,
    Reliability,
    Sweep,
}

impl Plot {
    fn file(self) -> &'static str {
        match self {
            Plot::PerEpoch => "accuracy_per_epoch",
            Plot::VsTime => "accuracy_vs_time",
            Plot::VsParams => "accuracy_vs_params",
            Plot::Reliability => "reliability",
            Plot::Sweep => "accuracy_vs_sweep",
        }
    }
}

/// The bundled DejaVu Sans, so charts need no system font library.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/DejaVuSans.ttf"),
        );
    });
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(
    report: &Report,
    plot: Plot,
    root: DrawingArea<DB, plotters::coord::Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    draw_inner(report, plot, &root).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// The padded range of the finite values of `v`; 0–100 (the whole accuracy axis) when there
/// are none, as for runs without per-epoch rows: an infinite range never finishes drawing.
fn span(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let finite = v.filter(|x| x.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    if lo > hi {
        return (0.0, 100.0);
    }
    let pad = ((hi - lo) * 0.1).max(0.5);
    (lo - pad, hi + pad)
}

/// A chart with f64 axes.
type Chart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Every plot's frame: its caption, margins and label areas, axes over `x` and `y`.
fn cartesian<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Chart<'a, DB>, DrawingAreaErrorKind<DB::ErrorType>> {
    ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x, y)
}

/// One labelled line through `points` (x, y, marker radius), a filled marker at each, and its
/// legend entry.
fn draw_line<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    label: String,
    color: RGBAColor,
    points: &[(f64, f64, i32)],
) -> DrawResult<DB> {
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|&(x, y, _)| (x, y)),
            color.stroke_width(2),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y, r)| Circle::new((x, y), r, color.filled())),
    )?;
    Ok(())
}

/// The lines' legend at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    position: SeriesLabelPosition,
) -> DrawResult<DB> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(position)
        .draw()
}

fn draw_inner<DB: DrawingBackend>(
    report: &Report,
    plot: Plot,
    root: &DrawingArea<DB, plotters::coord::Shift>,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let rows = &report.rows;
    let color = |i: usize| Palette99::pick(i).to_rgba();
    match plot {
        Plot::PerEpoch => {
            let max_epoch = rows.iter().map(|r| r.curve.len()).max().unwrap_or(1).max(1);
            let (lo, hi) = span(rows.iter().flat_map(|r| r.curve.iter().copied()));
            let mut chart = cartesian(
                root,
                "Test top-1 per epoch (mean over seeds)",
                1f64..(max_epoch as f64).max(1.5),
                lo.max(0.0)..hi.min(100.0),
            )?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc("test top-1 (%)")
                .x_labels(max_epoch.min(12))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, r) in rows.iter().enumerate() {
                let pts: Vec<(f64, f64, i32)> = r
                    .curve
                    .iter()
                    .enumerate()
                    .map(|(e, &a)| (e as f64 + 1.0, a, 3))
                    .collect();
                draw_line(&mut chart, r.label.clone(), color(i), &pts)?;
            }
            draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        }
        Plot::Reliability => {
            let mut chart = cartesian(
                root,
                "Reliability on the test split, last epoch (seeds pooled, 15 bins; larger markers hold more images)",
                0f64..100f64,
                0f64..100f64,
            )?;
            chart
                .configure_mesh()
                .x_desc("mean top-1 confidence in the bin (%)")
                .y_desc("top-1 accuracy in the bin (%)")
                .label_style(("sans-serif", 14))
                .draw()?;
            // Perfect calibration.
            chart.draw_series(LineSeries::new(
                [(0.0, 0.0), (100.0, 100.0)],
                BLACK.mix(0.4).stroke_width(1),
            ))?;
            for (i, r) in rows.iter().enumerate() {
                let Some(cal) = &r.calibration else { continue };
                let total = cal.total().max(1) as f64;
                // Each non-empty bin at (confidence, accuracy); a marker's area follows its
                // bin's share of the images, so a bin of a few images (a noisy accuracy) stays
                // small.
                let pts: Vec<(f64, f64, i32)> = cal
                    .bins
                    .iter()
                    .filter(|b| b.count > 0)
                    .map(|b| {
                        let share = b.count as f64 / total;
                        let radius = (2.0 + 12.0 * share.sqrt()) as i32;
                        (b.mean_confidence_pct(), b.accuracy_pct(), radius)
                    })
                    .collect();
                let label = format!("{} (pooled ECE {:.2}%)", r.label, cal.ece_pct());
                draw_line(&mut chart, label, color(i), &pts)?;
            }
            draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        Plot::Sweep => {
            let grids = report.sweep_grids_of();
            let Some(g) = grids.first() else {
                return Ok(());
            };
            let n = g.values.len();
            let baseline = rows.iter().find(|r| r.method == "none");
            let (lo, hi) = span(
                g.lines
                    .iter()
                    .flat_map(|(_, cells)| cells.iter().flatten())
                    .flat_map(|r| [r.last.0 - r.last.1, r.last.0 + r.last.1])
                    .chain(baseline.map(|b| b.last.0)),
            );
            let mut chart = cartesian(
                root,
                &format!(
                    "Last test top-1 against {} (mean over seeds, ± 1 std)",
                    g.key
                ),
                -0.5..(n as f64 - 0.5),
                lo.max(0.0)..hi.min(100.0),
            )?;
            // The values as categories, one tick each, whatever their spacing.
            let tick = |x: &f64| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                    g.values[i as usize].to_string()
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .x_desc(g.key)
                .y_desc("last test top-1 (%)")
                .x_labels(n + 1)
                .x_label_formatter(&tick)
                .label_style(("sans-serif", 14))
                .draw()?;
            if let Some(b) = baseline {
                let gray = BLACK.mix(0.6);
                chart
                    .draw_series(LineSeries::new(
                        [(-0.5, b.last.0), (n as f64 - 0.5, b.last.0)],
                        gray.stroke_width(3),
                    ))?
                    .label(format!("{} ({:.2}%)", b.label, b.last.0))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], gray.stroke_width(3))
                    });
            }
            for (i, (line, cells)) in g.lines.iter().enumerate() {
                let c = color(i);
                let pts: Vec<(f64, f64, i32)> = cells
                    .iter()
                    .enumerate()
                    .filter_map(|(k, r)| r.map(|r| (k as f64, r.last.0, 4)))
                    .collect();
                for (k, r) in cells.iter().enumerate() {
                    let Some(r) = r.filter(|r| r.runs > 1) else {
                        continue;
                    };
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![
                            (k as f64, r.last.0 - r.last.1),
                            (k as f64, r.last.0 + r.last.1),
                        ],
                        c.stroke_width(2),
                    )))?;
                }
                draw_line(&mut chart, line.clone(), c, &pts)?;
            }
            draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        }
        Plot::VsTime | Plot::VsParams => {
            let (title, xdesc) = match plot {
                Plot::VsTime => ("Best test top-1 against training time", "training time (s)"),
                _ => (
                    "Best test top-1 against trainable parameters",
                    "trainable parameters during training (millions)",
                ),
            };
            let x_of = |r: &Row| match plot {
                Plot::VsTime => r.train_seconds,
                _ => r.trainable_params as f64 / 1e6,
            };
            let (xlo, xhi) = {
                let lo = rows.iter().map(x_of).fold(f64::INFINITY, f64::min);
                let hi = rows.iter().map(x_of).fold(f64::NEG_INFINITY, f64::max);
                let pad = ((hi - lo) * 0.15).max(hi.abs() * 0.05).max(1e-3);
                ((lo - pad).max(0.0), hi + pad)
            };
            let (lo, hi) = span(
                rows.iter()
                    .flat_map(|r| [r.best.0 - r.best.1, r.best.0 + r.best.1]),
            );
            let mut chart = cartesian(root, title, xlo..xhi, lo.max(0.0)..hi.min(100.0))?;
            chart
                .configure_mesh()
                .x_desc(xdesc)
                .y_desc("best test top-1 (%)")
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, r) in rows.iter().enumerate() {
                let c = color(i);
                let p = (x_of(r), r.best.0);
                if r.runs > 1 {
                    // ± one standard deviation over seeds.
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(p.0, r.best.0 - r.best.1), (p.0, r.best.0 + r.best.1)],
                        c.stroke_width(2),
                    )))?;
                }
                let marker = EmptyElement::at(p)
                    + Circle::new((0, 0), 6, c.filled())
                    + Text::new(
                        r.label.clone(),
                        (9, -18),
                        ("sans-serif", 15).into_font().color(&BLACK),
                    );
                chart.draw_series(std::iter::once(marker))?;
            }
        }
    }
    Ok(())
}

/// Runs `report`.
pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let report = build(&args.runs)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let first = &args.runs[0];
        if args.runs.len() == 1 && !first.join("summary.json").exists() {
            first.clone()
        } else {
            PathBuf::from("report")
        }
    });
    let files = write(&report, &out)?;
    println!("{}", report.markdown());
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, method: &str, seed: Option<u64>, last: f64) -> RunRecord {
        RunRecord {
            label: label.into(),
            variant: String::new(),
            summary: Summary {
                trainable_params: 10,
                deploy_params: 10,
                deploy_macs: None,
                best_top1: last,
                best_epoch: 1,
                last_top1: last,
                last_ece: None,
                last_calibration: None,
                teacher_top1: None,
                teacher_ece: None,
                last_teacher_agreement: None,
                last_teacher_kl: None,
                last_head_top1: Vec::new(),
                last_head_ensemble_top1: None,
                last_cohort_ensemble_top1: None,
                train_seconds: 1.0,
                teacher_seconds: 0.0,
                init_seconds: 0.0,
                teacher_params: 0,
                teacher_macs: None,
                method: method.into(),
                peers: Vec::new(),
                gpu_peak_mib: None,
            },
            epochs: Vec::new(),
            test_images: 100,
            init_epochs: 0,
            seed,
            swept: Vec::new(),
            teacher: Vec::new(),
        }
    }

    /// A run of a temperature × α sweep, as the suite names it.
    fn swept(t: &str, alpha: &str, seed: u64, last: f64) -> RunRecord {
        let value = |key: &str, name: &str, value: &str| crate::experiment::SweptValue {
            key: key.into(),
            value: value.into(),
            name: format!("{name}{value}"),
        };
        let mut r = run(
            &format!("kd-temperature{t}-alpha{alpha}"),
            "kd",
            Some(seed),
            last,
        );
        r.variant = format!("temperature{t}-alpha{alpha}");
        r.swept = vec![
            value("method.temperature", "temperature", t),
            value("method.alpha", "alpha", alpha),
        ];
        r
    }

    /// The first sweep's values become columns, in the order of their values; the runs that
    /// differ only in it share a line, named without it; a pair never run is a dash.
    #[test]
    fn a_sweep_gets_a_grid_of_its_values() {
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            swept("16", "0.9", 0, 52.0),
            swept("4", "0.9", 0, 54.0),
            swept("4", "0.9", 1, 56.0),
            swept("4", "0.5", 0, 51.0),
            swept("1", "0.5", 0, 53.0),
        ]);
        let md = report.markdown();
        assert!(md.contains("The sweep of `method.temperature`"), "{md}");
        assert!(
            md.contains("| run | method.temperature = 1 | method.temperature = 4 | method.temperature = 16 |"),
            "{md}"
        );
        assert!(md.contains("| kd-alpha0.5 | 53.00 | 51.00 | – |"), "{md}");
        assert!(
            md.contains("| kd-alpha0.9 | – | 55.00 ± 1.41 | 52.00 |"),
            "{md}"
        );
        let plain = table(&[run("kd", "kd", Some(0), 50.0)]);
        assert!(!plain.markdown().contains("The sweep"));
        // Its chart is drawn, and a report without sweeps removes an earlier one.
        let out = tempfile::tempdir().unwrap();
        let chart = out.path().join("accuracy_vs_sweep.png");
        assert!(write(&report, out.path()).unwrap().contains(&chart));
        assert!(std::fs::metadata(&chart).unwrap().len() > 0);
        write(&plain, out.path()).unwrap();
        assert!(!chart.exists() && !out.path().join("accuracy_vs_sweep.svg").exists());
        // report.csv names each row's swept values.
        let csv = report.csv();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let col = header.iter().position(|h| *h == "swept").unwrap();
        let line = csv
            .lines()
            .find(|l| l.starts_with("kd-temperature16-alpha0.9,"))
            .unwrap();
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len());
        assert_eq!(cells[col], "method.temperature=16 method.alpha=0.9");
        // Every other cell stays under its own header.
        let at = |name: &str| cells[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!(
            (at("variant"), at("runs"), at("last_top1_mean")),
            ("temperature16-alpha0.9", "1", "52.0000")
        );
    }

    /// Each method is described once, with every row that ran it, its scheme and knowledge
    /// taken from `kd-runner list`'s line.
    #[test]
    fn each_method_is_described_once_with_its_kind() {
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            run("kd", "kd", Some(0), 51.0),
            run("self-kd", "kd", Some(0), 49.0),
            run("dml", "dml", Some(0), 52.0),
        ]);
        let md = report.markdown();
        assert!(
            md.contains("| method | rows | scheme, knowledge | what it is |"),
            "{md}"
        );
        assert!(
            md.contains("| kd | kd, self-kd | offline, response | Hinton et al. 2015"),
            "{md}"
        );
        assert!(
            md.contains("| dml | dml | online, response | Deep Mutual Learning"),
            "{md}"
        );
        assert!(
            md.contains("| none | baseline | baseline | cross-entropy only"),
            "{md}"
        );
        assert_eq!(md.matches("| kd | kd, self-kd |").count(), 1, "{md}");
    }

    /// Every swept value reaches report.csv, however it is spelled: plain values as they are,
    /// the others as TOML strings that parse back to the value.
    #[test]
    fn the_swept_cell_keeps_every_value() {
        let value = |key: &str, value: &str| crate::experiment::SweptValue {
            key: key.into(),
            value: value.into(),
            name: String::new(),
        };
        let tricky = [
            "runs/my t1",
            "[1, 2]",
            "say \"hi\"",
            "back\\slash",
            "tab\there",
            "",
        ];
        let mut values = vec![value("method.temperature", "4")];
        values.extend(
            tricky
                .iter()
                .enumerate()
                .map(|(i, v)| value(&format!("k{i}"), v)),
        );
        let cell = swept_cell(&values);
        assert!(
            cell.starts_with("method.temperature=4 k0=\"runs/my t1\" "),
            "{cell}"
        );
        // Each quoted value parses back, as TOML, to the value swept.
        for (i, v) in tricky.iter().enumerate() {
            let at = cell.find(&format!(" k{i}=")).unwrap() + format!(" k{i}=").len();
            let quoted = toml_basic_string(v);
            assert_eq!(&cell[at..at + quoted.len()], quoted);
            let parsed: toml::Table = toml::from_str(&format!("v = {quoted}")).unwrap();
            assert_eq!(parsed["v"].as_str(), Some(*v));
        }
        // In the CSV the cell is one field: quoted, its own quotes doubled.
        let mut r = swept("4", "0.9", 0, 50.0);
        r.swept = values;
        let csv = table(&[r]).csv();
        let expected = format!("\"{}\"", cell.replace('"', "\"\""));
        assert!(csv.lines().nth(1).unwrap().contains(&expected), "{csv}");
    }

    /// An epoch of `metrics.jsonl` whose method reported `values`.
    fn epoch_with(epoch: usize, values: &[(&str, f64)]) -> EpochMetrics {
        let values: BTreeMap<&str, f64> = values.iter().copied().collect();
        serde_json::from_value(serde_json::json!({
            "epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0,
            "test_top1": 50.0, "test_top5": 90.0, "seconds": 1.0, "images_per_sec": 100.0,
            "teacher_seconds": 0.0, "losses": {"loss_ce": 1.0}, "values": values,
        }))
        .unwrap()
    }

    /// The values a method reports get a table of their own, at the last epoch and over the
    /// run, each over the seeds that reported it; report.csv names the last epoch's.
    #[test]
    fn reported_values_get_a_table_of_their_own() {
        let switokd = |seed, shares: [f64; 2]| {
            let mut r = run("switokd", "switokd", Some(seed), 50.0);
            r.epochs = shares
                .iter()
                .enumerate()
                .map(|(e, share)| epoch_with(e + 1, &[("switokd_expert", *share)]))
                .collect();
            r
        };
        // Seed 0: 0.1 then 0.3 of the steps paused (0.2 over the run); seed 1: 0.2 then 0.5.
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            switokd(0, [0.1, 0.3]),
            switokd(1, [0.2, 0.5]),
        ]);
        let md = report.markdown();
        assert!(md.contains("Values the methods report"), "{md}");
        // Last epoch: 0.3 and 0.5 (mean 0.4, std 0.1414); over the run: 0.2 and 0.35.
        assert!(
            md.contains("| switokd | switokd_expert | 0.4000 ± 0.1414 | 0.2750 ± 0.1061 |"),
            "{md}"
        );
        let csv = report.csv();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let line = csv.lines().find(|l| l.starts_with("switokd,")).unwrap();
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len());
        assert_eq!(cells[header.len() - 1], "switokd_expert=0.400000");
        let plain = table(&[run("kd", "kd", Some(0), 50.0)]);
        assert!(!plain.markdown().contains("Values the methods report"));
    }

    #[test]
    fn online_peers_get_a_table_of_their_own() {
        let with_peer = |seed, last, peer_last| {
            let mut r = run("dml", "dml", Some(seed), last);
            r.summary.peers.push(kd_train::PeerSummary {
                name: "peer1".into(),
                model: "resnet18".into(),
                params: 2_797_610,
                best_top1: peer_last + 1.0,
                last_top1: peer_last,
                last_ece: Some(peer_last / 20.0),
                last_student_agreement: Some(peer_last + 30.0),
                // A run of older kd has none: the other's alone counts, with no spread.
                last_student_kl: (seed == 0).then_some(0.125),
            });
            r
        };
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            with_peer(0, 49.0, 56.0),
            with_peer(1, 51.0, 58.0),
        ]);
        let md = report.markdown();
        assert!(md.contains("Peers trained beside the student"), "{md}");
        assert!(
            md.contains("| dml | peer1 | resnet18 | 2,797,610 | 58.00 ± 1.41 | 57.00 ± 1.41 | 2.85 ± 0.07 | 87.00 ± 1.41 | 0.1250 |"),
            "{md}"
        );
        let csv = report.peers_csv().unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2, "{csv}");
        assert_eq!(
            lines[1],
            "dml,dml,,2,peer1,resnet18,2797610,58.0000,1.4142,57.0000,1.4142,2.8500,0.0707,87.0000,1.4142,0.125000,0.000000"
        );
        assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
        // Without online methods there is no peer table, and a report written over an older
        // one leaves no peers' CSV behind.
        let plain = table(&[run("baseline", "none", Some(0), 50.0)]);
        assert!(!plain.markdown().contains("Peers"));
        assert_eq!(plain.peers_csv(), None);
        let out = tempfile::tempdir().unwrap();
        write(&report, out.path()).unwrap();
        let peers_csv = out.path().join("report_peers.csv");
        assert_eq!(std::fs::read_to_string(&peers_csv).unwrap(), csv);
        write(&plain, out.path()).unwrap();
        assert!(!peers_csv.exists());
    }

    #[test]
    fn names_with_numbers_sort_by_value() {
        let mut v = [
            "kd-temperature16",
            "kd-temperature4",
            "kd-temperature1-alpha0.9",
            "kd-temperature1-alpha0.5",
            "baseline",
            "kd-temperature2.5",
            "kd-temperature02",
            "kd-subset0.5",
            "kd-subset0.05",
            "kd-subset0.25",
            "kd-subset0.1",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "baseline",
                "kd-subset0.05",
                "kd-subset0.1",
                "kd-subset0.25",
                "kd-subset0.5",
                "kd-temperature1-alpha0.5",
                "kd-temperature1-alpha0.9",
                "kd-temperature02",
                "kd-temperature2.5",
                "kd-temperature4",
                "kd-temperature16",
            ]
        );
        assert_eq!(natural_cmp("a", "a"), std::cmp::Ordering::Equal);
        assert_eq!(natural_cmp("a", "ab"), std::cmp::Ordering::Less);
    }

    /// BYOT's heads and their ensemble, and DML's cohort ensemble, get one table, each row
    /// over the runs that recorded the figure; the CSV has them in named columns.
    #[test]
    fn exits_and_ensembles_get_a_table_of_their_own() {
        let byot = |seed, base: f64| {
            let mut r = run("byot", "byot", Some(seed), base);
            r.summary.last_head_top1 = vec![base - 20.0, base - 10.0, base - 2.0];
            r.summary.last_head_ensemble_top1 = Some(base + 1.0);
            r
        };
        let dml = |seed, ensemble| {
            let mut r = run("dml", "dml", Some(seed), 50.0);
            r.summary.last_cohort_ensemble_top1 = ensemble;
            r
        };
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            byot(0, 60.0),
            byot(1, 62.0),
            // A run of older kd has no ensemble: the other's alone counts.
            dml(0, Some(55.5)),
            dml(1, None),
        ]);
        let md = report.markdown();
        assert!(md.contains("Exits and ensembles"), "{md}");
        assert!(
            md.contains("| byot | 41.00 ± 1.41 / 51.00 ± 1.41 / 59.00 ± 1.41 | 62.00 ± 1.41 | – |"),
            "{md}"
        );
        assert!(md.contains("| dml | – | – | 55.50 |"), "{md}");
        assert!(!md.contains("| baseline | –"), "{md}");
        let csv = report.csv();
        let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
        let col = |name: &str| lines[0].iter().position(|h| *h == name).unwrap();
        let byot_line = lines.iter().find(|l| l[0] == "byot").unwrap();
        assert_eq!(byot_line[col("head_top1_means")], "41.0000 51.0000 59.0000");
        assert_eq!(byot_line[col("head_ensemble_top1_mean")], "62.0000");
        assert_eq!(byot_line[col("cohort_ensemble_top1_mean")], "");
        let dml_line = lines.iter().find(|l| l[0] == "dml").unwrap();
        assert_eq!(dml_line[col("cohort_ensemble_top1_mean")], "55.5000");
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{csv}");
        let plain = table(&[run("baseline", "none", Some(0), 50.0)]);
        assert!(!plain.markdown().contains("Exits"));
    }

    #[test]
    fn calibration_and_fidelity_get_a_table_of_their_own() {
        let with = |seed, ece, agreement| {
            let mut r = run("kd", "kd", Some(seed), 50.0);
            r.summary.last_ece = Some(ece);
            r.summary.teacher_top1 = Some(60.0);
            r.summary.last_teacher_agreement = Some(agreement);
            r.summary.last_teacher_kl = Some(0.25);
            r.teacher = vec![crate::experiment::TeacherName {
                label: "resnet50".into(),
                seed: None,
            }];
            r
        };
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            with(0, 3.0, 70.0),
            with(1, 5.0, 72.0),
        ]);
        let md = report.markdown();
        assert!(md.contains("Calibration and fidelity"), "{md}");
        // Mean ± sample std over the two seeds; runs without a figure show "–".
        assert!(
            md.contains(
                "| kd | – | 4.00 ± 1.41 | resnet50 | 60.00 ± 0.00 | 71.00 ± 1.41 | 0.2500 ± 0.0000 |"
            ),
            "{md}"
        );
        assert!(md.contains("| baseline | – | – | – | – | – | – |"), "{md}");
        let csv = report.csv();
        let kd_line = csv.lines().find(|l| l.starts_with("kd,")).unwrap();
        assert!(
            kd_line.contains(",,,4.0000,1.4142,60.0000,71.0000,1.4142,0.250000,0.000000,"),
            "{kd_line}"
        );
        assert!(kd_line.ends_with(",resnet50,"), "{kd_line}");
        // A row whose runs had different teachers names each, once, in a quoted CSV cell.
        let mut other = with(2, 4.0, 71.0);
        other.teacher = vec![crate::experiment::TeacherName {
            label: "baseline".into(),
            seed: Some(0),
        }];
        let mixed = table(&[with(0, 3.0, 70.0), with(1, 5.0, 72.0), other]);
        assert_eq!(mixed.rows[0].teacher, "resnet50, baseline@0");
        assert!(
            mixed
                .csv()
                .lines()
                .nth(1)
                .unwrap()
                .ends_with(",\"resnet50, baseline@0\","),
            "{}",
            mixed.csv()
        );
        // Runs that recorded none of it (older kd): no such table.
        let plain = table(&[run("baseline", "none", Some(0), 50.0)]).markdown();
        assert!(!plain.contains("Calibration"), "{plain}");
    }

    /// A row names its teacher once: a run of each student's own seed without `@`, one network
    /// that teaches every seed with its seed, an ensemble of seeds member by member.
    #[test]
    fn a_rows_teacher_is_named_once_for_its_seeds() {
        use crate::experiment::TeacherName;
        let taught = |seed: u64, teachers: &[(&str, Option<u64>)]| {
            let mut r = run("s", "kd", Some(seed), 50.0);
            r.teacher = teachers
                .iter()
                .map(|(l, s)| TeacherName {
                    label: (*l).into(),
                    seed: *s,
                })
                .collect();
            r
        };
        let name = |runs: &[RunRecord]| row_teacher(&runs.iter().collect::<Vec<_>>());
        let seeds = 0..3u64;
        let ban: Vec<RunRecord> = seeds
            .clone()
            .map(|s| taught(s, &[("baseline", Some(s))]))
            .collect();
        assert_eq!(name(&ban), "baseline");
        let one: Vec<RunRecord> = seeds
            .clone()
            .map(|s| taught(s, &[("teacher-r50", Some(0))]))
            .collect();
        assert_eq!(name(&one), "teacher-r50@0");
        let members = [
            ("baseline", Some(0)),
            ("baseline", Some(1)),
            ("baseline", Some(2)),
        ];
        let ens: Vec<RunRecord> = seeds.map(|s| taught(s, &members)).collect();
        assert_eq!(name(&ens), "baseline@0 + baseline@1 + baseline@2");
        assert_eq!(name(&ens[1..2]), "baseline@0 + baseline + baseline@2");
        let file: Vec<RunRecord> = (0..2).map(|s| taught(s, &[("resnet50", None)])).collect();
        assert_eq!(name(&file), "resnet50");
        assert_eq!(name(&[run("b", "none", Some(0), 50.0)]), "");
    }

    /// A swept row is set against the baseline of the variant the sweep extended, and an
    /// unswept variant against its own.
    #[test]
    fn swept_rows_are_set_against_their_variants_baseline() {
        let at = |label: &str, method: &str, variant: &str, last: f64| {
            let mut r = run(label, method, Some(0), last);
            r.variant = variant.into();
            r
        };
        let report = table(&[
            at("baseline-aug", "none", "aug", 60.0),
            at("baseline-noaug", "none", "noaug", 40.0),
            at("baseline_mixup-aug", "none", "aug", 70.0),
            at("kd-aug-temperature4", "kd", "aug-temperature4", 61.0),
            at("kd-noaug-temperature4", "kd", "noaug-temperature4", 43.0),
            at("kd-noaug", "kd", "noaug", 42.0),
        ]);
        let delta = |l: &str| {
            report
                .rows
                .iter()
                .find(|r| r.label == l)
                .unwrap()
                .delta_best
        };
        assert_eq!(delta("kd-aug-temperature4"), Some(1.0));
        assert_eq!(delta("kd-noaug-temperature4"), Some(3.0));
        assert_eq!(delta("kd-noaug"), Some(2.0));
        // Two baselines of one variant: the first by name.
        assert_eq!(delta("baseline_mixup-aug"), Some(10.0));
    }

    #[test]
    fn the_paired_test_takes_only_the_seeds_both_rows_have() {
        let runs = [
            run("baseline", "none", Some(0), 50.0),
            run("baseline", "none", Some(1), 52.0),
            run("baseline", "none", Some(2), 51.0),
            // Seed 3 has no baseline run and a seedless run has no pair: both are left out.
            run("kd", "kd", Some(1), 53.5),
            run("kd", "kd", Some(2), 52.0),
            run("kd", "kd", Some(3), 90.0),
            run("kd", "kd", None, 90.0),
            run("at", "at", Some(0), 49.0),
        ];
        let report = table(&runs);
        let row = |l: &str| report.rows.iter().find(|r| r.label == l).unwrap();
        assert_eq!(row("baseline").paired_last, None);
        // Differences 1.5 and 1.0: mean 1.25, se 0.25, t 5, p = 1 − (2/π)·atan 5 (one df).
        let p = row("kd").paired_last.unwrap();
        assert_eq!(p.n, 2);
        assert!((p.mean - 1.25).abs() < 1e-12 && (p.t - 5.0).abs() < 1e-12);
        let want = 1.0 - 2.0 / std::f64::consts::PI * 5f64.atan();
        assert!((p.p - want).abs() < 1e-12);
        // One pair only: no test.
        assert_eq!(row("at").paired_last, None);
        let md = report.markdown();
        assert!(md.contains("| +1.25 (p = 0.13, 2 seeds) |"), "{md}");
        let csv = report.csv();
        let kd_line = csv.lines().find(|l| l.starts_with("kd,")).unwrap();
        assert!(
            kd_line.ends_with(",2,1.2500,5.0000,0.125666,,,,"),
            "{kd_line}"
        );
    }

    #[test]
    fn multiply_accumulates_get_columns_of_their_own() {
        let mut kd = run("kd", "kd", Some(0), 50.0);
        kd.summary.deploy_macs = Some(555_422_720);
        kd.summary.teacher_macs = Some(1_297_829_888);
        let mut small = run("baseline", "none", Some(0), 50.0);
        small.summary.deploy_macs = Some(35_046_656);
        let report = table(&[small, kd, run("old", "none", Some(1), 50.0)]);
        let md = report.markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0].matches('|').count(), lines[1].matches('|').count());
        let row = |l: &str| *lines.iter().find(|x| x.starts_with(l)).unwrap();
        assert!(row("| kd |").contains("| 0.56 G | 1.30 G |"), "{md}");
        assert!(row("| baseline |").contains("| 35.05 M | – |"), "{md}");
        // A run of older kd recorded none.
        assert!(row("| old |").contains("| – | – |"), "{md}");
        let csv = report.csv();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let line = |l: &str| -> Vec<String> {
            let row = csv.lines().find(|x| x.starts_with(l)).unwrap();
            row.split(',').map(String::from).collect()
        };
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let kd = line("kd,");
        assert_eq!(kd.len(), header.len());
        assert_eq!(kd[col("deploy_macs")], "555422720");
        assert_eq!(kd[col("teacher_macs")], "1297829888");
        assert_eq!(line("baseline,")[col("teacher_macs")], "");
    }

    /// The seeds' confidence bins are added up for the reliability diagram, drawn only where
    /// some run recorded them; a later report without them leaves no diagram behind.
    #[test]
    fn reliability_diagram_pools_the_seeds_bins() {
        let with_bins = |seed, confidences: &[(f64, bool)]| {
            let mut r = run("kd", "kd", Some(seed), 50.0);
            let mut c = Calibration::new();
            for &(p, right) in confidences {
                c.add(p, right);
            }
            r.summary.last_calibration = Some(c);
            r
        };
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            with_bins(0, &[(0.62, true), (0.95, true)]),
            with_bins(1, &[(0.66, false), (0.99, true)]),
        ]);
        let row = |l: &str| report.rows.iter().find(|r| r.label == l).unwrap();
        assert_eq!(row("baseline").calibration, None);
        // Calibration's own hand-worked example, split over two seeds: 8.5% pooled.
        let pooled = row("kd").calibration.as_ref().unwrap();
        assert_eq!(pooled.total(), 4);
        assert_eq!((pooled.bins[9].count, pooled.bins[9].correct), (2, 1));
        assert!((pooled.ece_pct() - 8.5).abs() < 1e-9);
        // Its CSV: the two non-empty bins of the kd row, none of the baseline.
        let csv = report.reliability_csv().unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "kd,kd,,9,60.0000,66.6667,2,64.0000,50.0000",
                "kd,kd,,14,93.3333,100.0000,2,97.0000,100.0000"
            ],
            "{csv}"
        );
        let out = tempfile::tempdir().unwrap();
        let written = write(&report, out.path()).unwrap();
        let diagram = out.path().join("reliability.png");
        assert!(written.contains(&diagram) && diagram.is_file());
        assert!(out.path().join("reliability.svg").is_file());
        assert!(out.path().join("report_reliability.csv").is_file());
        write(
            &table(&[run("baseline", "none", Some(0), 50.0)]),
            out.path(),
        )
        .unwrap();
        assert!(!diagram.exists() && !out.path().join("reliability.svg").exists());
        assert!(!out.path().join("report_reliability.csv").exists());
    }

    #[test]
    fn gpu_memory_gets_a_column_where_a_run_was_on_a_gpu() {
        let on_gpu = |seed, mib| {
            let mut r = run("kd", "kd", Some(seed), 50.0);
            r.summary.gpu_peak_mib = Some(mib);
            r
        };
        let report = table(&[
            run("baseline", "none", Some(0), 50.0),
            on_gpu(0, 1500.4),
            on_gpu(1, 2047.6),
        ]);
        let md = report.markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert!(lines[0].ends_with("| peak GPU memory (MiB) |"), "{md}");
        assert_eq!(lines[0].matches('|').count(), lines[1].matches('|').count());
        // The row's most over its seeds; a CPU row has none.
        let row = |l: &str| *lines.iter().find(|x| x.starts_with(l)).unwrap();
        assert!(row("| kd |").ends_with("| 2,048 |"), "{md}");
        assert!(row("| baseline |").ends_with("| – |"), "{md}");
        let csv = report.csv();
        let line = |l: &str| csv.lines().find(|x| x.starts_with(l)).unwrap().to_string();
        assert!(line("kd,").ends_with(",2047.6,,,"), "{csv}");
        assert!(line("baseline,").ends_with(",,,,"), "{csv}");
    }
}
