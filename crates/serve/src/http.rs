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
//! included), 413 for an upload over the limit, 415 for an upload that is not an image, 503 when
//! the model queue is full.

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

use crate::engine::{EngineHandle, Scored};
use crate::error::ApiError;
use crate::gallery::Gallery;
use crate::zeroshot::Templates;

/// Request limits.
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_query_chars: 256,
            max_k: 100,
            max_upload_bytes: 10 << 20,
            request_timeout: Duration::from_secs(30),
            max_labels: 64,
            max_label_chars: 64,
        }
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
}

pub(crate) type AppState = Arc<Shared>;

const INDEX_HTML: &str = include_str!("../static/index.html");

pub(crate) fn router(state: AppState) -> Router {
    let limits = state.limits;
    Router::new()
        .route("/", get(index))
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
        .with_state(state)
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

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
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
    let templates = Templates::parse(&form.text("template").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let pixels = preprocess(&s, form.image()?).await?;
    let probabilities = s
        .engine
        .classify(pixels, labels.clone(), templates.clone())
        .await?;
    let mut results: Vec<(String, f32)> = labels.into_iter().zip(probabilities).collect();
    results.sort_by(|a, b| b.1.total_cmp(&a.1));
    let results: Vec<LabelProbability> = results
        .into_iter()
        .map(|(label, probability)| LabelProbability { label, probability })
        .collect();
    Ok(Json(
        json!({ "template": templates.key(), "results": results }),
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

/// Checks that `bytes` is an image and turns it into the model's `[1,3,S,S]` input.
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
    let preprocessor = s.preprocessor;
    tokio::task::spawn_blocking(move || {
        preprocessor
            .preprocess_bytes(&bytes, "the uploaded image")
            .map_err(|e| ApiError::bad_request(format!("could not read the uploaded image: {e}")))
            .and_then(|t| {
                t.f_unsqueeze(0)
                    .map_err(|e| ApiError::internal(e.to_string()))
            })
    })
    .await
    .map_err(|e| ApiError::internal(format!("image preprocessing failed: {e}")))?
}
