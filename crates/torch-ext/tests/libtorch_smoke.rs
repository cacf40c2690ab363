//! The linked libtorch computes: matmul, autograd and fused attention, on the CPU and, where this
//! libtorch has a GPU, on CUDA compared with the CPU result. Proves the rpath, the link and the
//! PyTorch 2.11.0 ABI are right before any model code relies on them.

use tch::{Device, Kind, Tensor};

fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if torch_ext::init_cuda() {
        devices.push(Device::Cuda(0));
    }
    devices
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to(Device::Cpu) - b.to(Device::Cpu))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn matmul_matches_hand_computed_values() {
    for device in devices() {
        let a = Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.])
            .view([2, 3])
            .to(device);
        let b = Tensor::from_slice(&[7f32, 8., 9., 10., 11., 12.])
            .view([3, 2])
            .to(device);
        let c = a.matmul(&b);
        let expected = Tensor::from_slice(&[58f32, 64., 139., 154.]).view([2, 2]);
        assert_eq!(max_abs_diff(&c, &expected), 0.0, "{device:?}");
    }
}

#[test]
fn backward_gives_the_analytic_gradient() {
    for device in devices() {
        // d/dx sum(x^3 + 2x) = 3x^2 + 2
        let x = Tensor::from_slice(&[-1.5f64, 0., 0.5, 2.])
            .to(device)
            .set_requires_grad(true);
        let y = (x.pow_tensor_scalar(3) + &x * 2.0).sum(Kind::Double);
        y.backward();
        let expected = Tensor::from_slice(&[8.75f64, 2., 2.75, 14.]);
        assert!(max_abs_diff(&x.grad(), &expected) < 1e-12, "{device:?}");
    }
}

#[test]
fn scaled_dot_product_attention_equals_explicit_softmax_attention() {
    tch::manual_seed(0);
    let (batch, heads, len, dim) = (2, 4, 7, 16);
    let q = Tensor::randn([batch, heads, len, dim], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([batch, heads, len, dim], (Kind::Float, Device::Cpu));
    let v = Tensor::randn([batch, heads, len, dim], (Kind::Float, Device::Cpu));
    // An additive key-padding mask as BERT uses it: the last two keys of the second item are masked.
    let mask = Tensor::zeros([batch, 1, 1, len], (Kind::Float, Device::Cpu));
    let _ = mask.narrow(0, 1, 1).narrow(3, len - 2, 2).fill_(-10000.0);

    let scores = q.matmul(&k.transpose(-2, -1)) / (dim as f64).sqrt() + &mask;
    let reference = scores.softmax(-1, Kind::Float).matmul(&v);

    for device in devices() {
        let out = Tensor::scaled_dot_product_attention(
            &q.to(device),
            &k.to(device),
            &v.to(device),
            Some(mask.to(device)),
            0.0,
            false,
            None::<f64>,
            false,
        );
        assert_eq!(out.size(), vec![batch, heads, len, dim]);
        // CUDA matmuls may use TF32 internally, hence the looser bound there.
        let tolerance = if device == Device::Cpu { 1e-5 } else { 5e-3 };
        let diff = max_abs_diff(&out, &reference);
        assert!(
            diff < tolerance,
            "{device:?}: max |sdpa - reference| = {diff}"
        );
    }
}

#[test]
fn attention_backward_flows_to_queries_keys_and_values() {
    tch::manual_seed(1);
    let q = Tensor::randn([1, 2, 5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let k = Tensor::randn([1, 2, 5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let v = Tensor::randn([1, 2, 5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let out = Tensor::scaled_dot_product_attention(
        &q,
        &k,
        &v,
        None::<Tensor>,
        0.0,
        false,
        None::<f64>,
        false,
    );
    out.sum(Kind::Float).backward();
    for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
        let g = t.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert_eq!(
            g.isfinite().all().int64_value(&[]),
            1,
            "{name} gradient not finite"
        );
    }
    // Sum over the output makes dL/dv the column sums of the attention weights: each row of weights
    // sums to one, so dL/dv sums to len per head and feature.
    let gv_total = v.grad().sum_dim_intlist([2].as_slice(), false, Kind::Float);
    let expected = Tensor::full([1, 2, 8], 5.0, (Kind::Float, Device::Cpu));
    assert!(max_abs_diff(&gv_total, &expected) < 1e-4);
}
