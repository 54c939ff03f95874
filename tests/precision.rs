//! Streams are compatible across the precisions of the transforms: a stream written with f32
//! transforms decodes to the same `y_hat` (and table indexes) with bf16 transforms, and the
//! reverse, because the hyper-synthesis that decides the tables always runs in f32.
//!
//! bf16 runs as the portable emulation on CPUs without AVX512-BF16 (the same rounding, so the
//! same test), and as the AVX512-BF16 kernel where the CPU has it.

use psic::{Codec, Precision};

/// The bf16 precisions this CPU runs.
fn bf16_precisions() -> Vec<Precision> {
    let mut out = vec![Precision::Bf16Emulated];
    if Precision::bf16_supported() {
        out.push(Precision::Bf16);
    } else {
        println!("AVX512-BF16 kernel not tested: this CPU has no AVX512-BF16");
    }
    out
}

/// A deterministic 200x136 test image with edges and gradients.
fn image() -> image::RgbImage {
    image::RgbImage::from_fn(200, 136, |x, y| {
        let v = |a: u32| ((a % 251) as u8).wrapping_mul(3);
        image::Rgb([
            v(x * 7 + y),
            v(x * x / 9 + 3 * y),
            if (x / 17 + y / 13) % 2 == 0 { 40 } else { 210 },
        ])
    })
}

fn codec(precision: Precision) -> Codec {
    Codec::from_model_file(
        &psic::zoo::default_model(&candle_core::Device::Cpu).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .with_precision(precision)
    .unwrap()
}

#[test]
fn streams_decode_to_the_same_latent_at_either_precision() {
    let f32_codec = codec(Precision::F32);
    assert_eq!(f32_codec.precision(), Precision::F32);
    let img = image();
    for p in bf16_precisions() {
        let low = codec(p);
        assert_eq!(low.precision(), p);
        for (writer, name) in [(&f32_codec, "f32"), (&low, "bf16")] {
            let bytes = writer.encode(&img).unwrap();
            let a = f32_codec.decode_latent(&bytes).unwrap();
            let b = low.decode_latent(&bytes).unwrap();
            assert_eq!(
                a.y_indexes, b.y_indexes,
                "{name} stream, {p} decode: indexes"
            );
            let (ya, yb) = (
                a.y_hat.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.y_hat.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(ya, yb, "{name} stream, {p} decode: y_hat");
            // Both decode it to an image; the syntheses differ only by bf16 rounding.
            let (da, db) = (
                f32_codec.decode(&bytes).unwrap(),
                low.decode(&bytes).unwrap(),
            );
            let psnr = psnr(&da, &db);
            assert!(
                psnr > 40.0,
                "{name} stream: f32 vs {p} decode only {psnr:.1} dB apart"
            );
        }
        // bf16 analysis changes y a little, so the two encoders' streams may differ; both are
        // valid streams of the same model.
        let (sa, sb) = (f32_codec.encode(&img).unwrap(), low.encode(&img).unwrap());
        println!(
            "{p}: stream {} bytes (f32: {} bytes, identical: {})",
            sb.len(),
            sa.len(),
            sa == sb
        );
    }
}

/// PSNR of `b` against `a` in dB (8-bit).
fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let se: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let mse = se / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

#[test]
fn precision_follows_the_cpu_and_the_request() {
    assert_eq!(codec(Precision::F32).precision(), Precision::F32);
    let expect = if Precision::bf16_supported() {
        Precision::Bf16
    } else {
        Precision::F32
    };
    assert_eq!(codec(Precision::Bf16).precision(), expect);
}

/// `with_precision` also reaches the shield's trigger generator and recomputes the triggers it
/// keeps: a codec taken to bf16 and back decodes (shielded and full) exactly as a fresh f32
/// codec, and at bf16 its shielded decode differs from f32's only by bf16 rounding.
#[test]
fn the_shield_follows_the_precision_both_ways() {
    let img = image();
    let fresh = codec(Precision::F32);
    let bytes = fresh.encode(&img).unwrap();
    let there = codec(Precision::Bf16Emulated);
    let low = there.decode(&bytes).unwrap();
    let back = there.with_precision(Precision::F32).unwrap();
    assert_eq!(back.decode(&bytes).unwrap(), fresh.decode(&bytes).unwrap());
    assert_eq!(
        back.decode_full(&bytes, &psic::shield::Condition::FULL)
            .unwrap(),
        fresh
            .decode_full(&bytes, &psic::shield::Condition::FULL)
            .unwrap()
    );
    let apart = psnr(&fresh.decode(&bytes).unwrap(), &low);
    assert!(
        apart.is_finite() && apart > 40.0,
        "shielded f32 vs bf16: {apart:.1} dB"
    );
}
