//! Batches of tensors from a data set, built on worker threads, in a deterministic order.
//!
//! The counterpart of cn_clip's `DataLoader(dataset, batch_size=B, sampler=DistributedSampler,
//! num_workers=K)` over `LMDBDataset`:
//!
//! * the order is the [`EpochPlan`]'s (torch's sampler order), cut into batches of `B`, the last
//!   one shorter unless `drop_last`;
//! * batch `b` is built by worker `b % K`, like torch's workers, and handed out strictly in order,
//!   so the result never depends on thread timing;
//! * each worker keeps at most `prefetch` finished batches queued (torch's `prefetch_factor`),
//!   so memory stays bounded when the consumer is slower;
//! * a sample is read ([`SampleSource`]), its image decoded as Pillow would
//!   ([`cnclip_model::preprocess::decode`]), transformed ([`ImageTransform`]: the eval transform or
//!   training augmentation), normalised with CLIP's mean and std, and its text turned into ids by
//!   the shared [`TextPipeline`] (prompt, dataset preprocessing, tokenizer);
//! * the first failure ends the epoch with an error naming the sample (data set index, pair,
//!   image and text ids), as a Python worker exception would;
//! * dropping the loader stops the workers and joins them, also mid-epoch.
//!
//! Randomness of augmentation comes only from [`SampleKey`] (seed, epoch, data set index), never
//! from which worker runs a sample or when, so runs with 1 or 16 workers give the same tensors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use cnclip_model::preprocess::{
    DecodedImage, PreprocessError, Preprocessor, RgbImage, decode_named,
};
use tch::Tensor;

use crate::files::{BadRecordPolicy, FileError, read_image_tsv};
use crate::lmdb::{LmdbError, LmdbSplit, RawSample, SplitReader};
use crate::sampler::EpochPlan;
use crate::text::TextPipeline;

/// What makes one sample's random augmentation reproducible: the run's seed, the epoch and the
/// sample's data set index (the sampler's index, before wrapping modulo the pair count).
///
/// Padding repeats a pair under a different index, so the repeat gets its own augmentation, as
/// it would from a fresh random draw in cn_clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub seed: u64,
    pub epoch: u64,
    pub index: u64,
}

/// Turns a decoded image into the RGB image of the model's input size.
///
/// Implemented by the evaluation transform ([`Preprocessor`]: cn_clip's
/// `Resize((S, S), BICUBIC)` then `convert('RGB')`) and by training augmentation, which derives
/// all its randomness from `sample` so that results do not depend on worker scheduling. The
/// loader calls [`ImageTransform::apply`] concurrently from several threads, then normalises the
/// result (ToTensor + Normalize with CLIP's mean and std), so implementations return pixels, not
/// tensors.
pub trait ImageTransform: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    /// `(width, height)` of every image [`ImageTransform::apply`] returns.
    fn output_size(&self) -> (usize, usize);

    /// The transformed image; it must be [`ImageTransform::output_size`] large (the loader
    /// checks and reports a mismatch as an error of the sample).
    fn apply(&self, image: &DecodedImage, sample: SampleKey) -> Result<RgbImage, Self::Error>;
}

impl ImageTransform for Preprocessor {
    type Error = PreprocessError;

    fn output_size(&self) -> (usize, usize) {
        (self.size() as usize, self.size() as usize)
    }

    /// cn_clip's evaluation transform (also its training transform without `--use-augment`);
    /// deterministic, so `sample` is unused.
    fn apply(&self, image: &DecodedImage, _sample: SampleKey) -> Result<RgbImage, PreprocessError> {
        let s = self.size() as usize;
        image.resize_rgb(s, s)
    }
}

impl<T: ImageTransform + ?Sized> ImageTransform for Arc<T> {
    type Error = T::Error;

    fn output_size(&self) -> (usize, usize) {
        (**self).output_size()
    }

    fn apply(&self, image: &DecodedImage, sample: SampleKey) -> Result<RgbImage, Self::Error> {
        (**self).apply(image, sample)
    }
}

/// A random-access data set of (image, text) samples.
///
/// Each worker opens one [`SampleSource::Reader`] and reads all its samples through it (for an
/// LMDB: one long read transaction per environment, as cn_clip keeps one per worker).
pub trait SampleSource: Send + Sync {
    type Reader<'a>: SampleReader
    where
        Self: 'a;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The number of distinct samples (pairs); indices wrap modulo this.
    fn num_samples(&self) -> u64;

    fn reader(&self) -> Result<Self::Reader<'_>, Self::Error>;
}

/// Reads samples by data set index (wrapping).
pub trait SampleReader {
    type Error: std::error::Error + Send + Sync + 'static;

    fn sample(&self, index: u64) -> Result<RawSample, Self::Error>;
}

impl SampleSource for LmdbSplit {
    type Reader<'a> = SplitReader<'a>;
    type Error = LmdbError;

    fn num_samples(&self) -> u64 {
        LmdbSplit::num_samples(self)
    }

    fn reader(&self) -> Result<SplitReader<'_>, LmdbError> {
        LmdbSplit::reader(self)
    }
}

impl SampleReader for SplitReader<'_> {
    type Error = LmdbError;

    fn sample(&self, index: u64) -> Result<RawSample, LmdbError> {
        SplitReader::sample(self, index)
    }
}

/// A data set held in memory: pairs in order and image file bytes by id. Built from the TSV and
/// JSONL directly ([`MemorySource::from_files`]) it gives the same samples, in the same order, as
/// the LMDB that `build_split` would build from them.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    pairs: Vec<(i64, i64, Arc<str>)>,
    images: HashMap<i64, Arc<[u8]>>,
}

/// Why a [`MemorySource`] cannot produce a sample.
#[derive(Debug, thiserror::Error)]
pub enum MemorySourceError {
    #[error("the data set has no pairs, so sample {index} does not exist")]
    Empty { index: u64 },
    #[error("no image {image_id} (pair {pair_index}, text {text_id})")]
    MissingImage {
        image_id: i64,
        pair_index: u64,
        text_id: i64,
    },
    #[error("image {image_id}: the base64 text does not decode: {source}")]
    Base64 {
        image_id: i64,
        #[source]
        source: crate::base64::Base64Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a pair (the next pair index).
    pub fn push_pair(&mut self, image_id: i64, text_id: i64, text: &str) {
        self.pairs.push((image_id, text_id, Arc::from(text)));
    }

    /// Stores an image file's bytes under `image_id`.
    pub fn insert_image(&mut self, image_id: i64, file_bytes: Vec<u8>) {
        self.images.insert(image_id, Arc::from(file_bytes));
    }

    /// Reads a split's `{split}_imgs.tsv` and `{split}_texts.jsonl` (the pairs in the LMDB's
    /// order), checking references as `build_split` does.
    pub fn from_files(
        tsv: impl AsRef<Path>,
        jsonl: impl AsRef<Path>,
        policy: BadRecordPolicy,
    ) -> Result<Self, MemorySourceError> {
        let tsv = tsv.as_ref();
        let (images, _) = read_image_tsv(tsv, policy)?;
        let mut source = MemorySource::new();
        for record in images {
            let bytes =
                crate::base64::decode_cn_clip(record.base64.as_bytes()).map_err(|source| {
                    MemorySourceError::Base64 {
                        image_id: record.image_id,
                        source,
                    }
                })?;
            source.insert_image(record.image_id, bytes);
        }
        let known = crate::files::KnownImages {
            ids: source.images.keys().copied().collect(),
            source: tsv.display().to_string(),
        };
        let mut reader =
            crate::files::TextJsonlReader::open(jsonl, policy)?.with_known_images(known);
        for record in reader.by_ref() {
            let record = record?;
            for image_id in record.image_ids.iter().flatten() {
                source.push_pair(*image_id, record.text_id, &record.text);
            }
        }
        Ok(source)
    }
}

impl SampleSource for MemorySource {
    type Reader<'a> = &'a MemorySource;
    type Error = MemorySourceError;

    fn num_samples(&self) -> u64 {
        self.pairs.len() as u64
    }

    fn reader(&self) -> Result<&MemorySource, MemorySourceError> {
        Ok(self)
    }
}

impl SampleReader for &MemorySource {
    type Error = MemorySourceError;

    fn sample(&self, index: u64) -> Result<RawSample, MemorySourceError> {
        let n = self.pairs.len() as u64;
        if n == 0 {
            return Err(MemorySourceError::Empty { index });
        }
        let pair_index = index % n;
        let (image_id, text_id, text) = &self.pairs[pair_index as usize];
        let image = self
            .images
            .get(image_id)
            .ok_or(MemorySourceError::MissingImage {
                image_id: *image_id,
                pair_index,
                text_id: *text_id,
            })?;
        Ok(RawSample {
            index,
            pair_index,
            image_id: *image_id,
            text_id: *text_id,
            text: text.to_string(),
            image: image.to_vec(),
        })
    }
}

/// One batch, in sampler order.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` float32, normalised with CLIP's mean and std (CPU).
    pub images: Tensor,
    /// `[B, context_length]` int64 token ids (CPU).
    pub texts: Tensor,
    /// Position of `[SEP]` in each row (cn_clip's `eos_index`).
    pub eos_indices: Vec<i64>,
    /// Data set indices (the sampler's, possibly ≥ the pair count).
    pub indices: Vec<u64>,
    pub image_ids: Vec<i64>,
    pub text_ids: Vec<i64>,
    /// The batch's position in the epoch plan (0-based; a resumed plan starts at 0).
    pub batch_index: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Settings of a [`Loader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch (cn_clip's per-rank `--batch-size`).
    pub batch_size: usize,
    /// Worker threads; 0 builds each batch in the caller's thread when it is asked for.
    pub workers: usize,
    /// Finished batches each worker may queue ahead (torch's `prefetch_factor`, 2).
    pub prefetch: usize,
    /// Drop a last batch shorter than `batch_size` (cn_clip pads instead, so it never has one).
    pub drop_last: bool,
    /// The run's seed, passed to the transform in every [`SampleKey`].
    pub seed: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 1,
            workers: 0,
            prefetch: 2,
            drop_last: false,
            seed: 0,
        }
    }
}

/// What went wrong with one sample.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("reading the sample failed: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Decode(Box<PreprocessError>),
    #[error("the image transform failed: {0}")]
    Transform(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the image transform returned {got_w}x{got_h} pixels, expected {want_w}x{want_h}")]
    TransformSize {
        got_w: usize,
        got_h: usize,
        want_w: usize,
        want_h: usize,
    },
}

/// A loader failure; sample errors name the sample.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("invalid loader settings: {0}")]
    Config(String),
    #[error("opening the data set for worker {worker} failed: {source}")]
    Open {
        worker: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("sample {index}{}: {source}", describe_ids(*.pair_index, *.image_id, *.text_id))]
    Sample {
        /// The data set index (the sampler's).
        index: u64,
        pair_index: Option<u64>,
        image_id: Option<i64>,
        text_id: Option<i64>,
        #[source]
        source: SampleError,
    },
    #[error("building the batch tensors failed: {0}")]
    Tensor(#[from] tch::TchError),
    #[error("loader worker {worker} stopped without a result for batch {batch} (it panicked)")]
    WorkerDied { worker: usize, batch: usize },
}

fn describe_ids(pair: Option<u64>, image: Option<i64>, text: Option<i64>) -> String {
    let mut parts = Vec::new();
    if let Some(p) = pair {
        parts.push(format!("pair {p}"));
    }
    if let Some(i) = image {
        parts.push(format!("image {i}"));
    }
    if let Some(t) = text {
        parts.push(format!("text {t}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Everything a worker needs to build batches, shared by all workers.
struct Job<S, T> {
    source: Arc<S>,
    transform: Arc<T>,
    text: TextPipeline,
    batches: Vec<Vec<u64>>,
    epoch: u64,
    seed: u64,
}

impl<S: SampleSource, T: ImageTransform> Job<S, T> {
    fn build(
        &self,
        reader: &S::Reader<'_>,
        b: usize,
        stop: &AtomicBool,
    ) -> Option<Result<Batch, LoaderError>> {
        let indices = &self.batches[b];
        let (w, h) = self.transform.output_size();
        let per_image = 3 * w * h;
        let l = self.text.context_length();
        let n = indices.len();
        let mut pixels = vec![0f32; n * per_image];
        let mut ids = vec![0i64; n * l];
        let mut eos = Vec::with_capacity(n);
        let mut image_ids = Vec::with_capacity(n);
        let mut text_ids = Vec::with_capacity(n);
        for (k, &index) in indices.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let fail = |pair_index, image_id, text_id, source| {
                Some(Err(LoaderError::Sample {
                    index,
                    pair_index,
                    image_id,
                    text_id,
                    source,
                }))
            };
            let sample = match reader.sample(index) {
                Ok(s) => s,
                Err(e) => return fail(None, None, None, SampleError::Source(Box::new(e))),
            };
            let ids_of = (
                Some(sample.pair_index),
                Some(sample.image_id),
                Some(sample.text_id),
            );
            let decoded = match decode_named(&sample.image, &format!("{}", sample.image_id)) {
                Ok(d) => d,
                Err(e) => {
                    return fail(
                        ids_of.0,
                        ids_of.1,
                        ids_of.2,
                        SampleError::Decode(Box::new(e)),
                    );
                }
            };
            let key = SampleKey {
                seed: self.seed,
                epoch: self.epoch,
                index,
            };
            let rgb = match self.transform.apply(&decoded, key) {
                Ok(r) => r,
                Err(e) => {
                    return fail(
                        ids_of.0,
                        ids_of.1,
                        ids_of.2,
                        SampleError::Transform(Box::new(e)),
                    );
                }
            };
            if (rgb.width(), rgb.height()) != (w, h) {
                let source = SampleError::TransformSize {
                    got_w: rgb.width(),
                    got_h: rgb.height(),
                    want_w: w,
                    want_h: h,
                };
                return fail(ids_of.0, ids_of.1, ids_of.2, source);
            }
            rgb.normalize_into(&mut pixels[k * per_image..(k + 1) * per_image]);
            eos.push(
                self.text
                    .encode_into(&sample.text, &mut ids[k * l..(k + 1) * l]) as i64,
            );
            image_ids.push(sample.image_id);
            text_ids.push(sample.text_id);
        }
        let tensors = (|| -> Result<(Tensor, Tensor), tch::TchError> {
            let images =
                Tensor::f_from_slice(&pixels)?.f_view([n as i64, 3, h as i64, w as i64])?;
            let texts = Tensor::f_from_slice(&ids)?.f_view([n as i64, l as i64])?;
            Ok((images, texts))
        })();
        Some(
            tensors
                .map_err(LoaderError::from)
                .map(|(images, texts)| Batch {
                    images,
                    texts,
                    eos_indices: eos,
                    indices: indices.clone(),
                    image_ids,
                    text_ids,
                    batch_index: b,
                }),
        )
    }
}

/// Type-erased batch builder for the synchronous (0 workers) mode.
trait BuildBatch: Send {
    fn build_one(&self, b: usize) -> Result<Batch, LoaderError>;
}

impl<S: SampleSource + 'static, T: ImageTransform + 'static> BuildBatch for Arc<Job<S, T>> {
    fn build_one(&self, b: usize) -> Result<Batch, LoaderError> {
        let reader = self.source.reader().map_err(|e| LoaderError::Open {
            worker: 0,
            source: Box::new(e),
        })?;
        let stop = AtomicBool::new(false);
        match self.build(&reader, b, &stop) {
            Some(r) => r,
            None => unreachable!("the local stop flag is never set"),
        }
    }
}

/// An epoch's batches; iterate to get them in order.
pub struct Loader {
    num_batches: usize,
    next: usize,
    finished: bool,
    mode: Mode,
}

enum Mode {
    Inline(Box<dyn BuildBatch>),
    Threads {
        receivers: Vec<Receiver<Result<Batch, LoaderError>>>,
        handles: Vec<JoinHandle<()>>,
        stop: Arc<AtomicBool>,
    },
}

impl Loader {
    /// Starts loading `plan`'s samples from `source` with `transform` for images and `text` for
    /// token ids. Workers start at once and fill their queues.
    pub fn new<S, T>(
        source: Arc<S>,
        transform: Arc<T>,
        text: TextPipeline,
        plan: &EpochPlan,
        config: LoaderConfig,
    ) -> Result<Loader, LoaderError>
    where
        S: SampleSource + 'static,
        T: ImageTransform + 'static,
    {
        if config.batch_size == 0 {
            return Err(LoaderError::Config("batch_size must be at least 1".into()));
        }
        if config.workers > 0 && config.prefetch == 0 {
            return Err(LoaderError::Config(
                "prefetch must be at least 1 when workers are used".into(),
            ));
        }
        let (w, h) = transform.output_size();
        if w == 0 || h == 0 {
            return Err(LoaderError::Config(format!(
                "the image transform's output size {w}x{h} is empty"
            )));
        }
        let mut batches: Vec<Vec<u64>> = plan
            .indices
            .chunks(config.batch_size)
            .map(<[u64]>::to_vec)
            .collect();
        if config.drop_last && batches.last().is_some_and(|b| b.len() < config.batch_size) {
            batches.pop();
        }
        let num_batches = batches.len();
        let job = Arc::new(Job {
            source,
            transform,
            text,
            batches,
            epoch: plan.epoch,
            seed: config.seed,
        });
        if config.workers == 0 {
            return Ok(Loader {
                num_batches,
                next: 0,
                finished: false,
                mode: Mode::Inline(Box::new(job)),
            });
        }
        let workers = config.workers.min(num_batches.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        // The loader exists before the first thread starts, so a failed spawn drops it and its
        // Drop stops and joins the workers already running.
        let mut loader = Loader {
            num_batches,
            next: 0,
            finished: false,
            mode: Mode::Threads {
                receivers: Vec::with_capacity(workers),
                handles: Vec::with_capacity(workers),
                stop: Arc::clone(&stop),
            },
        };
        for worker in 0..workers {
            let (tx, rx) = sync_channel(config.prefetch);
            let job = Arc::clone(&job);
            let stop = Arc::clone(&stop);
            let handle = std::thread::Builder::new()
                .name(format!("muge-loader-{worker}"))
                .spawn(move || run_worker(&job, worker, workers, &tx, &stop))
                .map_err(|e| LoaderError::Config(format!("cannot start worker thread: {e}")))?;
            if let Mode::Threads {
                receivers, handles, ..
            } = &mut loader.mode
            {
                receivers.push(rx);
                handles.push(handle);
            }
        }
        Ok(loader)
    }

    /// Batches in this epoch (after `drop_last`).
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }

    /// Batches already handed out.
    pub fn batches_done(&self) -> usize {
        self.next
    }
}

fn run_worker<S: SampleSource, T: ImageTransform>(
    job: &Job<S, T>,
    worker: usize,
    workers: usize,
    tx: &SyncSender<Result<Batch, LoaderError>>,
    stop: &AtomicBool,
) {
    let reader = match job.source.reader() {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(Err(LoaderError::Open {
                worker,
                source: Box::new(e),
            }));
            return;
        }
    };
    for b in (worker..job.batches.len()).step_by(workers) {
        let Some(result) = job.build(&reader, b, stop) else {
            return;
        };
        let failed = result.is_err();
        // A full queue blocks here; dropping the loader disconnects the channel, which wakes
        // the worker with an error and ends it.
        if tx.send(result).is_err() {
            return;
        }
        if failed {
            return;
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished || self.next >= self.num_batches {
            return None;
        }
        let b = self.next;
        let result = match &self.mode {
            Mode::Inline(job) => job.build_one(b),
            Mode::Threads { receivers, .. } => {
                let worker = b % receivers.len();
                match receivers[worker].recv() {
                    Ok(r) => r,
                    Err(_) => Err(LoaderError::WorkerDied { worker, batch: b }),
                }
            }
        };
        self.next += 1;
        if result.is_err() {
            self.finished = true;
            self.shutdown();
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.finished {
            0
        } else {
            self.num_batches - self.next
        };
        (0, Some(left))
    }
}

impl Loader {
    fn shutdown(&mut self) {
        if let Mode::Threads {
            receivers,
            handles,
            stop,
        } = &mut self.mode
        {
            stop.store(true, Ordering::Relaxed);
            // Disconnecting wakes workers blocked on a full queue.
            receivers.clear();
            for h in handles.drain(..) {
                // A worker that panicked has already reported through its closed channel.
                let _ = h.join();
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shutdown();
    }
}
