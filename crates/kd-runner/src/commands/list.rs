//! `kd-runner list`: what can be chosen, one line each, and every config key with its default.
use candle_core::{DType, Device};
use kd_models::{Arch, Stem};
use kd_train::MethodConfig;

use crate::config::ExperimentConfig;

/// One line per method: what it is and the knowledge it transfers.
pub fn describe(method: &str) -> &'static str {
    match method {
        "none" => "baseline: cross-entropy only, no distillation",
        "kd" => "offline, response: Hinton et al. 2015, (1−α)·CE + α·T²·KL(teacher ‖ student); standardize = true z-scores the logits first (Sun et al. 2024)",
        "ctkd" => "offline, response: curriculum temperature KD (Li et al. 2023), Hinton KD at a temperature learned adversarially behind a gradient reversal, cosine curriculum",
        "dkd" => "offline, response: decoupled KD (Zhao et al. 2022), α·target-class + β·non-target-class KL; standardize = true as for kd",
        "dist" => "offline, response: DIST (Huang et al. 2022), Pearson correlation of predictions across classes and across the batch",
        "nkd" => "offline, response: normalized KD (Yang et al. 2023), the teacher's target probability weighs the student's target log-probability, and the teacher's distribution among the other classes, normalised, teaches the student's (γ·T²)",
        "wsld" => "offline, response: weighted soft labels (Zhou et al. 2021), Hinton's soft cross-entropy weighted per image by 1 − exp(−CE_student/CE_teacher)",
        "ttm" => "offline, response: transformed teacher matching (Zheng & Yang 2024), the teacher's probabilities to the power γ against the student at T = 1; weighted = true for WTTM",
        "fitnet" => "offline, feature: FitNets hints (Romero et al. 2015), 1×1 conv + BN + ReLU regressor, MSE",
        "at" => "offline, feature: attention transfer (Zagoruyko & Komodakis 2017), stages 1–4 (method.stages)",
        "nst" => "offline, feature: neuron selectivity transfer (Huang & Wang 2017), polynomial-kernel MMD of channel maps, stages 1–4",
        "vid" => "offline, feature: variational information distillation (Ahn et al. 2019), Gaussian NLL of teacher features, stages 1–4",
        "ofd" => "offline, feature: overhaul of feature distillation (Heo et al. 2019), partial L2 of pre-ReLU stages 1–4 above the teacher's margins",
        "ab" => "offline, feature, two-stage: activation boundaries (Heo et al. 2019), an init phase fits the body to fire where the teacher's pre-ReLU neurons fire, then CE alone",
        "ft" => "offline, feature, two-stage: factor transfer (Kim et al. 2018), an init phase trains a paraphraser of the teacher's last stage, then its factor is taught",
        "fsp" => "offline, feature, two-stage: flow of solution procedure (Yim et al. 2017), an init phase fits the body to the teacher's Gram matrices of consecutive levels, then CE alone; needs a teacher of the student's widths",
        "reviewkd" => "offline, feature: ReviewKD (Chen et al. 2021), attention-fused student levels vs teacher levels, hierarchical context loss",
        "mgd" => "offline, feature: masked generative distillation (Yang et al. 2022), random channels of the student's last stage zeroed, a generator rebuilds the teacher's last stage from the rest",
        "srrl" => "offline, feature: softmax regression representation learning (Yang et al. 2021), the last stage through a connector, pooled against the teacher's and, through the teacher's frozen classifier, against its logits",
        "rkd" => "offline, relation: relational KD (Park et al. 2019), distance and angle terms",
        "sp" => "offline, relation: similarity-preserving KD (Tung & Mori 2019), batch Gram matrices",
        "pkt" => "offline, relation: probabilistic knowledge transfer (Passalis & Tefas 2018), cosine-kernel KL",
        "cc" => "offline, relation: correlation congruence (Peng et al. 2019) as RepDistiller computes it, on projected embeddings",
        "crd" => "offline, relation: contrastive representation distillation (Tian et al. 2020), NCE against memory banks of 16384 other-class images",
        "byot" => "self, response + feature: Be Your Own Teacher (Zhang et al. 2019), deepest head teaches stage 1–3 heads",
        "kd_byot" => "offline + self: Hinton KD on the final head plus the BYOT terms",
        "dml" => "online, response: Deep Mutual Learning (Zhang et al. 2018), peers learn from each other",
        "switokd" => "online, response: switchable online KD (Qian et al. 2022), DML between the student and its teacher, the teacher paused (expert mode) while ahead and farther from the student than an adaptive threshold",
        "one" => "online, response: On-the-fly Native Ensemble (Lan et al. 2018), the gated ensemble of the student's branches (copies of its last stage) teaches each branch; the first branch is deployed",
        "okddip" => "online, response: online KD with diverse peers (Chen et al. 2020), the student's branches as peers, each taught by its own attention-weighted mix of the peers, and the deployed leader taught by their mean",
        "cl_ilr" => "online, response: collaborative learning with backprop rescaling (Song & Chai 2018) as OKDDip's authors reimplemented it, the student's branches each taught by the others' mean, their shared trunk's gradient divided by their number",
        "two_view" => "self, response: one image under two augmentations, each view teaching the other",
        "pskd" => "self, response: progressive self-KD (Kim et al. 2021), last epoch's prediction softens the target",
        "tf_kd_reg" => "self, response: teacher-free KD with a designed teacher (Yuan et al. 2020), correct_prob on the label softened at T; (1−α)·CE + α·(multiplier/K)·KL",
        "uskd" => "self, response: universal self-KD (Yang et al. 2023), NKD without a teacher: the target's soft label from the network's own confidence, the others' from Zipf's law over a ranking the final head and a weak head on stage 3 make",
        "dlb" => "self, response: self-distillation from the last mini-batch (Shen et al. 2022), each step replays the previous batch under its second augmentation, taught by the network's prediction of it one step earlier",
        "cs_kd" => "self, response: class-wise self-KD (Yun et al. 2020), a same-class image teaches",
        "mlkd" => "offline, response + relation: multi-level logit distillation (Jin et al. 2023), instance, class and batch alignment at T, 3, 5, 2, 6 on a weak and a RandAugment view; standardize = true as for kd",
        _ => "",
    }
}

/// A method's keys and preset values, `key = value` separated by commas (`name` left out).
fn method_keys(method: &str) -> String {
    let preset = MethodConfig::preset(method).expect("every name has a preset");
    match toml::Value::try_from(&preset) {
        Ok(toml::Value::Table(t)) => t
            .iter()
            .filter(|(k, _)| k.as_str() != "name")
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    }
}

/// Prints the lists.
pub fn run() -> anyhow::Result<()> {
    println!("datasets:");
    println!("  cifar10        CIFAR-10, 50,000 / 10,000 images of 10 classes (`cargo xtask fetch cifar10`)");
    println!("  cifar100       CIFAR-100, 50,000 / 10,000 images of 100 classes (`cargo xtask fetch cifar100`)");
    println!("  folder:PATH    PATH/{{train,test}}/<class>/*.png|jpg");
    println!("models (width 64, 10 classes, 32×32 images: parameters; multiply-accumulates per image with each stem):");
    for a in Arch::ALL {
        let (kind, depths) = a.blocks();
        // Built on zeros: shapes are all that is read.
        let cost = |stem| -> anyhow::Result<(usize, u64)> {
            let cfg = kd_models::ResNetConfig::new(a, stem, 10);
            let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
            let m = kd_models::ResNet::new(&cfg, vb)?;
            Ok((m.num_params(), m.macs(32, 32).backbone))
        };
        let ((params, macs_cifar), (_, macs_maxpool)) =
            (cost(Stem::Cifar)?, cost(Stem::CifarMaxpool)?);
        println!(
            "  {:<14} {:?} blocks {:?}; {} params; {} MACs (cifar), {} (cifar-maxpool)",
            a.name(),
            kind,
            depths,
            super::report::count(params),
            super::report::macs(macs_cifar),
            super::report::macs(macs_maxpool)
        );
    }
    println!("stems:");
    for s in Stem::ALL {
        println!(
            "  {:<14} {}",
            s.name(),
            match s {
                Stem::Cifar => "3×3 conv stride 1, BN, ReLU (stages at 32/16/8/4 px)",
                Stem::CifarMaxpool =>
                    "the same + 3×3 stride-2 max-pool (the pretrained teachers'; 16/8/4/2 px)",
            }
        );
    }
    println!("methods (method.name; then its keys with their defaults, `--set method.KEY=…`):");
    for m in MethodConfig::NAMES {
        println!("  {m:<14} {}", describe(m));
        let keys = method_keys(m);
        if !keys.is_empty() {
            println!("  {:<14} {keys}", "");
        }
    }
    println!("schedules:");
    println!("  warmup-cosine  linear warm-up for train.warmup_epochs, then cosine to train.final_lr (what train and suite use)");
    println!("  multistep      ×γ at given steps (library: kd_schedulers::Schedule::MultiStep)");
    println!("  constant       (library: kd_schedulers::Schedule::Constant)");
    println!("config keys (defaults; `--set key=value`):");
    for (k, v) in ExperimentConfig::default().keys() {
        println!("  {k} = {v}");
    }
    Ok(())
}
