//! The last step after fine-tuning: a Chinese-CLIP checkpoint behind a search box.
//!
//! Owns: an HTTP service (axum on tokio) that loads a checkpoint (official `.pt`, Hugging Face
//! directory or native file), an image gallery (cn_clip LMDB split, MUGE `{split}_imgs.tsv`, or a
//! folder of images) and the gallery's image features (computed once with a progress bar and
//! cached next to the gallery, keyed by checkpoint and gallery), and serves text→image search,
//! image→image search, zero-shot classification with Chinese labels, the gallery's images, a
//! health check and a small search page. See [`http`] for the routes and their JSON.
//!
//! One model lives on one thread ([`engine`]); requests reach it through a bounded queue, and
//! concurrent text queries are micro-batched into one text-tower call and one top-k scan
//! (`retrieval`'s exact ranking over a resident gallery tensor). Connections are hyper's HTTP/1
//! server with a header-read timeout (which also closes idle keep-alive connections) and a
//! connection cap; uploads are bounded in bytes, pixels (from the header, before decoding) and
//! concurrent decodes ([`Limits`]). Shutdown on Ctrl-C/SIGTERM lets requests in flight finish for
//! at most a window, then closes what is left.
//!
//! May depend on `cnclip-model`, `muge-data`, `retrieval`, `cnclip-extract`, `torch-ext`. Must not depend on
//! training (`cnclip-train`), LoRA or soup: serving a finished checkpoint compiles no training loop.
//!
//! | module | what |
//! |---|---|
//! | [`server`] | [`ServeConfig`], [`App`] (start-up), serving and graceful shutdown, [`run`] |
//! | [`http`] | routes, validation, limits, JSON errors |
//! | [`engine`] | the model thread, micro-batching (ranked by [`retrieval::ResidentIndex`]), zero-shot scoring |
//! | [`encoder`] | checkpoint loading, image and text features |
//! | [`scored`] | [`Scored`], one ranked gallery image |
//! | [`gallery`] | LMDB / TSV / folder image stores (`cnclip-extract`'s `ImageSource`) |
//! | [`features`] | the gallery feature cache (computed by `cnclip-extract`'s pipeline) |
//! | [`zeroshot`] | prompt templates for classification |

pub mod encoder;
pub mod engine;
pub mod error;
pub mod features;
pub mod gallery;
pub mod http;
pub mod scored;
pub mod server;
pub mod zeroshot;

pub use encoder::{Encoder, ModelSpec};
pub use engine::EngineOptions;
pub use error::{ApiError, ServeError};
pub use features::CacheOptions;
pub use gallery::Gallery;
pub use http::Limits;
pub use scored::Scored;
pub use server::{App, FeatureOrigin, ServeConfig, run, shutdown_signal};
pub use zeroshot::TemplateChoice;
