//! The binary as a person meets it: data summary, eval errors that name keys, fetch hints.

mod common;
use common::{assert_contains_all, failed, kd, succeeded, write_cifar10, write_teacher};

/// `kd-runner train` on the fixture CIFAR-10 in `data`: a width-4 ResNet18 with `stem`, batches
/// of 25.
fn tiny_train(data: &std::path::Path, stem: &str) -> std::process::Command {
    let mut c = kd();
    c.args([
        "train",
        "--dataset",
        "cifar10",
        "--width",
        "4",
        "--stem",
        stem,
    ])
    .args(["--batch-size", "25", "--data-dir"])
    .arg(data);
    c
}

/// `kd-runner eval` on the fixture CIFAR-10 in `data` of the network at `weights` (a run folder
/// or a weights file); more flags follow.
fn eval_of(data: &std::path::Path, weights: &std::path::Path) -> std::process::Command {
    let mut c = kd();
    c.args(["eval", "--data-dir"])
        .arg(data)
        .arg("--weights")
        .arg(weights);
    c
}

/// [`tiny_train`] with `args` into the run folder `run`; fails the test unless it succeeds, and
/// returns what it printed.
fn train_into(data: &std::path::Path, stem: &str, args: &[&str], run: &std::path::Path) -> String {
    succeeded(
        &tiny_train(data, stem)
            .args(args)
            .arg("--run-dir")
            .arg(run)
            .output()
            .unwrap(),
    )
}

#[test]
fn data_prints_counts_and_stats() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let out = kd()
        .args(["data", "--dataset", "cifar10", "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let text = succeeded(&out);
    assert!(
        text.contains("train: 100 images, test: 20 images"),
        "{text}"
    );
    assert!(
        text.contains("airplane") && text.contains("train mean (R, G, B)"),
        "{text}"
    );
}

#[test]
fn missing_data_says_how_to_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kd()
        .args(["data", "--dataset", "cifar100", "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("cargo xtask fetch cifar100") && err.contains("--from DIR"),
        "{err}"
    );
}

#[test]
fn eval_names_the_missing_keys_of_a_fake_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = kd_models::ResNetConfig {
        base_width: 4,
        ..kd_models::ResNetConfig::new(kd_models::Arch::Resnet18, kd_models::Stem::Cifar, 10)
    };
    let (_, vm) = kd_models::trainable_resnet(&cfg, &candle_core::Device::Cpu, 0).unwrap();
    let full = tmp.path().join("full.safetensors");
    kd_models::save_varmap(&vm, &full).unwrap();
    let mut t = candle_core::safetensors::load(&full, &candle_core::Device::Cpu).unwrap();
    t.retain(|k, _| !k.starts_with("layer3."));
    let fake = tmp.path().join("fake.safetensors");
    candle_core::safetensors::save(&t, &fake).unwrap();
    let meta = kd_models::TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: 10,
        base_width: 4,
        mean: [0.5; 3],
        std: [0.25; 3],
        source: "test".into(),
        source_sha256: String::new(),
    };
    std::fs::write(
        tmp.path().join("fake.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    let out = kd()
        .args(["eval", "--weights"])
        .arg(&fake)
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("missing key(s)") && err.contains("layer3.0.conv1.weight"),
        "{err}"
    );

    // The complete weights evaluate on a data set with the right class count.
    std::fs::write(
        tmp.path().join("full.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    write_cifar10(tmp.path());
    let out = kd()
        .args(["eval", "--weights"])
        .arg(&full)
        .arg("--data-dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    let text = succeeded(&out);
    assert!(
        text.contains("top-1") && text.contains("(20 images"),
        "{text}"
    );
}

#[test]
fn cuda_in_a_cpu_build_says_how_to_build() {
    if cfg!(feature = "cuda") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = kd()
        .args(["eval", "--device", "cuda", "--weights"])
        .arg(tmp.path().join("x.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn train_refuses_to_overwrite_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = tmp.path().join("run");
    let base = |epochs: &str| {
        let mut c = tiny_train(tmp.path(), "cifar-maxpool");
        c.args(["--lr", "0.01", "--epochs", epochs]);
        c
    };
    let out = base("1").arg("--run-dir").arg(&run).output().unwrap();
    assert!(succeeded(&out).contains("best test top-1"));
    for f in [
        "run.json",
        "config.toml",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "model.safetensors",
        "model.json",
    ] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let again = base("1").arg("--run-dir").arg(&run).output().unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--resume"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Flags other than --set and --device cannot change a run on resume.
    let refused = base("2").arg("--resume").arg(&run).output().unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--set"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let resumed = kd()
        .args(["train", "--set", "train.epochs=2", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    succeeded(&resumed);
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // A method that needs a teacher says how to get one.
    let no_teacher = base("1")
        .args(["--method", "kd"])
        .arg("--run-dir")
        .arg(tmp.path().join("kd"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&no_teacher.stderr).contains("--teacher FILE"));
}

/// `eval` and `--teacher` take a finished run's folder (its exported student), a folder without
/// one is named, and an I/O error's cause is printed once.
#[test]
fn eval_takes_a_run_folder_and_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = tmp.path().join("run");
    train_into(tmp.path(), "cifar", &["--epochs", "1"], &run);
    let eval = |weights: &std::path::Path| eval_of(tmp.path(), weights).output().unwrap();
    let text = succeeded(&eval(&run));
    assert!(
        text.contains("model.safetensors") && text.contains("top-1"),
        "{text}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = String::from_utf8_lossy(&eval(&empty).stderr).to_string();
    assert!(err.contains("folder without model.safetensors"), "{err}");
    let err = String::from_utf8_lossy(&eval(&empty.join("x.safetensors")).stderr).to_string();
    assert!(err.contains("x.json"), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    // A run folder serves as a teacher too.
    let teacher = run.to_str().unwrap();
    let out = train_into(
        tmp.path(),
        "cifar",
        &["--epochs", "1", "--method", "kd", "--teacher", teacher],
        &tmp.path().join("kd"),
    );
    assert!(out.contains("best test top-1"));
    // The student against its teacher: eval's agreement is the run's own, on the same images.
    let text = succeeded(
        &eval_of(tmp.path(), &tmp.path().join("kd"))
            .arg("--against")
            .arg(&run)
            .output()
            .unwrap(),
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("kd/summary.json")).unwrap())
            .unwrap();
    let agreement = summary["last_teacher_agreement"].as_f64().unwrap();
    let teacher_top1 = summary["teacher_top1"].as_f64().unwrap();
    assert!(
        text.contains(&format!("top-1 agreement {agreement:.2}%"))
            && text.contains(&format!("(top-1 {teacher_top1:.2}%"))
            && text.contains("ECE "),
        "{text}\n{summary}"
    );
    // The teacher is the same network as the student: the same cost per image.
    let macs = summary["deploy_macs"].as_u64().unwrap();
    assert!(
        macs > 0 && summary["teacher_macs"].as_u64() == Some(macs),
        "{summary}"
    );
}

/// The online branch methods (ONE, OKDDip, CL-ILR) train branches and parts they do not deploy:
/// each run logs every extra branch's top-1 and their ensemble, counts them in the trainable
/// parameters only, and exports the plain network, which `eval` scores as the run's last epoch.
#[test]
fn online_branch_methods_deploy_the_plain_network() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    for (method, extra) in [("one", 2), ("okddip", 3), ("cl_ilr", 3)] {
        let run = tmp.path().join(method);
        let args = ["--epochs", "2", "--lr", "0.05", "--method", method];
        train_into(tmp.path(), "cifar-maxpool", &args, &run);
        let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
        let header = csv.lines().next().unwrap();
        for k in 1..=extra {
            assert!(
                header.contains(&format!("head{k}_top1")),
                "{method}: {header}"
            );
        }
        assert!(
            !header.contains(&format!("head{}_top1", extra + 1))
                && header.contains("head_ensemble_top1"),
            "{method}: {header}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        let (trainable, deployed) = (
            summary["trainable_params"].as_u64().unwrap(),
            summary["deploy_params"].as_u64().unwrap(),
        );
        assert!(trainable > deployed, "{method}: {summary}");
        let text = succeeded(&eval_of(tmp.path(), &run).output().unwrap());
        let last = summary["last_top1"].as_f64().unwrap();
        assert!(
            text.contains(&format!("{deployed} params"))
                && text.contains(&format!("top-1 {last:.2}%")),
            "{method}: {text}\n{summary}"
        );
    }
}

/// `eval --ensemble-with`: a DML run's exported student and peer, loaded from their files and
/// averaged by the CLI, score the run's own cohort ensemble (computed by the trainer from the
/// networks in memory).
#[test]
fn eval_scores_an_exported_cohort_as_the_trainer_did() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = tmp.path().join("dml");
    let args = [
        "--epochs",
        "2",
        "--lr",
        "0.05",
        "--method",
        "dml",
        "--peer",
        "resnet18:cifar-maxpool:8",
    ];
    train_into(tmp.path(), "cifar", &args, &run);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let ensemble = summary["last_cohort_ensemble_top1"].as_f64().unwrap();
    let peer = summary["peers"][0]["last_top1"].as_f64().unwrap();
    let eval_with = |member: &std::path::Path| {
        eval_of(tmp.path(), &run)
            .arg("--ensemble-with")
            .arg(member)
            .output()
            .unwrap()
    };
    let text = succeeded(&eval_with(&run.join("peer1")));
    assert!(
        text.contains(&format!("peer1/model.safetensors: top-1 {peer:.2}%"))
            && text.contains(&format!(
                "ensemble of 2 models (softmax averaged): top-1 {ensemble:.2}%"
            )),
        "{text}\n{summary}"
    );
    // A member that cannot be loaded is named.
    let err = String::from_utf8_lossy(&eval_with(&tmp.path().join("missing.safetensors")).stderr)
        .to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
}

/// `--method switokd --peer …` trains the student beside its teacher through the binary: the
/// teacher (at twice the run's learning rate) is evaluated and exported as a peer, each epoch
/// logs the share of steps it sat out, and a second `--peer` is refused by name (SwitOKD has
/// one teacher).
#[test]
fn switokd_trains_beside_one_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = tmp.path().join("switokd");
    let args = ["--epochs", "2", "--lr", "0.05", "--method", "switokd"];
    // The teacher at twice the run's learning rate, which the run's config records.
    let peer = ["--peer", "resnet18:cifar-maxpool:8:2"];
    train_into(tmp.path(), "cifar", &[&args[..], &peer[..]].concat(), &run);
    assert!(run.join("peer1/model.safetensors").is_file());
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("lr_scale = 2.0"), "{config}");
    let rows = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for row in rows.lines() {
        let row: serde_json::Value = serde_json::from_str(row).unwrap();
        let expert = row["values"]["switokd_expert"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&expert), "{row}");
        assert!(
            row["peers"]["peer1"]["losses"]["loss_switokd"].is_f64(),
            "{row}"
        );
    }
    let two = tiny_train(tmp.path(), "cifar")
        .args(args)
        .args(peer)
        .args(peer)
        .arg("--run-dir")
        .arg(tmp.path().join("two"))
        .output()
        .unwrap();
    assert_contains_all(&failed(&two), ["switokd", "exactly one peer", "got 2"]);
}

/// `--method dlb` through the binary: the loader brings each image's second view, every epoch
/// after the run's first step replays a batch (its consistency term is logged and positive),
/// and mixup is refused by name.
#[test]
fn dlb_replays_the_last_batch_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = tmp.path().join("dlb");
    let args = ["--epochs", "2", "--lr", "0.05", "--method", "dlb"];
    train_into(tmp.path(), "cifar", &args, &run);
    let rows = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 2);
    for row in rows.lines() {
        let row: serde_json::Value = serde_json::from_str(row).unwrap();
        assert!(row["losses"]["loss_dlb"].as_f64().unwrap() > 0.0, "{row}");
    }
    let mixed = tiny_train(tmp.path(), "cifar")
        .args(args)
        .args(["--set", "data.mixup=1.0", "--run-dir"])
        .arg(tmp.path().join("mixed"))
        .output()
        .unwrap();
    assert_contains_all(&failed(&mixed), ["dlb", "data.mixup = 0"]);
}

/// Every column of a finished run's metrics.csv but the clocks, one string per epoch.
fn metrics_without_clocks(run_dir: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let clocks = ["seconds", "images_per_sec", "teacher_seconds"];
    lines
        .map(|l| {
            l.split(',')
                .zip(&header)
                .filter(|(_, h)| !clocks.contains(h))
                .map(|(v, h)| format!("{h}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// The resident data path (pixels kept on the training device, augmented and mixed by
/// kd-kernels' op, the GPU's path) trains exactly as the host loader does: same metrics, clocks
/// aside, for a mixup run.
#[test]
fn resident_data_trains_exactly_as_the_host_loader() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = |resident: bool| {
        let dir = tmp.path().join(format!("run-{resident}"));
        let resident = format!("data.resident={resident}");
        let args = [
            "--lr",
            "0.05",
            "--epochs",
            "2",
            "--set",
            "data.mixup=1.0",
            "--set",
            &resident,
        ];
        train_into(tmp.path(), "cifar", &args, &dir);
        metrics_without_clocks(&dir)
    };
    let (host, resident) = (run(false), run(true));
    assert_eq!(host.len(), 2);
    assert_eq!(host, resident);
}

/// On the CPU the channels-last ops run the channels-first arithmetic on transposed tensors, so
/// a channels-last run (max-pool stem, a feature method reading the stage features) gives the
/// channels-first run's numbers, and its config records the setting.
#[test]
fn channels_last_trains_exactly_as_channels_first_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = |format: &str| {
        let dir = tmp.path().join(format);
        let args = [
            "--lr",
            "0.05",
            "--epochs",
            "2",
            "--memory-format",
            format,
            "--set",
            "method.name=byot",
        ];
        train_into(tmp.path(), "cifar-maxpool", &args, &dir);
        let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        assert!(
            config.contains(&format!("memory_format = \"{format}\"")),
            "{config}"
        );
        metrics_without_clocks(&dir)
    };
    let (first, last) = (run("channels-first"), run("channels-last"));
    assert_eq!(first.len(), 2);
    assert_eq!(first, last);
}

/// A suite in `dir` over the fixture CIFAR-10 written there: `baseline.toml` and each of
/// `configs` (file name, then its `name` and tables after the common `[data]`, `[model]` and
/// `[train]` of width-4 ResNet18s trained 2 epochs), and `suite.toml` with the `suite` text.
/// Returns the command that runs it into `dir/out` (more arguments may follow).
fn tiny_suite(
    dir: &std::path::Path,
    configs: &[(&str, &str, &str)],
    suite: &str,
) -> impl Fn(&[&str]) -> std::process::Output {
    write_cifar10(dir);
    let data = dir.display().to_string();
    let common = format!("[data]\ndataset = \"cifar10\"\ndata_dir = {data:?}\nbatch_size = 50\n\n[model]\nwidth = 4\nstem = \"cifar-maxpool\"\n\n[train]\nepochs = 2\nlr = 0.02\nwarmup_epochs = 0\n");
    for (file, name, tables) in [("baseline.toml", "baseline", "")].iter().chain(configs) {
        std::fs::write(
            dir.join(file),
            format!("name = \"{name}\"\n{common}\n{tables}"),
        )
        .unwrap();
    }
    std::fs::write(dir.join("suite.toml"), suite).unwrap();
    let (file, out) = (dir.join("suite.toml"), dir.join("out"));
    move |extra: &[&str]| {
        kd().arg("suite")
            .arg(&file)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    }
}

/// A tiny suite (two methods × two seeds) → report: table, CSV and plots with the right rows;
/// rerunning skips finished runs and resumes an unfinished one from its checkpoint.
#[test]
fn suite_then_report_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let run_suite = tiny_suite(
        tmp.path(),
        &[(
            "byot.toml",
            "self-byot",
            "[method]\nname = \"byot\"\nalpha = 0.3\ntemperature = 3.0\nhint_weight = 0.03\n",
        )],
        "name = \"tiny\"\nseeds = [0, 1]\nconfigs = [\"baseline.toml\", \"byot.toml\"]\n",
    );
    let out_dir = tmp.path().join("out");
    let suite = || run_suite(&[]);
    let out = suite();
    succeeded(&out);
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    // The main table's rows (the calibration table follows after a blank line).
    let rows: Vec<&str> = md
        .lines()
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("| ") && !l.starts_with("| method"))
        .collect();
    assert_eq!(rows.len(), 2, "{md}");
    assert!(
        rows[0].starts_with("| baseline | 2 | 2 |") && rows[0].contains("(baseline)"),
        "{md}"
    );
    assert!(
        rows[1].starts_with("| self-byot | 2 | 2 |") && rows[1].contains(" ± "),
        "{md}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("| self-byot |"));
    let csv = std::fs::read_to_string(out_dir.join("report.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("label,method,variant,runs,epochs"));
    assert!(
        lines[1].starts_with("baseline,none,,2,2,") && lines[2].starts_with("self-byot,byot,,2,2,"),
        "{csv}"
    );
    let cells: Vec<&str> = lines[2].split(',').collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = |name: &str| header.iter().position(|c| *c == name).expect(name);
    // The paired test against the baseline's runs of the same seeds: two pairs at most (none
    // if the two differences happen to be equal).
    assert!(
        md.contains("same seeds (p)")
            && lines[0].ends_with("paired_t,paired_p,gpu_peak_mib,swept,teacher,values_last")
    );
    assert_eq!(cells.len(), header.len(), "{csv}");
    // CPU runs: no GPU memory, and no memory column in the Markdown table.
    assert_eq!(cells[col("gpu_peak_mib")], "", "{csv}");
    assert!(!md.contains("GPU memory"), "{md}");
    assert!(["", "2"].contains(&cells[col("paired_seeds")]), "{csv}");
    // BYOT's heads cost nothing deployed: the baseline's MACs; no teacher, no teacher MACs.
    let baseline: Vec<&str> = lines[1].split(',').collect();
    assert!(
        cells[col("deploy_macs")].parse::<u64>().unwrap() > 0,
        "{csv}"
    );
    assert_eq!(
        cells[col("deploy_macs")],
        baseline[col("deploy_macs")],
        "{csv}"
    );
    assert_eq!(cells[col("teacher_macs")], "", "{csv}");
    // Calibration at the last epoch; no teacher, so no fidelity (its cells empty, "–" in the
    // Markdown table).
    let ece: f64 = cells[col("ece_mean")].parse().unwrap();
    assert!((0.0..=100.0).contains(&ece), "{csv}");
    assert!(
        cells[col("test_nll_mean")].parse::<f64>().unwrap() > 0.0,
        "{csv}"
    );
    assert_eq!(cells[col("teacher_agreement_mean")], "", "{csv}");
    assert!(md.contains("Calibration and fidelity"), "{md}");
    let calibration_row = md
        .lines()
        .skip_while(|l| !l.starts_with("Calibration"))
        .find(|l| l.starts_with("| self-byot |"))
        .unwrap();
    assert!(calibration_row.ends_with("| – | – | – |"), "{md}");
    // The byot student trains heads it does not deploy: more trainable than deployed parameters.
    assert!(
        cells[col("trainable_params")].parse::<usize>().unwrap()
            > cells[col("deploy_params")].parse::<usize>().unwrap(),
        "{csv}"
    );
    for plot in [
        "accuracy_per_epoch",
        "accuracy_vs_time",
        "accuracy_vs_params",
    ] {
        let png = std::fs::read(out_dir.join(format!("{plot}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{plot}.png");
        let image = image::load_from_memory(&png).unwrap();
        assert_eq!((image.width(), image.height()), (960, 600));
        let svg = std::fs::read_to_string(out_dir.join(format!("{plot}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("self-byot") && svg.contains("baseline"),
            "{plot}.svg lacks the labels"
        );
    }
    // Rerun: finished runs are skipped (their summaries untouched); an unfinished one resumes.
    let finished = out_dir.join("baseline-s0/summary.json");
    let stamp = std::fs::metadata(&finished).unwrap().modified().unwrap();
    std::fs::remove_file(out_dir.join("self-byot-s1/summary.json")).unwrap();
    let again = suite();
    succeeded(&again);
    assert_eq!(
        std::fs::metadata(&finished).unwrap().modified().unwrap(),
        stamp
    );
    assert!(out_dir.join("self-byot-s1/summary.json").is_file());
    assert_eq!(
        std::fs::read_to_string(out_dir.join("self-byot-s1/metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // `report` on its own reads the same runs.
    let rep = kd()
        .arg("report")
        .arg(&out_dir)
        .arg("--out")
        .arg(tmp.path().join("rep"))
        .output()
        .unwrap();
    succeeded(&rep);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("rep/report.csv")).unwrap(),
        csv
    );
}

/// A born-again chain in a suite: `ban1` names the suite's `baseline` run as its teacher
/// (`teacher.run`). The suite trains the baseline first, points ban1's teacher at its folder,
/// and ban1 trains exactly as `kd-runner train --teacher` with that folder does; outside a
/// suite the unresolved name is refused. `ens` learns from both (`teacher.member_runs`), and the
/// report names each row's teacher.
#[test]
fn suite_chains_a_run_as_the_next_ones_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tiny_suite(
        tmp.path(),
        &[
            (
                "ban1.toml",
                "ban1",
                "[method]\nname = \"kd\"\nalpha = 1.0\ntemperature = 1.0\n\n[teacher]\nrun = \"baseline\"\n",
            ),
            (
                "ens.toml",
                "ens",
                "[method]\nname = \"kd\"\n\n[teacher]\nrun = \"baseline\"\nmember_runs = [\"ban1\"]\n",
            ),
        ],
        "name = \"tiny\"\nconfigs = [\"baseline.toml\", \"ban1.toml\", \"ens.toml\"]\n",
    );
    let ban1 = tmp.path().join("ban1.toml");
    let out_dir = tmp.path().join("out");
    let plan = succeeded(&suite(&["--dry-run"]));
    assert!(plan.contains("(taught by baseline-s0)"), "{plan}");
    succeeded(&suite(&[]));
    let teacher_dir = out_dir.join("baseline-s0");
    let saved = std::fs::read_to_string(out_dir.join("ban1-s0/config.toml")).unwrap();
    assert!(
        saved.contains(&format!("path = {:?}", teacher_dir.display().to_string())),
        "{saved}"
    );
    // Alone, ban1.toml has no teacher to load: refused before anything is written.
    let alone = tmp.path().join("alone");
    let refused = kd()
        .arg("train")
        .arg(&ban1)
        .arg("--run-dir")
        .arg(&alone)
        .output()
        .unwrap();
    let err = failed(&refused);
    assert!(
        err.contains("teacher.run = \"baseline\"") && err.contains("kd-runner suite"),
        "{err}"
    );
    assert!(!alone.exists());
    // With the teacher's folder given, the same run.
    let explicit = tmp.path().join("explicit");
    succeeded(
        &kd()
            .arg("train")
            .arg(&ban1)
            .arg("--teacher")
            .arg(&teacher_dir)
            .arg("--run-dir")
            .arg(&explicit)
            .output()
            .unwrap(),
    );
    assert_eq!(
        metrics_without_clocks(&explicit),
        metrics_without_clocks(&out_dir.join("ban1-s0"))
    );
    // The report scores ban1 against its teacher, the baseline it learned from.
    let csv = std::fs::read_to_string(out_dir.join("report.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = header
        .iter()
        .position(|c| *c == "teacher_agreement_mean")
        .unwrap();
    let ban1_row: Vec<&str> = lines[2].split(',').collect();
    assert!(lines[2].starts_with("ban1,kd,"), "{csv}");
    let agreement: f64 = ban1_row[col].parse().unwrap();
    assert!((0.0..=100.0).contains(&agreement), "{csv}");
    // Who taught whom: in each run.json, report.csv's `teacher` column (before `values_last`,
    // empty for kd) and the report's table.
    let taught = |run: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out_dir.join(run).join("run.json")).unwrap())
            .unwrap()
    };
    assert!(taught("baseline-s0").get("teacher").is_none());
    assert_eq!(
        taught("ban1-s0")["teacher"],
        serde_json::json!([{"label": "baseline", "seed": 0}])
    );
    assert_eq!(
        taught("ens-s0")["teacher"],
        serde_json::json!([{"label": "baseline", "seed": 0}, {"label": "ban1", "seed": 0}])
    );
    assert!(
        lines[2].ends_with(",baseline,") && lines[3].ends_with(",baseline + ban1,"),
        "{csv}"
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(
        md.contains("| ens | ") && md.contains(" | baseline + ban1 | "),
        "{md}"
    );
    // A run.json that does not parse stops the report, named.
    std::fs::write(out_dir.join("ens-s0/run.json"), "{\"label\": 3}").unwrap();
    let bad = kd()
        .arg("report")
        .arg(&out_dir)
        .arg("--out")
        .arg(tmp.path().join("rep"))
        .output()
        .unwrap();
    let err = failed(&bad);
    assert!(
        err.contains("ens-s0/run.json is not a kd run.json"),
        "{err}"
    );
}

/// A suite whose KD config names a teacher that is not there stops before its first run, naming
/// the file and the run that needs it; `--dry-run` lists the runs with a warning.
#[test]
fn suite_with_a_missing_teacher_stops_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tiny_suite(
        tmp.path(),
        &[(
            "kd.toml",
            "kd",
            "[method]\nname = \"kd\"\n\n[teacher]\npath = \"nowhere/teacher.safetensors\"\n",
        )],
        "name = \"tiny\"\nconfigs = [\"baseline.toml\", \"kd.toml\"]\n",
    );
    let out = suite(&[]);
    assert!(!out.status.success());
    assert_contains_all(
        &String::from_utf8_lossy(&out.stderr),
        [
            "nowhere/teacher.safetensors",
            "first needed by",
            "kd-s0",
            "xtask fetch",
        ],
    );
    assert!(
        !tmp.path().join("out/baseline-s0").exists(),
        "nothing trained"
    );
    let plan = succeeded(&suite(&["--dry-run"]));
    assert!(
        plan.contains("warning: the suite's teachers are not all there") && plan.contains("kd-s0"),
        "{plan}"
    );
}

#[test]
fn list_names_every_method_and_key() {
    let out = kd().arg("list").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_contains_all(
        &text,
        kd_train::MethodConfig::NAMES
            .iter()
            .map(|m| format!("  {m} ")),
    );
    assert_contains_all(
        &text,
        [
            "train.lr = 0.1",
            "data.subset = 1.0",
            "model.arch = \"resnet18\"",
            "method.name = \"none\"",
            // Each method's own keys, with their preset values.
            "init_epochs = 30",
            "temperature_range = 20.0",
            "negatives = 16384",
            // torchvision's parameter count and PyTorch's FLOP counter (kd-models' fixtures).
            "resnet18       Basic blocks [2, 2, 2, 2]; 11,173,962 params; 0.56 G MACs (cifar), 0.14 G (cifar-maxpool)",
            "resnet50       Bottleneck blocks [3, 4, 6, 3]; 23,520,842 params; 1.30 G MACs (cifar), 0.33 G (cifar-maxpool)",
        ],
    );
}

#[test]
fn set_with_an_unknown_key_lists_the_valid_ones() {
    let out = kd()
        .args(["train", "--set", "train.learning_rate=0.1"])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("learning_rate") && err.contains("train.lr"),
        "{err}"
    );
}

#[test]
fn unwritable_run_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "not a folder").unwrap();
    let out = kd()
        .args(["train", "--width", "4", "--epochs", "1", "--data-dir"])
        .arg(tmp.path())
        .arg("--run-dir")
        .arg(blocker.join("run"))
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains(&blocker.join("run").display().to_string()),
        "{err}"
    );
}

/// A full disk (simulated with a file-size limit) during a checkpoint write: a clear error naming
/// the file, the previous checkpoint still loadable, and the run resumes once there is room.
#[test]
fn full_disk_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = tmp.path().join("run");
    let first = kd()
        .args([
            "train",
            "--width",
            "4",
            "--epochs",
            "1",
            "--batch-size",
            "50",
            "--data-dir",
        ])
        .arg(tmp.path())
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    succeeded(&first);
    let metrics_before = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    // 64 KiB per file: smaller than the weights (~180 KB), so epoch 2's checkpoint cannot be written.
    // SIGXFSZ is ignored so that the write fails with EFBIG instead of killing the process.
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec {} train --set train.epochs=2 --resume {}",
        env!("CARGO_BIN_EXE_kd-runner"),
        run.display()
    );
    let full = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(!full.status.success(), "the write should have failed");
    let err = String::from_utf8_lossy(&full.stderr);
    assert!(
        err.contains(&run.display().to_string()) && err.contains(".safetensors"),
        "{err}"
    );
    let latest = kd_train::latest_checkpoint(&run).unwrap();
    assert!(latest.ends_with("checkpoint-0001"), "{}", latest.display());
    kd_models::checkpoint::read_safetensors(
        &latest.join("weights.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .starts_with(&metrics_before));
    let again = kd()
        .args(["train", "--set", "train.epochs=2", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    succeeded(&again);
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
}

/// A teacher for another class count is refused before training starts, naming the file.
#[test]
fn teacher_with_the_wrong_class_count_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let path = write_teacher(
        tmp.path(),
        "t100.safetensors",
        kd_models::Arch::Resnet18,
        100,
    );
    let out = kd()
        .args([
            "train",
            "--method",
            "kd",
            "--width",
            "4",
            "--epochs",
            "1",
            "--data-dir",
        ])
        .arg(tmp.path())
        .arg("--teacher")
        .arg(&path)
        .arg("--run-dir")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("t100.safetensors") && err.contains("100 classes"),
        "{err}"
    );
    assert!(
        !tmp.path().join("run").exists(),
        "nothing written for a refused run"
    );
}

/// `--teacher` twice: an ensemble teacher. KD trains from it, its config keeps the second as
/// `teacher.members`, and the summary counts both networks' parameters and MACs; a member of the
/// wrong class count, and a method that reads features, are refused by key before anything is
/// written.
#[test]
fn two_teachers_teach_as_an_ensemble() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let t18 = write_teacher(tmp.path(), "t18.safetensors", kd_models::Arch::Resnet18, 10);
    let t50 = write_teacher(tmp.path(), "t50.safetensors", kd_models::Arch::Resnet50, 10);
    let t100 = write_teacher(
        tmp.path(),
        "t100.safetensors",
        kd_models::Arch::Resnet18,
        100,
    );
    let train = |method: &str, second: &std::path::Path, run: &std::path::Path| {
        tiny_train(tmp.path(), "cifar")
            .args(["--method", method, "--epochs", "1", "--teacher"])
            .arg(&t18)
            .arg("--teacher")
            .arg(second)
            .arg("--run-dir")
            .arg(run)
            .output()
            .unwrap()
    };
    let run = tmp.path().join("run");
    succeeded(&train("kd", &t50, &run));
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        cfg.contains(&format!("members = [{:?}]", t50.display().to_string())),
        "{cfg}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let load =
        |p: &std::path::Path| kd_models::Teacher::load(p, &candle_core::Device::Cpu).unwrap();
    let (a, b) = (load(&t18), load(&t50));
    assert_eq!(
        summary["teacher_params"].as_u64().unwrap() as usize,
        a.num_params() + b.num_params()
    );
    assert_eq!(
        summary["teacher_macs"].as_u64().unwrap(),
        a.macs(32, 32) + b.macs(32, 32)
    );
    // `eval --against` both teachers: the ensemble's agreement and top-1, as the run saw them.
    let text = succeeded(
        &eval_of(tmp.path(), &run)
            .arg("--against")
            .arg(&t18)
            .arg("--against")
            .arg(&t50)
            .output()
            .unwrap(),
    );
    let agreement = summary["last_teacher_agreement"].as_f64().unwrap();
    let teacher_top1 = summary["teacher_top1"].as_f64().unwrap();
    assert!(
        text.contains(&format!(
            "against {} + {} (top-1 {teacher_top1:.2}%",
            t18.display(),
            t50.display()
        )) && text.contains(&format!("top-1 agreement {agreement:.2}%")),
        "{text}\n{summary}"
    );
    // The same two as an ensemble in `eval`: their mean logits score the run's teacher top-1.
    let text = succeeded(
        &eval_of(tmp.path(), &t18)
            .arg("--ensemble-with")
            .arg(&t50)
            .output()
            .unwrap(),
    );
    assert!(
        text.contains(&format!(
            "ensemble of 2 models (logits averaged, as an ensemble teacher): top-1 {teacher_top1:.2}%"
        )),
        "{text}\n{summary}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        info["teacher"],
        serde_json::json!([{"label": "resnet18 w4"}, {"label": "resnet50 w4"}])
    );
    for (method, second, expected) in [
        (
            "kd",
            &t100,
            vec!["teacher.members[0]", "t100.safetensors", "100 classes"],
        ),
        (
            "at",
            &t50,
            vec!["teacher.members", "method at", "ensembles teach kd"],
        ),
    ] {
        let refused = tmp.path().join(format!("refused-{method}"));
        let out = train(method, second, &refused);
        assert_contains_all(&failed(&out), expected);
        assert!(!refused.exists(), "nothing written for a refused run");
    }
}

/// A two-stage method with KD added, through the CLI: AB's init phase runs first (its row in
/// `init_metrics.jsonl`, its time in the summary), then the main run logs the cross-entropy and
/// the added KD term.
#[test]
fn two_stage_method_with_plus_kd_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let teacher = write_teacher(tmp.path(), "t.safetensors", kd_models::Arch::Resnet50, 10);
    let run = tmp.path().join("run");
    let out = kd()
        .args(["train", "--method", "ab", "--width", "4", "--epochs", "1"])
        .args(["--set", "method.init_epochs=1", "--set", "plus_kd.alpha=1"])
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("--teacher")
        .arg(&teacher)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    let text = succeeded(&out);
    assert!(text.contains("s init phase"), "{text}");
    let init = std::fs::read_to_string(run.join("init_metrics.jsonl")).unwrap();
    assert_eq!(init.lines().count(), 1, "{init}");
    let row: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let losses = row["losses"].as_object().unwrap();
    assert!(
        losses.contains_key("loss_ce") && losses.contains_key("loss_kd"),
        "{row}"
    );
    assert!(
        row["teacher_seconds"].as_f64().unwrap() > 0.0,
        "KD runs the teacher: {row}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(summary["init_seconds"].as_f64().unwrap() > 0.0, "{summary}");
    // The report counts the phase's epochs beside the main run's.
    let out = kd()
        .args(["report"])
        .arg(&run)
        .arg("--out")
        .arg(tmp.path().join("report"))
        .output()
        .unwrap();
    let text = succeeded(&out);
    assert!(text.contains("| 1 + 1 init |"), "{text}");
    let csv = std::fs::read_to_string(tmp.path().join("report/report.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!((col("epochs"), col("init_epochs")), ("1", "1"), "{csv}");
}

#[test]
fn precision_flag_and_key_are_typed() {
    let out = kd()
        .args(["train", "--precision", "fp16", "--epochs", "1"])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(err.contains("f32, tf32, bf16"), "{err}");
    let out = kd().arg("list").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("train.precision = \"f32\""), "{text}");
    assert!(text.contains("train.conv_algo = \"heuristic\""), "{text}");
    assert!(text.contains("data.resident = false"), "{text}");
    let out = kd()
        .args(["train", "--conv-algo", "fastest", "--epochs", "1"])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(err.contains("heuristic or benchmark"), "{err}");
}

/// `kd-runner bench` on the CPU at width 4, one timed step and no warm-up, plus `extra`.
fn tiny_cpu_bench(batch: &str, extra: &[&str]) -> std::process::Output {
    kd().args([
        "bench", "--device", "cpu", "--width", "4", "--batch", batch, "--steps", "1", "--warmup",
        "0",
    ])
    .args(extra)
    .output()
    .unwrap()
}

#[test]
fn bench_times_each_conv_algorithm_search() {
    let out = tiny_cpu_bench(
        "4",
        &["--workloads", "train", "--conv-algo", "heuristic,benchmark"],
    );
    let text = succeeded(&out);
    assert_contains_all(
        &text,
        [
            "BENCH workload=resnet18-train precision=f32 images_per_s=",
            "| workload | precision | conv algorithm | memory format | images/s | ms/step | model TFLOP/s | peak GPU memory used / reserved (MiB) |",
            "| resnet18 train step | f32 | heuristic | channels-first |",
            "| resnet18 train step | f32 | benchmark | channels-first |",
        ],
    );
    for search in ["heuristic", "benchmark"] {
        let tail = format!(" conv_algo={search} memory_format=channels-first");
        let line = text
            .lines()
            .find(|l| l.starts_with("BENCH") && l.contains(&tail));
        assert!(line.is_some(), "no BENCH line for {search}:\n{text}");
    }
}

/// The value of `key=` on a BENCH line.
fn bench_value(line: &str, key: &str) -> f64 {
    let prefix = format!("{key}=");
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

/// Model TFLOP/s is images/s times two FLOPs per multiply-accumulate of a forward pass, three
/// passes for a training step, plus the teacher's forward pass for a KD step; a method's step
/// has none.
#[test]
fn bench_counts_model_flops_per_second() {
    let out = tiny_cpu_bench(
        "4",
        &[
            "--workloads",
            "train,infer,kd,method:crd",
            "--train-size",
            "64",
        ],
    );
    let text = succeeded(&out);
    let macs = |arch| {
        let cfg = kd_models::ResNetConfig {
            base_width: 4,
            ..kd_models::ResNetConfig::new(arch, kd_models::Stem::Cifar, 10)
        };
        let vb = candle_nn::VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu);
        kd_models::ResNet::new(&cfg, vb)
            .unwrap()
            .macs(32, 32)
            .backbone as f64
    };
    let (student, teacher) = (
        macs(kd_models::Arch::Resnet18),
        macs(kd_models::Arch::Resnet50),
    );
    for (workload, flops) in [
        ("resnet18-train", 6.0 * student),
        ("resnet50-infer", 2.0 * teacher),
        ("kd-step", 2.0 * teacher + 6.0 * student),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("BENCH workload={workload} ")))
            .unwrap_or_else(|| panic!("no BENCH line for {workload}:\n{text}"));
        let want = flops * bench_value(line, "images_per_s") / 1e12;
        let got = bench_value(line, "model_tflops");
        assert!(
            (got - want).abs() <= 1e-3 * want + 1e-6,
            "{line}: want {want}"
        );
    }
    let crd = text
        .lines()
        .find(|l| l.starts_with("BENCH workload=method-crd "))
        .unwrap();
    assert!(!crd.contains("model_tflops"), "{crd}");
}

#[test]
fn bench_times_each_memory_format() {
    let out = tiny_cpu_bench(
        "4",
        &[
            "--workloads",
            "train,kd",
            "--teacher",
            "resnet18",
            "--memory-format",
            "channels-first,channels-last",
        ],
    );
    let text = succeeded(&out);
    for format in ["channels-first", "channels-last"] {
        for workload in ["resnet18-train", "kd-step"] {
            let line = text.lines().find(|l| {
                l.starts_with(&format!("BENCH workload={workload} "))
                    && l.contains(&format!(" memory_format={format}"))
            });
            assert!(
                line.is_some(),
                "no BENCH line for {workload} {format}:\n{text}"
            );
        }
    }
    let out = tiny_cpu_bench("4", &["--workloads", "train", "--memory-format", "nhwc"]);
    let err = failed(&out);
    assert!(err.contains("channels-first or channels-last"), "{err}");
}

#[test]
fn bench_times_any_methods_step_and_refuses_online_ones() {
    let out = tiny_cpu_bench(
        "8",
        &[
            "--train-size",
            "64",
            "--workloads",
            "method:crd,method:reviewkd,method:pskd,method:dlb",
        ],
    );
    let text = succeeded(&out);
    assert_contains_all(
        &text,
        [
            "BENCH workload=method-crd precision=f32",
            "BENCH workload=method-reviewkd precision=f32",
            "| crd step (resnet50 → resnet18) |",
            "| pskd step (resnet18) |",
            "| dlb step (resnet18) |",
        ],
    );
    let out = kd()
        .args([
            "bench",
            "--device",
            "cpu",
            "--width",
            "4",
            "--batch",
            "4",
            "--workloads",
            "method:dml",
        ])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("method:dml") && err.contains("online"),
        "{err}"
    );
    // Checked before anything runs: no row is timed first.
    let out = tiny_cpu_bench("4", &["--workloads", "train,method:dml"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("BENCH"), "{text}");
}

#[test]
fn bench_goes_on_past_a_failing_benchmark_and_then_fails() {
    // FSP needs a teacher of the student's widths, which the default ResNet50 is not: its
    // workload fails at run time, between two that must still be timed.
    let out = tiny_cpu_bench("4", &["--workloads", "train,method:fsp,kd"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_contains_all(
        &text,
        [
            "BENCH workload=resnet18-train precision=f32 images_per_s=",
            "BENCH_FAILED workload=method-fsp precision=f32 conv_algo=heuristic memory_format=channels-first error=\"method fsp compares",
            "BENCH workload=kd-step precision=f32 images_per_s=",
            "| KD step (resnet50 → resnet18) | f32 |",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 benchmark(s) failed (the others ran):\nworkload=method-fsp"),
        "{err}"
    );
}
