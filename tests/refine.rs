//! Encoder-side latent refinement (`psic::train::refine`): the refined stream is an ordinary
//! stream of the same level, and on a real photo it codes at a lower rate-distortion loss than
//! the plain encode, measured on the actual bytes and the actual full decode.
#![cfg(all(feature = "default-model", feature = "train"))]

use candle_core::Device;
use psic::image_io::load_image;
use psic::metrics::psnr;
use psic::shield::Condition;
use psic::train::refine::{encode_refined, refine_latent, RefineConfig};
use psic::{Codec, Error, ModelFile};

fn default_model() -> ModelFile {
    psic::zoo::default_model(&Device::Cpu).unwrap()
}

/// A 128x96 crop of the bundled Kodak photo (odd sizes pad: 96 is not a multiple of 64).
fn photo() -> psic::image::RgbImage {
    let img = load_image(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/kodim23.png")).unwrap();
    psic::image::imageops::crop_imm(&img, 300, 200, 128, 96).to_image()
}

/// `bpp + λ·255²·MSE` of a stream, from its length and its full decode.
fn rd_loss(codec: &Codec, img: &psic::image::RgbImage, stream: &[u8], lambda: f64) -> f64 {
    let full = codec.decode_full(stream, &Condition::FULL).unwrap();
    let mse = 10f64.powf(-psnr(img, &full).unwrap() / 10.0);
    let bpp = stream.len() as f64 * 8.0 / f64::from(img.width() * img.height());
    bpp + lambda * 255.0 * 255.0 * mse
}

#[test]
fn refined_streams_code_better_and_decode_anywhere() {
    let model = default_model();
    let codec = Codec::from_model_file(&model, &Device::Cpu).unwrap();
    let img = photo();
    let lambda = codec
        .rate_levels()
        .and_then(|l| l.info(codec.level()))
        .unwrap()
        .lambda;
    let plain = codec.encode(&img).unwrap();
    let cfg = RefineConfig {
        steps: 40,
        lr: 0.01,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let refined =
        encode_refined(&model, &codec, &img, &cfg, |i, s| seen.push((i, s.loss))).unwrap();
    assert_eq!(seen.len(), cfg.steps + 1);
    let (before, after) = (
        rd_loss(&codec, &img, &plain, lambda),
        rd_loss(&codec, &img, &refined, lambda),
    );
    assert!(
        after < 0.99 * before,
        "refined {after:.4} vs plain {before:.4}"
    );
    // An ordinary stream: a fresh codec of the same model decodes it, shielded by default.
    let other = Codec::from_model_file(&model, &Device::Cpu).unwrap();
    let shielded = other.decode(&refined).unwrap();
    assert_eq!(shielded.dimensions(), img.dimensions());
    // No steps: the analysis' own latent, so the plain stream.
    let none = RefineConfig { steps: 0, ..cfg };
    let y = refine_latent(&model, &codec, &img, &none, |_, _| {}).unwrap();
    assert_eq!(
        codec.encode_latent(img.width(), img.height(), &y).unwrap(),
        plain
    );
}

#[test]
fn refinement_refuses_a_foreign_model_or_a_bad_setting() {
    let model = default_model();
    let codec = common_tiny_codec();
    let img = photo();
    let err = refine_latent(&model, &codec, &img, &RefineConfig::default(), |_, _| {}).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let codec = Codec::from_model_file(&model, &Device::Cpu).unwrap();
    let bad = RefineConfig {
        lr: f64::NAN,
        ..Default::default()
    };
    let err = refine_latent(&model, &codec, &img, &bad, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("learning rate"), "{err}");
    let small = RefineConfig {
        max_pixels: 128 * 95,
        ..Default::default()
    };
    let err = refine_latent(&model, &codec, &img, &small, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("over its limit"), "{err}");
}

#[test]
fn a_latent_of_the_wrong_shape_is_a_typed_error() {
    let codec = Codec::from_model_file(&default_model(), &Device::Cpu).unwrap();
    let img = photo();
    let y = codec.analyse(&img).unwrap();
    let err = codec
        .encode_latent(img.width() + 64, img.height(), &y)
        .unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    let err = codec.encode_latent(0, img.height(), &y).unwrap_err();
    assert!(matches!(err, Error::Image(_)), "{err}");
    // Non-finite or huge latents: an error or a stream that decodes, never a panic.
    for v in [f32::NAN, f32::INFINITY, -1e30, 1e30] {
        let bad = (y.ones_like().unwrap() * f64::from(v)).unwrap();
        if let Ok(bytes) = codec.encode_latent(img.width(), img.height(), &bad) {
            let _ = codec.decode(&bytes);
        }
    }
}

fn common_tiny_codec() -> Codec {
    let model = ModelFile::initialize(
        psic::model::Architecture::ScaleHyperprior(psic::backbone::ScaleHyperpriorConfig {
            n: 8,
            m: 12,
        }),
        1,
        &Device::Cpu,
    )
    .unwrap();
    Codec::from_model_file(&model, &Device::Cpu).unwrap()
}
