//! What bf16 transforms do to a codec's quality: Kodak PSNR of the f32 and the bf16 paths, and
//! their difference, for each model given: psic model files or CompressAI checkpoints
//! (default: `models/psic-default.safetensors` and the CompressAI fixture model
//! `../shared/fixtures/compressai/hyperprior_128_192.safetensors`).
//!
//! ```text
//! cargo run --release --example bf16_psnr -- [--data DIR] [--limit N] [MODEL ...]
//! ```
//!
//! Each image is encoded and decoded with f32 transforms, with bf16 ones, and the f32 stream
//! is also decoded with bf16 (the streams are compatible: the hyper-synthesis is f32 in both).
//! bf16 is the AVX512-BF16 kernel where the CPU has it and the portable emulation (same
//! rounding, slower than f32) elsewhere. Shielded models are measured on their full decode and
//! their shielded one.

use std::path::PathBuf;

use candle_core::Device;
use image::RgbImage;
use psic::shield::Condition;
use psic::{Codec, ModelFile, Precision};

/// PSNR of `b` against `a` in dB (8-bit RGB).
fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let se: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let mse = se / a.as_raw().len() as f64;
    10.0 * (255.0 * 255.0 / mse.max(1e-12)).log10()
}

/// Per decode (name, condition): summed PSNRs of f32/f32, f32 stream/bf16 decode, bf16/bf16.
struct Sums {
    name: &'static str,
    condition: Condition,
    psnr: [f64; 3],
}

fn measure(model_path: &PathBuf, images: &[(String, RgbImage)], bf16: Precision) {
    let model = ModelFile::load(model_path, &Device::Cpu)
        .or_else(|_| ModelFile::import(model_path, None, &Device::Cpu))
        .expect("model");
    let load = |p: Precision| {
        Codec::from_model_file(&model, &Device::Cpu)
            .and_then(|c| c.with_precision(p))
            .expect("codec")
    };
    let (full, low) = (load(Precision::F32), load(bf16));
    let mut sums = vec![Sums {
        name: "full",
        condition: full.conditions().map_or(Condition::FULL, |c| c.full),
        psnr: [0.0; 3],
    }];
    if let Some(c) = full.conditions() {
        sums.push(Sums {
            name: "shielded",
            condition: c.shielded,
            psnr: [0.0; 3],
        });
    }
    let (mut bits, mut bits_low, mut pixels) = (0usize, 0usize, 0usize);
    for (name, img) in images {
        let (s32, s16) = (
            full.encode(img).expect("encode"),
            low.encode(img).expect("encode"),
        );
        bits += 8 * s32.len();
        bits_low += 8 * s16.len();
        pixels += (img.width() * img.height()) as usize;
        for s in &mut sums {
            let dec = |c: &Codec, bytes: &[u8]| c.decode_full(bytes, &s.condition).expect("decode");
            let p = [
                psnr(img, &dec(&full, &s32)),
                psnr(img, &dec(&low, &s32)),
                psnr(img, &dec(&low, &s16)),
            ];
            eprintln!("{name} {}: {:.3} {:.3} {:.3}", s.name, p[0], p[1], p[2]);
            for (t, v) in s.psnr.iter_mut().zip(p) {
                *t += v;
            }
        }
    }
    let n = images.len() as f64;
    println!(
        "{} ({} images; bf16 = {}): bpp f32 {:.4}, bf16 encoder {:.4}",
        model_path.display(),
        images.len(),
        low.precision(),
        bits as f64 / pixels as f64,
        bits_low as f64 / pixels as f64
    );
    for s in &sums {
        let [a, b, c] = s.psnr.map(|v| v / n);
        println!(
            "  {} decode: f32 {a:.4} dB | f32 stream, bf16 decode {b:.4} dB ({:+.4}) | bf16 encode + decode {c:.4} dB ({:+.4})",
            s.name,
            b - a,
            c - a
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut data = PathBuf::from("../shared/data/kodak");
    let mut limit = usize::MAX;
    let mut models = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--data" => data = args.next().expect("--data DIR").into(),
            "--limit" => limit = args.next().and_then(|v| v.parse().ok()).expect("--limit N"),
            _ => models.push(PathBuf::from(a)),
        }
    }
    if models.is_empty() {
        models.push("models/psic-default.safetensors".into());
        let hp = PathBuf::from("../shared/fixtures/compressai/hyperprior_128_192.safetensors");
        if hp.is_file() {
            models.push(hp);
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(&data)
        .expect("Kodak folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    let images: Vec<_> = files
        .iter()
        .take(limit)
        .map(|p| {
            let name = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, psic::image_io::load_image(p).expect("image"))
        })
        .collect();
    let bf16 = if Precision::bf16_supported() {
        Precision::Bf16
    } else {
        println!("this CPU has no AVX512-BF16: bf16 is the portable emulation (same rounding)");
        Precision::Bf16Emulated
    };
    for m in &models {
        measure(m, &images, bf16);
    }
}
