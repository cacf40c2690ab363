//! cn_clip's `ModifiedResNet` (RN50, `model.py:23-168`): a three-conv stem with average pooling,
//! anti-aliased bottlenecks (average pool before strided work) and an attention pool whose query is
//! the spatial mean token.

use super::layers::{BatchNorm2d, BatchNormMode, Conv2d, Linear, multi_head_attention};
use crate::config::VisionConfig;
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    if k <= 1 {
        return x.shallow_clone();
    }
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
}

#[derive(Debug)]
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
    stride: i64,
}

impl Bottleneck {
    fn new(p: &Path, inplanes: i64, planes: i64, stride: i64) -> Self {
        let downsample = (stride > 1 || inplanes != planes * 4).then(|| {
            let d = p / "downsample";
            (
                Conv2d::new(&(&d / "0"), inplanes, planes * 4, 1, 1, 0),
                BatchNorm2d::new(&(&d / "1"), planes * 4),
            )
        });
        Self {
            conv1: Conv2d::new(&(p / "conv1"), inplanes, planes, 1, 1, 0),
            bn1: BatchNorm2d::new(&(p / "bn1"), planes),
            conv2: Conv2d::new(&(p / "conv2"), planes, planes, 3, 1, 1),
            bn2: BatchNorm2d::new(&(p / "bn2"), planes),
            conv3: Conv2d::new(&(p / "conv3"), planes, planes * 4, 1, 1, 0),
            bn3: BatchNorm2d::new(&(p / "bn3"), planes * 4),
            downsample,
            stride,
        }
    }

    fn forward(&self, x: &Tensor, train: bool, bn: &BatchNormMode) -> Tensor {
        let out = self.bn1.forward_t(&self.conv1.forward(x), train, bn).relu();
        let out = self
            .bn2
            .forward_t(&self.conv2.forward(&out), train, bn)
            .relu();
        let out = self
            .bn3
            .forward_t(&self.conv3.forward(&avg_pool(&out, self.stride)), train, bn);
        let identity = match &self.downsample {
            Some((conv, norm)) => {
                norm.forward_t(&conv.forward(&avg_pool(x, self.stride)), train, bn)
            }
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

#[derive(Debug)]
struct AttentionPool2d {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    c_proj: Linear,
    heads: i64,
}

impl AttentionPool2d {
    fn new(p: &Path, spatial: i64, embed: i64, heads: i64, output: i64) -> Self {
        let std = (embed as f64).powf(-0.5);
        Self {
            positional_embedding: p.var(
                "positional_embedding",
                &[spatial * spatial + 1, embed],
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            ),
            k_proj: Linear::new(&(p / "k_proj"), embed, embed, std),
            q_proj: Linear::new(&(p / "q_proj"), embed, embed, std),
            v_proj: Linear::new(&(p / "v_proj"), embed, embed, std),
            c_proj: Linear::new(&(p / "c_proj"), embed, output, std),
            heads,
        }
    }

    /// Only the mean token's output is used, so only it is computed as a query.
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.flatten(2, 3).transpose(1, 2);
        let x = Tensor::cat(&[x.mean_dim(1, true, None::<Kind>), x], 1);
        let kind = x.kind();
        let x = x + self.positional_embedding.to_kind(kind);
        let query = self.q_proj.forward(&x.narrow(1, 0, 1));
        let out = multi_head_attention(
            &query,
            &self.k_proj.forward(&x),
            &self.v_proj.forward(&x),
            self.heads,
            None,
            0.0,
        );
        self.c_proj.forward(&out.select(1, 0))
    }
}

#[derive(Debug)]
pub struct ModifiedResNet {
    stem: Vec<(Conv2d, BatchNorm2d)>,
    layers: Vec<Bottleneck>,
    attnpool: AttentionPool2d,
    batch_norm: BatchNormMode,
}

impl ModifiedResNet {
    pub fn new(p: &Path, c: &VisionConfig, blocks: [i64; 4]) -> Self {
        let width = c.vision_width;
        let stem = vec![
            (
                Conv2d::new(&(p / "conv1"), 3, width / 2, 3, 2, 1),
                BatchNorm2d::new(&(p / "bn1"), width / 2),
            ),
            (
                Conv2d::new(&(p / "conv2"), width / 2, width / 2, 3, 1, 1),
                BatchNorm2d::new(&(p / "bn2"), width / 2),
            ),
            (
                Conv2d::new(&(p / "conv3"), width / 2, width, 3, 1, 1),
                BatchNorm2d::new(&(p / "bn3"), width),
            ),
        ];
        let mut layers = Vec::new();
        let mut inplanes = width;
        for (index, &count) in blocks.iter().enumerate() {
            let planes = width << index;
            let layer = p / format!("layer{}", index + 1);
            for b in 0..count {
                let stride = if b == 0 && index > 0 { 2 } else { 1 };
                layers.push(Bottleneck::new(&(&layer / b), inplanes, planes, stride));
                inplanes = planes * 4;
            }
        }
        let attnpool = AttentionPool2d::new(
            &(p / "attnpool"),
            c.image_resolution / 32,
            width * 32,
            c.heads(),
            c.embed_dim,
        );
        Self {
            stem,
            layers,
            attnpool,
            batch_norm: BatchNormMode::default(),
        }
    }

    pub fn dtype(&self) -> Kind {
        self.stem[0].0.weight.kind()
    }

    /// How training forwards normalise ([`BatchNormMode::Batch`] unless set).
    pub fn set_batch_norm_mode(&mut self, mode: BatchNormMode) {
        self.batch_norm = mode;
    }

    pub fn batch_norm_mode(&self) -> &BatchNormMode {
        &self.batch_norm
    }

    /// `train`: cn_clip's `model.train()`, whose BatchNorms follow [`Self::batch_norm_mode`];
    /// otherwise `eval()` (running statistics).
    pub fn forward(&self, image: &Tensor, train: bool) -> Tensor {
        let bn = &self.batch_norm;
        let mut x = image.to_kind(self.dtype());
        for (conv, norm) in &self.stem {
            x = norm.forward_t(&conv.forward(&x), train, bn).relu();
        }
        x = avg_pool(&x, 2);
        for block in &self.layers {
            x = block.forward(&x, train, bn);
        }
        self.attnpool.forward(&x)
    }
}
