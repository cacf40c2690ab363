//! The model thread: one [`Encoder`] in memory, fed by a bounded queue that every request shares.
//!
//! Text queries are micro-batched: when the thread picks up a text query it also takes every text
//! query already queued and then waits up to `batch_window` for more, until `max_batch`, and
//! encodes them in one text-tower call and ranks them in one top-k GEMM ([`ResidentIndex`]). Under load the queue
//! fills while the previous batch runs, so batches grow without any added wait; an idle service
//! answers a lone query after at most `batch_window`.
//!
//! libtorch errors and panics inside a job fail that job's requests (500) and leave the thread
//! running. A request whose client has gone (closed connection, timeout) is dropped unprocessed.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;
use tokio::sync::oneshot;

use crate::encoder::Encoder;
use crate::error::{ApiError, ServeError};
use crate::scored::Scored;
use crate::zeroshot::TemplateChoice;
use cnclip_model::zeroshot;
use retrieval::ResidentIndex;

/// Knobs of the model thread.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Most text queries per encoder call.
    pub max_batch: usize,
    /// How long a text batch waits for more queries once the queue is empty.
    pub batch_window: Duration,
    /// Requests that may wait in the queue; more are refused with 503.
    pub queue: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 32,
            batch_window: Duration::from_millis(2),
            queue: 1024,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

enum Job {
    Text {
        query: String,
        prompt: bool,
        k: usize,
        reply: Reply<Vec<Scored>>,
    },
    Image {
        pixels: Tensor,
        k: usize,
        reply: Reply<Vec<Scored>>,
    },
    Classify {
        pixels: Tensor,
        labels: Vec<String>,
        templates: TemplateChoice,
        reply: Reply<Vec<f32>>,
    },
}

/// Counters for `/healthz` (and for tests to see that batching happens).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub text_batches: AtomicU64,
    pub text_queries: AtomicU64,
    pub largest_batch: AtomicUsize,
}

/// The requests' side of the model thread; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    stats: Arc<EngineStats>,
}

/// The model thread; dropping every [`EngineHandle`] ends it, [`Engine::join`] waits for that.
pub struct Engine {
    thread: JoinHandle<()>,
}

impl Engine {
    /// Starts the thread that owns `encoder` and searches `gallery`.
    pub fn start(
        encoder: Encoder,
        gallery: ResidentIndex,
        options: EngineOptions,
    ) -> Result<(Engine, EngineHandle), ServeError> {
        let (tx, rx) = mpsc::sync_channel(options.queue.max(1));
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            logit_scale: encoder.logit_scale()?,
            encoder,
            gallery,
            options,
            stats: stats.clone(),
            label_cache: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("cnclip-serve-model".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| ServeError::Engine(e.to_string()))?;
        Ok((Engine { thread }, EngineHandle { tx, stats }))
    }

    /// Waits for the thread to finish its queue (after every handle was dropped).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

impl EngineHandle {
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Top-`k` gallery images for a text query.
    pub async fn search_text(
        &self,
        query: String,
        prompt: bool,
        k: usize,
    ) -> Result<Vec<Scored>, ApiError> {
        self.call(|reply| Job::Text {
            query,
            prompt,
            k,
            reply,
        })
        .await
    }

    /// Top-`k` gallery images for a preprocessed `[1,3,S,S]` image.
    pub async fn search_image(&self, pixels: Tensor, k: usize) -> Result<Vec<Scored>, ApiError> {
        self.call(|reply| Job::Image { pixels, k, reply }).await
    }

    /// Zero-shot probabilities of `labels` (in their order) for a preprocessed image.
    pub async fn classify(
        &self,
        pixels: Tensor,
        labels: Vec<String>,
        templates: TemplateChoice,
    ) -> Result<Vec<f32>, ApiError> {
        self.call(|reply| Job::Classify {
            pixels,
            labels,
            templates,
            reply,
        })
        .await
    }

    async fn call<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, ApiError> {
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send(job(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::unavailable(
                    "the model queue is full; retry in a moment",
                ));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::unavailable("the model thread has stopped"));
            }
        }
        answer
            .await
            .map_err(|_| ApiError::internal("the model thread dropped the request"))?
    }
}

struct Worker {
    encoder: Encoder,
    gallery: ResidentIndex,
    options: EngineOptions,
    stats: Arc<EngineStats>,
    logit_scale: f64,
    /// (template set, label) → averaged, normalised class embedding.
    label_cache: HashMap<(String, String), Tensor>,
}

/// Class embeddings kept between requests (a label set is usually asked for again and again).
const LABEL_CACHE_ENTRIES: usize = 4096;

struct TextJob {
    query: String,
    prompt: bool,
    k: usize,
    reply: Reply<Vec<Scored>>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Text {
                    query,
                    prompt,
                    k,
                    reply,
                } => {
                    let first = TextJob {
                        query,
                        prompt,
                        k,
                        reply,
                    };
                    let (batch, other) = self.collect(first, &rx);
                    self.text_batch(batch);
                    if let Some(job) = other {
                        self.single(job);
                    }
                }
                job => self.single(job),
            }
        }
    }

    /// The text queries to encode together with `first`, and a non-text job met on the way.
    fn collect(&self, first: TextJob, rx: &Receiver<Job>) -> (Vec<TextJob>, Option<Job>) {
        let mut batch = vec![first];
        let deadline = Instant::now() + self.options.batch_window;
        while batch.len() < self.options.max_batch.max(1) {
            let next = match rx.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            match next {
                Job::Text {
                    query,
                    prompt,
                    k,
                    reply,
                } => batch.push(TextJob {
                    query,
                    prompt,
                    k,
                    reply,
                }),
                other => return (batch, Some(other)),
            }
        }
        (batch, None)
    }

    fn text_batch(&mut self, batch: Vec<TextJob>) {
        let batch: Vec<TextJob> = batch.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if batch.is_empty() {
            return;
        }
        let stats = &self.stats;
        stats.text_batches.fetch_add(1, Ordering::Relaxed);
        stats
            .text_queries
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats
            .largest_batch
            .fetch_max(batch.len(), Ordering::Relaxed);
        let result = guarded(|| {
            let texts: Vec<(&str, bool)> =
                batch.iter().map(|j| (j.query.as_str(), j.prompt)).collect();
            let rows = self.encoder.text_features(&texts)?;
            let k = batch.iter().map(|j| j.k).max().unwrap_or(1);
            self.rank(&rows, k)
        });
        match result {
            Ok(ranked) => {
                for (job, mut hits) in batch.into_iter().zip(ranked) {
                    hits.truncate(job.k);
                    let _ = job.reply.send(Ok(hits));
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn single(&mut self, job: Job) {
        match job {
            Job::Text {
                query,
                prompt,
                k,
                reply,
            } => self.text_batch(vec![TextJob {
                query,
                prompt,
                k,
                reply,
            }]),
            Job::Image { pixels, k, reply } => {
                if reply.is_closed() {
                    return;
                }
                let result = guarded(|| {
                    let rows = self.encoder.image_features(&pixels)?;
                    let mut ranked = self.rank(&rows, k)?;
                    Ok(ranked.pop().unwrap_or_default())
                });
                let _ = reply.send(result);
            }
            Job::Classify {
                pixels,
                labels,
                templates,
                reply,
            } => {
                if reply.is_closed() {
                    return;
                }
                let result = guarded(|| self.classify(&pixels, &labels, &templates));
                let _ = reply.send(result);
            }
        }
    }

    /// Exact top-`k` for each row of `queries` (`[N·dim]`).
    fn rank(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Scored>>, ServeError> {
        let hits = self.gallery.search(queries, k).map_err(|e| match e {
            retrieval::RetrievalError::NonFinite { .. } => ServeError::Invalid(e.to_string()),
            e => e.into(),
        })?;
        let view = self.gallery.features().view();
        Ok(hits
            .into_iter()
            .map(|list| {
                list.into_iter()
                    .map(|h| Scored {
                        image_id: view.ids()[h.index],
                        score: h.score,
                    })
                    .collect()
            })
            .collect())
    }

    /// `softmax(exp(logit_scale) · cos(image, class))` over the labels: the model crate's
    /// zero-shot classifier with the model's own temperature (see the `zeroshot` module).
    fn classify(
        &mut self,
        pixels: &Tensor,
        labels: &[String],
        templates: &TemplateChoice,
    ) -> Result<Vec<f32>, ServeError> {
        let image = Tensor::f_from_slice(&self.encoder.image_features(pixels)?)?.f_view([1, -1])?;
        let mut classes = Vec::with_capacity(labels.len());
        for label in labels {
            classes.push(self.class_vector(label, templates)?);
        }
        let classifier = Tensor::f_stack(&classes, 1)?;
        let probabilities =
            zeroshot::probabilities_with_scale(&image, &classifier, self.logit_scale);
        Ok(Vec::<f32>::try_from(probabilities.f_flatten(0, -1)?)?)
    }

    /// The `[E]` class vector of `label` (cached per template choice and label).
    fn class_vector(
        &mut self,
        label: &str,
        templates: &TemplateChoice,
    ) -> Result<Tensor, ServeError> {
        let key = (templates.name.clone(), label.to_string());
        if let Some(e) = self.label_cache.get(&key) {
            return Ok(e.shallow_clone());
        }
        let prompts = templates.templates.prompts(label);
        let inputs: Vec<(&str, bool)> = prompts.iter().map(|t| (t.as_str(), false)).collect();
        // Chunks bound the memory of the 183-template set on a large text tower.
        let mut features = Vec::with_capacity(inputs.len() * self.encoder.dim());
        for chunk in inputs.chunks(64) {
            features.extend(self.encoder.text_features(chunk)?);
        }
        let rows = Tensor::f_from_slice(&features)?.f_view([inputs.len() as i64, -1])?;
        let class = zeroshot::class_vector(&rows);
        let norm = class.f_norm()?.f_double_value(&[])?;
        if !norm.is_finite() {
            return Err(ServeError::Invalid(format!(
                "the class embedding of {label:?} is not finite"
            )));
        }
        if self.label_cache.len() >= LABEL_CACHE_ENTRIES {
            self.label_cache.clear();
        }
        self.label_cache.insert(key, class.shallow_clone());
        Ok(class)
    }
}

/// Runs one job's model work; an error or a panic (libtorch raises through tch's panicking calls)
/// becomes a 500 for that job only.
fn guarded<T>(work: impl FnOnce() -> Result<T, ServeError>) -> Result<T, ApiError> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::internal(format!("model error: {e}"))),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(ApiError::internal(format!("model error: {message}")))
        }
    }
}
