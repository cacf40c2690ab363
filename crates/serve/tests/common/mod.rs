//! Shared by the integration tests: a tiny random checkpoint, small generated galleries, and a
//! server on 127.0.0.1 with a port of its own.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use cnclip_model::weights::{StateDict, save_native};
use cnclip_model::{Clip, ClipConfig};
use cnclip_serve::{App, ServeConfig};
use image::{ImageFormat, Rgb, RgbImage};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A tiny ViT + BERT (cn_clip's real vocabulary size, so any Chinese query has valid ids).
pub fn tiny_config() -> ClipConfig {
    ClipConfig::from_json_str(
        r#"{"embed_dim":16,"image_resolution":32,"vision_layers":2,"vision_width":32,"vision_patch_size":8,
            "vision_head_width":16,"vocab_size":21128,"text_attention_probs_dropout_prob":0.0,
            "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":24,
            "text_initializer_range":0.02,"text_intermediate_size":48,"text_max_position_embeddings":64,
            "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
        "tiny test config",
    )
    .expect("the tiny config is valid")
}

/// A fresh empty directory under the system temp dir, unique to this process and `name`, removed
/// when dropped.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("cnclip-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A random tiny model saved as a native checkpoint.
pub fn tiny_checkpoint(dir: &Path, seed: i64) -> Result<PathBuf> {
    tiny_checkpoint_with(dir, seed, |_| {})
}

/// [`tiny_checkpoint`] with its state dict changed by `edit` before saving.
pub fn tiny_checkpoint_with(
    dir: &Path,
    seed: i64,
    edit: impl FnOnce(&mut StateDict),
) -> Result<PathBuf> {
    tch::manual_seed(seed);
    let config = tiny_config();
    let clip = Clip::new(&config, tch::Device::Cpu);
    let mut state = StateDict::new();
    for (key, tensor) in clip.named_tensors() {
        state.insert(key, tensor);
    }
    edit(&mut state);
    let path = dir.join("tiny.safetensors");
    save_native(&path, &config, &state)?;
    Ok(path)
}

/// Distinct colours, so that every gallery image has different features.
pub const COLOURS: [[u8; 3]; 6] = [
    [220, 30, 30],
    [30, 200, 40],
    [40, 60, 220],
    [240, 220, 20],
    [20, 20, 20],
    [250, 250, 250],
];

/// The encoded file of gallery image `i` (a striped picture in colour `i`; even `i` as PNG,
/// odd as JPEG).
pub fn image_file(i: usize) -> (Vec<u8>, ImageFormat) {
    let [r, g, b] = COLOURS[i % COLOURS.len()];
    let img = RgbImage::from_fn(48, 40, |x, y| {
        if (x / 6 + y / 8 + i as u32).is_multiple_of(3) {
            Rgb([r / 2, g / 2, b / 2])
        } else {
            Rgb([r, g, b])
        }
    });
    let format = if i.is_multiple_of(2) {
        ImageFormat::Png
    } else {
        ImageFormat::Jpeg
    };
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format).unwrap();
    (bytes.into_inner(), format)
}

/// Gallery ids: `1000 + i`.
pub fn gallery_id(i: usize) -> i64 {
    1000 + i as i64
}

/// A folder gallery of `n` images named by id (`1000.png`, `1001.jpg`, …).
pub fn folder_gallery(dir: &Path, n: usize) -> Result<PathBuf> {
    let folder = dir.join("images");
    std::fs::create_dir_all(&folder)?;
    for i in 0..n {
        let (bytes, format) = image_file(i);
        let ext = if format == ImageFormat::Png {
            "png"
        } else {
            "jpg"
        };
        std::fs::write(folder.join(format!("{}.{ext}", gallery_id(i))), bytes)?;
    }
    Ok(folder)
}

/// `{dir}/data/valid_imgs.tsv` (+ texts) of `n` images, as MUGE ships them.
pub fn tsv_gallery(dir: &Path, n: usize) -> Result<PathBuf> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let mut tsv = String::new();
    let mut texts = String::new();
    for i in 0..n {
        let b64 = muge_data::base64::encode(&image_file(i).0);
        tsv.push_str(&format!("{}\t{b64}\n", gallery_id(i)));
        texts.push_str(&format!(
            "{{\"text_id\": {i}, \"text\": \"商品{i}\", \"image_ids\": [{}]}}\n",
            gallery_id(i)
        ));
    }
    std::fs::write(data.join("valid_imgs.tsv"), tsv)?;
    std::fs::write(data.join("valid_texts.jsonl"), texts)?;
    Ok(data.join("valid_imgs.tsv"))
}

/// A cn_clip LMDB split `{dir}/lmdb/valid` of `n` images (built from [`tsv_gallery`]).
pub fn lmdb_gallery(dir: &Path, n: usize) -> Result<PathBuf> {
    tsv_gallery(dir, n)?;
    let summary = muge_data::build_split(
        &dir.join("data"),
        "valid",
        &dir.join("lmdb"),
        muge_data::BadRecordPolicy::Fail,
        &mut |_| {},
    )?;
    Ok(summary.dir)
}

/// A service on 127.0.0.1 (an OS-chosen port) running in the current tokio runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Builds the app (blocking work off the runtime's workers) and starts serving it.
    pub async fn start(config: ServeConfig) -> Result<TestServer> {
        let app = tokio::task::spawn_blocking(move || App::build(&config)).await??;
        Self::serve(app).await
    }

    pub async fn serve(app: App) -> Result<TestServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = rx.await;
        }));
        Ok(TestServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Graceful shutdown; returns when the server and its model thread have stopped.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

/// A config for the tiny checkpoint and `gallery`, caching features in `dir/cache`.
pub fn config(dir: &Path, checkpoint: &Path, gallery: &Path) -> ServeConfig {
    let mut config = ServeConfig::new(checkpoint, Some(gallery.to_path_buf()));
    config.cache.dir = Some(dir.join("cache"));
    config
}

/// An HTTP client that talks to 127.0.0.1 only (no proxy from the environment).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}
