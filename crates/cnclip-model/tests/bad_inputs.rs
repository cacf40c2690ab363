//! The bad-input corpus of `cnclip-model` (issue 11): images users actually feed a 250k-pair run
//! (truncated, empty, not images, decompression-bomb headers, every unusual mode) and damaged
//! checkpoints (missing key, wrong shape, wrong dtype, truncated `.pt` and `.safetensors`).
//!
//! Inputs are generated here from the small committed fixtures, so nothing large is stored. Every
//! case must end in an error that names the image id or the file and the key, or decode to a
//! normal tensor; a panic fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::config::ClipConfig;
use cnclip_model::model::Clip;
use cnclip_model::preprocess::{MAX_PIXELS, PreprocessError, Preprocessor};
use cnclip_model::weights::{self, PtHeader, StateDict};
use cnclip_model::{LoadError, LoadOptions};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn image_fixture(name: &str) -> Vec<u8> {
    std::fs::read(manifest().join("tests/fixtures/preprocess").join(name)).unwrap()
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnclip-bad-inputs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image_err(bytes: &[u8], id: &str) -> PreprocessError {
    match Preprocessor::new(32).unwrap().preprocess_bytes(bytes, id) {
        Ok(t) => panic!("{id}: decoded to {:?} instead of failing", t.size()),
        Err(e) => {
            assert!(
                e.to_string().starts_with(&format!("image {id} ")),
                "the error must name the image: {e}"
            );
            e
        }
    }
}

/// A JPEG whose frame header (SOF0/SOF2) claims `w`×`h`; the scan data stays the small image's.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut b = image_fixture("jpeg_444_77x51.jpg");
    let sof = b
        .windows(2)
        .position(|m| m == [0xFF, 0xC0] || m == [0xFF, 0xC2])
        .unwrap();
    // FFC0 len(2) precision(1) height(2) width(2)
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

#[test]
fn unreadable_images_name_the_image() {
    let e = image_err(&[], "gallery/0.jpg");
    assert!(matches!(e, PreprocessError::Empty { .. }), "{e}");

    for (bytes, id) in [
        (
            &b"<html><body>404 Not Found</body></html>"[..],
            "gallery/1.jpg",
        ),
        (&b"\x00\x00\x00\x00"[..], "gallery/2.jpg"),
        (&b"PK\x03\x04 a zip"[..], "gallery/3.jpg"),
    ] {
        let e = image_err(bytes, id);
        assert!(matches!(e, PreprocessError::UnknownFormat { .. }), "{e}");
    }

    let jpeg = image_fixture("jpeg_420_300x200.jpg");
    for cut in [4, 200, jpeg.len() / 2, jpeg.len() - 2] {
        let e = image_err(&jpeg[..cut], "gallery/4.jpg");
        assert!(
            matches!(
                e,
                PreprocessError::Truncated { .. } | PreprocessError::Decode { .. }
            ),
            "cut at {cut}: {e}"
        );
    }
    // Found by fuzzing (fuzz/, target image_decode): a palette PNG whose PLTE chunk is 49 bytes
    // made the png crate panic (slice index out of range); it must be this image's error.
    let bytes =
        std::fs::read(manifest().join("tests/fixtures/bad_inputs/png_plte_not_multiple_of_3.png"))
            .unwrap();
    let e = image_err(&bytes, "gallery/5.png");
    assert!(matches!(e, PreprocessError::Decode { .. }), "{e}");

    // Every single-byte flip of a small JPEG's header region: an error or an image, never a panic.
    let small = image_fixture("jpeg_444_77x51.jpg");
    for i in 0..small.len().min(700) {
        let mut b = small.clone();
        b[i] ^= 0xA5;
        let _ = Preprocessor::new(16).unwrap().preprocess_bytes(&b, "flip");
    }
}

#[test]
fn decompression_bomb_headers_are_refused_by_limit() {
    // Pillow's DecompressionBombError threshold: 2 × MAX_IMAGE_PIXELS.
    assert_eq!(MAX_PIXELS, 2 * 89_478_485);
    let check = |bytes: &[u8], id: &str, format: &str| {
        let e = image_err(bytes, id);
        match &e {
            PreprocessError::TooLarge {
                width,
                height,
                limit,
                ..
            } => {
                assert_eq!((*width, *height, *limit), (20000, 20000, MAX_PIXELS), "{e}");
            }
            other => panic!("{format}: expected TooLarge, got {other}"),
        }
        assert_eq!(
            e.to_string(),
            format!("image {id} is too large: 20000x20000 exceeds {MAX_PIXELS} pixels")
        );
    };

    check(&jpeg_claiming(20000, 20000), "bomb/1.jpg", "JPEG");

    let mut png = image_fixture("rgb_1x1.png");
    png[16..20].copy_from_slice(&20000u32.to_be_bytes());
    png[20..24].copy_from_slice(&20000u32.to_be_bytes());
    check(&png, "bomb/2.png", "PNG");

    let mut bmp = image_fixture("bmp_rgb_30x20.bmp");
    bmp[18..22].copy_from_slice(&20000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&20000i32.to_le_bytes());
    check(&bmp, "bomb/3.bmp", "BMP");

    let mut gif = image_fixture("gif_35x25.gif");
    gif[6..8].copy_from_slice(&20000u16.to_le_bytes());
    gif[8..10].copy_from_slice(&20000u16.to_le_bytes());
    check(&gif, "bomb/4.gif", "GIF");

    // Under the limit the header is believed: libjpeg meets the EOI marker early, warns and
    // fills the rest (as Pillow does for a file that is not cut short); an image or an error
    // naming it, never a panic or an unbounded allocation.
    let r = Preprocessor::new(32)
        .unwrap()
        .preprocess_bytes(&jpeg_claiming(4000, 3000), "big/5.jpg");
    if let Err(e) = r {
        assert!(e.to_string().starts_with("image big/5.jpg "), "{e}");
    }
}

fn png_bytes<P: image::PixelWithColorType>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>) -> Vec<u8>
where
    [P::Subpixel]: image::EncodableLayout,
{
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn every_unusual_mode_decodes_to_rgb() {
    let rgb16 = image::ImageBuffer::from_fn(23, 17, |x, y| {
        image::Rgb([(x * 2000) as u16, (y * 3000) as u16, 65535])
    });
    let rgba16 = image::ImageBuffer::from_fn(19, 11, |x, y| {
        image::Rgba([
            (x * 3000) as u16,
            7,
            (y * 5000) as u16,
            (x * y * 100) as u16,
        ])
    });
    let generated = [
        ("generated/rgb16.png", png_bytes(&rgb16)),
        ("generated/rgba16.png", png_bytes(&rgba16)),
    ];
    let fixtures = [
        "jpeg_cmyk_40x30.jpg",
        "jpeg_gray_64x48.jpg",
        "i16_30x20.png",
        "p_33x27.png",
        "p_trns_29x35.png",
        "rgba_50x40.png",
        "la_40x30.png",
        "one_41x29.png",
        "bmp_p_26x18.bmp",
        "gif_gray_30x22.gif",
        "webp_rgba_lossless_36x28.webp",
    ];
    let all = generated
        .into_iter()
        .chain(fixtures.iter().map(|f| (*f, image_fixture(f))));
    let p = Preprocessor::new(32).unwrap();
    for (id, bytes) in all {
        let t = p
            .preprocess_bytes(&bytes, id)
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(t.size(), [3, 32, 32], "{id}");
        assert!(
            bool::try_from(t.isfinite().all()).unwrap(),
            "{id}: non-finite pixels"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

fn tiny_config() -> ClipConfig {
    let dir = manifest().join("tests/fixtures/model/configs");
    ClipConfig::from_json_files(&dir.join("tiny-vit.json"), &dir.join("tiny-bert.json")).unwrap()
}

fn good_state_dict(config: &ClipConfig) -> StateDict {
    tch::manual_seed(11);
    Clip::new(config, Device::Cpu).state_dict()
}

/// Writes `sd` as both formats and returns the two load errors.
fn load_both(dir: &Path, tag: &str, config: &ClipConfig, sd: &StateDict) -> [(PathBuf, String); 2] {
    let pt = dir.join(format!("{tag}.pt"));
    let header = PtHeader {
        epoch: 1,
        step: 1,
        name: tag.into(),
    };
    weights::write_pt(&pt, sd, &header).unwrap();
    let st = dir.join(format!("{tag}.safetensors"));
    weights::save_native(&st, config, sd).unwrap();
    let options = LoadOptions {
        config: Some(config.clone()),
        ..Default::default()
    };
    [pt, st].map(|p| {
        let e = Clip::load(&p, &options, Device::Cpu).expect_err(tag);
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()),
            "the error must name the file: {msg}"
        );
        (p, msg)
    })
}

#[test]
fn damaged_checkpoints_name_file_and_key() {
    let dir = tmp_dir("ckpt");
    let config = tiny_config();
    let good = good_state_dict(&config);
    let key = "visual.proj";
    assert!(good.contains_key(key));

    let mut sd = good.shallow_clone();
    sd.remove(key);
    for (_, msg) in load_both(&dir, "missing", &config, &sd) {
        assert!(msg.contains("1 missing"), "{msg}");
        assert!(msg.contains(&format!("missing keys: {key}")), "{msg}");
    }

    let mut sd = good.shallow_clone();
    sd.insert(
        "visual.extra_head.weight",
        Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
    );
    for (_, msg) in load_both(&dir, "unexpected", &config, &sd) {
        assert!(
            msg.contains("unexpected keys: visual.extra_head.weight"),
            "{msg}"
        );
    }

    let mut sd = good.shallow_clone();
    let want = good.get(key).unwrap().size();
    sd.insert(key, Tensor::zeros([3, 5], (Kind::Float, Device::Cpu)));
    for (_, msg) in load_both(&dir, "shape", &config, &sd) {
        assert!(
            msg.contains(&format!(
                "shape mismatch for {key}: the model expects {want:?}, the weights have [3, 5]"
            )),
            "{msg}"
        );
    }

    // Integers where weights belong: torch's copy_ would cast them silently; that is a corrupt
    // or wrong file, so it must be refused with the key named.
    let mut sd = good.shallow_clone();
    sd.insert(key, good.get(key).unwrap().to_kind(Kind::Int64));
    for (_, msg) in load_both(&dir, "dtype", &config, &sd) {
        assert!(msg.contains(&format!("dtype mismatch for {key}")), "{msg}");
        assert!(msg.contains("Int64"), "{msg}");
    }

    // fp16 / bf16 weights are a legitimate way to ship a checkpoint: they load (cast to fp32).
    let mut sd = good.shallow_clone();
    sd.insert(key, good.get(key).unwrap().to_kind(Kind::Half));
    let p = dir.join("half.safetensors");
    weights::save_native(&p, &config, &sd).unwrap();
    Clip::load(&p, &LoadOptions::default(), Device::Cpu).unwrap();

    // Truncated files: every cut is an error naming the file.
    let pt = dir.join("full.pt");
    weights::write_pt(
        &pt,
        &good,
        &PtHeader {
            epoch: 1,
            step: 1,
            name: "full".into(),
        },
    )
    .unwrap();
    let st = dir.join("full.safetensors");
    weights::save_native(&st, &config, &good).unwrap();
    let options = LoadOptions {
        config: Some(config.clone()),
        ..Default::default()
    };
    for full in [pt, st] {
        let bytes = std::fs::read(&full).unwrap();
        let ext = full.extension().unwrap().to_str().unwrap().to_owned();
        for (i, cut) in [
            0,
            7,
            8,
            100,
            bytes.len() / 3,
            bytes.len() / 2,
            bytes.len() - 1,
        ]
        .into_iter()
        .enumerate()
        {
            let p = dir.join(format!("cut{i}.{ext}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = Clip::load(&p, &options, Device::Cpu)
                .err()
                .unwrap_or_else(|| panic!("{} cut at {cut} loaded", full.display()));
            assert!(
                e.to_string().contains(&p.display().to_string()),
                "cut at {cut}: {e}"
            );
        }
    }

    // A safetensors header that lies about a tensor's extent.
    let p = dir.join("lying.safetensors");
    let header =
        br#"{"visual.proj":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,4000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&p, &bytes).unwrap();
    let e = weights::read_safetensors(&p).unwrap_err().to_string();
    assert!(e.contains("lying.safetensors"), "{e}");

    // A native file without its config metadata, loaded as a model.
    let p = dir.join("plain.safetensors");
    weights::save_safetensors(&p, &good, Default::default()).unwrap();
    let e = Clip::load(&p, &LoadOptions::default(), Device::Cpu).unwrap_err();
    assert!(
        matches!(e, LoadError::Weights(_)) && e.to_string().contains("plain.safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A 16-bit RGBA PNG of `w`×`h` pixels, one colour, encoded row by row (the source is never held).
fn solid_rgba16_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Sixteen);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row: Vec<u8> = [0x12u8, 0x34, 0xAB, 0xCD, 0x56, 0x78, 0xFF, 0xFF]
            .iter()
            .copied()
            .cycle()
            .take(w as usize * 8)
            .collect();
        for _ in 0..h {
            std::io::Write::write_all(&mut stream, &row).unwrap();
        }
        stream.finish().unwrap();
    }
    out
}

#[test]
fn images_pillow_opens_are_not_refused_by_a_stricter_limit() {
    // 9000×9000 = 81 Mpx is under Pillow's MAX_IMAGE_PIXELS (89,478,485), so Pillow opens it; at
    // 8 bytes per pixel it needs 648 MB, more than the `image` crate's default 512 MiB allocation
    // limit. Peak memory of this test: the decoded u16 buffer (648 MB) plus its 8-bit copy (324 MB).
    let png = solid_rgba16_png(9000, 9000);
    let img = cnclip_model::preprocess::decode_named(&png, "big/rgba16.png")
        .unwrap_or_else(|e| panic!("Pillow opens this image: {e}"));
    assert_eq!((img.width(), img.height()), (9000, 9000));
    assert_eq!(img.mode(), cnclip_model::preprocess::Mode::Rgba);
    // Pillow's `RGBA;16B` unpacker keeps the high byte of each sample.
    let rgb = img.resize_rgb(4, 4).unwrap();
    assert!(
        rgb.as_raw().chunks(3).all(|p| p == [0x12, 0xAB, 0x56]),
        "{:?}",
        &rgb.as_raw()[..3]
    );
}
