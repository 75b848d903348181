//! `kd-runner selfcheck` on the CPU, and what the GPU script makes of its table: the device
//! script's `fallbacks` (`tools/gpu/fallbacks.sh`) reads selfcheck's row names to switch a
//! failing kernel family back to candle's ops. Its patterns are run here on the table selfcheck
//! really prints, with rows failed, erring or missing, so that a renamed row or a wrong pattern
//! shows on the CPU instead of in the first (short) GPU session.

mod common;
use common::{assert_contains_all, kd, succeeded};

use std::path::Path;
use std::process::Command;

/// `fallbacks` and `channels_last_ok` over `table` as `$OUT/selfcheck.txt`: the KD_DISABLE it
/// exports ("" when none) and whether the channels-last bench would run.
fn fallbacks(table: &str) -> (String, bool) {
    fallbacks_over(Some(table))
}

/// [`fallbacks`], with no `selfcheck.txt` at all for `None`.
fn fallbacks_over(table: Option<&str>) -> (String, bool) {
    let (disable, cl, _) = fallbacks_after(table, "");
    (disable, cl)
}

/// [`fallbacks_over`] with `steps` as `$OUT/steps.txt` (where `step` records selfcheck's exit
/// status); also returns steps.txt afterwards.
fn fallbacks_after(table: Option<&str>, steps: &str) -> (String, bool, String) {
    let out = tempfile::tempdir().unwrap();
    if let Some(table) = table {
        std::fs::write(out.path().join("selfcheck.txt"), table).unwrap();
    }
    std::fs::write(out.path().join("steps.txt"), steps).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/gpu/fallbacks.sh");
    let run = Command::new("bash")
        .arg("-c")
        .arg(
            "set -uo pipefail; source \"$1\"; fallbacks > /dev/null; \
             echo \"disable=${KD_DISABLE:-}\"; channels_last_ok && echo cl=yes || echo cl=no",
        )
        .arg("fallbacks")
        .arg(&script)
        .env("OUT", out.path())
        .env_remove("KD_DISABLE")
        .output()
        .unwrap();
    let text = succeeded(&run);
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_string()
    };
    let steps = std::fs::read_to_string(out.path().join("steps.txt")).unwrap();
    (value("disable="), value("cl=") == "yes", steps)
}

/// `table` with the first row whose name starts with `name` (and, with `last`, is a
/// channels-last row, else is not) marked FAIL.
fn failing(table: &str, name: &str, last: bool) -> String {
    let mut done = false;
    let lines: Vec<String> = table
        .lines()
        .map(|l| {
            let hit = !done
                && l.starts_with(&format!("| {name}"))
                && l.contains("channels-last") == last
                && l.ends_with("| ok |");
            if hit {
                done = true;
                format!("{}| FAIL |", l.strip_suffix("| ok |").unwrap())
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(done, "no row {name} (channels-last {last}) to fail");
    lines.join("\n") + "\n"
}

#[test]
fn selfcheck_runs_every_check_on_the_cpu_and_the_device_script_reads_its_table() {
    // On the CPU it compares the CPU with itself: this keeps the GPU check runnable.
    let out = kd()
        .args(["selfcheck", "--device", "cpu"])
        .output()
        .unwrap();
    let table = succeeded(&out);
    assert_contains_all(
        &table,
        [
            "conv 64×3×32² → 64, 3×3/s1, bf16: backward filter",
            "batch norm BF16 relu=true: dx",
            "max-pool F32: backward",
            "max-pool BF16, channels-last: backward",
            "resident loader",
            "train step bf16: stem gradient",
            "method crd: loss",
            "method reviewkd: gradients of",
            "method dml: gradients of",
            "method ab init phase: gradients of",
            "method fsp init phase: loss",
        ],
    );
    assert!(table.contains(" checks, 0 failed"), "{table}");

    // Everything within bounds: nothing switched off, the channels-last bench runs.
    assert_eq!(fallbacks(&table), (String::new(), true));
    // One failing row of a family switches that family off.
    for (row, disabled) in [
        ("conv 64×64×32² → 128, 3×3/s2, tf32", "conv"),
        ("batch norm F32 relu=true: dx", "bn,bneval"),
        ("batch norm eval BF16 relu=false: y", "bn,bneval"),
        ("batch norm BF16 relu=false: running var", "bnrunning"),
        ("batch norm train tail F32: d shortcut", "traintail"),
        ("max-pool BF16: forward", "pool"),
        ("add + ReLU F32: gradient of b", "addrelu"),
        ("softmax loss KD loss", "losses"),
        ("fused SGD, ", "sgd"),
        ("augment BF16", "augment"),
        ("resident loader", "augment"),
    ] {
        let (d, cl) = fallbacks(&failing(&table, row, false));
        assert_eq!(d, disabled, "{row}");
        assert!(cl, "{row}");
    }
    // A failing channels-last row switches nothing off (the layout is opt-in), but keeps the
    // channels-last bench from running.
    for row in ["conv ", "batch norm F32", "max-pool F32", "ResNet18 w16"] {
        assert_eq!(
            fallbacks(&failing(&table, row, true)),
            (String::new(), false),
            "{row}"
        );
    }
    // An error inside a family is a failing row named after it (`Checks::guard`).
    let erring = |name: &str| {
        table.replace(
            "| add + ReLU F32: forward |",
            &format!("| {name}: error: CUDA_ERROR_LAUNCH_FAILED | NaN | 0e0 | FAIL |\n| add + ReLU F32: forward |"),
        )
    };
    assert_eq!(fallbacks(&erring("batch norm")).0, "bn,bneval");
    assert_eq!(fallbacks(&erring("max-pool BF16")).0, "pool");
    assert_eq!(fallbacks(&erring("conv")).0, "conv");
    assert_eq!(
        fallbacks(&erring("max-pool BF16, channels-last")),
        (String::new(), false)
    );
    // selfcheck cut off after the BatchNorm rows (a crash, a time limit): the families it did
    // not reach count as failed, and the channels-last bench does not run.
    let cut = &table[..table.find("| max-pool").expect("max-pool rows")];
    assert_eq!(
        fallbacks(cut),
        ("pool,addrelu,losses,sgd,augment".to_string(), false)
    );
    // Cut by the step's time limit instead (`step` wrote rc 124): the families it did not reach
    // were never checked but are not known to be wrong, so they stay on, and steps.txt says so.
    let steps = "selfcheck: rc 124, 100 s\n";
    let (d, cl, after) = fallbacks_after(Some(cut), steps);
    assert_eq!((d.as_str(), cl), ("", false));
    assert!(
        after.ends_with(
            "selfcheck: stopped by its time limit before checking \
             pool,addrelu,losses,sgd,augment; left on\n"
        ),
        "{after}"
    );
    // A failing row still switches its family off then.
    let cut_failing = failing(cut, "batch norm F32 relu=true: dx", false);
    assert_eq!(fallbacks_after(Some(&cut_failing), steps).0, "bn,bneval");
    // An empty table (selfcheck died before its first row: the device or NVRTC refused):
    // every family off. No table at all (the step never ran): nothing to go on, nothing off.
    let all = "conv,traintail,bn,bneval,pool,addrelu,losses,sgd,augment";
    assert_eq!(fallbacks(""), (all.to_string(), false));
    assert_eq!(fallbacks_over(None), (String::new(), false));
}
