//! Load test of the search service on a MUGE-size gallery: 30,000 random unit image features
//! (dimension 512, a prebuilt feature file: no images are encoded), served on 127.0.0.1, and a
//! fixed number of `GET /api/search` requests from `C` concurrent clients in this process.
//! Reports p50/p99 latency, queries/s and the mean micro-batch size.
//!
//! ```text
//! cargo bench -p cnclip-serve --bench load
//! LOAD_MODEL=vit-b-16 LOAD_REQUESTS=400 LOAD_CONCURRENCY=1,8,32 cargo bench -p cnclip-serve --bench load
//! ```
//! `LOAD_MODEL`: `tiny` (a 2-layer text tower: measures the service, batching and the 30k top-k
//! scan) or `vit-b-16` (ViT-B-16's RoBERTa-base text tower with random weights: the real encoding
//! cost of a query). The client shares the machine's cores with the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cnclip_model::{Clip, ClipConfig};
use cnclip_serve::{App, Encoder, ServeConfig};
use retrieval::{FeatureKind, FeatureView, write_native};

const GALLERY: usize = 30_000;
const DIM: usize = 512;

const QUERIES: [&str; 16] = [
    "红色连衣裙",
    "男士运动鞋",
    "儿童保温杯",
    "无线蓝牙耳机",
    "真皮双肩包",
    "夏季防晒衣",
    "北欧风落地灯",
    "不锈钢炒锅",
    "纯棉四件套",
    "机械键盘",
    "猫咪玩具",
    "复古墨镜",
    "加厚羽绒服",
    "手机壳 透明",
    "婴儿推车",
    "办公椅 人体工学",
];

fn main() -> Result<()> {
    let model = std::env::var("LOAD_MODEL").unwrap_or_else(|_| "tiny".into());
    let requests: usize = std::env::var("LOAD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if model == "tiny" { 3000 } else { 400 });
    let concurrency: Vec<usize> = std::env::var("LOAD_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();

    let dir = std::env::temp_dir().join(format!("cnclip-serve-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let features = dir.join("gallery.safetensors");
    write_random_gallery(&features)?;

    let config = match model.as_str() {
        "tiny" => ClipConfig::from_json_str(
            r#"{"embed_dim":512,"image_resolution":32,"vision_layers":1,"vision_width":32,"vision_patch_size":8,
                "vision_head_width":16,"vocab_size":21128,"text_attention_probs_dropout_prob":0.0,
                "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":64,
                "text_initializer_range":0.02,"text_intermediate_size":128,"text_max_position_embeddings":64,
                "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
            "tiny load-test config",
        )?,
        "vit-b-16" => ClipConfig::from_name("ViT-B-16")?,
        other => bail!("LOAD_MODEL must be tiny or vit-b-16, not {other:?}"),
    };
    tch::manual_seed(0);
    let clip = Clip::new(&config, tch::Device::Cpu);
    let encoder = Encoder::from_model(clip, format!("random {model}"), 52)?;
    let mut serve = ServeConfig::new(dir.join("unused-checkpoint"), None);
    serve.features = vec![features];
    serve.text_prompt = true;
    let app = App::with_encoder(&serve, encoder)?;

    println!(
        "load test: {GALLERY} gallery features (dim {DIM}), model {model}, {requests} requests per run, \
         {} CPU threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder().no_proxy().build()?;
        // Warm-up (first libtorch calls, page cache of the feature file).
        for q in QUERIES {
            get(&client, addr, q).await?;
        }
        println!("| clients | requests | p50 ms | p99 ms | mean ms | queries/s | mean batch |");
        println!("|---|---|---|---|---|---|---|");
        for &c in &concurrency {
            let before = stats(&client, addr).await?;
            let (mut latencies, wall) = run(&client, addr, c, requests).await?;
            let after = stats(&client, addr).await?;
            latencies.sort_unstable();
            let pct = |p: f64| {
                let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
                latencies[i - 1].as_secs_f64() * 1e3
            };
            let mean = latencies.iter().map(Duration::as_secs_f64).sum::<f64>()
                / latencies.len() as f64
                * 1e3;
            let batch = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
            println!(
                "| {c} | {requests} | {:.2} | {:.2} | {mean:.2} | {:.0} | {batch:.1} |",
                pct(0.50),
                pct(0.99),
                requests as f64 / wall.as_secs_f64()
            );
        }
        let _ = stop.send(());
        server.await??;
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// 30k rows of a fixed xorshift stream (normalised by `write_native`).
fn write_random_gallery(path: &std::path::Path) -> Result<()> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let data: Vec<f32> = (0..GALLERY * DIM).map(|_| next()).collect();
    let ids: Vec<i64> = (0..GALLERY as i64).map(|i| 100_000 + i).collect();
    let view = FeatureView::new(&ids, &data, DIM)?;
    write_native(
        path,
        &view,
        FeatureKind::Image,
        Some("random load-test gallery"),
    )?;
    Ok(())
}

async fn get(client: &reqwest::Client, addr: std::net::SocketAddr, q: &str) -> Result<()> {
    let response = client
        .get(format!("http://{addr}/api/search?q={q}&k=10"))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("{q}: {} {}", response.status(), response.text().await?);
    }
    response.bytes().await?;
    Ok(())
}

/// `(text_queries, text_batches)` from `/healthz`.
async fn stats(client: &reqwest::Client, addr: std::net::SocketAddr) -> Result<(u64, u64)> {
    let health: serde_json::Value = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await?
        .json()
        .await?;
    Ok((
        health["text_queries"].as_u64().unwrap_or(0),
        health["text_batches"].as_u64().unwrap_or(0),
    ))
}

/// `requests` queries from `clients` concurrent loops; per-request latencies and the wall time.
async fn run(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    clients: usize,
    requests: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let t = Instant::now();
                get(&client, addr, QUERIES[i % QUERIES.len()]).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::with_capacity(requests);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((all, start.elapsed()))
}
