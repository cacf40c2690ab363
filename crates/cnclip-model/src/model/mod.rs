//! The Chinese-CLIP network: vision tower (ViT or ModifiedResNet), BERT text tower and the CLIP
//! wrapper, with variables registered under cn_clip's state-dict keys.

mod bert;
mod checkpointing;
mod clip;
pub mod delta;
mod layers;
mod resnet;
mod vit;

pub use checkpointing::CheckpointedForward;
pub(crate) use clip::converted_by_cn_clip;
pub use clip::{Clip, ModelError, Precision, Visual};
pub use delta::{DeltaSlot, LinearDelta, LinearSite, WeightLayout};
pub use layers::BatchNormMode;
pub use vit::{flip_keep_indices, resize_positional_embedding};
