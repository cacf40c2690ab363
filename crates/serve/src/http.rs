//! Routes, request validation and JSON shapes.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the search page (plain HTML/JS compiled into the binary) |
//! | `GET /healthz` | `{"status":"ok", "images", "dim", "model", …}` |
//! | `GET /api/search?q=…&k=…&prompt=0/1` | `{"query", "k", "prompt", "results":[{"image_id","score"}], "took_ms"}` |
//! | `POST /api/search/image[?k=…]` | same `results` for an uploaded image (multipart field `image`, or the raw body) |
//! | `POST /api/classify` | multipart `image`, `labels` (repeated, or one per line), `template` → `{"template", "results":[{"label","probability"}]}`, most probable first |
//! | `GET /images/{id}` | the image bytes with their content type (sniffed from the magic bytes) |
//!
//! Every refusal is a JSON `{"error": message, "status": code}`: 400 for bad parameters, 404 for an
//! unknown image or route, 405, 408 when a request runs past the timeout (reading a slow upload
//! included), 413 for an upload over the byte limit or an image over the pixel limit (read from
//! its header, before decoding), 415 for an upload that is not an image, 431 for too many or too
//! large headers, 503 when the model queue is full. A last layer turns any other non-JSON error
//! (a framework rejection) into the same shape. Only what hyper refuses before a request exists
//! (a malformed request line or header, more than 1024 header lines or ~400 KB of header) gets
//! hyper's bare status and a closed connection.
//!
//! Error messages are English, like every other message of cnclip (CLI errors, logs): stable,
//! greppable, and what a developer calling the API reads. The search page is Chinese and shows
//! them after a Chinese sentence (`请求失败（HTTP 413）：…`).
//!
//! Limits and their defaults: [`Limits`] (flags of the `serve` example; docs/HARDENING.md).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cnclip_model::preprocess::{Format, Preprocessor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tch::Tensor;
use tokio::sync::Semaphore;

use crate::engine::EngineHandle;
use crate::error::ApiError;
use crate::gallery::Gallery;
use crate::scored::Scored;
use crate::zeroshot::TemplateChoice;

/// Request and connection limits (defaults in [`Limits::default`]; the `serve` example's flags
/// set them, see docs/HARDENING.md).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest text query, in characters (the text tower sees at most 50 tokens anyway).
    pub max_query_chars: usize,
    /// Largest `k`.
    pub max_k: usize,
    /// Largest request body (uploads), in bytes.
    pub max_upload_bytes: usize,
    /// A request still running after this is answered 408.
    pub request_timeout: Duration,
    /// Most candidate labels per classification.
    pub max_labels: usize,
    /// Longest label, in characters.
    pub max_label_chars: usize,
    /// Most pixels (width × height, read from the file's header before anything is decoded) of
    /// an uploaded image; larger ones are refused with 413.
    pub max_image_pixels: u64,
    /// Most uploaded images decoded at once; further uploads wait (within `request_timeout`).
    /// With `max_image_pixels` this bounds decoding memory.
    pub max_concurrent_decodes: usize,
    /// Most upload requests (`/api/search/image`, `/api/classify`) whose bodies are read at once;
    /// further ones wait (within `request_timeout`). Bounds buffered bodies to this ×
    /// `max_upload_bytes`.
    pub max_concurrent_uploads: usize,
    /// A request's header must arrive in full within this; a kept-alive connection waiting for
    /// its next request is closed after it too (hyper's header-read timer).
    pub header_read_timeout: Duration,
    /// Most connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// After the shutdown signal, requests in flight get this long to finish; connections still
    /// open then are closed.
    pub shutdown_timeout: Duration,
    /// Most header lines in a request (more: 431).
    pub max_headers: usize,
    /// Most bytes of the request target and header lines together (more: 431).
    pub max_header_bytes: usize,
}

impl Limits {
    /// The defaults (a `const`, so that flag parsers can name them).
    pub const DEFAULT: Limits = Limits {
        max_query_chars: 256,
        max_k: 100,
        max_upload_bytes: 10 << 20,
        request_timeout: Duration::from_secs(30),
        max_labels: 64,
        max_label_chars: 64,
        max_image_pixels: 50_000_000,
        max_concurrent_decodes: 2,
        max_concurrent_uploads: 8,
        header_read_timeout: Duration::from_secs(10),
        max_connections: 256,
        shutdown_timeout: Duration::from_secs(10),
        max_headers: 64,
        max_header_bytes: 16 << 10,
    };

    /// Refuses limits that would stop the service from serving anything (a zero count or a
    /// zero timeout), naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let counts = [
            ("max_query_chars", self.max_query_chars as u64),
            ("max_k", self.max_k as u64),
            ("max_upload_bytes", self.max_upload_bytes as u64),
            ("max_labels", self.max_labels as u64),
            ("max_label_chars", self.max_label_chars as u64),
            ("max_image_pixels", self.max_image_pixels),
            ("max_concurrent_decodes", self.max_concurrent_decodes as u64),
            ("max_concurrent_uploads", self.max_concurrent_uploads as u64),
            ("max_connections", self.max_connections as u64),
            ("max_headers", self.max_headers as u64),
            ("max_header_bytes", self.max_header_bytes as u64),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, v)| *v == 0) {
            return Err(format!("limits.{name} is 0; it must be at least 1"));
        }
        for (name, value) in [
            ("request_timeout", self.request_timeout),
            ("header_read_timeout", self.header_read_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("limits.{name} is 0; it must be positive"));
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// What the handlers share: one engine (one model), the gallery, the limits.
pub(crate) struct Shared {
    pub engine: EngineHandle,
    pub gallery: Option<Gallery>,
    pub images: usize,
    pub dim: usize,
    pub model: String,
    pub device: String,
    pub preprocessor: Preprocessor,
    pub limits: Limits,
    /// Whether `/api/search` applies the product prompt when the request does not say.
    pub text_prompt: bool,
    /// One permit per image being decoded ([`Limits::max_concurrent_decodes`]).
    pub decode_slots: Arc<Semaphore>,
    /// One permit per upload being read and handled ([`Limits::max_concurrent_uploads`]).
    pub upload_slots: Arc<Semaphore>,
}

impl Shared {
    pub(crate) fn slots(limits: &Limits) -> (Arc<Semaphore>, Arc<Semaphore>) {
        (
            Arc::new(Semaphore::new(limits.max_concurrent_decodes)),
            Arc::new(Semaphore::new(limits.max_concurrent_uploads)),
        )
    }
}

pub(crate) type AppState = Arc<Shared>;

const INDEX_HTML: &str = include_str!("../static/index.html");

/// The search page's prompt checkbox, as `static/index.html` writes it (unticked).
const PROMPT_CHECKBOX: &str = r#"<input id="prompt" name="prompt" type="checkbox">"#;

/// The search page for a service whose text queries default to the product prompt or not: the
/// page's checkbox starts as the service's default, and page queries send what it says.
pub fn index_html(text_prompt: bool) -> String {
    if text_prompt {
        INDEX_HTML.replacen(
            PROMPT_CHECKBOX,
            r#"<input id="prompt" name="prompt" type="checkbox" checked>"#,
            1,
        )
    } else {
        INDEX_HTML.to_string()
    }
}

pub(crate) fn router(state: AppState) -> Router {
    let limits = state.limits;
    let page = Html(index_html(state.text_prompt));
    Router::new()
        .route("/", get(move || std::future::ready(page.clone())))
        .route("/healthz", get(healthz))
        .route("/api/search", get(search_text))
        .route("/api/search/image", post(search_image))
        .route("/api/classify", post(classify))
        .route("/images/{id}", get(image))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_upload_bytes))
        .layer(middleware::from_fn_with_state(
            limits.request_timeout,
            timeout,
        ))
        .layer(middleware::from_fn_with_state(limits, header_limits))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// Refuses a request whose header is over [`Limits::max_headers`] or
/// [`Limits::max_header_bytes`] with a JSON 431 (hyper's own, larger backstop answers without a
/// body).
async fn header_limits(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bytes = request.uri().to_string().len()
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if headers.len() > limits.max_headers {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has {} header lines; at most {} are accepted",
                headers.len(),
                limits.max_headers
            ),
        )
        .into_response();
    }
    if bytes > limits.max_header_bytes {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request target and headers are {bytes} bytes; at most {} are accepted",
                limits.max_header_bytes
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// The last word on every answer: a 4xx/5xx that is not already JSON (a rejection or status made
/// by axum or a layer rather than by a handler) becomes `{"error", "status"}` like the rest.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (_, body) = response.into_parts();
    // Framework rejections are one short line; anything longer is cut, not buffered whole.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_string()
    } else {
        text
    };
    ApiError::new(status, message).into_response()
}

async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {:.1} s and was abandoned",
                limit.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

async fn healthz(State(s): State<AppState>) -> Json<Value> {
    let stats = s.engine.stats();
    Json(json!({
        "status": "ok",
        "images": s.images,
        "dim": s.dim,
        "model": s.model,
        "device": s.device,
        "image_store": s.gallery.as_ref().map(Gallery::kind),
        "text_prompt": s.text_prompt,
        "text_batches": stats.text_batches.load(Ordering::Relaxed),
        "text_queries": stats.text_queries.load(Ordering::Relaxed),
        "largest_text_batch": stats.largest_batch.load(Ordering::Relaxed),
    }))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

#[derive(Debug, Deserialize)]
struct SearchParams {
    q: Option<String>,
    k: Option<String>,
    prompt: Option<String>,
}

async fn search_text(
    State(s): State<AppState>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let query = p.q.as_deref().map(str::trim).unwrap_or_default();
    if query.is_empty() {
        return Err(ApiError::bad_request(
            "the query is empty: pass the text to search for as ?q=…",
        ));
    }
    let chars = query.chars().count();
    if chars > s.limits.max_query_chars {
        return Err(ApiError::bad_request(format!(
            "the query is {chars} characters long; at most {} are accepted",
            s.limits.max_query_chars
        )));
    }
    let k = parse_k(p.k.as_deref(), &s.limits)?;
    let prompt = parse_bool("prompt", p.prompt.as_deref(), s.text_prompt)?;
    let start = Instant::now();
    let results = s.engine.search_text(query.to_string(), prompt, k).await?;
    Ok(Json(SearchResponse {
        query: Some(query),
        k,
        prompt: Some(prompt),
        results,
        took_ms: start.elapsed().as_secs_f64() * 1e3,
    })
    .into_response())
}

/// The answer of both searches (scores serialise as f32, so `0.1191299`, not its f64 expansion).
#[derive(Debug, Serialize)]
struct SearchResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    k: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<bool>,
    results: Vec<Scored>,
    took_ms: f64,
}

#[derive(Debug, Serialize)]
struct LabelProbability {
    label: String,
    probability: f32,
}

async fn search_image(State(s): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let query = request.uri().query().map(str::to_string);
    let _slot = upload_slot(&s).await?;
    let form = read_form(&s, request, &["image", "k"]).await?;
    let k = form
        .text("k")
        .or(query_param(query.as_deref(), "k")?)
        .map(|k| parse_k(Some(&k), &s.limits))
        .transpose()?
        .unwrap_or(10);
    let pixels = preprocess(&s, form.image()?).await?;
    let start = Instant::now();
    let results = s.engine.search_image(pixels, k).await?;
    Ok(Json(SearchResponse {
        query: None,
        k,
        prompt: None,
        results,
        took_ms: start.elapsed().as_secs_f64() * 1e3,
    })
    .into_response())
}

async fn classify(State(s): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
    let _slot = upload_slot(&s).await?;
    let form = read_form(&s, request, &["image", "labels", "label", "template"]).await?;
    let mut labels = Vec::new();
    for (name, value) in &form.fields {
        if name == "labels" || name == "label" {
            labels.extend(
                value
                    .split(['\n', '\r'])
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
    }
    if labels.is_empty() {
        return Err(ApiError::bad_request(
            "no candidate labels: send one or more form fields `labels` (or one field with a label per line)",
        ));
    }
    if labels.len() > s.limits.max_labels {
        return Err(ApiError::bad_request(format!(
            "{} labels given; at most {} are accepted",
            labels.len(),
            s.limits.max_labels
        )));
    }
    if let Some(long) = labels
        .iter()
        .find(|l| l.chars().count() > s.limits.max_label_chars)
    {
        return Err(ApiError::bad_request(format!(
            "the label {:?}… is longer than {} characters",
            long.chars().take(16).collect::<String>(),
            s.limits.max_label_chars
        )));
    }
    let templates = TemplateChoice::parse(&form.text("template").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let pixels = preprocess(&s, form.image()?).await?;
    let probabilities = s
        .engine
        .classify(pixels, labels.clone(), templates.clone())
        .await?;
    if let Some(p) = probabilities.iter().find(|p| !p.is_finite()) {
        // Only a model refused at start (non-finite logit_scale) or features gone NaN get here.
        return Err(ApiError::internal(format!(
            "the model produced a probability of {p}; its weights are not usable for classification"
        )));
    }
    let mut results: Vec<(String, f32)> = labels.into_iter().zip(probabilities).collect();
    results.sort_by(|a, b| b.1.total_cmp(&a.1));
    let results: Vec<LabelProbability> = results
        .into_iter()
        .map(|(label, probability)| LabelProbability { label, probability })
        .collect();
    Ok(Json(
        json!({ "template": templates.name, "results": results }),
    ))
}

async fn image(
    State(s): State<AppState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let image_id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("image id {id:?} is not an integer")))?;
    let shared = s.clone();
    let bytes = tokio::task::spawn_blocking(move || match &shared.gallery {
        Some(g) => g.image_bytes(image_id),
        None => Ok(None),
    })
    .await
    .map_err(|e| ApiError::internal(format!("reading image {image_id} failed: {e}")))?
    .map_err(|e| ApiError::internal(format!("reading image {image_id} failed: {e}")))?;
    let Some(bytes) = bytes else {
        return Err(ApiError::not_found(if s.gallery.is_some() {
            format!("unknown image id {image_id}")
        } else {
            format!(
                "unknown image id {image_id}: this service was started from a feature file without an image store"
            )
        }));
    };
    let mime = content_type(Format::sniff(&bytes));
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// The MIME type of an image file, from its first bytes.
pub fn content_type(format: Option<Format>) -> &'static str {
    match format {
        Some(Format::Jpeg) => "image/jpeg",
        Some(Format::Png) => "image/png",
        Some(Format::WebP) => "image/webp",
        Some(Format::Gif) => "image/gif",
        Some(Format::Bmp) => "image/bmp",
        Some(Format::Tiff) => "image/tiff",
        None => "application/octet-stream",
    }
}

fn parse_k(k: Option<&str>, limits: &Limits) -> Result<usize, ApiError> {
    let Some(k) = k.map(str::trim) else {
        return Ok(10.min(limits.max_k));
    };
    match k.parse::<usize>() {
        Ok(v) if (1..=limits.max_k).contains(&v) => Ok(v),
        _ => Err(ApiError::bad_request(format!(
            "k must be an integer from 1 to {}, got {k:?}",
            limits.max_k
        ))),
    }
}

fn parse_bool(name: &str, value: Option<&str>, default: bool) -> Result<bool, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!(
            "{name} must be 1/0 (or true/false), got {other:?}"
        ))),
    }
}

fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    let uri: axum::http::Uri = format!("/?{query}")
        .parse()
        .map_err(|_| ApiError::bad_request("malformed query string"))?;
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    Ok(pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v))
}

/// An upload: the image and the other form fields.
struct Form {
    image: Option<Bytes>,
    fields: Vec<(String, String)>,
}

impl Form {
    fn text(&self, name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn image(&self) -> Result<Bytes, ApiError> {
        self.image.clone().ok_or_else(|| {
            ApiError::bad_request(
                "no image: send it as the multipart form field `image` (or as the raw request body)",
            )
        })
    }
}

/// A `multipart/form-data` body (fields `allowed`), or any other body taken whole as the image.
async fn read_form(s: &Shared, request: Request, allowed: &[&str]) -> Result<Form, ApiError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let too_large = |status: StatusCode, text: String| {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                format!(
                    "the upload is larger than the limit of {} bytes",
                    s.limits.max_upload_bytes
                ),
            )
        } else {
            ApiError::new(status, text)
        }
    };
    if !multipart {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|e| too_large(e.status(), e.body_text()))?;
        return Ok(Form {
            image: (!body.is_empty()).then_some(body),
            fields: Vec::new(),
        });
    }
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| too_large(e.status(), e.body_text()))?;
    let mut out = Form {
        image: None,
        fields: Vec::new(),
    };
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| too_large(e.status(), e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown form field {name:?}; this endpoint takes {}",
                allowed.join(", ")
            )));
        }
        if name == "image" {
            out.image = Some(
                field
                    .bytes()
                    .await
                    .map_err(|e| too_large(e.status(), e.body_text()))?,
            );
        } else {
            let text = field
                .text()
                .await
                .map_err(|e| too_large(e.status(), e.body_text()))?;
            out.fields.push((name, text));
        }
    }
    Ok(out)
}

/// Waits for one of the [`Limits::max_concurrent_uploads`] upload slots.
async fn upload_slot(s: &Shared) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    s.upload_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::unavailable("the service is shutting down"))
}

/// Width and height from an image file's header, reading nothing past it (for a GIF, also the
/// first frame's descriptor: a frame reaching past the logical screen grows the canvas the
/// decoder allocates, as in Pillow).
fn header_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    if Format::sniff(bytes) == Some(Format::Gif) {
        let mut gif = gif::DecodeOptions::new()
            .read_info(std::io::Cursor::new(bytes))
            .map_err(|e| e.to_string())?;
        let (w, h) = (u32::from(gif.width()), u32::from(gif.height()));
        let frame = gif.next_frame_info().map_err(|e| e.to_string())?;
        return Ok(frame.map_or((w, h), |f| {
            (
                w.max(u32::from(f.left) + u32::from(f.width)),
                h.max(u32::from(f.top) + u32::from(f.height)),
            )
        }));
    }
    if Format::sniff(bytes) == Some(Format::Tiff) {
        return cnclip_model::preprocess::tiff_dimensions(bytes);
    }
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

/// Checks that `bytes` is an image of at most [`Limits::max_image_pixels`] pixels (from its
/// header, before decoding) and turns it into the model's `[1,3,S,S]` input, decoding at most
/// [`Limits::max_concurrent_decodes`] uploads at once.
async fn preprocess(s: &Shared, bytes: Bytes) -> Result<Tensor, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request("the uploaded image is empty"));
    }
    if Format::sniff(&bytes).is_none() {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the upload is not an image: expected JPEG, PNG, WebP, GIF or BMP, found bytes {}",
                head.join(" ")
            ),
        ));
    }
    let (width, height) = header_dimensions(&bytes)
        .map_err(|e| ApiError::bad_request(format!("could not read the uploaded image: {e}")))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > s.limits.max_image_pixels {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the uploaded image is {width}x{height} ({pixels} pixels); at most {} pixels are accepted",
                s.limits.max_image_pixels
            ),
        ));
    }
    let permit = s
        .decode_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::unavailable("the service is shutting down"))?;
    let preprocessor = s.preprocessor;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        preprocessor
            // Errors read "image upload is truncated: …", "image upload does not decode as …".
            .preprocess_bytes(&bytes, "upload")
            .map_err(|e| ApiError::bad_request(format!("could not read the uploaded image: {e}")))
            .and_then(|t| {
                t.f_unsqueeze(0)
                    .map_err(|e| ApiError::internal(e.to_string()))
            })
    })
    .await
    .map_err(|e| ApiError::internal(format!("image preprocessing failed: {e}")))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A status made outside our handlers (here a handler answering plain text, as axum's own
    /// rejections and tower layers do) leaves the router as the same JSON as our refusals; JSON
    /// answers and successes pass through untouched.
    #[tokio::test]
    async fn non_json_errors_become_json() {
        let app = Router::new()
            .route(
                "/plain",
                get(|| async { (StatusCode::BAD_REQUEST, "Failed to parse the request") }),
            )
            .route("/empty", get(|| async { StatusCode::PAYLOAD_TOO_LARGE }))
            .route(
                "/ours",
                get(|| async { ApiError::new(StatusCode::CONFLICT, "ours") }),
            )
            .route("/ok", get(|| async { "fine" }))
            .layer(middleware::map_response(json_errors));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for (path, status, message) in [
            ("/plain", 400, "Failed to parse the request"),
            ("/empty", 413, "Payload Too Large"),
            ("/ours", 409, "ours"),
        ] {
            let response = client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), status, "{path}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body, json!({"error": message, "status": status}), "{path}");
        }
        let ok = client
            .get(format!("http://{addr}/ok"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.text().await.unwrap(), "fine");
        server.abort();
    }

    #[test]
    fn zero_limits_are_refused_by_name() {
        assert_eq!(Limits::DEFAULT.validate(), Ok(()));
        let zero = Limits {
            max_connections: 0,
            ..Limits::DEFAULT
        };
        assert_eq!(
            zero.validate(),
            Err("limits.max_connections is 0; it must be at least 1".to_string())
        );
        let zero = Limits {
            header_read_timeout: Duration::ZERO,
            ..Limits::DEFAULT
        };
        assert!(zero.validate().unwrap_err().contains("header_read_timeout"));
    }

    /// The header probe must agree with the decoder on every kind of image the decoder reads
    /// (cnclip-model's preprocessing fixtures: JPEG 4:2:0/4:2:2/4:4:4/grey/CMYK/progressive,
    /// PNG of every mode, GIF, WebP, BMP).
    #[test]
    fn header_dimensions_match_the_decoder() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../cnclip-model/tests/fixtures/preprocess");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if Format::sniff(&bytes).is_none() {
                continue;
            }
            let decoded = cnclip_model::preprocess::decode_named(&bytes, "fixture").unwrap();
            let (w, h) =
                header_dimensions(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                (w as usize, h as usize),
                (decoded.width(), decoded.height()),
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen >= 30, "only {seen} fixtures");
    }

    /// A GIF whose first frame reaches past its 2×2 logical screen: the decoder's canvas (and
    /// Pillow's) is the frame's extent, so that is what the pixel limit must see.
    #[test]
    fn a_gif_frame_past_the_screen_counts() {
        let mut bytes = Vec::new();
        {
            let mut encoder =
                gif::Encoder::new(&mut bytes, 2, 2, &[0, 0, 0, 255, 255, 255]).unwrap();
            let mut frame = gif::Frame::from_indexed_pixels(300, 200, vec![1u8; 300 * 200], None);
            frame.left = 10;
            frame.top = 5;
            encoder.write_frame(&frame).unwrap();
        }
        assert_eq!(header_dimensions(&bytes), Ok((310, 205)));
        let decoded = cnclip_model::preprocess::decode_named(&bytes, "gif").unwrap();
        assert_eq!((decoded.width(), decoded.height()), (310, 205));
    }

    #[test]
    fn the_page_checkbox_follows_the_default() {
        assert!(INDEX_HTML.contains(PROMPT_CHECKBOX));
        assert!(index_html(true).contains(r#"type="checkbox" checked>"#));
        assert!(!index_html(false).contains("checked>"));
    }
}
