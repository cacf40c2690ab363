//! The model as the service uses it: a checkpoint in any supported format, cn_clip's eval image
//! transform, and the text path with and without the product prompt. Everything here is blocking
//! libtorch work; the service calls it only from its model thread (and once at start-up).

use std::path::PathBuf;

use cnclip_model::preprocess::Preprocessor;
use cnclip_model::{Clip, ClipConfig, LoadOptions, Precision};
use muge_data::TextPipeline;
use tch::{Device, Kind, Tensor};

use crate::error::ServeError;

/// Which checkpoint to load and, for an official `.pt` (which does not record its architecture),
/// which towers it has.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Official `.pt`, Hugging Face directory or native `.safetensors`.
    pub checkpoint: PathBuf,
    /// A shipped vision config name or a JSON file in cn_clip's schema. Without it (and
    /// `text_model`), an official `.pt`'s architecture is inferred from its tensor shapes (the
    /// shipped config they match); given, it is checked against the shapes or the file's config.
    pub vision_model: Option<String>,
    /// As `vision_model`, for the text tower.
    pub text_model: Option<String>,
    /// Token context length (cn_clip's `--context-length`).
    pub context_length: usize,
}

impl ModelSpec {
    pub fn new(checkpoint: impl Into<PathBuf>) -> Self {
        ModelSpec {
            checkpoint: checkpoint.into(),
            vision_model: None,
            text_model: None,
            context_length: cnclip_model::tokenizer::DEFAULT_CONTEXT_LENGTH,
        }
    }
}

/// A loaded model with its preprocessing and text pipelines.
pub struct Encoder {
    clip: Clip,
    preprocessor: Preprocessor,
    plain: TextPipeline,
    prompted: TextPipeline,
    name: String,
}

impl Encoder {
    /// Loads `spec.checkpoint` onto `device` at `precision`.
    pub fn load(
        spec: &ModelSpec,
        device: Device,
        precision: Precision,
    ) -> Result<Self, ServeError> {
        // An official .pt without the flags: its architecture is read from its tensor shapes.
        let config = match (&spec.vision_model, &spec.text_model) {
            (Some(v), Some(t)) => Some(ClipConfig::from_tower_args(v, t)?),
            (None, None) => None,
            _ => {
                return Err(ServeError::Invalid(
                    "give both --vision-model and --text-model, or neither".into(),
                ));
            }
        };
        let options = LoadOptions {
            config,
            ..Default::default()
        };
        let mut clip = Clip::load(&spec.checkpoint, &options, device)?;
        clip.set_precision(precision);
        let name = spec
            .checkpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.checkpoint.display().to_string());
        Self::from_model(clip, name, spec.context_length)
    }

    /// Wraps a model already in memory (tests, benchmarks, a caller that built it itself).
    pub fn from_model(
        clip: Clip,
        name: impl Into<String>,
        context_length: usize,
    ) -> Result<Self, ServeError> {
        let resolution = u32::try_from(clip.config().vision.image_resolution)
            .map_err(|_| ServeError::Invalid("image resolution out of range".into()))?;
        let plain = TextPipeline::new(context_length)?;
        Ok(Encoder {
            preprocessor: Preprocessor::new(resolution)?,
            prompted: plain.clone().with_product_prompt(),
            plain,
            clip,
            name: name.into(),
        })
    }

    /// The checkpoint's file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Feature dimension (`embed_dim`).
    pub fn dim(&self) -> usize {
        self.clip.config().vision.embed_dim as usize
    }

    /// The model (for `cnclip-extract`'s pipeline).
    pub fn clip(&self) -> &Clip {
        &self.clip
    }

    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    pub fn device(&self) -> Device {
        self.clip.device()
    }

    /// `exp(logit_scale)`, the temperature of zero-shot probabilities.
    pub fn logit_scale(&self) -> Result<f64, ServeError> {
        let _guard = tch::no_grad_guard();
        Ok(self
            .clip
            .logit_scale_exp()
            .f_to_kind(Kind::Double)?
            .f_double_value(&[])?)
    }

    /// L2-normalised features of `texts` (`(text, with product prompt)`), `[N·dim]` row-major.
    ///
    /// The ids are cut after the batch's longest text instead of padded to the context length as
    /// cn_clip does: padding is masked out of attention and `[CLS]` is pooled, so the features are
    /// the same up to float rounding (the `trimming_padding_keeps_features` test), and a short
    /// query costs a fraction of the 52-token forward pass.
    pub fn text_features(&self, texts: &[(&str, bool)]) -> Result<Vec<f32>, ServeError> {
        let ids = self.text_ids(texts, true)?;
        let _guard = tch::no_grad_guard();
        rows(&self.clip.text_features(&ids))
    }

    /// `[N, L]` ids of `texts`; `trim`: `L` is the longest text's length, else the context length.
    fn text_ids(&self, texts: &[(&str, bool)], trim: bool) -> Result<Tensor, ServeError> {
        let l = self.plain.context_length();
        let mut ids = vec![cnclip_model::tokenizer::PAD_ID; texts.len() * l];
        let mut longest = 1;
        for ((text, prompt), row) in texts.iter().zip(ids.chunks_exact_mut(l)) {
            let pipeline = if *prompt { &self.prompted } else { &self.plain };
            longest = longest.max(pipeline.encode_into(text, row) + 1);
        }
        let ids = Tensor::f_from_slice(&ids)?.f_view([texts.len() as i64, l as i64])?;
        Ok(if trim {
            ids.f_narrow(1, 0, longest as i64)?
        } else {
            ids
        })
    }

    /// L2-normalised features of preprocessed `[N,3,S,S]` images, `[N·dim]` row-major.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Vec<f32>, ServeError> {
        let _guard = tch::no_grad_guard();
        rows(&self.clip.image_features(pixels))
    }
}

fn rows(features: &Tensor) -> Result<Vec<f32>, ServeError> {
    let cpu = features
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    Ok(Vec::<f32>::try_from(cpu.f_flatten(0, -1)?)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn trimming_padding_keeps_features() {
        tch::manual_seed(3);
        let config = ClipConfig::from_json_str(
            r#"{"embed_dim":16,"image_resolution":32,"vision_layers":1,"vision_width":32,"vision_patch_size":8,
                "vision_head_width":16,"vocab_size":21128,"text_attention_probs_dropout_prob":0.0,
                "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":24,
                "text_initializer_range":0.02,"text_intermediate_size":48,"text_max_position_embeddings":64,
                "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
            "tiny",
        )
        .unwrap();
        let encoder = Encoder::from_model(Clip::new(&config, Device::Cpu), "tiny", 52).unwrap();
        let texts = [
            ("红色连衣裙", true),
            ("包", false),
            ("无线蓝牙耳机 降噪 长续航", true),
        ];
        let trimmed = encoder.text_features(&texts).unwrap();
        let ids = encoder.text_ids(&texts, false).unwrap();
        assert_eq!(ids.size(), [3, 52]);
        assert!(encoder.text_ids(&texts, true).unwrap().size()[1] < 52);
        let padded = tch::no_grad(|| rows(&encoder.clip.text_features(&ids))).unwrap();
        for (a, b) in trimmed.iter().zip(&padded) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
