//! Start-up (model, gallery, features), the HTTP server, and graceful shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cnclip_model::Precision;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use retrieval::{FeatureKind, NativeFeatures};
use tch::Device;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::encoder::{Encoder, ModelSpec};
use crate::engine::{Engine, EngineOptions};
use crate::error::ServeError;
use crate::features::{
    CacheOptions, CacheOutcome, cache_key, checkpoint_identity, gallery_features,
};
use crate::gallery::Gallery;
use crate::http::{Limits, Shared, router};

/// Everything the service needs to start.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: ModelSpec,
    pub device: Device,
    pub precision: Precision,
    /// An LMDB split (or its `imgs/`), a `{split}_imgs.tsv`, or a folder of images.
    pub gallery: Option<PathBuf>,
    /// Native feature files to search instead of computing (and caching) the gallery's features:
    /// one file, or several shards searched as their concatenation in this order (an id in two
    /// shards is an error); with a gallery, their ids must be the gallery's. Empty: compute.
    pub features: Vec<PathBuf>,
    pub cache: CacheOptions,
    pub engine: EngineOptions,
    pub limits: Limits,
    /// Whether text queries get the product prompt when a request does not say (`prompt=`).
    pub text_prompt: bool,
}

impl ServeConfig {
    /// Defaults for everything but the checkpoint and the gallery.
    pub fn new(checkpoint: impl Into<PathBuf>, gallery: Option<PathBuf>) -> Self {
        ServeConfig {
            model: ModelSpec::new(checkpoint),
            device: Device::Cpu,
            precision: Precision::Fp32,
            gallery,
            features: Vec::new(),
            cache: CacheOptions {
                dir: None,
                batch_size: 32,
                progress: false,
            },
            engine: EngineOptions::default(),
            limits: Limits::default(),
            text_prompt: false,
        }
    }
}

/// How the gallery's features were obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureOrigin {
    /// `--features` (one file or shards).
    Files(Vec<PathBuf>),
    /// The feature cache.
    Cache(CacheOutcome),
}

/// A started service, ready to serve: the model thread runs, the features are in memory.
pub struct App {
    shared: Arc<Shared>,
    engine: Engine,
    origin: FeatureOrigin,
}

impl App {
    /// Loads the checkpoint, opens the gallery and its features (computing them on first start).
    /// Blocking: call it before entering the runtime or from `spawn_blocking`.
    pub fn build(config: &ServeConfig) -> Result<App, ServeError> {
        let encoder = Encoder::load(&config.model, config.device, config.precision)?;
        Self::with_encoder(config, encoder)
    }

    /// [`App::build`] with a model already loaded (`config.model.checkpoint` still names the file
    /// it came from, for the feature cache's key).
    pub fn with_encoder(config: &ServeConfig, encoder: Encoder) -> Result<App, ServeError> {
        config.limits.validate().map_err(ServeError::Invalid)?;
        let gallery = config.gallery.as_ref().map(Gallery::open).transpose()?;
        let (shards, origin) = match (config.features.as_slice(), &gallery) {
            ([_, ..], _) => {
                let mut shards = Vec::with_capacity(config.features.len());
                for path in &config.features {
                    let features = NativeFeatures::open(path)?;
                    check_features(&features, gallery.as_ref(), encoder.dim())?;
                    shards.push(Arc::new(features));
                }
                (shards, FeatureOrigin::Files(config.features.clone()))
            }
            ([], Some(gallery)) => {
                let key = cache_key(
                    &checkpoint_identity(&config.model.checkpoint)?,
                    &gallery.identity()?,
                    encoder.preprocessor().size(),
                    config.precision,
                );
                let (features, outcome) = gallery_features(&encoder, gallery, &key, &config.cache)?;
                (vec![Arc::new(features)], FeatureOrigin::Cache(outcome))
            }
            ([], None) => {
                return Err(ServeError::Invalid(
                    "nothing to search: give a gallery (LMDB, .tsv or image folder) or a feature file"
                        .into(),
                ));
            }
        };
        let images: usize = shards.iter().map(|s| s.view().len()).sum();
        if let (0, [first, rest @ ..]) = (images, shards.as_slice()) {
            return Err(ServeError::Features {
                path: first.path().to_path_buf(),
                message: match rest.len() {
                    0 => "has no rows; the gallery is empty".into(),
                    n => format!(
                        "and the {n} other feature files have no rows; the gallery is empty"
                    ),
                },
            });
        }
        let dim = encoder.dim();
        let model = encoder.name().to_string();
        let device = match encoder.device() {
            tch::Device::Cuda(i) => format!("cuda:{i}"),
            other => format!("{other:?}").to_lowercase(),
        };
        let preprocessor = *encoder.preprocessor();
        check_logit_scale(&encoder, &config.model.checkpoint)?;
        let index = retrieval::ResidentIndex::from_shards(shards, encoder.device())?;
        let (engine, handle) = Engine::start(encoder, index, config.engine)?;
        let (decode_slots, upload_slots) = Shared::slots(&config.limits);
        let shared = Arc::new(Shared {
            engine: handle,
            gallery,
            images,
            dim,
            model,
            device,
            preprocessor,
            limits: config.limits,
            text_prompt: config.text_prompt,
            decode_slots,
            upload_slots,
        });
        Ok(App {
            shared,
            engine,
            origin,
        })
    }

    /// Where the features came from (reused or computed cache, or a given file).
    pub fn feature_origin(&self) -> &FeatureOrigin {
        &self.origin
    }

    /// Number of searchable images.
    pub fn images(&self) -> usize {
        self.shared.images
    }

    /// The router, for callers that host it themselves.
    pub fn router(&self) -> axum::Router {
        router(self.shared.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then lets requests in flight finish (for at
    /// most [`Limits::shutdown_timeout`]; connections still open then are closed), stops the model
    /// thread after its queue drains, and returns.
    ///
    /// Connections are hyper's HTTP/1 server: a request's header must arrive within
    /// [`Limits::header_read_timeout`] (hyper's timer also runs while a kept-alive connection
    /// waits for its next request, so idle connections close after it too), and at most
    /// [`Limits::max_connections`] are open at once; further ones wait in the listen backlog
    /// until a connection closes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let App { shared, engine, .. } = self;
        let limits = shared.limits;
        let app = router(shared);
        let served = serve_connections(listener, app, &limits, shutdown).await;
        // Every handle to the model thread is gone with the router: the thread ends.
        tokio::task::spawn_blocking(move || engine.join())
            .await
            .map_err(std::io::Error::other)?;
        served
    }
}

/// Most header lines hyper itself parses; [`Limits::max_headers`] (checked by the router, with a
/// JSON 431) is meant to stay below it. Beyond it hyper answers a bare 431 and closes.
const HYPER_MAX_HEADERS: usize = 1024;

/// The accept loop: hyper's HTTP/1 connection per socket, a connection cap (a semaphore permit
/// per open connection, taken before `accept`), and hyper-util's graceful shutdown bounded by
/// `limits.shutdown_timeout`.
async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_headers(HYPER_MAX_HEADERS);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // The peer gave up before we accepted: nothing to serve.
                Err(e) if is_connection_error(&e) => continue,
                // Out of descriptors or memory: back off, as hyper's and axum's loops do; the
                // connections already open keep being served and freed.
                Err(_) => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            // A connection error (a reset, a header timeout) ends this connection only.
            let _ = connection.await;
            drop(permit);
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    // Idle connections close at once; the others after their current response, or when the
    // window ends (a half-sent request must not hold the process).
    let _ = tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown()).await;
    connections.shutdown().await;
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Zero-shot probabilities are `softmax(exp(logit_scale) · cos)`: a non-finite temperature makes
/// every one NaN (JSON `null`), so such a checkpoint is refused at start.
fn check_logit_scale(encoder: &Encoder, checkpoint: &std::path::Path) -> Result<(), ServeError> {
    let scale = encoder.logit_scale()?;
    if scale.is_finite() {
        return Ok(());
    }
    Err(ServeError::Invalid(format!(
        "{}: exp(logit_scale) is {scale}, so zero-shot probabilities would be NaN; the checkpoint's \
         `logit_scale` must be a finite number below ~88 (cn_clip clamps it at ln 100 = 4.6052)",
        checkpoint.display()
    )))
}

/// A feature file given with `--features` must be image features of the model's dimension and,
/// with a gallery, name only its images.
fn check_features(
    features: &NativeFeatures,
    gallery: Option<&Gallery>,
    dim: usize,
) -> Result<(), ServeError> {
    let err = |message: String| ServeError::Features {
        path: features.path().to_path_buf(),
        message,
    };
    if features.kind() != FeatureKind::Image {
        return Err(err(format!(
            "holds {} features; image features are needed",
            features.kind().as_str()
        )));
    }
    if features.view().dim() != dim {
        return Err(err(format!(
            "has dimension {}, the model's features have {dim}",
            features.view().dim()
        )));
    }
    if let Some(gallery) = gallery {
        let known: std::collections::HashSet<i64> = gallery.ids().iter().copied().collect();
        if let Some(id) = features.view().ids().iter().find(|id| !known.contains(id)) {
            return Err(err(format!(
                "has image {id}, which the gallery {} does not",
                gallery.path().display()
            )));
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and systemd send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Builds the service and serves it on `addr` until Ctrl-C/SIGTERM, on a runtime of its own: the
/// whole service for a `main` that is not async. `on_ready` gets the bound address and the app.
pub fn run(
    config: &ServeConfig,
    addr: &str,
    on_ready: impl FnOnce(std::net::SocketAddr, &App),
) -> Result<(), ServeError> {
    let app = App::build(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::Invalid(format!("starting the async runtime: {e}")))?;
    let window = config.limits.shutdown_timeout;
    let served = runtime.block_on(async move {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(ServeError::io(addr))?;
        let local = listener.local_addr().map_err(ServeError::io(addr))?;
        on_ready(local, &app);
        app.serve(listener, shutdown_signal())
            .await
            .map_err(ServeError::io(addr))
    });
    // Decodes of abandoned uploads may still run on the blocking pool: do not wait past the window.
    runtime.shutdown_timeout(window);
    served
}
