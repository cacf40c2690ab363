//! The two costly steps of cn_clip's image preprocessing on one core: JPEG decode (libjpeg-turbo,
//! Pillow's pixels) and Pillow's bicubic resize to the model's square input.
//!
//! `cargo bench -p cnclip-model --bench preprocess [-- --width 600 --height 450 --size 224 --iters 200]`
//!
//! Prints the minimum and median microseconds per image of each step (the minimum is the least
//! disturbed by other load on the machine).

use cnclip_model::preprocess::decode;
use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;
use std::time::Instant;

fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stats(mut us: Vec<f64>) -> (f64, f64) {
    us.sort_by(f64::total_cmp);
    (us[0], us[us.len() / 2])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (w, h) = (flag("--width", 600), flag("--height", 450));
    let size = flag("--size", 224);
    let iters = flag("--iters", 200).max(1);
    // A photo-like test image: smooth gradients plus texture, JPEG quality 90.
    let pixels: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            let t = ((x * 7 + y * 13) % 64) as u8;
            [
                (x * 255 / w) as u8 ^ t,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ]
        })
        .collect();
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 90).encode(
        &pixels,
        w as u32,
        h as u32,
        ExtendedColorType::Rgb8,
    )?;
    let mut decode_us = Vec::with_capacity(iters);
    let mut resize_us = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let decoded = decode(&jpeg)?;
        decode_us.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let rgb = decoded.resize_rgb(size, size)?;
        resize_us.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(rgb);
    }
    let (dmin, dmed) = stats(decode_us);
    let (rmin, rmed) = stats(resize_us);
    println!(
        "{{\"image\": \"{w}x{h}\", \"size\": {size}, \"iters\": {iters}, \"decode_us\": {{\"min\": {dmin:.1}, \"median\": {dmed:.1}}}, \"resize_us\": {{\"min\": {rmin:.1}, \"median\": {rmed:.1}}}}}"
    );
    Ok(())
}
