//! Candidates that are not native files: an official `.pt` (materialised once through a strict
//! model load) and a LoRA adapter (merged into its base before averaging).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_lora::LoraConfig;
use cnclip_model::weights::load_native;
use cnclip_model::{Clip, ClipConfig, LoadOptions};
use soup::candidate::{Source, resolve};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cnclip-model/tests/fixtures/model")
}

fn tiny_config() -> ClipConfig {
    let fx = fixtures().join("configs");
    ClipConfig::from_json_files(&fx.join("tiny-vit.json"), &fx.join("tiny-bert.json")).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-soup-src-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn official_pt_is_materialised_through_a_strict_load() {
    let dir = temp("pt");
    let pt = fixtures().join("tiny_vit.pt");
    let candidates = resolve(std::slice::from_ref(&pt), None).unwrap();
    assert_eq!(candidates[0].source, Source::Foreign(pt.clone()));
    assert_eq!(candidates[0].name, "tiny_vit");
    let err = candidates[0].native_path(&dir, None).unwrap_err();
    assert!(err.to_string().contains("--vision-model"), "{err}");
    let native = candidates[0]
        .native_path(&dir, Some(&tiny_config()))
        .unwrap();
    let options = LoadOptions {
        config: Some(tiny_config()),
        ..Default::default()
    };
    let want = Clip::load(&pt, &options, Device::Cpu).unwrap().state_dict();
    let (config, got) = load_native(&native).unwrap();
    assert_eq!(config, tiny_config());
    assert_eq!(got.len(), want.len());
    for (k, t) in want.iter() {
        assert!(got.get(k).unwrap().equal(t), "{k}");
    }
    // Made once: a second call returns the same file untouched.
    let modified = std::fs::metadata(&native).unwrap().modified().unwrap();
    assert_eq!(
        candidates[0]
            .native_path(&dir, Some(&tiny_config()))
            .unwrap(),
        native
    );
    assert_eq!(
        std::fs::metadata(&native).unwrap().modified().unwrap(),
        modified
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lora_adapter_is_merged_into_its_base() {
    let dir = temp("lora");
    tch::manual_seed(7);
    let base_model = Clip::new(&tiny_config(), Device::Cpu);
    let base = dir.join("base.safetensors");
    base_model.save_native(&base).unwrap();

    let mut tuned = Clip::load(&base, &LoadOptions::default(), Device::Cpu).unwrap();
    let config = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["qv".into()],
        ..Default::default()
    };
    cnclip_lora::inject(&mut tuned, &config).unwrap();
    tch::manual_seed(8);
    tch::no_grad(|| {
        for (key, mut t) in tuned.named_tensors() {
            if key.ends_with(".lora_B.weight") {
                t.copy_(&(Tensor::randn_like(&t) * 0.3));
            }
        }
    });
    let adapter = dir.join("run-lora/epoch1.safetensors");
    std::fs::create_dir_all(adapter.parent().unwrap()).unwrap();
    cnclip_lora::save_adapter(&tuned, &adapter).unwrap();

    // An adapter without its base is refused, naming the flag.
    let err = resolve(std::slice::from_ref(&adapter), None).unwrap_err();
    assert!(err.to_string().contains("--lora-base"), "{err}");

    let candidates = resolve(&[adapter.clone(), base.clone()], Some(&base)).unwrap();
    assert!(matches!(candidates[0].source, Source::Lora { .. }));
    assert_eq!(candidates[1].source, Source::Native(base.clone()));
    let native = candidates[0].native_path(&dir.join("work"), None).unwrap();
    let (config_got, merged) = load_native(&native).unwrap();
    assert_eq!(config_got, tiny_config());

    // The same weights as merging the adapters inside the model, and not the base's.
    cnclip_lora::unload(&mut tuned, true).unwrap();
    let want = tuned.state_dict();
    assert_eq!(merged.len(), want.len());
    let mut changed = 0;
    for (k, t) in want.iter() {
        let got = merged.get(k).unwrap();
        let diff = (got - t).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{k}: {diff}");
        if !got.equal(base_model.state_dict().get(k).unwrap()) {
            changed += 1;
        }
    }
    assert!(changed > 0, "the adapter changed nothing");
    let _ = std::fs::remove_dir_all(&dir);
}
