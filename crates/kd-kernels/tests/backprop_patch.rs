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
