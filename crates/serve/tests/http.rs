//! Every endpoint and every refusal over real HTTP on 127.0.0.1, with a tiny random model and
//! small generated galleries (folder, TSV, LMDB, feature file only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::Result;
use cnclip_serve::features::CacheOutcome;
use cnclip_serve::{App, FeatureOrigin};
use common::*;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

async fn get_json(url: &str) -> Result<(StatusCode, Value)> {
    let response = client().get(url).send().await?;
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{url}: content type {content_type:?}"
    );
    Ok((status, response.json().await?))
}

async fn post_json(url: &str, form: Form) -> Result<(StatusCode, Value)> {
    let response = client().post(url).multipart(form).send().await?;
    let status = response.status();
    Ok((status, response.json().await?))
}

/// Asserts a JSON error with `status` whose message contains `needle`.
fn assert_error(what: &str, (status, body): &(StatusCode, Value), expected: u16, needle: &str) {
    assert_eq!(status.as_u16(), expected, "{what}: {body}");
    assert_eq!(body["status"], expected, "{what}: {body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{what}: message {message:?} lacks {needle:?}"
    );
}

fn results(body: &Value) -> Vec<(i64, f64)> {
    body["results"]
        .as_array()
        .expect("results array")
        .iter()
        .map(|r| {
            (
                r["image_id"].as_i64().unwrap(),
                r["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn image_part(i: usize) -> Part {
    Part::bytes(image_file(i).0).file_name("query.img")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers() -> Result<()> {
    let dir = temp_dir("endpoints");
    let checkpoint = tiny_checkpoint(&dir, 1)?;
    let gallery = folder_gallery(&dir, 6)?;
    let server = TestServer::start(config(&dir, &checkpoint, &gallery)).await?;

    let (status, health) = get_json(&server.url("/healthz")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["images"], 6);
    assert_eq!(health["dim"], 16);
    assert_eq!(health["image_store"], "folder");

    let page = client().get(server.url("/")).send().await?;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()?
            .starts_with("text/html")
    );
    let html = page.text().await?;
    assert!(html.contains("id=\"q\"") && html.contains("/api/search"));

    // Text → image: k results, gallery ids, best first; the prompt option is echoed and changes
    // the query the text tower sees.
    let (status, body) = get_json(&server.url("/api/search?q=红色连衣裙&k=4")).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["query"], "红色连衣裙");
    assert_eq!(body["k"], 4);
    assert_eq!(body["prompt"], false);
    let plain = results(&body);
    assert_eq!(plain.len(), 4);
    assert!(plain.iter().all(|(id, _)| (1000..1006).contains(id)));
    assert!(plain.windows(2).all(|w| w[0].1 >= w[1].1));
    assert!(plain.iter().all(|(_, s)| s.abs() <= 1.0 + 1e-5));
    let (_, body) = get_json(&server.url("/api/search?q=红色连衣裙&k=4&prompt=1")).await?;
    assert_eq!(body["prompt"], true);
    assert_ne!(
        results(&body),
        plain,
        "the product prompt must change the scores"
    );
    // k larger than the gallery returns the whole gallery; default k is 10.
    let (_, body) = get_json(&server.url("/api/search?q=%E7%BA%A2")).await?;
    assert_eq!(results(&body).len(), 6);

    // Image → image: a gallery image finds itself first, with cosine 1.
    let form = Form::new().part("image", image_part(3)).text("k", "3");
    let (status, body) = post_json(&server.url("/api/search/image"), form).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let hits = results(&body);
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0].0, gallery_id(3));
    assert!((hits[0].1 - 1.0).abs() < 1e-4, "{hits:?}");
    // The raw body works too, with k in the query string.
    let response = client()
        .post(server.url("/api/search/image?k=2"))
        .body(image_file(2).0)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await?;
    assert_eq!(results(&body).len(), 2);
    assert_eq!(results(&body)[0].0, gallery_id(2));

    // Zero-shot: probabilities over the labels, most probable first, summing to 1.
    for template in ["", "photo", "openai", "product", "一张{}的图片"] {
        let form = Form::new()
            .part("image", image_part(0))
            .text("labels", "红色\n绿色")
            .text("labels", "蓝色")
            .text("template", template);
        let (status, body) = post_json(&server.url("/api/classify"), form).await?;
        assert_eq!(status, StatusCode::OK, "{template}: {body}");
        let rows = body["results"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
        for label in ["红色", "绿色", "蓝色"] {
            assert!(labels.contains(&label), "{labels:?}");
        }
        let probs: Vec<f64> = rows
            .iter()
            .map(|r| r["probability"].as_f64().unwrap())
            .collect();
        assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{probs:?}");
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probs:?}");
    }

    // Images come back byte for byte with the sniffed content type.
    for i in [0, 1] {
        let response = client()
            .get(server.url(&format!("/images/{}", gallery_id(i))))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        let expected = if i == 0 { "image/png" } else { "image/jpeg" };
        assert_eq!(response.headers()["content-type"], expected);
        assert_eq!(response.bytes().await?.as_ref(), image_file(i).0.as_slice());
    }
    server.stop().await
}

/// Zero-shot probabilities are `softmax(exp(logit_scale) · cos(image, label))`, computed here from
/// the same checkpoint without the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_matches_a_direct_computation() -> Result<()> {
    let dir = temp_dir("classify");
    let checkpoint = tiny_checkpoint(&dir, 12)?;
    let gallery = folder_gallery(&dir, 2)?;
    let server = TestServer::start(config(&dir, &checkpoint, &gallery)).await?;
    let labels = ["红色", "绿色的裙子", "蓝色"];
    let form = Form::new()
        .part("image", image_part(2))
        .text("labels", labels.join("\n"));
    let (status, body) = post_json(&server.url("/api/classify"), form).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await?;

    let encoder = cnclip_serve::Encoder::load(
        &cnclip_serve::ModelSpec::new(&checkpoint),
        tch::Device::Cpu,
        cnclip_model::Precision::Fp32,
    )?;
    let pixels = encoder
        .preprocessor()
        .preprocess_bytes(&image_file(2).0, "image 2")?
        .unsqueeze(0);
    let image = encoder.image_features(&pixels)?;
    let inputs: Vec<(&str, bool)> = labels.iter().map(|l| (*l, false)).collect();
    let texts = encoder.text_features(&inputs)?;
    let scale = encoder.logit_scale()?;
    let logits: Vec<f64> = texts
        .chunks_exact(image.len())
        .map(|t| {
            scale
                * t.iter()
                    .zip(&image)
                    .map(|(a, b)| f64::from(a * b))
                    .sum::<f64>()
        })
        .collect();
    let total: f64 = logits.iter().map(|l| l.exp()).sum();
    for row in body["results"].as_array().unwrap() {
        let label = row["label"].as_str().unwrap();
        let i = labels.iter().position(|l| *l == label).unwrap();
        let expected = logits[i].exp() / total;
        let got = row["probability"].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-5,
            "{label}: {got} vs {expected}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors() -> Result<()> {
    let dir = temp_dir("errors");
    let checkpoint = tiny_checkpoint(&dir, 2)?;
    let gallery = folder_gallery(&dir, 3)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    config.limits.max_upload_bytes = 64 << 10;
    config.limits.max_query_chars = 20;
    config.limits.max_labels = 4;
    let server = TestServer::start(config).await?;
    let url = |p: &str| server.url(p);

    let cases: [(&str, u16, &str); 10] = [
        ("/api/search", 400, "empty"),
        ("/api/search?q=%20%20", 400, "empty"),
        (
            "/api/search?q=一二三四五六七八九十一二三四五六七八九十一",
            400,
            "21 characters",
        ),
        ("/api/search?q=包&k=0", 400, "k must be"),
        ("/api/search?q=包&k=101", 400, "k must be"),
        ("/api/search?q=包&k=ten", 400, "k must be"),
        ("/api/search?q=包&prompt=maybe", 400, "prompt"),
        ("/images/999", 404, "unknown image id 999"),
        ("/images/abc", 400, "not an integer"),
        ("/no/such/page", 404, "no route"),
    ];
    for (path, status, needle) in cases {
        assert_error(path, &get_json(&url(path)).await?, status, needle);
    }
    let response = client().delete(url("/api/search")).send().await?;
    let status = response.status();
    assert_error(
        "DELETE",
        &(status, response.json().await?),
        405,
        "not allowed",
    );

    let upload = |bytes: Vec<u8>| Form::new().part("image", Part::bytes(bytes).file_name("x"));
    let search_image = url("/api/search/image");
    assert_error(
        "text upload",
        &post_json(&search_image, upload(b"hello, not an image".to_vec())).await?,
        415,
        "not an image",
    );
    assert_error(
        "empty upload",
        &post_json(&search_image, upload(Vec::new())).await?,
        400,
        "empty",
    );
    let mut corrupt = image_file(1).0;
    corrupt.truncate(40);
    assert_error(
        "truncated JPEG",
        &post_json(&search_image, upload(corrupt)).await?,
        400,
        "could not read",
    );
    let mut big = image_file(0).0;
    big.resize(100 << 10, 0);
    assert_error(
        "oversized upload",
        &post_json(&search_image, upload(big.clone())).await?,
        413,
        "limit",
    );
    let response = client().post(&search_image).body(big).send().await?;
    let status = response.status();
    assert_error(
        "oversized raw body",
        &(status, response.json().await?),
        413,
        "limit",
    );
    assert_error(
        "no image field",
        &post_json(&search_image, Form::new().text("k", "3")).await?,
        400,
        "no image",
    );
    assert_error(
        "unknown field",
        &post_json(&search_image, upload(image_file(0).0).text("colour", "red")).await?,
        400,
        "unknown form field",
    );
    assert_error(
        "bad k on upload",
        &post_json(&search_image, upload(image_file(0).0).text("k", "0")).await?,
        400,
        "k must be",
    );

    let classify = url("/api/classify");
    assert_error(
        "no labels",
        &post_json(&classify, upload(image_file(0).0)).await?,
        400,
        "no candidate labels",
    );
    assert_error(
        "too many labels",
        &post_json(
            &classify,
            upload(image_file(0).0).text("labels", "甲\n乙\n丙\n丁\n戊"),
        )
        .await?,
        400,
        "at most 4",
    );
    assert_error(
        "unknown template",
        &post_json(
            &classify,
            upload(image_file(0).0)
                .text("labels", "猫")
                .text("template", "sketch"),
        )
        .await?,
        400,
        "unknown template",
    );
    assert_error(
        "classify a text file",
        &post_json(&classify, upload(b"GIF8".to_vec()).text("labels", "猫")).await?,
        415,
        "not an image",
    );

    // Still serving after all that.
    let (status, body) = get_json(&url("/api/search?q=包&k=2")).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_time_out() -> Result<()> {
    let dir = temp_dir("timeout");
    let checkpoint = tiny_checkpoint(&dir, 3)?;
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    config.limits.request_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await?;

    // Headers promise 1000 bytes; the body never comes.
    let addr = server.addr;
    let response = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.write_all(
            b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
              Content-Length: 1000\r\nConnection: close\r\n\r\n\x89PNG",
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(response)
    })
    .await??;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("\"error\""), "{response}");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_share_one_encoder_call() -> Result<()> {
    let dir = temp_dir("batching");
    let checkpoint = tiny_checkpoint(&dir, 4)?;
    let gallery = folder_gallery(&dir, 6)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    // A long window: the batch closes when the fourth query arrives, not on the clock.
    config.engine.batch_window = Duration::from_secs(5);
    config.engine.max_batch = 4;
    let server = TestServer::start(config).await?;
    let queries = ["红色", "绿色的鞋", "蓝色背包", "黄色"];
    let batched = futures_join(queries.map(|q| {
        let url = server.url(&format!("/api/search?q={q}&k=6&prompt=1"));
        async move { get_json(&url).await }
    }))
    .await;
    let (_, health) = get_json(&server.url("/healthz")).await?;
    assert_eq!(health["largest_text_batch"], 4, "{health}");
    assert_eq!(health["text_batches"], 1, "{health}");
    server.stop().await?;

    // The same queries one at a time (no batching) rank and score identically.
    let mut config = common::config(&dir, &checkpoint, &gallery);
    config.engine.max_batch = 1;
    let server = TestServer::start(config).await?;
    for (q, batched) in queries.iter().zip(batched) {
        let (status, batched) = batched?;
        assert_eq!(status, StatusCode::OK);
        let (_, alone) = get_json(&server.url(&format!("/api/search?q={q}&k=6&prompt=1"))).await?;
        let (a, b) = (results(&batched), results(&alone));
        assert_eq!(
            a.iter().map(|r| r.0).collect::<Vec<_>>(),
            b.iter().map(|r| r.0).collect::<Vec<_>>()
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x.1 - y.1).abs() < 1e-5, "{q}: {a:?} vs {b:?}");
        }
    }
    server.stop().await
}

/// Runs the futures concurrently on the runtime and returns their outputs in order.
async fn futures_join<F, T>(futures: [F; 4]) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("query task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() -> Result<()> {
    let dir = temp_dir("shutdown");
    let checkpoint = tiny_checkpoint(&dir, 5)?;
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    config.engine.batch_window = Duration::from_millis(800);
    let server = TestServer::start(config).await?;
    let url = server.url("/api/search?q=包&k=1");
    let in_flight = tokio::spawn(async move { get_json(&url).await });
    // The query now waits in the model thread's batch window.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = server.addr;
    tokio::time::timeout(Duration::from_secs(30), server.stop()).await??;
    let (status, body) = in_flight.await??;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(results(&body).len(), 1);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_cache_is_keyed_by_checkpoint_and_gallery() -> Result<()> {
    let dir = temp_dir("cache");
    let checkpoint = tiny_checkpoint(&dir, 6)?;
    let gallery = folder_gallery(&dir, 3)?;
    let config = config(&dir, &checkpoint, &gallery);
    let build = |config: cnclip_serve::ServeConfig| async move {
        Ok::<_, anyhow::Error>(tokio::task::spawn_blocking(move || App::build(&config)).await??)
    };
    let origin = |app: &App| match app.feature_origin() {
        FeatureOrigin::Cache(outcome) => outcome.clone(),
        other => panic!("features from {other:?}"),
    };

    let first = origin(&build(config.clone()).await?);
    let CacheOutcome::Computed(path) = first else {
        panic!("first start must compute: {first:?}")
    };
    assert!(path.starts_with(dir.join("cache")));
    assert_eq!(
        origin(&build(config.clone()).await?),
        CacheOutcome::Reused(path.clone())
    );

    // Another image in the gallery: another key, computed again.
    let (bytes, _) = image_file(4);
    std::fs::write(gallery.join("1004.png"), bytes)?;
    let app = build(config.clone()).await?;
    assert_eq!(app.images(), 4);
    let CacheOutcome::Computed(path2) = origin(&app) else {
        panic!("a changed gallery must recompute")
    };
    assert_ne!(path, path2);

    // Another checkpoint at the same path (rewritten): computed again.
    std::thread::sleep(Duration::from_millis(20));
    tiny_checkpoint(&dir, 7)?;
    assert!(matches!(
        origin(&build(config.clone()).await?),
        CacheOutcome::Computed(_)
    ));

    // A cache file whose stored key differs (copied over) is not trusted.
    let CacheOutcome::Reused(current) = origin(&build(config.clone()).await?) else {
        panic!("expected reuse")
    };
    std::fs::copy(&path, &current)?;
    assert!(matches!(
        origin(&build(config).await?),
        CacheOutcome::Computed(_)
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tsv_and_lmdb_galleries_serve_their_images() -> Result<()> {
    let dir = temp_dir("stores");
    let checkpoint = tiny_checkpoint(&dir, 8)?;
    let tsv = tsv_gallery(&dir, 4)?;
    let lmdb = lmdb_gallery(&dir.join("l"), 4)?;
    for (gallery, kind) in [(tsv, "tsv"), (lmdb, "lmdb")] {
        let server = TestServer::start(config(&dir, &checkpoint, &gallery)).await?;
        let (_, health) = get_json(&server.url("/healthz")).await?;
        assert_eq!(health["image_store"], kind);
        assert_eq!(health["images"], 4);
        for i in 0..4 {
            let response = client()
                .get(server.url(&format!("/images/{}", gallery_id(i))))
                .send()
                .await?;
            assert_eq!(response.status(), StatusCode::OK, "{kind} image {i}");
            assert_eq!(response.bytes().await?.as_ref(), image_file(i).0.as_slice());
        }
        let form = Form::new().part("image", image_part(1));
        let (_, body) = post_json(&server.url("/api/search/image"), form).await?;
        assert_eq!(results(&body)[0].0, gallery_id(1), "{kind}: {body}");
        assert_error(
            kind,
            &get_json(&server.url("/images/1004")).await?,
            404,
            "unknown image id",
        );
        server.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_file_alone_is_searchable() -> Result<()> {
    let dir = temp_dir("features-only");
    let checkpoint = tiny_checkpoint(&dir, 9)?;
    let ids: Vec<i64> = (0..50).map(|i| 7000 + i).collect();
    let data: Vec<f32> = (0..50 * 16)
        .map(|i| ((i * 37 % 101) as f32) - 50.0)
        .collect();
    let view = retrieval::FeatureView::new(&ids, &data, 16)?;
    let path = dir.join("feats.safetensors");
    retrieval::write_native(&path, &view, retrieval::FeatureKind::Image, None)?;
    let mut config = cnclip_serve::ServeConfig::new(&checkpoint, None);
    config.features = vec![path.clone()];
    let server = TestServer::start(config).await?;
    let (status, body) = get_json(&server.url("/api/search?q=手机壳&k=5")).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(results(&body).iter().all(|(id, _)| ids.contains(id)));
    assert_error(
        "no image store",
        &get_json(&server.url("/images/7000")).await?,
        404,
        "without an image store",
    );
    server.stop().await?;

    // A feature file that names images the gallery lacks is refused at start.
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = common::config(&dir, &checkpoint, &gallery);
    config.features = vec![path];
    let Err(e) = App::build(&config) else {
        panic!("mismatched feature file accepted")
    };
    assert!(e.to_string().contains("has image 7000"), "{e}");
    Ok(())
}

/// Issue 20.4: `--features a b c` serves the shards as one gallery — every result (k = all rows,
/// ids and scores) equals the one-file service's, with tied rows split across shard boundaries —
/// and an id in two shards is refused at start, naming both files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_shards_serve_as_one_file() -> Result<()> {
    let dir = temp_dir("feature-shards");
    let checkpoint = tiny_checkpoint(&dir, 9)?;
    let ids: Vec<i64> = (0..50).map(|i| 9000 - i).collect();
    let mut data: Vec<f32> = (0..50 * 16)
        .map(|i| ((i * 37 % 101) as f32) - 50.0)
        .collect();
    // Rows 19, 20 and 35 equal row 5: exact ties on both sides of the shard boundaries 20 and 35.
    let row5 = data[5 * 16..6 * 16].to_vec();
    for r in [19, 20, 35] {
        data[r * 16..(r + 1) * 16].copy_from_slice(&row5);
    }
    let view = retrieval::FeatureView::new(&ids, &data, 16)?;
    let whole = dir.join("whole.safetensors");
    retrieval::write_native(&whole, &view, retrieval::FeatureKind::Image, None)?;
    let mut shards = Vec::new();
    for (s, (a, b)) in [(0, 20), (20, 35), (35, 50)].into_iter().enumerate() {
        let path = dir.join(format!("shard{s}.safetensors"));
        retrieval::write_native(&path, &view.rows(a, b), retrieval::FeatureKind::Image, None)?;
        shards.push(path);
    }
    let mut answers = Vec::new();
    for files in [vec![whole], shards.clone()] {
        let mut config = cnclip_serve::ServeConfig::new(&checkpoint, None);
        config.features = files;
        let server = TestServer::start(config).await?;
        let (status, body) = get_json(&server.url("/api/search?q=手机壳&k=50")).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        answers.push(results(&body));
        server.stop().await?;
    }
    assert_eq!(answers[0].len(), 50);
    assert_eq!(answers[0], answers[1]);
    let tied: Vec<i64> = answers[1]
        .iter()
        .filter(|(id, _)| [8995, 8981, 8980, 8965].contains(id))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(tied, [8995, 8981, 8980, 8965], "ties in gallery order");

    let again = dir.join("again.safetensors");
    retrieval::write_native(
        &again,
        &view.rows(30, 31),
        retrieval::FeatureKind::Image,
        None,
    )?;
    let mut config = cnclip_serve::ServeConfig::new(&checkpoint, None);
    config.features = vec![
        shards[0].clone(),
        shards[2].clone(),
        again.clone(),
        shards[1].clone(),
    ];
    let Err(e) = App::build(&config) else {
        panic!("an id in two shards accepted")
    };
    let msg = e.to_string();
    assert!(msg.contains("image id 8970"), "{msg}");
    assert!(
        msg.contains("shard1.safetensors") && msg.contains("again.safetensors"),
        "{msg}"
    );
    Ok(())
}

/// Issue 18.1: a service started with `--text-prompt` serves a page whose prompt checkbox starts
/// ticked (the page's queries send what the checkbox says: `browser.rs` checks that in Chromium).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_starts_with_the_services_prompt_default() -> Result<()> {
    let dir = temp_dir("page-prompt");
    let checkpoint = tiny_checkpoint(&dir, 13)?;
    let gallery = folder_gallery(&dir, 2)?;
    for text_prompt in [true, false] {
        let mut config = config(&dir, &checkpoint, &gallery);
        config.text_prompt = text_prompt;
        let server = TestServer::start(config).await?;
        let html = client().get(server.url("/")).send().await?.text().await?;
        let checkbox = html
            .split('<')
            .find(|tag| tag.starts_with("input id=\"prompt\""))
            .unwrap_or_else(|| panic!("no prompt checkbox in the page:\n{html}"));
        assert_eq!(
            checkbox.contains(" checked"),
            text_prompt,
            "text_prompt={text_prompt}: <{checkbox}"
        );
        let (_, health) = get_json(&server.url("/healthz")).await?;
        assert_eq!(health["text_prompt"], text_prompt);
        server.stop().await?;
    }
    Ok(())
}

/// A PNG whose header says `width`×`height` (8-bit RGB) followed by one IDAT of a few bytes: the
/// pixels are never there, only a decoder that trusts the header would allocate for them.
fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    }
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00]);
    png
}

/// Issue 18.2/18.4: an upload over the pixel limit is refused with 413 from its header (before
/// decoding), with an English message that names the size and the limit (not the old
/// "image the uploaded image is too large").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_the_pixel_limit_are_refused_413() -> Result<()> {
    let dir = temp_dir("pixels");
    let checkpoint = tiny_checkpoint(&dir, 14)?;
    let gallery = folder_gallery(&dir, 2)?;
    let server = TestServer::start(config(&dir, &checkpoint, &gallery)).await?;
    let search_image = server.url("/api/search/image");
    let default_limit = cnclip_serve::Limits::default().max_image_pixels;
    // 13000×13000 (a decompression bomb: 169 Mpx from a few KB, past the default 50 Mpx) and 20000×20000 (past the decoder's own limit too).
    for side in [13_000u32, 20_000] {
        let form = Form::new().part(
            "image",
            Part::bytes(png_header_claiming(side, side)).file_name("bomb.png"),
        );
        let answer = post_json(&search_image, form).await?;
        assert_error(
            &format!("{side}² PNG"),
            &answer,
            413,
            &format!(
                "{side}x{side} ({} pixels)",
                u64::from(side) * u64::from(side)
            ),
        );
        let message = answer.1["error"].as_str().unwrap_or_default();
        assert!(message.contains(&default_limit.to_string()), "{message}");
        assert!(!message.contains("image the"), "{message}");
    }
    server.stop().await?;

    // A lower limit applies to real images too, and to /api/classify; smaller ones still pass.
    let mut config = config(&dir, &checkpoint, &gallery);
    config.limits.max_image_pixels = 48 * 40 - 1;
    let server = TestServer::start(config).await?;
    let form = Form::new().part("image", image_part(0));
    assert_error(
        "48x40 over a limit of 1919",
        &post_json(&server.url("/api/search/image"), form).await?,
        413,
        "48x40 (1920 pixels); at most 1919 pixels",
    );
    let form = Form::new()
        .part("image", image_part(1))
        .text("labels", "猫\n狗");
    assert_error(
        "classify 48x40 JPEG",
        &post_json(&server.url("/api/classify"), form).await?,
        413,
        "1920 pixels",
    );
    server.stop().await?;
    let mut config = common::config(&dir, &checkpoint, &gallery);
    config.limits.max_image_pixels = 48 * 40;
    let server = TestServer::start(config).await?;
    let form = Form::new().part("image", image_part(0));
    let (status, body) = post_json(&server.url("/api/search/image"), form).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await
}

/// Issue 18.4: refusals made by the HTTP layer rather than a handler are JSON too: too many or
/// too large headers get a JSON 431 (hyper's own 431 has an empty body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_answer_json_431() -> Result<()> {
    let dir = temp_dir("headers");
    let checkpoint = tiny_checkpoint(&dir, 15)?;
    let gallery = folder_gallery(&dir, 2)?;
    let server = TestServer::start(config(&dir, &checkpoint, &gallery)).await?;
    let limits = cnclip_serve::Limits::default();
    let send = |headers: Vec<(String, String)>| {
        let mut request = client().get(server.url("/api/search?q=包&k=1"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await?;
            let status = response.status();
            let text = response.text().await?;
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{status}: body {text:?} is not JSON: {e}"));
            anyhow::Ok((status, body))
        }
    };
    // 150 header lines (hyper's default limit is 100) and a 20 KiB cookie.
    let many = (0..150)
        .map(|i| (format!("x-h{i}"), "1".to_string()))
        .collect();
    assert_error("150 headers", &send(many).await?, 431, "header lines");
    let large = vec![("cookie".to_string(), "a".repeat(20 << 10))];
    assert_error(
        "20 KiB header",
        &send(large).await?,
        431,
        &format!("at most {} are accepted", limits.max_header_bytes),
    );
    let (status, body) = send(vec![("x-ok".into(), "1".into())]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await
}

/// Issue 18.4: a checkpoint whose `exp(logit_scale)` is not finite would answer every
/// classification with `"probability": null`; it is refused at start with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_finite_logit_scale_is_refused_at_start() -> Result<()> {
    let dir = temp_dir("logit-scale");
    let gallery = folder_gallery(&dir, 2)?;
    // exp(100) overflows float32 to inf; NaN stays NaN.
    for value in [100f32, f32::NAN] {
        let checkpoint = tiny_checkpoint_with(&dir, 16, |state| {
            state.insert("logit_scale", tch::Tensor::from(value));
        })?;
        let config = config(&dir, &checkpoint, &gallery);
        let Err(e) = tokio::task::spawn_blocking(move || App::build(&config)).await? else {
            panic!("logit_scale {value} accepted")
        };
        let message = e.to_string();
        assert!(
            message.contains("logit_scale") && message.contains("tiny.safetensors"),
            "{message}"
        );
    }
    Ok(())
}

/// Issue 18.2: at most `max_concurrent_uploads` upload bodies are read at once; a further upload
/// waits for a slot (within its request timeout) instead of adding its body to memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_wait_for_a_slot() -> Result<()> {
    let dir = temp_dir("upload-slots");
    let checkpoint = tiny_checkpoint(&dir, 17)?;
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    config.limits.max_concurrent_uploads = 1;
    let timeout = Duration::from_secs(3);
    config.limits.request_timeout = timeout;
    let server = TestServer::start(config).await?;

    // A holds the only slot: its body never completes, so it ends with 408 after `timeout`,
    // counted from when its request reached the service (after `sent`).
    let addr = server.addr;
    let sent = std::time::Instant::now();
    let holder = tokio::task::spawn_blocking(move || -> Result<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.write_all(
            b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
              Content-Length: 1000\r\nConnection: close\r\n\r\n\x89PNG",
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // B is complete and small, but can only be read once A's slot is free.
    let form = Form::new().part("image", image_part(1));
    let (status, body) = post_json(&server.url("/api/search/image"), form).await?;
    let answered = sent.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    let holder = holder.await??;
    assert!(holder.starts_with("HTTP/1.1 408"), "{holder}");
    // A's slot is free no earlier than `timeout` after `sent`; B cannot have been read before.
    assert!(
        answered >= timeout,
        "B was answered {answered:?} after A was sent, while A held the only upload slot ({timeout:?})"
    );
    // Text search does not take upload slots.
    let (status, body) = get_json(&server.url("/api/search?q=包&k=1")).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await
}
