//! Issue 18.2: peak memory under concurrent large image uploads is bounded by the decode limit,
//! and an image over the pixel limit is refused without being decoded. Measured as the growth of
//! the process's peak RSS (`VmHWM`, reset through `/proc/self/clear_refs` before each phase; the
//! server runs in this process). Alone in its test binary so that no other test's memory counts.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result};
use common::*;
use image::{ImageFormat, Rgb, RgbImage};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn rss() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/self/status"))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak to the current RSS and returns the current RSS.
fn reset_peak() -> Result<u64> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
    Ok(rss()?.0)
}

async fn upload(url: String, png: Vec<u8>) -> Result<(StatusCode, serde_json::Value)> {
    let form = Form::new().part("image", Part::bytes(png).file_name("big.png"));
    let response = client().post(url).multipart(form).send().await?;
    Ok((response.status(), response.json().await?))
}

const MB: f64 = 1e6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_uploads_stay_within_the_decode_bound() -> Result<()> {
    let dir = temp_dir("memory");
    let checkpoint = tiny_checkpoint(&dir, 31)?;
    let gallery = folder_gallery(&dir, 2)?;
    // A solid-colour PNG: a few KB on the wire, W·H·3 bytes decoded. Its decoded buffer is over
    // glibc's largest mmap threshold (32 MiB), so it is mapped and unmapped whole and shows in
    // RSS exactly while it lives, whichever thread's arena allocates it.
    let (w, h) = (3400u32, 3400u32);
    let decoded = f64::from(w) * f64::from(h) * 3.0;
    let mut png = std::io::Cursor::new(Vec::new());
    RgbImage::from_pixel(w, h, Rgb([200, 40, 90])).write_to(&mut png, ImageFormat::Png)?;
    let png = png.into_inner();

    let mut config = config(&dir, &checkpoint, &gallery);
    let decodes = 1;
    let concurrent = 4;
    config.limits.max_concurrent_decodes = decodes;
    // Uploads wait for their turn to decode; a debug build takes seconds per image.
    config.limits.request_timeout = std::time::Duration::from_secs(600);
    let server = TestServer::start(config).await?;
    let url = server.url("/api/search/image?k=1");

    // One upload first (thread pools, caches), then one alone: the cost of one decode, `single`.
    let (status, body) = upload(url.clone(), png.clone()).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let base = reset_peak()?;
    let start = std::time::Instant::now();
    let (status, body) = upload(url.clone(), png.clone()).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    eprintln!("one upload: {:?}", start.elapsed());
    let single = rss()?.1.saturating_sub(base) as f64;
    // The measurement must see the decoded image, or the bound below would be vacuous (¾: other
    // pages freed meanwhile may offset a little of it).
    assert!(
        single >= 0.75 * decoded,
        "one {w}x{h} upload raised the peak by {:.1} MB, less than its decoded {:.1} MB",
        single / MB,
        decoded / MB
    );

    // `concurrent` uploads at once: at most `decodes` decode at a time, so the peak grows by at
    // most `decodes` single decodes, plus every upload's body held by server and client (2× the
    // PNG each), plus half a decode of allocator and thread-stack slack. Without the bound the
    // decodes overlap and the growth is near `concurrent` × `single`.
    let base = reset_peak()?;
    let uploads: Vec<_> = (0..concurrent)
        .map(|_| tokio::spawn(upload(url.clone(), png.clone())))
        .collect();
    for u in uploads {
        let (status, body) = u.await??;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let grown = rss()?.1.saturating_sub(base) as f64;
    let bound = decodes as f64 * single + concurrent as f64 * 2.0 * png.len() as f64 + single / 2.0;
    eprintln!(
        "{concurrent} concurrent {w}x{h} uploads ({} bytes each): peak +{:.1} MB; one alone +{:.1} MB; bound {:.1} MB",
        png.len(),
        grown / MB,
        single / MB,
        bound / MB
    );
    assert!(
        grown <= bound,
        "{concurrent} concurrent uploads raised the peak RSS by {:.1} MB; the bound is {:.1} MB",
        grown / MB,
        bound / MB
    );
    server.stop().await?;

    // Over the pixel limit: refused from the header, nothing decoded (growth far below one image).
    let mut config = common::config(&dir, &checkpoint, &gallery);
    config.limits.max_image_pixels = u64::from(w) * u64::from(h) / 2;
    let server = TestServer::start(config).await?;
    let url = server.url("/api/search/image?k=1");
    let base = reset_peak()?;
    let (status, body) = upload(url, png.clone()).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let grown = rss()?.1.saturating_sub(base) as f64;
    assert!(
        grown < decoded / 4.0,
        "a refused upload raised the peak by {:.1} MB",
        grown / MB
    );
    server.stop().await
}
