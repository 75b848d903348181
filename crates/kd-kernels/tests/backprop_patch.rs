//! The vendored candle-core's backprop change (vendor/candle-core/KD-PATCH.md): the first
//! gradient reaching a tensor is stored as it is instead of being added to zeroes. These are the
//! cases that change could get wrong — a tensor reached by several edges (the sums), one gradient
//! shared by both operands of an add, and a broadcast gradient that a later backward needs
//! contiguous — each against its closed form.
use candle_core::{DType, Device, IndexOp, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_tensor_reached_by_several_edges_sums_their_gradients() {
    let x = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
    // y = (x + x)·x + 3x  →  dy/dx = 4x + 3.
    let y = ((x.as_tensor() + x.as_tensor()).unwrap() * x.as_tensor()).unwrap();
    let y = (y + (x.as_tensor() * 3.0).unwrap()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), vec![7.0, -5.0, 15.0]);
}

#[test]
fn operands_of_an_add_keep_their_own_gradients() {
    let a = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let b = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
    // a and b first receive the same gradient tensor (from the add); then a gets b·… more.
    let s = (a.as_tensor() + b.as_tensor()).unwrap();
    let loss = ((s * 2.0).unwrap() + (a.as_tensor() * b.as_tensor()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    // d/da = 2 + b, d/db = 2 + a.
    assert_eq!(values(grads.get(&a).unwrap()), vec![5.0, 6.0]);
    assert_eq!(values(grads.get(&b).unwrap()), vec![3.0, 4.0]);
}

#[test]
fn a_broadcast_gradient_is_stored_contiguous_for_the_ops_that_need_it() {
    // sum_all's gradient is a broadcast of one value; gather's backward scatters it, which
    // candle only does from a contiguous tensor.
    let x = Var::from_tensor(
        &Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap(),
    )
    .unwrap();
    let idx = Tensor::new(&[[1u32], [3], [0]], &Device::Cpu).unwrap();
    let loss = x.as_tensor().gather(&idx, 1).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(&x).unwrap();
    assert!(g.is_contiguous());
    let want = Tensor::new(
        &[
            [0f32, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0, 0.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(values(g), values(&want));
    // The same through a mean over one axis, broadcast back along it.
    let m = x.as_tensor().mean_keepdim(1).unwrap();
    let grads = (m.i((.., 0)).unwrap() * 4.0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(&x).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(values(g), vec![1.0; 12]);
    assert_eq!(g.dtype(), DType::F32);
}

/// y = s·x with a gradient of `grad_shape` (the input's own shape unless a test wants a wrong one).
struct Scale {
    s: f32,
    grad_shape: Option<Vec<usize>>,
}

impl candle_core::CustomOp1 for Scale {
    fn name(&self) -> &'static str {
        "test-scale"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("f32 only")
        };
        let (a, b) = layout.contiguous_offsets().expect("contiguous input");
        let out = v[a..b].iter().map(|x| x * self.s).collect();
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = (grad_res * self.s as f64)?;
        Ok(Some(match &self.grad_shape {
            Some(shape) => Tensor::zeros(shape.as_slice(), arg.dtype(), arg.device())?,
            None => g,
        }))
    }
}

#[test]
fn custom_op_transpose_and_permute_gradients_accumulate() {
    let x = Var::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
    let scale = |s| Scale {
        s,
        grad_shape: None,
    };
    // x reaches the loss through two custom ops, a transpose and a permute:
    // loss = Σ 3x + Σ 5x + Σ 7·xᵀ·w + Σ permute(x)  →  dloss/dx = 8 + 7·w(transposed) + 1.
    let w = Tensor::new(&[[1.0f32, 0.0], [2.0, 1.0], [0.0, 3.0]], &Device::Cpu).unwrap();
    let a = x
        .as_tensor()
        .apply_op1(scale(3.0))
        .unwrap()
        .sum_all()
        .unwrap();
    let b = x
        .as_tensor()
        .apply_op1(scale(5.0))
        .unwrap()
        .sum_all()
        .unwrap();
    let c = (x.as_tensor().t().unwrap() * &w).unwrap() * 7.0;
    let c = c.unwrap().sum_all().unwrap();
    let d = x.as_tensor().permute((1, 0)).unwrap().sum_all().unwrap();
    let loss = (((a + b).unwrap() + c).unwrap() + d).unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(&x).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(
        values(g),
        vec![16.0, 23.0, 9.0, 9.0, 16.0, 30.0],
        "8 + 1 + 7·wᵀ"
    );
    // A custom op whose own gradient is the only one its input gets (stored as it is).
    let y = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let grads = y
        .as_tensor()
        .apply_op1(scale(3.0))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(values(grads.get(&y).unwrap()), vec![3.0, 3.0]);
}

#[test]
fn a_gradient_of_the_wrong_shape_is_refused() {
    // Upstream adds each gradient to zeroes of the input's shape, which refuses a wrong one;
    // storing the first gradient as it is must refuse it too.
    let x = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
    let bad = Scale {
        s: 2.0,
        grad_shape: Some(vec![2]),
    };
    let err = x
        .as_tensor()
        .apply_op1(bad)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap_err()
        .to_string();
    assert!(err.contains("gradient of shape [2]"), "{err}");
}
