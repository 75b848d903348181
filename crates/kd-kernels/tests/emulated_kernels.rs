//! The CUDA kernel sources (`src/kernels/*.cu`) run on the CPU in a small CUDA emulator
//! (`tests/emulator/`), with the launch geometry the GPU gets ([`LaunchGeometry`]), and each
//! kernel's output is compared with the CPU path of its op. So CI, which has no GPU, runs the
//! kernels' own indexing, reductions, warp shuffles and bf16 rounding, not a rewrite of them.
//!
//! The emulator is built twice, with AddressSanitizer and UBSan (an out-of-bounds access or
//! undefined behaviour in a kernel fails the test) and with ThreadSanitizer (a data race between
//! the threads of a block fails it), and every launch runs under both, which must agree bit for
//! bit. It needs a C++20 compiler: `c++`, or the one `CXX` names.
//!
//! What it cannot show (the GPU check `kd-runner selfcheck --device cuda` does): the GPU's
//! memory model beyond what barriers order, and its approximate intrinsics.
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use kd_kernels::augment::MixKind;
use kd_kernels::batch_norm::update_running_stats;
use kd_kernels::launch::LaunchGeometry;
use kd_kernels::{
    add_relu, augment_batch, batch_norm_train, sgd_momentum_step, AugmentPlan, BatchMix, MaxPool2d,
    MemoryFormat, Normalisation, SgdStep,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// The emulator: built once per sanitizer (cached by a hash of its sources), one process a launch.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Sanitizer {
    Address,
    Thread,
}

impl Sanitizer {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Sanitizer::Address => &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
            Sanitizer::Thread => &["-fsanitize=thread"],
        }
    }
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every file the emulator is built from: its own two and the kernel sources.
fn emulator_sources() -> Vec<PathBuf> {
    let mut files = vec![
        crate_dir().join("tests/emulator/cuda_emu.hpp"),
        crate_dir().join("tests/emulator/driver.cpp"),
    ];
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(crate_dir().join("src/kernels"))
        .expect("src/kernels")
        .map(|e| e.unwrap().path())
        .collect();
    kernels.sort();
    files.extend(kernels);
    files
}

fn build(san: Sanitizer) -> PathBuf {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut flags = vec!["-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Wextra"];
    flags.extend(san.flags());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&cxx, &flags).hash(&mut h);
    for f in emulator_sources() {
        std::fs::read(&f).unwrap().hash(&mut h);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let exe = dir.join(format!("kd-cuda-emu-{san:?}-{:016x}", h.finish()));
    if exe.exists() {
        return exe;
    }
    let tmp = exe.with_extension("partial");
    let out = Command::new(&cxx)
        .args(&flags)
        .arg(crate_dir().join("tests/emulator/driver.cpp"))
        .arg("-o")
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| {
            panic!("could not run the C++ compiler `{cxx}` ({e}); the kernel emulator needs a C++20 compiler (g++ ≥ 11 or clang ≥ 14): install one or name it in CXX")
        });
    assert!(
        out.status.success(),
        "building the kernel emulator with `{cxx} {}` failed:\n{}",
        flags.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &exe).unwrap();
    exe
}

fn emulator(san: Sanitizer) -> PathBuf {
    static ADDRESS: OnceLock<PathBuf> = OnceLock::new();
    static THREAD: OnceLock<PathBuf> = OnceLock::new();
    let cell = match san {
        Sanitizer::Address => &ADDRESS,
        Sanitizer::Thread => &THREAD,
    };
    cell.get_or_init(|| build(san)).clone()
}

/// One kernel argument.
#[derive(Clone, Debug)]
enum Arg {
    /// A device buffer (its bytes), read back after the launch.
    Buf(Vec<u8>),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// The emulator's request for one launch (the format is in `tests/emulator/driver.cpp`).
fn request(kernel: &str, g: LaunchGeometry, args: &[Arg]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend((kernel.len() as u32).to_le_bytes());
    req.extend(kernel.as_bytes());
    for b in g.grid {
        req.extend(b.to_le_bytes());
    }
    req.extend(g.threads.to_le_bytes());
    req.extend((args.len() as u32).to_le_bytes());
    for a in args {
        match a {
            Arg::Buf(b) => {
                req.push(b'P');
                req.extend((b.len() as u64).to_le_bytes());
                req.extend(b);
            }
            Arg::I32(v) => {
                req.push(b'i');
                req.extend(v.to_le_bytes());
            }
            Arg::I64(v) => {
                req.push(b'l');
                req.extend(v.to_le_bytes());
            }
            Arg::F32(v) => {
                req.push(b'f');
                req.extend(v.to_le_bytes());
            }
        }
    }
    req
}

/// Longest a launch may take: a kernel whose threads wait at a barrier that not all of them
/// reach would otherwise hang the test run.
const LAUNCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Exit status, stdout and stderr of the emulator given `req`.
fn run_emulator(san: Sanitizer, req: Vec<u8>) -> (std::process::ExitStatus, Vec<u8>, Vec<u8>) {
    use std::io::Read;
    let mut child = Command::new(emulator(san))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the kernel emulator");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&req));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        out.read_to_end(&mut b).map(|_| b)
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        err.read_to_end(&mut b).map(|_| b)
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LAUNCH_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            panic!("the kernel emulator ({san:?}) did not finish in {LAUNCH_TIMEOUT:?}: a barrier that some threads never reach?");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    // A failed write means the emulator stopped reading: its exit status says why.
    let _ = writer.join().unwrap();
    (
        status,
        out.join().unwrap().unwrap(),
        err.join().unwrap().unwrap(),
    )
}

fn run_once(san: Sanitizer, kernel: &str, g: LaunchGeometry, args: &[Arg]) -> Vec<Vec<u8>> {
    let (status, stdout, stderr) = run_emulator(san, request(kernel, g, args));
    assert!(
        status.success(),
        "{kernel} {g:?} under the {san:?} sanitizer failed ({status}):\n{}",
        String::from_utf8_lossy(&stderr)
    );
    let (mut rest, mut bufs) = (&stdout[..], Vec::new());
    while !rest.is_empty() {
        let n = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        bufs.push(rest[8..8 + n].to_vec());
        rest = &rest[8 + n..];
    }
    bufs
}

/// Runs `kernel` over `g` under AddressSanitizer; returns its buffers after the launch, in
/// argument order.
fn launch(kernel: &str, g: LaunchGeometry, args: &[Arg]) -> Vec<Vec<u8>> {
    run_once(Sanitizer::Address, kernel, g, args)
}

/// The launcher for the `i`-th of several geometries of one case: `chosen` for the first (the
/// production geometry), [`launch`] for the others (ThreadSanitizer checks the production one).
fn launcher(
    i: usize,
    chosen: fn(&str, LaunchGeometry, &[Arg]) -> Vec<Vec<u8>>,
) -> fn(&str, LaunchGeometry, &[Arg]) -> Vec<Vec<u8>> {
    if i == 0 {
        chosen
    } else {
        launch
    }
}

/// [`launch`], and again under ThreadSanitizer, which must give the same bits. ThreadSanitizer
/// costs about five times as much, so the tests race-check each kernel in some of its cases.
fn launch_race_checked(kernel: &str, g: LaunchGeometry, args: &[Arg]) -> Vec<Vec<u8>> {
    let a = run_once(Sanitizer::Address, kernel, g, args);
    let t = run_once(Sanitizer::Thread, kernel, g, args);
    assert_eq!(a, t, "{kernel} {g:?}: the two emulator builds disagree");
    a
}

// ---------------------------------------------------------------------------------------------
// Element types and comparisons.

trait Elem: Copy {
    const DTYPE: DType;
    const SUFFIX: &'static str;
    /// Relative bound between the kernel and the CPU path for element-wise results.
    const TOL: f32;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn to_bytes(v: &[Self]) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Vec<Self>;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    const SUFFIX: &'static str = "f32";
    const TOL: f32 = 2e-5;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn from_bytes(b: &[u8]) -> Vec<Self> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::BF16;
    const SUFFIX: &'static str = "bf16";
    // One bf16 rounding step (2⁻⁸): both sides compute in f32 and round once, so they differ
    // at most where the f32 values straddle a rounding boundary.
    const TOL: f32 = 1.0 / 128.0;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
    }
    fn from_bytes(b: &[u8]) -> Vec<Self> {
        b.chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())))
            .collect()
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    <f32 as Elem>::from_bytes(b)
}

fn buf_f32(v: &[f32]) -> Arg {
    Arg::Buf(<f32 as Elem>::to_bytes(v))
}

fn buf<E: Elem>(v: &[E]) -> Arg {
    Arg::Buf(E::to_bytes(v))
}

fn tensor_f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn elems<E: Elem>(t: &Tensor) -> Vec<E> {
    tensor_f32s(t).into_iter().map(E::from_f32).collect()
}

/// A buffer of `E` read back from the emulator, as f32.
fn values<E: Elem>(b: &[u8]) -> Vec<f32> {
    E::from_bytes(b).into_iter().map(E::to_f32).collect()
}

/// `v` as a CPU tensor of `E`'s dtype and shape `dims` (exact: `v` holds `E` values).
fn tensor_of<E: Elem>(v: &[E], dims: (usize, usize, usize, usize)) -> Tensor {
    let v: Vec<f32> = v.iter().map(|e| e.to_f32()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(E::DTYPE)
        .unwrap()
}

/// Asserts |got − want| ≤ tol · max(1, max |want|) element-wise; NaN must meet NaN.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || g.is_nan() {
            assert!(w.is_nan() && g.is_nan(), "{what}[{i}]: got {g}, want {w}");
            continue;
        }
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (bound {})",
            tol * scale
        );
    }
}

fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

// ---------------------------------------------------------------------------------------------
// The kernels the emulator knows are the kernels the sources define.

/// Kernel names defined in a source: `extern "C" __global__ void NAME(`, with the names inside
/// a `KD_*_KERNELS(SUFFIX, E)` macro expanded for each instantiation in the same file.
fn kernels_in_source(src: &str) -> BTreeSet<String> {
    let suffixes: Vec<&str> = src
        .lines()
        .filter(|l| l.starts_with("KD_") && l.contains("_KERNELS("))
        .map(|l| {
            l.split('(')
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim()
        })
        .collect();
    let mut names = BTreeSet::new();
    for part in src.split("__global__ void").skip(1) {
        let name = part.trim_start().split('(').next().unwrap().trim();
        match name.strip_suffix("_##SUFFIX") {
            Some(stem) => names.extend(suffixes.iter().map(|s| format!("{stem}_{s}"))),
            None => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn the_emulator_runs_every_kernel_the_sources_define() {
    let mut defined = BTreeSet::new();
    for f in emulator_sources() {
        if f.extension().is_some_and(|e| e == "cu") {
            defined.extend(kernels_in_source(&std::fs::read_to_string(&f).unwrap()));
        }
    }
    assert!(defined.len() >= 17, "{defined:?}");
    let out = Command::new(emulator(Sanitizer::Address))
        .arg("--list")
        .output()
        .unwrap();
    let known: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        known, defined,
        "tests/emulator/driver.cpp must register every kernel of src/kernels"
    );
}

#[test]
fn the_emulator_rejects_arguments_that_do_not_match_the_kernel() {
    // bn_update_running(float*, const float*, int, int, float, float): a float where an int is.
    let args = [
        buf_f32(&[0.0; 4]),
        buf_f32(&[0.0; 8]),
        Arg::F32(4.0),
        Arg::I32(0),
        Arg::F32(0.1),
        Arg::F32(1.0),
    ];
    let g = LaunchGeometry::linear(1, 32);
    let (status, _, stderr) =
        run_emulator(Sanitizer::Address, request("bn_update_running", g, &args));
    assert!(!status.success());
    let err = String::from_utf8_lossy(&stderr);
    assert!(
        err.contains("argument 2 is 'f', the kernel wants an int"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// BatchNorm: statistics, apply (+ReLU), backward reduce, backward data, running statistics.

/// How a BatchNorm case lays out the 4-D buffers it hands the kernels under test: the
/// channels-first kernels take the (N, C, H, W) values as they are, the channels-last ones
/// (`*_cl_*`) the same values as (N, H, W, C) and give results back so, and each has its own
/// launch geometries. The CPU paths the results are compared with are channels-first.
type Dims = (usize, usize, usize, usize);

/// The (N, C, H, W), layout cases of a BatchNorm test: `first` channels-first (its shapes probe
/// the plane tiles), `last` channels-last (fewer channels than a tile's 32, and more: two
/// channel groups; the smaller geometries make the rows loop at any size).
fn layouts(first: &[Dims], last: &[Dims]) -> Vec<(Dims, MemoryFormat)> {
    let f = first.iter().map(|&d| (d, MemoryFormat::ChannelsFirst));
    f.chain(last.iter().map(|&d| (d, MemoryFormat::ChannelsLast)))
        .collect()
}

#[derive(Clone, Copy)]
struct Lay {
    format: MemoryFormat,
    n: usize,
    c: usize,
    hw: usize,
}

impl Lay {
    fn new(format: MemoryFormat, (n, c, h, w): (usize, usize, usize, usize)) -> Self {
        Lay {
            format,
            n,
            c,
            hw: h * w,
        }
    }

    fn last(&self) -> bool {
        self.format == MemoryFormat::ChannelsLast
    }

    /// Kernel `base` of this layout for element suffix `sfx`.
    fn kernel(&self, base: &str, sfx: &str) -> String {
        match self.last() {
            false => format!("{base}_{sfx}"),
            true => format!("{base}_cl_{sfx}"),
        }
    }

    /// Channels-first values `v` (one or more (N, C, H·W) tensors one after another) in this
    /// layout.
    fn put<T: Copy>(&self, v: &[T]) -> Vec<T> {
        let (c, hw) = (self.c, self.hw);
        match self.last() {
            false => v.to_vec(),
            // Element (image, spatial, channel) of the channels-last copy.
            true => (0..v.len())
                .map(|k| v[(k / (hw * c)) * c * hw + (k % c) * hw + (k / c) % hw])
                .collect(),
        }
    }

    /// Values `v` of this layout as channels-first (the inverse of [`Lay::put`]).
    fn take(&self, v: Vec<f32>) -> Vec<f32> {
        let (c, hw) = (self.c, self.hw);
        match self.last() {
            false => v,
            true => (0..v.len())
                .map(|k| v[(k / (c * hw)) * hw * c + (k % hw) * c + (k / hw) % c])
                .collect(),
        }
    }

    /// The element-wise kernels' (N,) C, H·W arguments: channels-last ones take N too.
    fn dims_args(&self) -> Vec<Arg> {
        let mut a = Vec::new();
        if self.last() {
            a.push(Arg::I32(self.n as i32));
        }
        a.extend([Arg::I32(self.c as i32), Arg::I32(self.hw as i32)]);
        a
    }

    /// Geometries of the per-channel reductions: the production one, then smaller blocks that
    /// merge partial results differently. Channels-first: one slice of three warps; slices of
    /// two warps over one or two samples (uneven when N is odd). Channels-last: one slice of
    /// 64-thread tiles (the rows loop); one slice per row tile of a warp.
    fn reductions(&self) -> [LaunchGeometry; 3] {
        let (n, c) = (self.n, self.c);
        if self.last() {
            let m = n * self.hw;
            let groups = c.div_ceil(LaunchGeometry::channel_group(c)) as u32;
            let rows = (32 / LaunchGeometry::channel_group(c)).max(1);
            return [
                LaunchGeometry::channels_last_reduction(m, c),
                LaunchGeometry::linear(groups, 64),
                LaunchGeometry {
                    grid: [groups, m.div_ceil(rows) as u32, 1],
                    threads: 32,
                },
            ];
        }
        [
            LaunchGeometry::per_channel(n, c),
            LaunchGeometry::linear(c as u32, 96),
            LaunchGeometry {
                grid: [c as u32, n.div_ceil(2) as u32, 1],
                threads: 64,
            },
        ]
    }

    /// Runs an element-wise BN kernel at its production geometry (with `chosen`) and at one
    /// that makes it loop (channels-first: one warp a plane; channels-last: one warp a channel
    /// group for all rows); the buffer `out` must come out the same bits from both. Returns it,
    /// channels-first.
    fn elementwise(
        &self,
        kernel: &str,
        args: &[Arg],
        out: usize,
        chosen: fn(&str, LaunchGeometry, &[Arg]) -> Vec<Vec<u8>>,
    ) -> Vec<u8> {
        let (n, c, hw) = (self.n, self.c, self.hw);
        let geometries = match self.last() {
            false => [
                LaunchGeometry::per_plane(n, c, hw).unwrap(),
                LaunchGeometry {
                    grid: [1, c as u32, n as u32],
                    threads: 32,
                },
            ],
            true => [
                LaunchGeometry::channels_last_rows(n * hw, c),
                LaunchGeometry::linear(c.div_ceil(LaunchGeometry::channel_group(c)) as u32, 32),
            ],
        };
        let outs: Vec<Vec<u8>> = geometries
            .into_iter()
            .enumerate()
            .map(|(i, g)| launcher(i, chosen)(kernel, g, args).swap_remove(out))
            .collect();
        assert_eq!(
            outs[0],
            outs[1],
            "{kernel} {:?}: the geometry changed the result",
            (n, c, hw)
        );
        outs[0].clone()
    }

    /// [`Lay::elementwise`]'s output as channels-first values.
    fn elementwise_values<E: Elem>(
        &self,
        kernel: &str,
        args: &[Arg],
        out: usize,
        chosen: fn(&str, LaunchGeometry, &[Arg]) -> Vec<Vec<u8>>,
    ) -> Vec<f32> {
        self.take(values::<E>(&self.elementwise(kernel, args, out, chosen)))
    }
}

/// Runs `kernel` (`bn_stats_finish` or `bn_reduce_finish`) over the slices' partial results
/// `part`; returns the (2, C) result.
fn finish(
    kernel: &str,
    part: &[f32],
    c: usize,
    slices: usize,
    launch: fn(&str, LaunchGeometry, &[Arg]) -> Vec<Vec<u8>>,
) -> Vec<f32> {
    let b = launch(
        kernel,
        LaunchGeometry::flat(c),
        &[
            buf_f32(part),
            buf_f32(&vec![f32::NAN; 2 * c]),
            Arg::I32(c as i32),
            Arg::I32(slices as i32),
        ],
    );
    f32s(&b[1])
}

fn batch_norm_case<E: Elem>(
    rng: &mut ChaCha8Rng,
    (n, c, h, w): (usize, usize, usize, usize),
    format: MemoryFormat,
) {
    let lay = Lay::new(format, (n, c, h, w));
    let hw = h * w;
    let total = n * c * hw;
    let eps = 1e-5f32;
    // Channels with different means and spreads; values exactly representable in E.
    let x: Vec<E> = (0..total)
        .map(|k| {
            let ch = (k / hw) % c;
            E::from_f32(rng.gen_range(-1.0f32..1.0) * (0.5 + ch as f32) + ch as f32 - 1.0)
        })
        .collect();
    let gamma = random(rng, c, 0.5, 1.5);
    let beta = random(rng, c, -0.5, 0.5);
    let dy: Vec<E> = (0..total)
        .map(|_| E::from_f32(rng.gen_range(-1.0f32..1.0)))
        .collect();
    let as_tensor = |v: &[E]| tensor_of(v, (n, c, h, w));
    let (ni, ci, hwi) = (Arg::I32(n as i32), Arg::I32(c as i32), Arg::I32(hw as i32));
    let sfx = E::SUFFIX;

    for relu in [false, true] {
        let what = format!("{sfx} {:?} {format:?} relu={relu}", (n, c, h, w));
        // Races do not depend on the element type or the ReLU: check one combination.
        let launch = if E::DTYPE == DType::F32 && relu {
            launch_race_checked
        } else {
            launch
        };
        // The CPU path, gradients through autograd.
        let xv = Var::from_tensor(&as_tensor(&x)).unwrap();
        let gv = Var::from_vec(gamma.clone(), c, &Device::Cpu).unwrap();
        let bv = Var::from_vec(beta.clone(), c, &Device::Cpu).unwrap();
        let out = batch_norm_train(&xv, &gv, &bv, eps as f64, relu).unwrap();
        let dyt = as_tensor(&dy).to_dtype(DType::F32).unwrap();
        let grads = (out.y.to_dtype(DType::F32).unwrap() * &dyt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let cpu_stats = tensor_f32s(&out.stats);
        let cpu_y: Vec<E> = elems(&out.y);
        let cpu_dx = tensor_f32s(grads.get(&xv).unwrap());
        let mut cpu_red = tensor_f32s(grads.get(&bv).unwrap());
        cpu_red.extend(tensor_f32s(grads.get(&gv).unwrap()));

        // Statistics: partial Welford states per (channel, slice), then merged per channel.
        // The production geometry; one slice of three warps; one slice per sample.
        let mut stats = Vec::new();
        for (i, g) in lay.reductions().into_iter().enumerate() {
            let launch = launcher(i, launch);
            let slices = g.grid[1] as usize;
            let b = launch(
                &lay.kernel("bn_stats", sfx),
                g,
                &[
                    buf(&lay.put(&x)),
                    buf_f32(&vec![f32::NAN; 3 * slices * c]),
                    ni.clone(),
                    ci.clone(),
                    hwi.clone(),
                ],
            );
            let merged = finish("bn_stats_finish", &f32s(&b[1]), c, slices, launch);
            assert_close(&format!("stats {what} {g:?}"), &merged, &cpu_stats, 2e-6);
            stats = merged;
        }

        // Apply: the production geometry and one that makes the kernel loop.
        let y = lay.elementwise_values::<E>(
            &lay.kernel("bn_apply", sfx),
            &[
                vec![
                    buf(&lay.put(&x)),
                    buf_f32(&stats),
                    buf_f32(&gamma),
                    buf_f32(&beta),
                    buf(&vec![E::from_f32(f32::NAN); total]),
                ],
                lay.dims_args(),
                vec![Arg::F32(eps), Arg::I32(relu as i32)],
            ]
            .concat(),
            4,
            launch,
        );
        let want: Vec<f32> = cpu_y.iter().map(|e| e.to_f32()).collect();
        assert_close(&format!("y {what}"), &y, &want, E::TOL);
        if relu {
            assert!(y.iter().all(|v| *v >= 0.0), "y {what}: negative after ReLU");
        }

        // Backward: Σdy' and Σdy'·x̂ per channel, then dx; the CPU's y gives the ReLU mask.
        for (i, g) in lay.reductions().into_iter().enumerate() {
            let launch = launcher(i, launch);
            let slices = g.grid[1] as usize;
            let b = launch(
                &lay.kernel("bn_backward_reduce", sfx),
                g,
                &[
                    buf(&lay.put(&x)),
                    buf(&lay.put(&cpu_y)),
                    buf(&lay.put(&dy)),
                    buf_f32(&cpu_stats),
                    buf_f32(&vec![f32::NAN; 2 * slices * c]),
                    ni.clone(),
                    ci.clone(),
                    hwi.clone(),
                    Arg::F32(eps),
                    Arg::I32(relu as i32),
                ],
            );
            let red = finish("bn_reduce_finish", &f32s(&b[4]), c, slices, launch);
            assert_close(&format!("dβ, dγ {what} {g:?}"), &red, &cpu_red, 1e-5);
        }
        let dx = lay.elementwise_values::<E>(
            &lay.kernel("bn_backward_data", sfx),
            &[
                buf(&lay.put(&x)),
                buf(&lay.put(&cpu_y)),
                buf(&lay.put(&dy)),
                buf_f32(&cpu_stats),
                buf_f32(&gamma),
                buf_f32(&cpu_red),
                buf(&vec![E::from_f32(f32::NAN); total]),
                ni.clone(),
                ci.clone(),
                hwi.clone(),
                Arg::F32(eps),
                Arg::I32(relu as i32),
                Arg::I32(0),
            ],
            6,
            launch,
        );
        assert_close(&format!("dx {what}"), &dx, &cpu_dx, E::TOL.max(1e-4));
    }
}

/// A residual block's tail in training mode: `bn_apply_add_relu_*` and `bn_backward_data_*`
/// with the shortcut's gradient, against `batch_norm_train_add_relu`'s CPU path (its gradients
/// through autograd). The statistics and backward sums are the plain BatchNorm's kernels,
/// checked by [`batch_norm_case`]; here they come from the CPU.
fn training_tail_case<E: Elem>(
    rng: &mut ChaCha8Rng,
    (n, c, h, w): (usize, usize, usize, usize),
    format: MemoryFormat,
) {
    let lay = Lay::new(format, (n, c, h, w));
    let hw = h * w;
    let total = n * c * hw;
    let eps = 1e-5f32;
    let as_e = |v: Vec<f32>| -> Vec<E> { v.into_iter().map(E::from_f32).collect() };
    let x = as_e(random(rng, total, -2.0, 3.0));
    // Shortcuts large enough to flip the sign of bn(x) in places.
    let r = as_e(random(rng, total, -2.0, 2.0));
    let dy = as_e(random(rng, total, -1.0, 1.0));
    let gamma = random(rng, c, 0.5, 1.5);
    let beta = random(rng, c, -0.5, 0.5);
    let as_tensor = |v: &[E]| tensor_of(v, (n, c, h, w));
    let xv = Var::from_tensor(&as_tensor(&x)).unwrap();
    let rv = Var::from_tensor(&as_tensor(&r)).unwrap();
    let gv = Var::from_vec(gamma.clone(), c, &Device::Cpu).unwrap();
    let bv = Var::from_vec(beta.clone(), c, &Device::Cpu).unwrap();
    let out = kd_kernels::batch_norm_train_add_relu(&xv, &gv, &bv, &rv, eps as f64, None).unwrap();
    let dyt = as_tensor(&dy).to_dtype(DType::F32).unwrap();
    let grads = (out.y.to_dtype(DType::F32).unwrap() * &dyt)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let stats = tensor_f32s(&out.stats);
    let cpu_y: Vec<E> = elems(&out.y);
    let mut cpu_red = tensor_f32s(grads.get(&bv).unwrap());
    cpu_red.extend(tensor_f32s(grads.get(&gv).unwrap()));
    let mut cpu_grads = tensor_f32s(grads.get(&xv).unwrap());
    cpu_grads.extend(tensor_f32s(grads.get(&rv).unwrap()));
    let (ni, ci, hwi) = (Arg::I32(n as i32), Arg::I32(c as i32), Arg::I32(hw as i32));
    let sfx = E::SUFFIX;
    let what = format!("{sfx} {:?} {format:?}", (n, c, h, w));
    let launch = if E::DTYPE == DType::F32 {
        launch_race_checked
    } else {
        launch
    };

    let beta_gamma = [beta, gamma.clone()].concat();
    let y = lay.elementwise_values::<E>(
        &lay.kernel("bn_apply_add_relu", sfx),
        &[
            vec![
                buf(&lay.put(&x)),
                buf(&lay.put(&r)),
                buf_f32(&stats),
                buf_f32(&beta_gamma),
                buf(&vec![E::from_f32(f32::NAN); total]),
            ],
            lay.dims_args(),
            vec![Arg::F32(eps)],
        ]
        .concat(),
        4,
        launch,
    );
    let want: Vec<f32> = cpu_y.iter().map(|e| e.to_f32()).collect();
    assert_close(&format!("tail y {what}"), &y, &want, E::TOL);
    assert!(y.contains(&0.0) && y.iter().any(|v| *v > 0.0), "{what}");

    // dx, then the shortcut's gradient, in one buffer of two tensors.
    let both = lay.elementwise_values::<E>(
        &lay.kernel("bn_backward_data", sfx),
        &[
            buf(&lay.put(&x)),
            buf(&lay.put(&cpu_y)),
            buf(&lay.put(&dy)),
            buf_f32(&stats),
            buf_f32(&gamma),
            buf_f32(&cpu_red),
            buf(&vec![E::from_f32(f32::NAN); 2 * total]),
            ni,
            ci,
            hwi,
            Arg::F32(eps),
            Arg::I32(1),
            Arg::I32(1),
        ],
        6,
        launch,
    );
    assert_close(
        &format!("tail dx {what}"),
        &both[..total],
        &cpu_grads[..total],
        E::TOL.max(1e-4),
    );
    assert_close(
        &format!("tail shortcut gradient {what}"),
        &both[total..],
        &cpu_grads[total..],
        E::TOL,
    );
}

#[test]
fn training_tail_kernels_match_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let first = [(3, 5, 4, 6), (2, 2, 24, 24), (2, 3, 1, 1)];
    for (dims, format) in layouts(&first, &[(3, 5, 4, 6), (2, 40, 2, 3)]) {
        training_tail_case::<f32>(&mut rng, dims, format);
        training_tail_case::<bf16>(&mut rng, dims, format);
    }
}

#[test]
fn batch_norm_kernels_match_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Channels-first: planes smaller than a warp, larger than a per-plane block (256) and than
    // a per-channel block (512, so the reduction tile loops along the plane); fewer values per
    // channel than threads and more; the smallest batch.
    let first = [(3, 5, 4, 6), (4, 2, 12, 12), (2, 2, 24, 24), (2, 3, 1, 1)];
    for (dims, format) in layouts(&first, &[(3, 5, 4, 6), (2, 3, 1, 1), (2, 40, 2, 3)]) {
        batch_norm_case::<f32>(&mut rng, dims, format);
        batch_norm_case::<bf16>(&mut rng, dims, format);
    }
}

fn batch_norm_eval_case<E: Elem>(
    rng: &mut ChaCha8Rng,
    (n, c, h, w): (usize, usize, usize, usize),
    format: MemoryFormat,
) {
    let lay = Lay::new(format, (n, c, h, w));
    let hw = h * w;
    let total = n * c * hw;
    let eps = 1e-5f32;
    let x: Vec<E> = (0..total)
        .map(|_| E::from_f32(rng.gen_range(-2.0f32..2.0)))
        .collect();
    let r: Vec<E> = (0..total)
        .map(|_| E::from_f32(rng.gen_range(-1.0f32..1.0)))
        .collect();
    let mean = random(rng, c, -1.0, 1.0);
    let var = random(rng, c, 0.2, 2.0);
    let gamma = random(rng, c, 0.5, 1.5);
    let beta = random(rng, c, -0.5, 0.5);
    // The CPU path with constants (nothing needs a gradient), as a frozen teacher runs it.
    let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
    let (xt, rt) = (tensor_of(&x, (n, c, h, w)), tensor_of(&r, (n, c, h, w)));
    let (mt, vt, gt, bt) = (t(&mean), t(&var), t(&gamma), t(&beta));
    let params = || {
        [
            buf_f32(&mean),
            buf_f32(&var),
            buf_f32(&gamma),
            buf_f32(&beta),
        ]
    };
    let sfx = E::SUFFIX;
    for relu in [false, true] {
        let want = kd_kernels::batch_norm_eval(&xt, &gt, &bt, &mt, &vt, eps as f64, relu).unwrap();
        let mut args = vec![buf(&lay.put(&x))];
        args.extend(params());
        args.push(buf(&vec![E::from_f32(f32::NAN); total]));
        args.extend(lay.dims_args());
        args.extend([Arg::F32(eps), Arg::I32(relu as i32)]);
        let y = lay.elementwise_values::<E>(&lay.kernel("bn_eval", sfx), &args, 5, launch);
        let what = format!("bn_eval_{sfx} {:?} {format:?} relu={relu}", (n, c, h, w));
        assert_close(&what, &y, &tensor_f32s(&want), E::TOL);
    }
    let want =
        kd_kernels::batch_norm_eval_add_relu(&xt, &gt, &bt, &mt, &vt, eps as f64, &rt).unwrap();
    let mut args = vec![buf(&lay.put(&x))];
    args.extend(params());
    args.extend([buf(&lay.put(&r)), buf(&vec![E::from_f32(f32::NAN); total])]);
    args.extend(lay.dims_args());
    args.push(Arg::F32(eps));
    let y = lay.elementwise_values::<E>(
        &lay.kernel("bn_eval_add_relu", sfx),
        &args,
        6,
        launch_race_checked,
    );
    let what = format!("bn_eval_add_relu_{sfx} {:?} {format:?}", (n, c, h, w));
    // bf16: the CPU path rounds the BatchNorm's output to bf16 before the add, the kernel not.
    assert_close(&what, &y, &tensor_f32s(&want), 2.0 * E::TOL);
    assert!(y.iter().all(|v| *v >= 0.0), "{what}: negative after ReLU");
}

#[test]
fn eval_batch_norm_kernels_match_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    // Channels-first: a plane smaller than a warp, one larger than a per-plane block, one value
    // per plane.
    let first = [(3, 5, 4, 6), (2, 3, 24, 24), (4, 2, 1, 1)];
    for (dims, format) in layouts(&first, &[(3, 5, 4, 6), (2, 40, 2, 3)]) {
        batch_norm_eval_case::<f32>(&mut rng, dims, format);
        batch_norm_eval_case::<bf16>(&mut rng, dims, format);
    }
}

/// Random running statistics for the C channels of `stats` (2, C), and the CPU's update of
/// them from `stats` over `count` values per channel: (mean before, variance before, mean after,
/// variance after).
fn cpu_running_update(
    rng: &mut ChaCha8Rng,
    stats: &[f32],
    count: usize,
    momentum: f32,
) -> (Vec<f32>, Vec<f32>, Tensor, Tensor) {
    let c = stats.len() / 2;
    let mean0 = random(rng, c, -1.0, 1.0);
    let var0 = random(rng, c, 0.5, 1.5);
    let (rm, rv) = (
        Tensor::new(mean0.as_slice(), &Device::Cpu).unwrap(),
        Tensor::new(var0.as_slice(), &Device::Cpu).unwrap(),
    );
    let st = Tensor::from_vec(stats.to_vec(), (2, c), &Device::Cpu).unwrap();
    update_running_stats(&rm, &rv, &st, momentum as f64, count).unwrap();
    (mean0, var0, rm, rv)
}

#[test]
fn running_statistics_kernel_matches_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (c, count, momentum) = (300usize, 50usize, 0.1f32);
    let stats = random(&mut rng, 2 * c, 0.1, 2.0);
    let (mean0, var0, rm, rv) = cpu_running_update(&mut rng, &stats, count, momentum);
    let scale = (count as f64 / (count as f64 - 1.0)) as f32;
    for (row, start, s, want) in [(0, &mean0, 1.0, &rm), (1, &var0, scale, &rv)] {
        let b = launch_race_checked(
            "bn_update_running",
            LaunchGeometry::flat(c),
            &[
                buf_f32(start),
                buf_f32(&stats),
                Arg::I32(c as i32),
                Arg::I32(row),
                Arg::F32(momentum),
                Arg::F32(s),
            ],
        );
        assert_close(
            &format!("running row {row}"),
            &f32s(&b[0]),
            &tensor_f32s(want),
            1e-6,
        );
    }
}

#[test]
fn statistics_with_running_update_match_the_two_launches() {
    // bn_stats_finish_running against bn_stats_finish followed by the CPU's running update:
    // the same (2, C) statistics, bit for bit, and the running statistics as the CPU updates
    // them from those statistics. Partial states from bn_stats over three slices (uneven).
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, c, hw) = (5usize, 70usize, 9usize);
    let x: Vec<f32> = (0..n * c * hw)
        .map(|k| rng.gen_range(-1.0f32..1.0) * (1.0 + (k / hw % c) as f32 * 0.1))
        .collect();
    let g = LaunchGeometry {
        grid: [c as u32, 3, 1],
        threads: 64,
    };
    let part = f32s(
        &launch(
            "bn_stats_f32",
            g,
            &[
                buf_f32(&x),
                buf_f32(&vec![f32::NAN; 3 * 3 * c]),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
                Arg::I32(hw as i32),
            ],
        )[1],
    );
    let stats = finish("bn_stats_finish", &part, c, 3, launch);
    let (count, momentum) = (n * hw, 0.1f32);
    let (mean0, var0, rm, rv) = cpu_running_update(&mut rng, &stats, count, momentum);
    let var_scale = (count as f64 / (count as f64 - 1.0)) as f32;
    // The production geometry, and blocks of one warp (threads past C do nothing).
    for g in [LaunchGeometry::flat(c), LaunchGeometry::linear(3, 32)] {
        let b = launch_race_checked(
            "bn_stats_finish_running",
            g,
            &[
                buf_f32(&part),
                buf_f32(&vec![f32::NAN; 2 * c]),
                Arg::I32(c as i32),
                Arg::I32(3),
                buf_f32(&mean0),
                buf_f32(&var0),
                Arg::F32(momentum),
                Arg::F32(var_scale),
            ],
        );
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&f32s(&b[1])), bits(&stats), "statistics {g:?}");
        assert_close(
            &format!("running mean {g:?}"),
            &f32s(&b[2]),
            &tensor_f32s(&rm),
            1e-6,
        );
        assert_close(
            &format!("running var {g:?}"),
            &f32s(&b[3]),
            &tensor_f32s(&rv),
            1e-6,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Max-pool forward and backward, with ties and a NaN.

fn max_pool_case<E: Elem>(
    rng: &mut ChaCha8Rng,
    pool: MaxPool2d,
    (n, c, h, w): (usize, usize, usize, usize),
    format: MemoryFormat,
) {
    let (oh, ow) = (pool.out_size(h), pool.out_size(w));
    let planes = n * c;
    // Few distinct values, many of them 0 as after a ReLU: windows tie often.
    let mut x: Vec<E> = (0..planes * h * w)
        .map(|_| E::from_f32(rng.gen_range(0..4) as f32 * 0.5))
        .collect();
    x[h * w + w + 1] = E::from_f32(f32::NAN);
    let dy: Vec<E> = (0..planes * oh * ow)
        .map(|_| E::from_f32(rng.gen_range(-1.0f32..1.0)))
        .collect();
    let what = format!("{} {pool:?} {:?} {format}", E::SUFFIX, (n, c, h, w));
    let xv = Var::from_tensor(&tensor_of(&x, (n, c, h, w))).unwrap();
    let y = pool.forward(&xv).unwrap();
    let dyt = tensor_of(&dy, (n, c, oh, ow)).to_dtype(DType::F32).unwrap();
    let grads = (y.to_dtype(DType::F32).unwrap() * dyt)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // The kernels' buffers in the case's layout; their geometry after the buffers.
    let (input, output) = (
        Lay::new(format, (n, c, h, w)),
        Lay::new(format, (n, c, oh, ow)),
    );
    let mut geometry = match format {
        MemoryFormat::ChannelsFirst => vec![Arg::I64(planes as i64)],
        MemoryFormat::ChannelsLast => vec![Arg::I32(n as i32), Arg::I32(c as i32)],
    };
    geometry
        .extend([h, w, oh, ow, pool.kernel, pool.stride, pool.padding].map(|v| Arg::I32(v as i32)));
    // Production geometry over `pixels` pixels of each channel, race-checked; channels-last
    // also one warp a channel group for all of them (the rows loop), which must agree.
    let run = |kernel: &str, pixels: usize, args: &[Arg], out: usize| -> Vec<u8> {
        match format {
            MemoryFormat::ChannelsFirst => {
                launch_race_checked(kernel, LaunchGeometry::flat(pixels * c), args).swap_remove(out)
            }
            MemoryFormat::ChannelsLast => {
                let production = LaunchGeometry::channels_last_rows(pixels, c);
                let groups = c.div_ceil(LaunchGeometry::channel_group(c)) as u32;
                let a = launch_race_checked(kernel, production, args).swap_remove(out);
                let b = launch(kernel, LaunchGeometry::linear(groups, 32), args).swap_remove(out);
                assert_eq!(a, b, "{kernel} {what}: the geometry changed the result");
                a
            }
        }
    };

    let mut args = vec![
        buf(&input.put(&x)),
        buf(&vec![E::from_f32(-1.0); planes * oh * ow]),
    ];
    args.extend(geometry.iter().cloned());
    let kernel = input.kernel("max_pool_fwd", E::SUFFIX);
    let got = output.take(values::<E>(&run(&kernel, n * oh * ow, &args, 1)));
    assert_close(&format!("max-pool y {what}"), &got, &tensor_f32s(&y), 0.0);

    let mut args = vec![
        buf(&input.put(&x)),
        buf(&output.put(&dy)),
        buf(&vec![E::from_f32(f32::NAN); planes * h * w]),
    ];
    args.extend(geometry.iter().cloned());
    let kernel = input.kernel("max_pool_bwd", E::SUFFIX);
    let got = input.take(values::<E>(&run(&kernel, n * h * w, &args, 2)));
    let want = tensor_f32s(grads.get(&xv).unwrap());
    // Both sum an input's windows in the same order in f32 (f64 for f64): equal bit for bit.
    assert_close(&format!("max-pool dx {what}"), &got, &want, 0.0);
}

#[test]
fn max_pool_kernels_match_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let pool = |kernel, stride, padding| MaxPool2d {
        kernel,
        stride,
        padding,
    };
    let stem = MaxPool2d::RESNET_STEM;
    // Channels-last: fewer channels than a tile's 32 and more (two channel groups).
    let cases = layouts(
        &[(2, 3, 7, 7), (2, 2, 8, 10)],
        &[(2, 3, 7, 7), (1, 40, 6, 5)],
    )
    .into_iter()
    .map(|(d, f)| (stem, d, f))
    .chain([
        (pool(2, 2, 0), (1, 3, 6, 6), MemoryFormat::ChannelsFirst),
        (pool(3, 1, 1), (2, 2, 5, 5), MemoryFormat::ChannelsFirst),
        (pool(2, 2, 0), (1, 3, 6, 6), MemoryFormat::ChannelsLast),
        (pool(3, 1, 1), (2, 2, 5, 5), MemoryFormat::ChannelsLast),
    ]);
    for (pool, dims, format) in cases {
        max_pool_case::<f32>(&mut rng, pool, dims, format);
        max_pool_case::<bf16>(&mut rng, pool, dims, format);
    }
}

// ---------------------------------------------------------------------------------------------
// Augmentation and SGD.

/// The mixings an augmentation case runs: none, mixup, and CutMix with a box that touches the
/// image's last row and column.
fn mixes(rng: &mut ChaCha8Rng, b: usize, h: usize, w: usize) -> Vec<Option<BatchMix>> {
    let mut partner = || {
        (0..b)
            .map(|_| rng.gen_range(0..b as u32))
            .collect::<Vec<_>>()
    };
    let (mixup, cutmix) = (partner(), partner());
    vec![
        None,
        Some(BatchMix {
            partner: mixup,
            lambda: 0.3,
            cut: None,
        }),
        Some(BatchMix {
            partner: cutmix,
            lambda: 0.6,
            cut: Some([2, h, 3, w]),
        }),
    ]
}

fn augment_case<E: Elem>(rng: &mut ChaCha8Rng) {
    let (n, c, h, w, pad) = (6usize, 3usize, 6usize, 7usize, 2usize);
    let pixels: Vec<u8> = (0..n * c * h * w).map(|_| rng.gen()).collect();
    let plans: Vec<AugmentPlan> = (0..9)
        .map(|_| AugmentPlan {
            index: rng.gen_range(0..n as u32),
            oy: rng.gen_range(0..=2 * pad as u32),
            ox: rng.gen_range(0..=2 * pad as u32),
            flip: rng.gen(),
        })
        .collect();
    let norm = Normalisation::from_mean_std(&[0.49, 0.48, 0.45], &[0.25, 0.24, 0.26]);
    let images = Tensor::from_vec(pixels.clone(), (n, c, h, w), &Device::Cpu).unwrap();
    let table = norm.kernel_table();
    let total = plans.len() * c * h * w;
    for mix in mixes(rng, plans.len(), h, w) {
        let want = augment_batch(&images, &plans, mix.as_ref(), pad, &norm, E::DTYPE).unwrap();
        let plan_words: Vec<u8> = kd_kernels::augment::kernel_plan(&plans, mix.as_ref())
            .into_iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let (mode, lambda, [y0, y1, x0, x1]) = MixKind::of(mix.as_ref()).kernel_args();
        let b = launch_race_checked(
            &format!("augment_{}", E::SUFFIX),
            LaunchGeometry::flat(total),
            &[
                Arg::Buf(pixels.clone()),
                Arg::Buf(plan_words),
                buf_f32(&table),
                buf(&vec![E::from_f32(f32::NAN); total]),
                Arg::I32(plans.len() as i32),
                Arg::I32(c as i32),
                Arg::I32(h as i32),
                Arg::I32(w as i32),
                Arg::I32(pad as i32),
                Arg::I32(mode),
                Arg::F32(lambda),
                Arg::I32(y0 as i32),
                Arg::I32(y1 as i32),
                Arg::I32(x0 as i32),
                Arg::I32(x1 as i32),
            ],
        );
        let got: Vec<f32> = values::<E>(&b[3]);
        assert_close(
            &format!("augment {} mode {mode}", E::SUFFIX),
            &got,
            &tensor_f32s(&want),
            1e-6,
        );
    }
}

#[test]
fn augment_kernel_matches_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    augment_case::<f32>(&mut rng);
    augment_case::<bf16>(&mut rng);
}

/// The one-launch list update against the CPU's two passes per parameter: parameters of 1,000
/// values (one block, not a multiple of its threads), none, exactly one chunk, one chunk and one
/// value, and three, with and without weight decay.
#[test]
fn sgd_list_kernel_matches_the_cpu_path() {
    use kd_kernels::launch::{sgd_list, SGD_CHUNK};
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let lens = [1000, 0, SGD_CHUNK, SGD_CHUNK + 1, 3];
    let decays = [5e-4, 0.0, 5e-4, 1e-2, 0.0];
    for nesterov in [false, true] {
        let step = |weight_decay: f64| SgdStep {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.1,
            weight_decay,
            nesterov,
        };
        let params: Vec<_> = lens
            .iter()
            .map(|&n| {
                (
                    random(&mut rng, n, -1.0, 1.0),
                    random(&mut rng, n, -1.0, 1.0),
                    random(&mut rng, n, -0.1, 0.1),
                )
            })
            .collect();
        let (geometry, first_block) = sgd_list(&lens).unwrap();
        let mut args = vec![Arg::I32(lens.len() as i32)];
        for (i, (p, g, m)) in params.iter().enumerate() {
            args.extend([
                buf_f32(p),
                buf_f32(g),
                buf_f32(m),
                Arg::I64(lens[i] as i64),
                Arg::F32(decays[i] as f32),
                Arg::I32(first_block[i]),
            ]);
        }
        args.push(Arg::I32(first_block[lens.len()]));
        let s = step(0.0);
        args.extend([
            Arg::F32(s.lr as f32),
            Arg::F32(s.momentum as f32),
            Arg::F32((1.0 - s.dampening) as f32),
            Arg::I32(nesterov as i32),
        ]);
        let out = launch_race_checked("sgd_list_f32", geometry, &args);
        for (i, (p, g, m)) in params.iter().enumerate() {
            let t = |v: &Vec<f32>| Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
            let (pt, gt, mt) = (t(p), t(g), t(m));
            sgd_momentum_step(&pt, &gt, &mt, &step(decays[i])).unwrap();
            let what = format!("parameter {i} nesterov={nesterov}");
            assert_close(&what, &f32s(&out[3 * i]), &tensor_f32s(&pt), 1e-6);
            assert_close(
                &format!("{what} buffer"),
                &f32s(&out[3 * i + 2]),
                &tensor_f32s(&mt),
                1e-6,
            );
            assert_eq!(
                f32s(&out[3 * i + 1]),
                *g,
                "{what}: the gradient is read only"
            );
        }
    }
}

#[test]
fn sgd_kernels_match_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 1000; // not a multiple of the block size
    for nesterov in [false, true] {
        let s = SgdStep {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 5e-4,
            nesterov,
        };
        let (p, g, m) = (
            random(&mut rng, n, -1.0, 1.0),
            random(&mut rng, n, -1.0, 1.0),
            random(&mut rng, n, -0.1, 0.1),
        );
        let t = |v: &Vec<f32>| Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let (pt, gt, mt) = (t(&p), t(&g), t(&m));
        sgd_momentum_step(&pt, &gt, &mt, &s).unwrap();
        for geometry in [LaunchGeometry::flat(n), LaunchGeometry::linear(2, 128)] {
            let b = launch_race_checked(
                "sgd_momentum_f32",
                geometry,
                &[
                    buf_f32(&m),
                    buf_f32(&g),
                    buf_f32(&p),
                    Arg::I64(n as i64),
                    Arg::F32(s.weight_decay as f32),
                    Arg::F32(s.momentum as f32),
                    Arg::F32((1.0 - s.dampening) as f32),
                ],
            );
            let m1 = f32s(&b[0]);
            assert_close("momentum buffer", &m1, &tensor_f32s(&mt), 1e-6);
            let b = launch_race_checked(
                "sgd_param_f32",
                geometry,
                &[
                    buf_f32(&p),
                    buf_f32(&g),
                    buf_f32(&m1),
                    Arg::I64(n as i64),
                    Arg::F32(s.lr as f32),
                    Arg::F32(s.weight_decay as f32),
                    Arg::F32(s.momentum as f32),
                    Arg::I32(nesterov as i32),
                ],
            );
            assert_close(
                &format!("parameter nesterov={nesterov}"),
                &f32s(&b[0]),
                &tensor_f32s(&pt),
                1e-6,
            );
        }
    }
}

fn add_relu_case<E: Elem>(rng: &mut ChaCha8Rng) {
    let n = 1000; // not a multiple of the block size
    let dims = (2, 5, 10, 10);
    let mut a: Vec<E> = random(rng, n, -1.0, 1.0)
        .into_iter()
        .map(E::from_f32)
        .collect();
    let b: Vec<E> = random(rng, n, -1.0, 1.0)
        .into_iter()
        .map(E::from_f32)
        .collect();
    a[3] = E::from_f32(f32::NAN); // a NaN sum gives 0, as the CPU path
    let dy: Vec<E> = random(rng, n, -1.0, 1.0)
        .into_iter()
        .map(E::from_f32)
        .collect();
    // The CPU path, with its backward.
    let (at, bt) = (
        Var::from_tensor(&tensor_of(&a, dims)).unwrap(),
        Var::from_tensor(&tensor_of(&b, dims)).unwrap(),
    );
    let yt = add_relu(&at, &bt).unwrap();
    let dyt = tensor_of(&dy, dims);
    let grads = (yt.to_dtype(DType::F32).unwrap() * dyt.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (y_cpu, dx_cpu) = (tensor_f32s(&yt), tensor_f32s(grads.get(&at).unwrap()));
    assert_eq!(dx_cpu, tensor_f32s(grads.get(&bt).unwrap()));
    // The CPU path is the definition: relu(a + b), the gradient dy where y > 0.
    for k in 0..n {
        let s = a[k].to_f32() + b[k].to_f32();
        let want = E::from_f32(if s > 0.0 { s } else { 0.0 }).to_f32();
        assert_eq!(y_cpu[k].to_bits(), want.to_bits(), "y[{k}]");
    }
    for geometry in [LaunchGeometry::flat(n), LaunchGeometry::linear(2, 128)] {
        let out = launch_race_checked(
            &format!("add_relu_{}", E::SUFFIX),
            geometry,
            &[
                buf(&a),
                buf(&b),
                buf(&vec![E::from_f32(7.0); n]),
                Arg::I64(n as i64),
            ],
        );
        let y = values::<E>(&out[2]);
        assert_close("add_relu", &y, &y_cpu, 0.0);
        let y_e: Vec<E> = y.iter().map(|&v| E::from_f32(v)).collect();
        let out = launch_race_checked(
            &format!("relu_backward_{}", E::SUFFIX),
            geometry,
            &[
                buf(&y_e),
                buf(&dy),
                buf(&vec![E::from_f32(7.0); n]),
                Arg::I64(n as i64),
            ],
        );
        assert_close("relu_backward", &values::<E>(&out[2]), &dx_cpu, 0.0);
    }
}

#[test]
fn add_relu_kernels_match_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    add_relu_case::<f32>(&mut rng);
    add_relu_case::<bf16>(&mut rng);
}

// ---------------------------------------------------------------------------------------------
// The softmax losses: cross-entropy (label smoothing, mixup) and Hinton's KD loss.

fn buf_u32(v: &[u32]) -> Arg {
    Arg::Buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// The forward kernels at their production geometry (one block of 32 warps) and at one block of
/// two warps (each warp then takes many rows); the backward kernels at theirs (a warp a row) and
/// at one block of two warps (the grid loops over the rows).
fn loss_geometries(b: usize) -> ([LaunchGeometry; 2], [LaunchGeometry; 2]) {
    (
        [LaunchGeometry::loss_rows(), LaunchGeometry::linear(1, 64)],
        [
            LaunchGeometry::warp_per_row(b),
            LaunchGeometry::linear(1, 64),
        ],
    )
}

/// With `race_checked`, every forward launch also runs under ThreadSanitizer (its block of 1,024
/// threads is the costly part of this test, so one case does).
fn softmax_losses_case(rng: &mut ChaCha8Rng, (b, k): (usize, usize), race_checked: bool) {
    use kd_kernels::softmax_loss::{cross_entropy, kd_loss};
    let z = random(rng, b * k, -6.0, 6.0);
    let t = random(rng, b * k, -6.0, 6.0);
    let ya: Vec<u32> = (0..b).map(|_| rng.gen_range(0..k as u32)).collect();
    let yb: Vec<u32> = (0..b).map(|_| rng.gen_range(0..k as u32)).collect();
    let cpu = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
    let (ya_t, yb_t) = (cpu(&ya), cpu(&yb));
    let upstream = 0.7f32;
    let (fwd, bwd) = loss_geometries(b);
    let (bi, ki) = (Arg::I32(b as i32), Arg::I32(k as i32));
    let fwd_launch = if race_checked {
        launch_race_checked
    } else {
        launch
    };

    for (smoothing, mix) in [(0.0f64, None), (0.1, None), (0.1, Some(0.3f64))] {
        let what = format!("xent {:?} ε {smoothing} λ {mix:?}", (b, k));
        let zv = Var::from_vec(z.clone(), (b, k), &Device::Cpu).unwrap();
        let loss = cross_entropy(&zv, &ya_t, mix.map(|l| (&yb_t, l)), smoothing).unwrap();
        let grads = (&loss * upstream as f64).unwrap().backward().unwrap();
        let want_loss = loss.to_scalar::<f32>().unwrap();
        let want_dz = tensor_f32s(grads.get(&zv).unwrap());
        let lambda = mix.unwrap_or(1.0);
        let (wa, wb, eps_k) = (
            (lambda * (1.0 - smoothing)) as f32,
            ((1.0 - lambda) * (1.0 - smoothing)) as f32,
            (smoothing / k as f64) as f32,
        );
        let lb = if mix.is_some() { &yb } else { &ya };
        let weights = [Arg::F32(wa), Arg::F32(wb), Arg::F32(eps_k)];
        for (i, g) in fwd.into_iter().enumerate() {
            let mut args = vec![
                buf_f32(&z),
                buf_u32(&ya),
                buf_u32(lb),
                buf_f32(&[f32::NAN]),
                bi.clone(),
                ki.clone(),
            ];
            args.extend(weights.clone());
            let out = launcher(i, fwd_launch)("xent_fwd", g, &args);
            assert_close(
                &format!("{what} loss {g:?}"),
                &f32s(&out[3]),
                &[want_loss],
                1e-6,
            );
        }
        for (i, g) in bwd.into_iter().enumerate() {
            let mut args = vec![
                buf_f32(&z),
                buf_u32(&ya),
                buf_u32(lb),
                buf_f32(&[upstream]),
                buf_f32(&vec![f32::NAN; b * k]),
                bi.clone(),
                ki.clone(),
            ];
            args.extend(weights.clone());
            let out = launcher(i, launch)("xent_bwd", g, &args);
            assert_close(&format!("{what} dz {g:?}"), &f32s(&out[4]), &want_dz, 1e-6);
        }
    }

    for temp in [1.0f32, 4.0] {
        let what = format!("kd {:?} T {temp}", (b, k));
        let sv = Var::from_vec(z.clone(), (b, k), &Device::Cpu).unwrap();
        let tt = Tensor::from_vec(t.clone(), (b, k), &Device::Cpu).unwrap();
        let loss = kd_loss(&sv, &tt, temp as f64).unwrap();
        let grads = (&loss * upstream as f64).unwrap().backward().unwrap();
        let want_loss = loss.to_scalar::<f32>().unwrap();
        let want_ds = tensor_f32s(grads.get(&sv).unwrap());
        for (i, g) in fwd.into_iter().enumerate() {
            let args = [
                buf_f32(&z),
                buf_f32(&t),
                buf_f32(&[f32::NAN]),
                bi.clone(),
                ki.clone(),
                Arg::F32(1.0 / temp),
                Arg::F32(temp * temp),
            ];
            let out = launcher(i, fwd_launch)("kd_kl_fwd", g, &args);
            // A sum of terms of both signs: against the loss's own scale.
            assert_close(
                &format!("{what} loss {g:?}"),
                &f32s(&out[2]),
                &[want_loss],
                1e-5,
            );
        }
        for (i, g) in bwd.into_iter().enumerate() {
            let args = [
                buf_f32(&z),
                buf_f32(&t),
                buf_f32(&[upstream]),
                buf_f32(&vec![f32::NAN; b * k]),
                bi.clone(),
                ki.clone(),
                Arg::F32(1.0 / temp),
                Arg::F32(temp),
            ];
            let out = launcher(i, launch)("kd_kl_bwd", g, &args);
            assert_close(&format!("{what} ds {g:?}"), &f32s(&out[3]), &want_ds, 1e-6);
        }
    }

    // A label outside the classes: NaN loss, NaN gradient of its row only.
    let mut bad = ya.clone();
    bad[0] = k as u32;
    let weights = [Arg::F32(1.0), Arg::F32(0.0), Arg::F32(0.0)];
    let mut args = vec![
        buf_f32(&z),
        buf_u32(&bad),
        buf_u32(&bad),
        buf_f32(&[0.0]),
        bi.clone(),
        ki.clone(),
    ];
    args.extend(weights.clone());
    let out = launch("xent_fwd", fwd[0], &args);
    assert!(
        f32s(&out[3])[0].is_nan(),
        "{:?}: loss with label {k}",
        (b, k)
    );
    let mut args = vec![
        buf_f32(&z),
        buf_u32(&bad),
        buf_u32(&bad),
        buf_f32(&[1.0]),
        buf_f32(&vec![0.0; b * k]),
        bi,
        ki,
    ];
    args.extend(weights);
    let dz = f32s(&launch("xent_bwd", bwd[0], &args)[4]);
    assert!(dz[..k].iter().all(|v| v.is_nan()), "{:?}: row 0", (b, k));
    assert!(
        dz[k..].iter().all(|v| v.is_finite()),
        "{:?}: other rows",
        (b, k)
    );
}

#[test]
fn softmax_loss_kernels_match_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // Fewer classes than lanes, more (a lane takes several), one class; fewer rows than warps
    // and more.
    for (i, dims) in [(5, 10), (70, 100), (3, 1), (33, 7)]
        .into_iter()
        .enumerate()
    {
        softmax_losses_case(&mut rng, dims, i == 0);
    }
}
