//! Per-block gradient checkpointing gives the same parameter gradients as the recorded forward.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::{Clip, ClipConfig, LoadOptions};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Reduction, Tensor};

fn load(name: &str, vision: &str) -> Clip {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model");
    let config = ClipConfig::from_json_files(
        &dir.join(format!("configs/{vision}.json")),
        &dir.join("configs/tiny-bert.json"),
    )
    .unwrap();
    let options = LoadOptions {
        config: Some(config),
        ..Default::default()
    };
    Clip::load(dir.join(format!("{name}.pt")), &options, Device::Cpu).unwrap()
}

fn contrastive(img: &Tensor, txt: &Tensor, scale: &Tensor) -> Tensor {
    let logits = img.matmul(&txt.tr()) * scale;
    let truth = Tensor::arange(logits.size()[0], (Kind::Int64, Device::Cpu));
    (logits.cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0)
        + logits
            .tr()
            .cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0))
        / 2.0
}

fn gradients(model: &Clip) -> BTreeMap<String, Tensor> {
    let grads = model
        .named_tensors()
        .into_iter()
        .filter(|(_, t)| t.requires_grad() && t.grad().defined())
        .map(|(k, t)| (k, t.grad().copy()))
        .collect();
    for (_, t) in model.named_tensors() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    grads
}

#[test]
fn checkpointed_gradients_equal_plain_gradients() {
    for (name, vision, res) in [
        ("tiny_vit", "tiny-vit", 32),
        ("tiny_vith", "tiny-vith", 32),
        ("tiny_rn50", "tiny-rn50", 64),
    ] {
        let model = load(name, vision);
        tch::manual_seed(1);
        let images = Tensor::randn([4, 3, res, res], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint_low(672, 8000, [4, 12], (Kind::Int64, Device::Cpu));
        // Padding in one row, so the mask path is exercised.
        let _ = ids.narrow(0, 1, 1).narrow(1, 6, 6).fill_(0);

        let (img, txt, scale) = model.forward_t(&images, &ids, true);
        let plain_loss = contrastive(&img, &txt, &scale);
        plain_loss.backward();
        let plain = gradients(&model);

        let fwd = model.forward_checkpointed(&images, &ids, true);
        let loss = contrastive(&fwd.image_features, &fwd.text_features, &fwd.logit_scale);
        assert!((loss.double_value(&[]) - plain_loss.double_value(&[])).abs() < 1e-6);
        fwd.backward(&model, &loss);
        let staged = gradients(&model);

        assert_eq!(
            plain.len(),
            staged.len(),
            "{name}: different sets of parameters got gradients"
        );
        assert!(plain.len() > 40, "{name}: only {} gradients", plain.len());
        for (key, g) in &plain {
            let scale = g.abs().max().double_value(&[]).max(1e-12);
            let diff = (g - &staged[key]).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5 * scale + 1e-10,
                "{name} {key}: differs by {diff:e} (scale {scale:e})"
            );
        }
    }
}
