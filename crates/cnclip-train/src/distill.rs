//! cn_clip's knowledge distillation (`--distillation`; `train.py:get_loss` and
//! `cosineSimilarityLoss`, `main.py:244-285`): a frozen teacher sees the same preprocessed images
//! as the student, and the step's loss gains
//! `kd_loss_weight · (1 − mean_rows cos(teacher, resize(student)))`, where the student's
//! normalised image features `[N, D_s]` are resized bilinearly, as a one-channel `N × D_s` image,
//! to the teacher's `[N, D_t]`. Under data parallelism both are gathered like the contrastive
//! loss's rows. (With `--gather-with-grad`, cn_clip gathers the student's rows in rank order but
//! the teacher's with the local rows first, so on ranks other than 0 its rows are paired with
//! another rank's teacher features; here both use the same order, so every row meets its own.)
//!
//! cn_clip's teachers are ModelScope hub models (a CLIP's `encode_image`: unnormalised image
//! features). Here the teacher is a local checkpoint of any architecture this program loads, and
//! its features are likewise its `encode_image` (the cosine ignores their scale).

use cnclip_model::{Clip, ClipConfig, LoadError, LoadOptions};
use cnclip_train_config::SettingError;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The loss of cn_clip's `cosineSimilarityLoss(teacher, student)`: `1 − mean(cos_sim(teacher,
/// interp(student)))` with `interp` = `F.interpolate(student[None, None], size=teacher.shape,
/// mode="bilinear", align_corners=False)`, in fp32 (where autocast puts `cosine_similarity`).
pub fn cosine_similarity_loss(teacher: &Tensor, student: &Tensor) -> Tensor {
    let teacher = teacher.to_kind(Kind::Float);
    let size = teacher.size();
    let resized = student
        .to_kind(Kind::Float)
        .unsqueeze(0)
        .unsqueeze(0)
        .upsample_bilinear2d(&size, false, None, None)
        .squeeze_dim(0)
        .squeeze_dim(0);
    let mean = Tensor::cosine_similarity(&teacher, &resized, 1, 1e-8).mean(Kind::Float);
    -mean + 1.0
}

/// A frozen teacher: its image features for a batch of the student's images.
pub struct Teacher {
    model: Clip,
}

impl std::fmt::Debug for Teacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teacher")
            .field("config", self.model.config())
            .finish()
    }
}

fn setting(flag: &'static str, message: String) -> SettingError {
    SettingError { flag, message }
}

impl Teacher {
    /// A teacher model as it is (fp32 weights of the file, no gradient).
    pub fn new(model: Clip) -> Self {
        for (_, mut var) in model.var_store().variables() {
            let _ = var.requires_grad_(false);
        }
        Self { model }
    }

    /// The teacher at `path` (`--teacher-model-name`; an official `.pt` also needs its
    /// architecture, `model`: `--teacher-model`) on `device`, checked against the student: it
    /// must take the student's images (same resolution). Errors name the flag to change.
    pub fn load(
        path: Option<&str>,
        model: Option<&str>,
        student: &ClipConfig,
        device: Device,
    ) -> Result<Self, SettingError> {
        let flag = "teacher-model-name";
        let name = path.filter(|n| !n.is_empty()).ok_or_else(|| {
            setting(
                flag,
                "required with --distillation: the path of a local teacher checkpoint".into(),
            )
        })?;
        let path = Path::new(name);
        if !path.exists() {
            return Err(setting(
                flag,
                format!(
                    "{name} does not exist (a local teacher checkpoint is expected: an official \
                     .pt with --teacher-model, a Hugging Face ChineseCLIPModel directory or a \
                     native .safetensors)"
                ),
            ));
        }
        let arch = match model {
            Some(m) => Some(
                ClipConfig::from_name(m)
                    .map_err(|e| setting("teacher-model", format!("{m}: {e}")))?,
            ),
            None => None,
        };
        // The architecture is used only for a file that records none (an official .pt).
        let options = LoadOptions {
            config: arch,
            resize_pos_embed: false,
        };
        let model = Clip::load(path, &options, device).map_err(|e| match e {
            LoadError::ConfigRequired { .. } if model.is_none() => setting(
                "teacher-model",
                format!(
                    "required for the official .pt teacher {name}, which does not record its \
                     architecture: pass its cn_clip model name (e.g. ViT-H-14, or VISION@TEXT)"
                ),
            ),
            e => setting(flag, e.to_string()),
        })?;
        let (theirs, ours) = (
            model.config().vision.image_resolution,
            student.vision.image_resolution,
        );
        if theirs != ours {
            return Err(setting(
                flag,
                format!(
                    "the teacher {name} takes {theirs}×{theirs} images but the student's are \
                     {ours}×{ours} (cn_clip feeds the teacher the student's images)"
                ),
            ));
        }
        Ok(Self::new(model))
    }

    pub fn model(&self) -> &Clip {
        &self.model
    }

    /// The teacher's image features `[N, D_t]` for the student's preprocessed images (no
    /// gradient, inference mode).
    pub fn features(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| self.model.encode_image(images))
    }
}
