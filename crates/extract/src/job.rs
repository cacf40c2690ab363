//! An extraction job as `extract_features` runs it: one process, or one rank of a sharded run
//! ([`crate::shard`]). Every rank encodes its run of whole batches into a shard file under a
//! directory named after the job's key (checkpoint identity, precision, batch size, data, world
//! size), reusing a shard a previous run completed; rank 0 then waits for all shards and returns
//! the merged features, which equal the single-process features bit for bit.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cnclip_model::{Clip, Precision};
use muge_data::{ImageTransform, TextPipeline};
use retrieval::{FeatureKind, Features, write_jsonl, write_native};
use tch::Tensor;

use crate::error::ExtractError;
use crate::identity::{Fnv, file_identity};
use crate::pipeline::{ExtractOptions, Progress, image_features, text_features};
use crate::shard::{merge_shards, read_shard, shard_path, shard_range, write_shard};
use crate::source::ImageSource;

/// Bumped when the way shards are computed changes, so older shards are not reused.
const SHARD_VERSION: u32 = 1;

/// Encodes `ids[range]` of a job, reporting progress.
pub type Compute<'a> =
    dyn FnMut(Range<usize>, &mut dyn FnMut(Progress)) -> Result<Features, ExtractError> + 'a;

/// Who this process is in an extraction, and what it extracts with.
#[derive(Debug, Clone)]
pub struct ShardJob {
    checkpoint: String,
    precision: Precision,
    rank: usize,
    world: usize,
    timeout: Duration,
}

/// What rank 0 (or a single process) wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Rows in the jsonl.
    pub rows: usize,
    /// The native feature file, when one was asked for.
    pub native: Option<PathBuf>,
}

/// What one rank's part of a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardOutcome {
    /// One process: no shard files.
    Alone,
    /// This rank's shard was encoded and written.
    Computed,
    /// This rank's shard was complete from an earlier run and reused.
    Reused,
}

impl ShardJob {
    /// A job over `checkpoint` (its [`file_identity`] keys the shards) at `precision`, as `rank`
    /// of `world` (`(0, 1)`: one process). Rank 0 waits at most 30 minutes for the other shards.
    pub fn new(
        checkpoint: &Path,
        precision: Precision,
        (rank, world): (usize, usize),
    ) -> Result<Self, ExtractError> {
        if world == 0 || rank >= world {
            return Err(ExtractError::Invalid(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        Ok(ShardJob {
            checkpoint: file_identity(checkpoint)?,
            precision,
            rank,
            world,
            timeout: Duration::from_secs(1800),
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// The key of one extraction: everything its features depend on.
    pub fn key(&self, kind: FeatureKind, batch: usize, data: &str) -> String {
        format!(
            "cnclip {} features v{SHARD_VERSION}; checkpoint {}; precision {:?}; batch {batch}; \
             {data}; world {}",
            kind.as_str(),
            self.checkpoint,
            self.precision,
            self.world
        )
    }

    /// Where the shards of the extraction with `key` whose result goes to `output` live.
    pub fn shard_dir(output: &Path, key: &str) -> PathBuf {
        let mut hash = Fnv::new();
        hash.write(key.as_bytes());
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "features".into());
        output.with_file_name(format!("{name}.{:016x}.shards", hash.finish()))
    }

    /// This rank's part of encoding `ids` in batches of `batch` (`compute(range, progress)`
    /// encodes `ids[range]`). Returns the features of all ids on rank 0 (and in a single
    /// process), `None` on the other ranks, and what happened to this rank's shard.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        output: &Path,
        kind: FeatureKind,
        data: &str,
        ids: &[i64],
        batch: usize,
        compute: &mut Compute<'_>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Option<Features>, ShardOutcome), ExtractError> {
        if self.world == 1 {
            return Ok((Some(compute(0..ids.len(), progress)?), ShardOutcome::Alone));
        }
        let key = self.key(kind, batch, data);
        let dir = Self::shard_dir(output, &key);
        std::fs::create_dir_all(&dir).map_err(crate::error::io_err(&dir))?;
        let path = shard_path(&dir, kind, self.rank, self.world);
        let range = shard_range(ids.len(), batch, self.rank, self.world);
        let outcome = match read_shard(&path, &key)? {
            Some(shard) if shard.ids == ids[range.clone()] => ShardOutcome::Reused,
            _ => {
                let features = compute(range, progress)?;
                write_shard(&path, &features, &key)?;
                ShardOutcome::Computed
            }
        };
        if self.rank != 0 {
            return Ok((None, outcome));
        }
        let merged = merge_shards(&dir, kind, self.world, &key, ids, self.timeout)?;
        Ok((Some(merged), outcome))
    }

    /// [`ShardJob::run`] over every image of `source`; rank 0 writes the result with
    /// [`write_features`] (`native`: the model name of a native file next to the jsonl).
    #[allow(clippy::too_many_arguments)]
    pub fn images<T: ImageTransform + ?Sized>(
        &self,
        model: &Clip,
        source: &ImageSource,
        transform: &T,
        options: &ExtractOptions,
        output: &Path,
        native: Option<&str>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Option<Written>, ShardOutcome), ExtractError> {
        // CPU and GPU kernels round differently: shards of one kind only (not the GPU index,
        // which differs between ranks).
        let on = if model.device().is_cuda() {
            "cuda"
        } else {
            "cpu"
        };
        let data = format!("images {}; on {on}", source.identity()?);
        let ids = source.ids();
        let batch = options.batch_size.max(1);
        let mut compute = |range: Range<usize>, progress: &mut dyn FnMut(Progress)| {
            image_features(model, source, &ids[range], transform, options, progress)
        };
        let (features, outcome) = self.run(
            output,
            FeatureKind::Image,
            &data,
            ids,
            batch,
            &mut compute,
            progress,
        )?;
        Ok((write_all(features, output, native)?, outcome))
    }

    /// [`ShardJob::texts`] over the texts of a `{split}_texts.jsonl`, tokenised by `pipeline`;
    /// rank 0 writes the result as [`ShardJob::images`] does. Also returns how many texts the
    /// file holds.
    #[allow(clippy::too_many_arguments)]
    pub fn texts_file(
        &self,
        model: &Clip,
        path: &Path,
        pipeline: &TextPipeline,
        options: &ExtractOptions,
        output: &Path,
        native: Option<&str>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Option<Written>, ShardOutcome, usize), ExtractError> {
        let encoded = pipeline.encode_texts_file(path, muge_data::BadRecordPolicy::Fail)?;
        let data = format!(
            "texts {}, prompt {:?}, context {}",
            file_identity(path)?,
            pipeline.prompt(),
            pipeline.context_length()
        );
        let (ids, tokens) = (&encoded.text_ids, &encoded.ids);
        let (features, outcome) =
            self.texts(model, ids, tokens, &data, options, output, progress)?;
        Ok((write_all(features, output, native)?, outcome, ids.len()))
    }

    /// [`ShardJob::run`] over tokenised texts (`tokens` row `i` is text `ids[i]`; `data` names
    /// where they came from and how they were tokenised).
    #[allow(clippy::too_many_arguments)]
    pub fn texts(
        &self,
        model: &Clip,
        ids: &[i64],
        tokens: &Tensor,
        data: &str,
        options: &ExtractOptions,
        output: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Option<Features>, ShardOutcome), ExtractError> {
        let batch = options.batch_size.max(1);
        let on = if model.device().is_cuda() {
            "cuda"
        } else {
            "cpu"
        };
        let data = format!("{data}; on {on}");
        let mut compute = |range: Range<usize>, progress: &mut dyn FnMut(Progress)| {
            let rows = tokens.f_narrow(0, range.start as i64, range.len() as i64)?;
            text_features(model, &ids[range], &rows, options, progress)
        };
        self.run(
            output,
            FeatureKind::Text,
            &data,
            ids,
            batch,
            &mut compute,
            progress,
        )
    }
}

fn write_all(
    features: Option<Features>,
    output: &Path,
    native: Option<&str>,
) -> Result<Option<Written>, ExtractError> {
    let Some(features) = features else {
        return Ok(None);
    };
    let native = write_features(&features, output, native)?;
    Ok(Some(Written {
        rows: features.ids.len(),
        native,
    }))
}

/// The model name a native feature file records: `vision@text` from the flags or the shipped
/// pair the config is, else the checkpoint's path.
pub fn model_name(
    (vision, text): (Option<&str>, Option<&str>),
    config: &cnclip_model::ClipConfig,
    checkpoint: &Path,
) -> String {
    match (vision, text, config.shipped_pair()) {
        (Some(v), Some(t), _) => format!("{v}@{t}"),
        (_, _, Some((v, t))) => format!("{v}@{t}"),
        _ => checkpoint.display().to_string(),
    }
}

/// Loads `checkpoint` (official `.pt`, Hugging Face directory or native file) onto `device` at
/// `precision`, as the extraction scripts do: `vision`/`text` name the towers (a shipped config
/// or a JSON file); without them an official `.pt`'s architecture is read from its shapes and the
/// other formats use the config they carry.
pub fn load_model(
    checkpoint: &Path,
    (vision, text): (Option<&str>, Option<&str>),
    precision: Precision,
    device: tch::Device,
) -> Result<Clip, ExtractError> {
    let options = cnclip_model::LoadOptions {
        config: cnclip_model::ClipConfig::from_optional_tower_args(vision, text)?,
        ..Default::default()
    };
    let mut model = Clip::load(checkpoint, &options, device)?;
    model.set_precision(precision);
    Ok(model)
}

/// Writes cn_clip's jsonl to `output` and, with `native_model` (the name to record), the native
/// feature file `output.safetensors` next to it, which it returns.
pub fn write_features(
    features: &Features,
    output: &Path,
    native_model: Option<&str>,
) -> Result<Option<PathBuf>, ExtractError> {
    write_jsonl(output, &features.view(), features.kind)?;
    let Some(model) = native_model else {
        return Ok(None);
    };
    let path = output.with_extension("safetensors");
    write_native(&path, &features.view(), features.kind, Some(model))?;
    Ok(Some(path))
}
