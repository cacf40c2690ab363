//! Start-up (model, gallery, features), the HTTP server, and graceful shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use cnclip_model::Precision;
use retrieval::{FeatureKind, NativeFeatures};
use tch::Device;
use tokio::net::TcpListener;

use crate::encoder::{Encoder, ModelSpec};
use crate::engine::{Engine, EngineOptions};
use crate::error::ServeError;
use crate::features::{
    CacheOptions, CacheOutcome, cache_key, checkpoint_identity, gallery_features,
};
use crate::gallery::Gallery;
use crate::http::{Limits, Shared, router};
use crate::index::GalleryIndex;

/// Everything the service needs to start.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: ModelSpec,
    pub device: Device,
    pub precision: Precision,
    /// An LMDB split (or its `imgs/`), a `{split}_imgs.tsv`, or a folder of images.
    pub gallery: Option<PathBuf>,
    /// A native feature file to search instead of computing (and caching) the gallery's features;
    /// with a gallery, its ids must be the gallery's.
    pub features: Option<PathBuf>,
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
            features: None,
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
    /// `--features`.
    File(PathBuf),
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
        let gallery = config.gallery.as_ref().map(Gallery::open).transpose()?;
        let (features, origin) = match (&config.features, &gallery) {
            (Some(path), _) => {
                let features = NativeFeatures::open(path)?;
                check_features(&features, gallery.as_ref(), encoder.dim())?;
                (features, FeatureOrigin::File(path.clone()))
            }
            (None, Some(gallery)) => {
                let key = cache_key(
                    &checkpoint_identity(&config.model.checkpoint)?,
                    &gallery.identity()?,
                    encoder.preprocessor().size(),
                    config.precision,
                );
                let (features, outcome) = gallery_features(&encoder, gallery, &key, &config.cache)?;
                (features, FeatureOrigin::Cache(outcome))
            }
            (None, None) => {
                return Err(ServeError::Invalid(
                    "nothing to search: give a gallery (LMDB, .tsv or image folder) or a feature file"
                        .into(),
                ));
            }
        };
        if features.view().is_empty() {
            return Err(ServeError::Features {
                path: features.path().to_path_buf(),
                message: "has no rows; the gallery is empty".into(),
            });
        }
        let images = features.view().len();
        let dim = encoder.dim();
        let model = encoder.name().to_string();
        let device = match encoder.device() {
            tch::Device::Cuda(i) => format!("cuda:{i}"),
            other => format!("{other:?}").to_lowercase(),
        };
        let preprocessor = *encoder.preprocessor();
        let index = GalleryIndex::new(Arc::new(features), encoder.device())?;
        let (engine, handle) = Engine::start(encoder, index, config.engine)?;
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

    /// Serves on `listener` until `shutdown` resolves, then lets requests in flight finish, stops
    /// the model thread after its queue drains, and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let App { shared, engine, .. } = self;
        let app = router(shared);
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        // Every handle to the model thread is gone with the router: the thread ends.
        tokio::task::spawn_blocking(move || engine.join())
            .await
            .map_err(std::io::Error::other)?;
        served
    }
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
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(ServeError::io(addr))?;
        let local = listener.local_addr().map_err(ServeError::io(addr))?;
        on_ready(local, &app);
        app.serve(listener, shutdown_signal())
            .await
            .map_err(ServeError::io(addr))
    })
}
