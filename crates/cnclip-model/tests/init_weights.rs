//! `--clip-weight-path` / `--bert-weight-path`: cn_clip's `restore_model` initialisation against
//! cn_clip's own model after it, and the refusals of files that do not fit. Fixtures:
//! tests/fixtures/make_init_fixtures.py (init/).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::weights::read_safetensors;
use cnclip_model::{Clip, ClipConfig, InitError, InitSource};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/init")
        .join(name)
}

fn tiny() -> Clip {
    let config =
        ClipConfig::from_json_files(&fixture("tiny-vit.json"), &fixture("tiny-bert.json")).unwrap();
    tch::manual_seed(3);
    Clip::new(&config, Device::Cpu)
}

fn keys(json: &Value, field: &str) -> Vec<String> {
    json[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

/// Bit-identical: the same bits in the same dtype and shape. Every value is either copied from the
/// file or rounded once from it to fp16 (a correctly rounded IEEE operation), so no tolerance.
fn assert_bits_equal(key: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.size(), theirs.size(), "{key}: shape");
    assert_eq!(ours.kind(), theirs.kind(), "{key}: dtype");
    let (a, b) = (
        ours.view_dtype(Kind::Int).flatten(0, -1),
        theirs.view_dtype(Kind::Int).flatten(0, -1),
    );
    let differ = a.ne_tensor(&b).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(differ, 0, "{key}: {differ} values differ from cn_clip's");
}

fn check_against_cn_clip(bert: &Path) {
    let mut model = tiny();
    let reports = model
        .init_from_pretrained(Some(&fixture("openai_clip.pt")), Some(bert))
        .unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let (expected, _) = read_safetensors(fixture("expected.safetensors")).unwrap();
    let ours = model.named_tensors();
    let mut from_clip = keys(&json, "from_clip");
    let mut from_bert = keys(&json, "from_bert");
    from_clip.sort();
    from_bert.sort();
    assert_eq!(reports.len(), 2);
    let mut loaded: Vec<Vec<String>> = reports.iter().map(|r| r.loaded.clone()).collect();
    loaded.iter_mut().for_each(|l| l.sort());
    assert_eq!((&loaded[0], &loaded[1]), (&from_clip, &from_bert));
    // OpenAI's text tower and BERT's pooler/heads are not taken; `position_ids` is taken by name
    // (it starts with `bert`) and ignored, as the model has no such weight.
    assert_eq!(reports[0].ignored, Vec::<String>::new());
    assert_eq!(reports[1].ignored, vec!["bert.embeddings.position_ids"]);
    for key in from_clip.iter().chain(&from_bert) {
        assert_bits_equal(key, &ours[key], expected.get(key).unwrap());
    }
    // The rest keeps its random init, rounded to fp16 by convert_weights as in cn_clip.
    for key in keys(&json, "random") {
        let t = &ours[&key];
        assert_bits_equal(&key, t, &t.to_kind(Kind::Half).to_kind(Kind::Float));
        assert!(t.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{key}");
    }
    assert_eq!(ours.len(), expected.len(), "the model has cn_clip's keys");
}

#[test]
fn init_from_pytorch_model_bin_equals_cn_clip() {
    check_against_cn_clip(&fixture("bert/pytorch_model.bin"));
}

#[test]
fn init_from_hf_directory_and_safetensors_equals_cn_clip() {
    check_against_cn_clip(&fixture("bert"));
    check_against_cn_clip(&fixture("bert/model.safetensors"));
}

#[test]
fn one_tower_alone_leaves_the_other_random() {
    let mut model = tiny();
    let before = model.named_tensors()["bert.embeddings.word_embeddings.weight"].copy();
    model
        .init_from_pretrained(Some(&fixture("openai_clip.pt")), None)
        .unwrap();
    let after = &model.named_tensors()["bert.embeddings.word_embeddings.weight"];
    // Not from any file, but rounded to fp16 by convert_weights.
    assert!(after.equal(&before.to_kind(Kind::Half).to_kind(Kind::Float)));
    assert!(!after.equal(&before), "the random init was rounded");
}

#[test]
fn no_file_still_rounds_like_cn_clips_load() {
    // main.py calls load(model, clip_path=None, bert_path=None) for a model from scratch.
    let mut model = tiny();
    let before = model.named_tensors();
    let before: Vec<(String, Tensor)> = before.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
    assert!(model.init_from_pretrained(None, None).unwrap().is_empty());
    let after = model.named_tensors();
    for (key, t) in before {
        let rounded = key != "logit_scale"
            && !key.contains("ln_")
            && !key.ends_with("embedding")
            && key.starts_with("visual.");
        let expected = if rounded || key.starts_with("bert.") || key == "text_projection" {
            t.to_kind(Kind::Half).to_kind(Kind::Float)
        } else {
            t
        };
        assert!(after[&key].equal(&expected), "{key}");
    }
}

fn error_of(clip: Option<&str>, bert: Option<&str>) -> String {
    let mut model = tiny();
    let before = model.named_tensors()["visual.conv1.weight"].copy();
    let clip = clip.map(fixture);
    let bert = bert.map(fixture);
    let err = model
        .init_from_pretrained(clip.as_deref(), bert.as_deref())
        .expect_err("must be refused");
    // Nothing changed: files are checked before the model is touched.
    assert!(model.named_tensors()["visual.conv1.weight"].equal(&before));
    err.to_string()
}

#[test]
fn mismatched_files_are_refused_naming_file_and_key() {
    let e = error_of(Some("bad_shape.pt"), None);
    assert!(
        e.contains("--clip-weight-path")
            && e.contains("bad_shape.pt")
            && e.contains("visual.conv1.weight")
            && e.contains("[32, 3, 8, 8]")
            && e.contains("[32, 3, 4, 4]"),
        "{e}"
    );
    let e = error_of(Some("run_checkpoint.pt"), None);
    assert!(
        e.contains("run_checkpoint.pt") && e.contains("state_dict") && e.contains("--resume"),
        "{e}"
    );
    let e = error_of(None, Some("bare_bert.safetensors"));
    assert!(
        e.contains("--bert-weight-path")
            && e.contains("bare_bert.safetensors")
            && e.contains("embeddings.word_embeddings.weight")
            && e.contains("bert.*"),
        "{e}"
    );
    let e = error_of(Some("torchscript.pt"), None);
    assert!(
        e.contains("torchscript.pt") && e.contains("TorchScript") && e.contains("torch.jit.load"),
        "{e}"
    );
    // The vision file given as the BERT file: nothing in it starts with `bert`.
    let e = error_of(None, Some("openai_clip.pt"));
    assert!(
        e.contains("--bert-weight-path") && e.contains("visual."),
        "{e}"
    );
    let mut model = tiny();
    let missing = model
        .init_from_pretrained(Some(&fixture("no_such.pt")), None)
        .unwrap_err();
    assert!(matches!(
        missing,
        InitError::NotFound {
            flag: "clip-weight-path",
            ..
        }
    ));
}

#[test]
fn key_selection_is_restore_models() {
    let c = InitSource::Clip;
    assert!(c.takes("visual.proj") && c.takes("logit_scale") && c.takes("visualx"));
    assert!(!c.takes("text_projection") && !c.takes("module.visual.proj"));
    let b = InitSource::Bert;
    assert!(b.takes("bert.encoder.layer.0.output.dense.weight"));
    assert!(!b.takes("bert.pooler.dense.weight") && !b.takes("cls.predictions.bias"));
}
