//! Quality levels (issue 18): per-level channel gains on the latent, written into the stream
//! header, refused with typed errors where they do not match, fitted with the `train` module.
//!
//! The tests take one lock: the thread-count test changes the process environment.

mod common;

use std::sync::{Mutex, MutexGuard};

use candle_core::Device;
use common::*;
use psic::backbone::{MeanScaleHyperpriorConfig, ScaleHyperpriorConfig};
use psic::bitstream::{Bitstream, EntropyPath};
use psic::model::Architecture;
use psic::rate::RateLevels;
use psic::shield::Condition;
use psic::{Codec, Error, ModelFile, Precision};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PATHS: [EntropyPath; 2] = [EntropyPath::Float, EntropyPath::Portable];

/// Tiny untrained models of both families (N 8, M 12).
fn tiny_models() -> Vec<ModelFile> {
    let dev = Device::Cpu;
    vec![
        ModelFile::initialize(
            Architecture::ScaleHyperprior(ScaleHyperpriorConfig { n: 8, m: 12 }),
            3,
            &dev,
        )
        .unwrap(),
        ModelFile::initialize(
            Architecture::MeanScaleHyperprior(MeanScaleHyperpriorConfig { n: 8, m: 12 }),
            4,
            &dev,
        )
        .unwrap(),
    ]
}

/// Per-channel gains `base · (1 + 0.1·(c mod 5))` for `m` channels.
fn gains(m: usize, base: f32) -> Vec<f32> {
    (0..m)
        .map(|c| base * (1.0 + 0.1 * (c % 5) as f32))
        .collect()
}

fn with_levels(model: &ModelFile, levels: Vec<Vec<f32>>) -> ModelFile {
    let levels = RateLevels::new(levels, vec![]).unwrap();
    model.with_rate_levels(Some(&levels)).unwrap()
}

fn codec(model: &ModelFile) -> Codec {
    Codec::from_model_file(model, &Device::Cpu)
        .unwrap()
        .with_precision(Precision::F32)
        .unwrap()
}

fn m_of(model: &ModelFile) -> usize {
    codec(model).backbone().latent_channels()
}

#[test]
fn unit_level_is_bit_identical_to_the_single_rate_model() {
    let _g = serial();
    let img = test_image(96, 72);
    for model in tiny_models() {
        let m = m_of(&model);
        let levelled = with_levels(&model, vec![vec![1.0; m], gains(m, 2.0)]);
        assert_eq!(
            levelled.fingerprint().unwrap(),
            model.fingerprint().unwrap()
        );
        for path in PATHS {
            let plain = codec(&model).with_entropy_path(path);
            let unit = codec(&levelled).with_entropy_path(path);
            assert_eq!(unit.levels(), 2);
            let (a, b) = (plain.encode(&img).unwrap(), unit.encode(&img).unwrap());
            let (sa, sb) = (
                Bitstream::from_bytes(&a).unwrap(),
                Bitstream::from_bytes(&b).unwrap(),
            );
            assert_eq!(sa.strings, sb.strings, "{path:?}");
            assert_eq!((sa.level, sb.version()), (None, 3));
            assert_eq!(plain.decode(&a).unwrap(), unit.decode(&b).unwrap());
            // The levelled model still reads the model's level-less streams (same fingerprint).
            assert_eq!(unit.decode(&a).unwrap(), plain.decode(&a).unwrap());
        }
    }
}

#[test]
fn level_round_trips_through_the_header_and_scales_the_latent() {
    let _g = serial();
    let img = test_image(64, 64);
    for model in tiny_models() {
        let m = m_of(&model);
        let g = [gains(m, 0.5), gains(m, 1.0), gains(m, 3.0)];
        let levelled = with_levels(&model, g.to_vec());
        for path in PATHS {
            for (l, gl) in g.iter().enumerate() {
                let c = codec(&levelled)
                    .with_entropy_path(path)
                    .with_level(l)
                    .unwrap();
                let bytes = c.encode(&img).unwrap();
                let s = Bitstream::from_bytes(&bytes).unwrap();
                assert_eq!(s.level.map(|v| v.index), Some(l as u8));
                assert_eq!(s.entropy_path, path);
                // Decoding follows the stream, whatever level the decoder encodes at.
                let latent = codec(&levelled).decode_latent(&bytes).unwrap();
                if model.architecture.name() == "mbt2018-mean" {
                    continue;
                }
                let y = f32s(&latent.y_hat);
                let plane = y.len() / m;
                // Zero-mean model: every y_hat is a whole multiple of its channel's step 1/g.
                for (i, v) in y.iter().enumerate() {
                    let q = v * gl[i / plane];
                    assert!(
                        (q - q.round()).abs() < 1e-3,
                        "level {l}: {v} · {}",
                        gl[i / plane]
                    );
                }
            }
        }
    }
}

#[test]
fn the_model_default_level_is_what_a_codec_writes() {
    let _g = serial();
    let img = test_image(64, 64);
    let model = &tiny_models()[0];
    let m = m_of(model);
    let levels = RateLevels::new(vec![gains(m, 0.5), gains(m, 1.0), gains(m, 3.0)], vec![])
        .unwrap()
        .with_default_level(2)
        .unwrap();
    let levelled = model.with_rate_levels(Some(&levels)).unwrap();
    let path = std::env::temp_dir().join(format!("psic-levels-{}.st", std::process::id()));
    levelled.save(&path).unwrap();
    let loaded = ModelFile::load(&path, &Device::Cpu).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded.rate_levels().unwrap().unwrap().default_level(), 2);
    let c = codec(&loaded);
    assert_eq!(c.level(), 2);
    let bytes = c.encode(&img).unwrap();
    let header = Bitstream::from_bytes(&bytes).unwrap().level;
    assert_eq!(header.map(|v| v.index), Some(2));
    // An explicit level still wins, and a level the model lacks cannot be the default.
    assert_eq!(c.with_level(0).unwrap().level(), 0);
    assert!(matches!(
        levels.with_default_level(3),
        Err(Error::UnknownLevel {
            level: 3,
            levels: 3
        })
    ));
}

#[test]
fn missing_levels_and_other_gains_are_typed_errors() {
    let _g = serial();
    let img = test_image(64, 64);
    let model = tiny_models().remove(0);
    let m = m_of(&model);
    let three = with_levels(&model, vec![gains(m, 0.5), gains(m, 1.0), gains(m, 2.0)]);
    let two = with_levels(&model, vec![gains(m, 0.5), gains(m, 1.0)]);
    let other = with_levels(&model, vec![gains(m, 0.5), gains(m, 1.1), gains(m, 2.0)]);
    let bytes = codec(&three).with_level(2).unwrap().encode(&img).unwrap();
    let err = codec(&two).decode(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownLevel {
                level: 2,
                levels: 2
            }
        ),
        "{err}"
    );
    let err = codec(&model).decode(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownLevel {
                level: 2,
                levels: 1
            }
        ),
        "{err}"
    );
    let at1 = codec(&three).with_level(1).unwrap().encode(&img).unwrap();
    let err = codec(&other).decode(&at1).unwrap_err();
    assert!(matches!(err, Error::LevelMismatch { level: 1 }), "{err}");
    // The levels the two models share still decode.
    assert!(codec(&other).decode(&bytes).is_ok());
    assert!(codec(&two).decode(&at1).is_ok());
    let err = codec(&three).with_level(3).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownLevel {
                level: 3,
                levels: 3
            }
        ),
        "{err}"
    );
    assert!(matches!(
        codec(&model).with_level(1),
        Err(Error::UnknownLevel {
            level: 1,
            levels: 1
        })
    ));
    // Another base model is still a model mismatch.
    let foreign = with_levels(&tiny_models().remove(1), vec![gains(12, 1.0); 3]);
    assert!(matches!(
        codec(&foreign).decode(&bytes),
        Err(Error::ModelMismatch { .. })
    ));
    // Gains with the wrong channel count or out of range do not load.
    let mut bad = three.clone();
    bad.tensors.insert(
        "rate.gains".into(),
        candle_core::Tensor::ones((2, m + 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        Codec::from_model_file(&bad, &Device::Cpu),
        Err(Error::Model(_))
    ));
}

/// The CompressAI fixture (a trained scale hyperprior) with levels of uniform gains, and a
/// 256x192 crop of its test image.
fn fixture_levels(gain_list: &[f32]) -> Option<(ModelFile, image::RgbImage)> {
    let dir = fixture_dir("compressai")?;
    let model = ModelFile::import(
        dir.join("hyperprior_128_192.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let img = psic::image_io::load_image(dir.join("test768x512.png")).unwrap();
    let img = image::imageops::crop_imm(&img, 256, 128, 256, 192).to_image();
    let levels = gain_list.iter().map(|&g| vec![g; 192]).collect();
    Some((with_levels(&model, levels), img))
}

#[test]
fn larger_gains_cost_more_bytes_and_give_higher_psnr() {
    let _g = serial();
    let Some((model, img)) = fixture_levels(&[0.5, 1.0, 2.0]) else {
        return;
    };
    let mut last = (0usize, 0f64);
    for l in 0..3 {
        let c = codec(&model).with_level(l).unwrap();
        let bytes = c.encode(&img).unwrap();
        let psnr = psic::metrics::psnr(&img, &c.decode(&bytes).unwrap()).unwrap();
        eprintln!("level {l}: {} bytes, {psnr:.2} dB", bytes.len());
        assert!(bytes.len() > last.0 && psnr > last.1, "level {l}");
        last = (bytes.len(), psnr);
    }
}

fn set_threads(n: Option<usize>) {
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        match n {
            Some(n) => std::env::set_var(var, n.to_string()),
            None => std::env::remove_var(var),
        }
    }
}

#[test]
fn portable_level_streams_decode_identically_at_1_and_3_threads() {
    let _g = serial();
    let Some((model, img)) = fixture_levels(&[0.6, 1.7]) else {
        return;
    };
    let m = 192;
    let model = with_levels(&model, vec![gains(m, 0.6), gains(m, 1.7)]);
    for l in 0..2 {
        let bytes = codec(&model).with_level(l).unwrap().encode(&img).unwrap();
        let mut decoded = Vec::new();
        for threads in [1, 3] {
            set_threads(Some(threads));
            let latent = codec(&model).decode_latent(&bytes).unwrap();
            decoded.push((latent.y_indexes, f32s(&latent.y_hat)));
        }
        set_threads(None);
        assert!(
            decoded[0] == decoded[1],
            "level {l}: 1 and 3 threads differ"
        );
    }
}

#[test]
fn shielded_and_full_decodes_work_at_every_level() {
    let _g = serial();
    let img = test_image(64, 64);
    let model = tiny_models().remove(0);
    let m = m_of(&model);
    let plain = with_levels(&model, vec![gains(m, 0.5), gains(m, 2.0)]);
    let shielded = plain.with_new_cltg(7, &Device::Cpu).unwrap();
    let (p, s) = (codec(&plain), codec(&shielded));
    let c = s.conditions().unwrap();
    assert_eq!(s.levels(), 2);
    for l in 0..2 {
        let bytes = codec(&shielded)
            .with_level(l)
            .unwrap()
            .encode(&img)
            .unwrap();
        assert_eq!(
            bytes,
            codec(&plain).with_level(l).unwrap().encode(&img).unwrap()
        );
        let full = s.decode_full(&bytes, &c.full).unwrap();
        let shielded_img = s.decode_shielded(&bytes).unwrap();
        assert_eq!(full, p.decode_full(&bytes, &Condition::FULL).unwrap());
        assert_eq!(shielded_img.dimensions(), (64, 64));
        assert_eq!(s.decode(&bytes).unwrap(), shielded_img);
    }
}

#[cfg(feature = "train")]
#[test]
fn fitting_moves_gains_with_lambda() {
    use psic::train::rates::{fit_rate_levels, RateFitConfig};
    let _g = serial();
    let Some(dir) = fixture_dir("compressai") else {
        return;
    };
    let model = ModelFile::import(
        dir.join("hyperprior_128_192.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let files = vec![dir.join("test768x512.png")];
    let mut sampler = psic::data::CropSampler::new(&files, 64, 1).unwrap();
    let cfg = RateFitConfig {
        lambdas: vec![0.0002, 0.2],
        steps: 4,
        batch: 2,
        lr: 0.05,
        seed: 1,
        reference_lambda: None,
    };
    let mut seen = Vec::new();
    let levels = fit_rate_levels(&model, &mut sampler, &cfg, &Device::Cpu, |_, s| {
        seen.push(s.to_vec())
    })
    .unwrap();
    assert_eq!((levels.len(), seen.len()), (2, 4));
    let mean_log = |l: usize| {
        let g = levels.gains(l).unwrap();
        g.iter().map(|v| v.ln()).sum::<f32>() / g.len() as f32
    };
    eprintln!("mean log gains {} {}", mean_log(0), mean_log(1));
    assert!(mean_log(0) < 0.0 && mean_log(1) > 0.0);
    assert_eq!(levels.info(1).map(|i| i.lambda), Some(0.2));
    // The fitted levels load and code: the higher λ costs more.
    let fitted = model.with_rate_levels(Some(&levels)).unwrap();
    let img = test_image(128, 128);
    let len = |l: usize| {
        codec(&fitted)
            .with_level(l)
            .unwrap()
            .encode(&img)
            .unwrap()
            .len()
    };
    assert!(len(0) < len(1));
}

/// The shipped default model carries its quality levels (issue 18): at least three, ordered by
/// λ, its default level neither end, and on a Kodak crop each higher level spends more bytes for
/// a better full decode; every stream names its level and decodes both ways.
#[cfg(feature = "default-model")]
#[test]
fn the_default_model_has_ordered_quality_levels() {
    let _g = serial();
    let dev = Device::Cpu;
    let model = psic::zoo::default_model(&dev).unwrap();
    let levels = model
        .rate_levels()
        .unwrap()
        .expect("the default model has quality levels");
    assert!(levels.len() >= 3, "{} levels", levels.len());
    let d = levels.default_level();
    assert!(d > 0 && d + 1 < levels.len(), "default level {d}");
    let img = image::open(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/kodim23.png"))
        .unwrap()
        .to_rgb8();
    let img = image::imageops::crop_imm(&img, 256, 128, 256, 256).to_image();
    let codec = Codec::from_model_file(&model, &dev).unwrap();
    assert_eq!(codec.level(), d);
    let full = codec.conditions().expect("a shielded model").full;
    let mut last: Option<(usize, f64, f64)> = None;
    for level in 0..levels.len() {
        let lambda = levels.info(level).map(|i| i.lambda);
        let c = Codec::from_model_file(&model, &dev)
            .unwrap()
            .with_level(level)
            .unwrap();
        let bytes = c.encode(&img).unwrap();
        let header = Bitstream::from_bytes(&bytes).unwrap().level;
        assert_eq!(header.map(|v| usize::from(v.index)), Some(level));
        let psnr = psic::metrics::psnr(&img, &codec.decode_full(&bytes, &full).unwrap()).unwrap();
        let shielded = codec.decode_shielded(&bytes).unwrap();
        assert_eq!(shielded.dimensions(), img.dimensions());
        let lambda = lambda.expect("each level names its lambda");
        if let Some((n, p, l)) = last {
            assert!(lambda > l, "level {level}: lambda {lambda} after {l}");
            assert!(
                bytes.len() > n,
                "level {level}: {} bytes after {n}",
                bytes.len()
            );
            assert!(psnr > p, "level {level}: {psnr:.2} dB after {p:.2}");
        }
        last = Some((bytes.len(), psnr, lambda));
    }
}
