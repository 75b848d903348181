//! torchvision's initialisation, seeded and independent of the device: Kaiming-normal
//! (fan-out, ReLU gain) convolutions, BN γ = 1 and β = 0 (γ = 0 on each block's last BN with
//! zero-init-residual), PyTorch's default `Linear` init U(±1/√fan_in). Each tensor draws from a
//! generator keyed by the seed and its own name, so adding a module never shifts the others.
use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// True for the BN that closes a residual branch (`bn2` of a BasicBlock, `bn3` of a Bottleneck),
/// in the backbone's stages or an extra branch's (`branch{i}.layer4.*`).
fn is_last_block_bn(name: &str, bottleneck: bool) -> bool {
    (name.starts_with("layer") || name.starts_with("branch"))
        && name.ends_with(if bottleneck {
            ".bn3.weight"
        } else {
            ".bn2.weight"
        })
}

/// Initialises every variable of `vm` (a ResNet's) from `seed`.
pub fn init_resnet(vm: &VarMap, seed: u64, zero_init_residual: bool) -> Result<()> {
    let data = vm.data().lock().expect("var map lock");
    // Only the backbone's blocks say which kind they are (a method's parts may name a conv3).
    let bottleneck = data
        .keys()
        .any(|k| k.starts_with("layer") && k.ends_with(".conv3.weight"));
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    // fc fan-in comes from the weight; look it up for the bias.
    let fan_in_of = |module: &str| {
        data.get(&format!("{module}.weight"))
            .and_then(|w| w.dims().get(1).copied())
            .unwrap_or(1)
    };
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name));
        let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let is_linear = module == "fc" || module.ends_with(".fc");
        let values: Vec<f32> = if dims.len() == 4 {
            let fan_out = dims[0] * dims[2] * dims[3];
            let normal = Normal::new(0.0f32, (2.0 / fan_out as f32).sqrt()).expect("finite std");
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        } else if is_linear {
            let bound = 1.0 / (fan_in_of(module) as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-bound..=bound)).collect()
        } else {
            let v = match leaf {
                "running_var" => 1.0,
                "weight" if zero_init_residual && is_last_block_bn(name, bottleneck) => 0.0,
                "weight" => 1.0,
                _ => 0.0, // bias, running_mean
            };
            vec![v; n]
        };
        let t = Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
