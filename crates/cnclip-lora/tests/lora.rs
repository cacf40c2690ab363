//! LoRA on the tiny cn_clip fixtures of cnclip-model: zero-initialised B changes nothing, only
//! adapters get gradients, merge/unmerge/unload round trips, adapter files and merged state dicts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_lora::{LoraConfig, LoraError};
use cnclip_model::{Clip, ClipConfig, LoadOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Reduction, Tensor};

/// Torch's global generator is shared by the test threads; tests that seed it run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn model_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cnclip-model/tests/fixtures/model")
}

fn load(name: &str, vision: &str) -> Clip {
    let dir = model_fixtures();
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

fn inputs(res: i64) -> (Tensor, Tensor) {
    tch::manual_seed(11);
    let images = Tensor::randn([3, 3, res, res], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(672, 8000, [3, 12], (Kind::Int64, Device::Cpu));
    // Padding in one row, so the mask path is exercised.
    let ids = ids.index_fill(1, &Tensor::from_slice(&[10i64, 11]), 0);
    (images, ids)
}

fn features(model: &Clip, images: &Tensor, ids: &Tensor) -> (Tensor, Tensor) {
    tch::no_grad(|| (model.encode_image(images), model.encode_text(ids)))
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

fn config(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Gives every B random values, so adapters change the outputs.
fn randomise_b(model: &Clip, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (key, mut t) in model.named_tensors() {
            if key.ends_with(".lora_B.weight") {
                t.copy_(&(Tensor::randn_like(&t) * 0.3));
            }
        }
    });
}

fn contrastive(model: &Clip, images: &Tensor, ids: &Tensor) -> Tensor {
    let (img, txt, scale) = model.forward_t(images, ids, true);
    let logits = img.matmul(&txt.tr()) * scale;
    let truth = Tensor::arange(logits.size()[0], (Kind::Int64, Device::Cpu));
    logits.cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0)
        + logits
            .tr()
            .cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0)
}

fn base_keys(model: &Clip) -> Vec<String> {
    model
        .named_tensors()
        .into_keys()
        .filter(|k| !k.contains(".lora_"))
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-lora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn zero_initialised_b_leaves_outputs_identical() {
    let _serial = serial();
    let (images, ids) = inputs(32);
    for (name, vision, targets) in [
        ("tiny_vit", "tiny-vit", vec!["all+proj"]),
        ("tiny_vith", "tiny-vith", vec!["qv", "mlp.c_proj"]),
    ] {
        let mut model = load(name, vision);
        let (img, txt) = features(&model, &images, &ids);
        let report = cnclip_lora::inject(&mut model, &config(&targets)).unwrap();
        assert!(report.adapter_parameters > 0);
        let (img2, txt2) = features(&model, &images, &ids);
        assert!(img.equal(&img2), "{name}: image features moved");
        assert!(txt.equal(&txt2), "{name}: text features moved");
        // The adapters are there and act once B is non-zero.
        randomise_b(&model, 1);
        let (img3, txt3) = features(&model, &images, &ids);
        assert!(max_rel(&img3, &img) > 1e-3, "{name}");
        assert!(max_rel(&txt3, &txt) > 1e-3, "{name}");
    }
}

#[test]
fn injection_counts_and_initialisation_follow_peft() {
    let _serial = serial();
    let mut model = load("tiny_vit", "tiny-vit");
    let report = cnclip_lora::inject(&mut model, &config(&["qv"])).unwrap();
    // tiny-vit: 2 blocks of width 48 (q and v parts); tiny-bert: 2 layers of hidden 8.
    assert_eq!(report.adapters.len(), 2 * 2 + 2 * 2);
    assert_eq!(
        report.adapter_parameters,
        4 * (2 * 2 * (48 + 48) + 2 * 2 * (8 + 8))
    );
    assert_eq!(report.base_parameters, 0);
    let named = model.named_tensors();
    let a = &named["visual.transformer.resblocks.0.attn.in_proj.q.lora_A.weight"];
    assert_eq!(a.size(), vec![4, 48]);
    let bound = 1.0 / 48f64.sqrt();
    assert!(a.abs().max().double_value(&[]) <= bound);
    assert!(a.abs().max().double_value(&[]) > 0.5 * bound);
    let b = &named["visual.transformer.resblocks.0.attn.in_proj.q.lora_B.weight"];
    assert_eq!(b.size(), vec![48, 4]);
    assert_eq!(b.abs().max().double_value(&[]), 0.0);
    assert!(matches!(
        cnclip_lora::inject(&mut model, &config(&["qv"])),
        Err(LoraError::AlreadyAttached)
    ));
    // The ResNet tower has no sites: a vision target matches nothing, text targets work.
    let mut rn = load("tiny_rn50", "tiny-rn50");
    let err = cnclip_lora::inject(&mut rn, &config(&["attn.out_proj"])).unwrap_err();
    assert!(err.to_string().contains("attn.out_proj"), "{err}");
    cnclip_lora::inject(&mut rn, &config(&["query", "value"])).unwrap();
}

#[test]
fn gradients_reach_only_adapters() {
    let _serial = serial();
    let (images, ids) = inputs(32);
    for train_extras in [false, true] {
        let mut model = load("tiny_vit", "tiny-vit");
        let lora = LoraConfig {
            train_layer_norms: train_extras,
            train_logit_scale: train_extras,
            ..config(&["all+proj"])
        };
        let report = cnclip_lora::inject(&mut model, &lora).unwrap();
        // The shape-only count (docs/LORA.md's table) agrees with the built model.
        let count = cnclip_lora::count::parameter_count(model.config(), &lora).unwrap();
        assert_eq!(count.adapter_parameters, report.adapter_parameters);
        assert_eq!(count.base_parameters, report.base_parameters);
        assert_eq!(count.adapters, report.adapters.len());
        assert_eq!(
            count.model_parameters,
            Some(
                base_keys(&model)
                    .iter()
                    .map(|k| model.named_tensors()[k].numel() as i64)
                    .sum()
            )
        );
        randomise_b(&model, 2);
        contrastive(&model, &images, &ids).backward();
        let mut adapters = 0;
        for (key, t) in model.named_tensors() {
            let trains = key.contains(".lora_") || lora.trains_base_key(&key);
            assert_eq!(t.requires_grad(), trains, "{key}");
            let grad = t.grad();
            if trains {
                assert!(grad.defined(), "{key} got no gradient");
                assert!(grad.abs().max().double_value(&[]) > 0.0, "{key}");
                adapters += usize::from(key.contains(".lora_"));
            } else {
                assert!(!grad.defined(), "{key} (frozen) got a gradient");
            }
        }
        // 2 blocks × (3 in_proj parts + out_proj + c_fc + c_proj) + proj, 2 layers × 6 + text_projection.
        // A and B of: 2 blocks × (q, k, v, out_proj, c_fc, c_proj) + proj, 2 layers × 6 +
        // text_projection.
        assert_eq!(adapters, 2 * (2 * 6 + 1 + 2 * 6 + 1));
    }
}

#[test]
fn checkpointed_forward_gives_the_same_adapter_gradients() {
    let _serial = serial();
    let (images, ids) = inputs(32);
    let grads = |checkpointed: bool| -> BTreeMap<String, Tensor> {
        let mut model = load("tiny_vit", "tiny-vit");
        tch::manual_seed(5);
        cnclip_lora::inject(&mut model, &config(&["all+proj"])).unwrap();
        randomise_b(&model, 3);
        if checkpointed {
            let fwd = model.forward_checkpointed(&images, &ids, true);
            let logits = fwd.image_features.matmul(&fwd.text_features.tr()) * &fwd.logit_scale;
            let truth = Tensor::arange(3, (Kind::Int64, Device::Cpu));
            let loss =
                logits.cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0)
                    + logits.tr().cross_entropy_loss::<Tensor>(
                        &truth,
                        None,
                        Reduction::Mean,
                        -100,
                        0.0,
                    );
            fwd.backward(&model, &loss);
        } else {
            contrastive(&model, &images, &ids).backward();
        }
        model
            .named_tensors()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(k, t)| (k, t.grad().copy()))
            .collect()
    };
    let plain = grads(false);
    let checkpointed = grads(true);
    assert_eq!(plain.len(), checkpointed.len());
    for (key, g) in &plain {
        let err = max_rel(&checkpointed[key], g);
        assert!(err < 1e-5, "{key}: {err}");
    }
}

#[test]
fn adapter_dropout_acts_only_in_training() {
    let _serial = serial();
    let (images, ids) = inputs(32);
    let mut model = load("tiny_vit", "tiny-vit");
    let lora = LoraConfig {
        dropout: 0.5,
        ..config(&["attn"])
    };
    cnclip_lora::inject(&mut model, &lora).unwrap();
    randomise_b(&model, 4);
    let eval_a = tch::no_grad(|| model.encode_image_t(&images, false));
    let eval_b = tch::no_grad(|| model.encode_image(&images));
    assert!(eval_a.equal(&eval_b));
    let train = tch::no_grad(|| model.encode_image_t(&images, true));
    assert!(!train.equal(&eval_a), "no dropout in the vision adapters");
    let text_eval = tch::no_grad(|| model.encode_text_t(&ids, false));
    let text_train = tch::no_grad(|| model.encode_text_t(&ids, true));
    assert!(
        !text_train.equal(&text_eval),
        "no dropout in the text adapters"
    );
}

#[test]
fn merge_unmerge_and_unload_round_trip() {
    let _serial = serial();
    let (images, ids) = inputs(32);
    let mut model = load("tiny_vit", "tiny-vit");
    let base = model.state_dict();
    let base = base.shallow_clone();
    let original: BTreeMap<String, Tensor> =
        base.iter().map(|(k, t)| (k.into(), t.copy())).collect();
    cnclip_lora::inject(&mut model, &config(&["qv", "mlp.c_fc", "all+proj"])).unwrap();
    randomise_b(&model, 5);
    let (img, txt) = features(&model, &images, &ids);

    assert_eq!(cnclip_lora::merge(&model).unwrap(), 2 * 4 + 1 + 2 * 6 + 1);
    assert_eq!(cnclip_lora::merge(&model).unwrap(), 0, "merging twice");
    let weights = model.named_tensors();
    let w = "visual.transformer.resblocks.1.attn.in_proj_weight";
    assert!(!weights[w].equal(&original[w]));
    let (img_m, txt_m) = features(&model, &images, &ids);
    assert!(max_rel(&img_m, &img) < 1e-5, "{}", max_rel(&img_m, &img));
    assert!(max_rel(&txt_m, &txt) < 1e-5, "{}", max_rel(&txt_m, &txt));

    assert_eq!(cnclip_lora::unmerge(&model).unwrap(), 2 * 4 + 1 + 2 * 6 + 1);
    for (key, t) in &original {
        let now = &model.named_tensors()[key];
        assert!(
            (now - t).abs().max().double_value(&[])
                <= 1e-6 * t.abs().max().double_value(&[]).max(1.0),
            "{key} after unmerge"
        );
    }
    let (img_u, txt_u) = features(&model, &images, &ids);
    assert!(max_rel(&img_u, &img) < 1e-5);
    assert!(max_rel(&txt_u, &txt) < 1e-5);

    // Unload with merge: a plain model with exactly the base keys and the adapted outputs.
    let unloaded = cnclip_lora::unload(&mut model, true).unwrap();
    assert_eq!(unloaded.rank, 4);
    assert!(cnclip_lora::attached(&model).is_empty());
    assert_eq!(
        model.named_tensors().into_keys().collect::<Vec<_>>(),
        base_keys(&model)
    );
    assert_eq!(model.named_tensors().len(), original.len());
    let (img_p, txt_p) = features(&model, &images, &ids);
    assert!(max_rel(&img_p, &img) < 1e-5);
    assert!(max_rel(&txt_p, &txt) < 1e-5);
    assert!(model.named_tensors()["visual.conv1.weight"].requires_grad());
    // The plain model saves and loads as any native model.
    let dir = temp_dir("unload");
    model.save_native(dir.join("merged.safetensors")).unwrap();
    let reloaded = Clip::load(
        dir.join("merged.safetensors"),
        &LoadOptions::default(),
        Device::Cpu,
    )
    .unwrap();
    let (img_r, _) = features(&reloaded, &images, &ids);
    assert!(img_r.equal(&img_p));

    // Unload without merge gives the base model back.
    let mut model = load("tiny_vit", "tiny-vit");
    let (img0, _) = features(&model, &images, &ids);
    cnclip_lora::inject(&mut model, &config_for_unload()).unwrap();
    randomise_b(&model, 6);
    cnclip_lora::merge(&model).unwrap();
    cnclip_lora::unload(&mut model, false).unwrap();
    let (img1, _) = features(&model, &images, &ids);
    assert!(max_rel(&img1, &img0) < 1e-6);
    // Adapters can be attached again, under the same names.
    cnclip_lora::inject(&mut model, &config(&["qv"])).unwrap();
    let keys = model.named_tensors();
    assert!(keys.contains_key("visual.transformer.resblocks.1.attn.in_proj.v.lora_B.weight"));
    assert!(!keys.keys().any(|k| k.contains("__")), "renamed duplicates");
    assert_eq!(keys.keys().filter(|k| k.contains(".lora_")).count(), 2 * 8);
    let _ = std::fs::remove_dir_all(dir);
}

fn config_for_unload() -> LoraConfig {
    config(&["attn"])
}

#[test]
fn adapter_files_round_trip_and_merge_into_state_dicts() {
    let _serial = serial();
    let (images, ids) = inputs(32);
    let dir = temp_dir("file");
    let path = dir.join("adapter.safetensors");
    let mut model = load("tiny_vit", "tiny-vit");
    let base_sd = model.state_dict();
    let base_sd: cnclip_model::weights::StateDict = base_sd
        .iter()
        .map(|(k, t)| (k.to_string(), t.copy()))
        .collect();
    let lora = LoraConfig {
        train_layer_norms: true,
        train_logit_scale: true,
        ..config(&["qv", "attn.in_proj.k", "output.dense", "visual.proj"])
    };
    cnclip_lora::inject(&mut model, &lora).unwrap();
    randomise_b(&model, 7);
    tch::no_grad(|| {
        for (key, mut t) in model.named_tensors() {
            if lora.trains_base_key(&key) {
                let _ = t.g_add_scalar_(0.25);
            }
        }
    });
    let (img, txt) = features(&model, &images, &ids);
    cnclip_lora::save_adapter(&model, &path).unwrap();
    assert!(cnclip_lora::is_adapter_file(&path).unwrap());

    let file = cnclip_lora::read_adapter(&path).unwrap();
    assert_eq!(file.config, lora);
    assert_eq!(&file.base_config, model.config());
    // q, k, v on 2 blocks, proj; query/value + both output.dense on 2 layers; plus LNs and scale.
    assert_eq!(file.adapters().len(), 2 * 3 + 1 + 2 * 4);
    let stored_base: Vec<&str> = file.base_weights().iter().map(|(k, _)| *k).collect();
    assert!(stored_base.contains(&"logit_scale"));
    assert!(stored_base.contains(&"visual.transformer.resblocks.0.ln_1.weight"));
    assert!(stored_base.contains(&"bert.encoder.layer.1.output.LayerNorm.bias"));
    assert!(!stored_base.iter().any(|k| k.ends_with("in_proj_weight")));

    // Onto a fresh base: identical outputs.
    let mut fresh = load("tiny_vit", "tiny-vit");
    assert_eq!(cnclip_lora::load_adapter(&mut fresh, &path).unwrap(), lora);
    let (img2, txt2) = features(&fresh, &images, &ids);
    assert!(img2.equal(&img), "{}", max_rel(&img2, &img));
    assert!(txt2.equal(&txt));
    // The same again onto a model that already carries adapters of that config (a resume).
    cnclip_lora::load_adapter(&mut fresh, &path).unwrap();

    // merged_state_dict: the base's keys, merged weights, the adapter model's outputs.
    let merged = cnclip_lora::merged_state_dict(&base_sd, &path).unwrap();
    assert_eq!(
        merged.keys().collect::<Vec<_>>(),
        base_sd.keys().collect::<Vec<_>>()
    );
    let untouched = "visual.transformer.resblocks.0.mlp.c_fc.weight";
    assert!(
        merged
            .get(untouched)
            .unwrap()
            .equal(base_sd.get(untouched).unwrap())
    );
    let mut plain = Clip::new(model.config(), Device::Cpu);
    plain.load_named(merged.iter(), false).unwrap();
    let (img3, txt3) = features(&plain, &images, &ids);
    assert!(max_rel(&img3, &img) < 1e-5, "{}", max_rel(&img3, &img));
    assert!(max_rel(&txt3, &txt) < 1e-5, "{}", max_rel(&txt3, &txt));
    assert_eq!(
        merged.get("logit_scale").unwrap().double_value(&[]),
        model.named_tensors()["logit_scale"].double_value(&[])
    );

    // Another architecture is refused with the key that does not fit.
    let mut other = load("tiny_vith", "tiny-vith");
    let err = cnclip_lora::load_adapter(&mut other, &path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter.safetensors") && err.contains("shape"),
        "{err}"
    );
    let other_sd = other.state_dict();
    let err = cnclip_lora::merged_state_dict(&other_sd, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shape"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn damaged_adapter_files_are_refused_with_the_key() {
    let _serial = serial();
    let dir = temp_dir("damaged");
    let mut model = load("tiny_vit", "tiny-vit");
    cnclip_lora::inject(&mut model, &config(&["qv"])).unwrap();
    let (lora, mut sd) = cnclip_lora::adapter_state_dict(&model).unwrap();
    let meta = |lora: &LoraConfig| {
        std::collections::HashMap::from([
            ("cnclip.format".to_string(), "cnclip-lora".to_string()),
            ("cnclip.format_version".to_string(), "1".to_string()),
            (
                "cnclip.lora".to_string(),
                serde_json::to_string(lora).unwrap(),
            ),
            ("cnclip.config".to_string(), model.config().to_json()),
        ])
    };
    let path = dir.join("a.safetensors");
    let missing = "bert.encoder.layer.1.attention.self.value.lora_B.weight";
    sd.remove(missing);
    cnclip_model::weights::save_safetensors(&path, &sd, meta(&lora)).unwrap();
    let err = cnclip_lora::read_adapter(&path).unwrap_err().to_string();
    assert!(
        err.contains("attention.self.value.lora_A.weight") && err.contains(missing),
        "{err}"
    );

    let (_, mut sd) = cnclip_lora::adapter_state_dict(&model).unwrap();
    sd.insert(
        "visual.conv1.weight",
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    );
    cnclip_model::weights::save_safetensors(&path, &sd, meta(&lora)).unwrap();
    let err = cnclip_lora::read_adapter(&path).unwrap_err().to_string();
    assert!(err.contains("visual.conv1.weight"), "{err}");

    let (_, sd) = cnclip_lora::adapter_state_dict(&model).unwrap();
    let wrong_rank = LoraConfig {
        rank: 2,
        ..lora.clone()
    };
    cnclip_model::weights::save_safetensors(&path, &sd, meta(&wrong_rank)).unwrap();
    let err = cnclip_lora::read_adapter(&path).unwrap_err().to_string();
    assert!(err.contains("expected [2,"), "{err}");

    model.save_native(&path).unwrap();
    let err = cnclip_lora::read_adapter(&path).unwrap_err().to_string();
    assert!(err.contains("cnclip-lora"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// With adapter dropout, gradient checkpointing must recompute each block with the masks of its
/// first pass. Checked to first order: a step of size ε against the checkpointed gradient `g`
/// lowers the loss (same seed, so same masks) by ε·|g|² when the gradient belongs to the function
/// that was evaluated; masks drawn afresh in the recomputation would break that.
#[test]
fn checkpointed_dropout_masks_match_between_passes() {
    let _serial = serial();
    let (images, ids) = inputs(32);
    let mut model = load("tiny_vit", "tiny-vit");
    let lora = LoraConfig {
        dropout: 0.3,
        ..config(&["all+proj"])
    };
    cnclip_lora::inject(&mut model, &lora).unwrap();
    randomise_b(&model, 8);
    let loss_of = |fwd: &cnclip_model::model::CheckpointedForward| {
        let logits = fwd.image_features.matmul(&fwd.text_features.tr()) * &fwd.logit_scale;
        let truth = Tensor::arange(3, (Kind::Int64, Device::Cpu));
        logits.cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0)
            + logits
                .tr()
                .cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0)
    };
    let loss_at_seed = |model: &Clip, seed: i64| {
        tch::manual_seed(seed);
        tch::no_grad(|| loss_of(&model.forward_checkpointed(&images, &ids, true)).double_value(&[]))
    };
    tch::manual_seed(77);
    let fwd = model.forward_checkpointed(&images, &ids, true);
    let loss = loss_of(&fwd);
    let l0 = loss.double_value(&[]);
    fwd.backward(&model, &loss);
    assert_eq!(
        loss_at_seed(&model, 77),
        l0,
        "same seed, same masks, same loss"
    );
    assert_ne!(loss_at_seed(&model, 78), l0, "dropout is active");
    let params: Vec<Tensor> = model
        .var_store()
        .trainable_variables()
        .into_iter()
        .filter(|t| t.requires_grad())
        .collect();
    let norm2: f64 = params
        .iter()
        .map(|p| p.grad().square().sum(Kind::Double).double_value(&[]))
        .sum();
    assert!(norm2 > 0.0);
    let eps = 1e-2 / norm2.sqrt();
    tch::no_grad(|| {
        for p in &params {
            let mut p = p.shallow_clone();
            let _ = p.g_sub_(&(p.grad() * eps));
        }
    });
    let decrease = l0 - loss_at_seed(&model, 77);
    let predicted = eps * norm2;
    assert!(
        (decrease - predicted).abs() < 0.05 * predicted,
        "loss fell by {decrease:e}, the gradient predicts {predicted:e}"
    );
}
