//! The mean-scale hyperprior `mbt2018-mean`: conformance with CompressAI's own
//! `MeanScaleHyperprior(64, 96)` (transforms, symbols, strings and reconstructions of
//! `../shared/fixtures/compressai-mean`, made by CompressAI 1.2.8, not by us), and the rest of
//! psic with it: the codec on both entropy paths, shielding, training and damaged input.
//!
//! Tolerances: float values (`y`, `z`, scales, means) are compared by the largest absolute
//! difference over the largest reference magnitude (`max_rel_diff`), at most 1e-4; `x_hat` by
//! the largest absolute difference on the `[0, 1]` scale, at most 1e-4; integers (symbols, table
//! indexes) and strings exactly.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use psic::backbone::MeanScaleHyperpriorConfig;
use psic::bitstream::{Bitstream, EntropyPath};
use psic::model::Architecture;
use psic::{Codec, Error, ModelFile, Precision};

/// Float tolerance of the transforms (see the module docs).
const TOL: f32 = 1e-4;

type Fixture = CompressAiFixture;

fn fixture() -> Option<Fixture> {
    let f = compressai_fixture("compressai-mean", "mean_scale_64_96.safetensors", 15_624)?;
    assert_eq!(f.z_string.len(), 2_888);
    Some(f)
}

fn f32_codec(model: &ModelFile) -> Codec {
    Codec::from_model_file(model, &Device::Cpu)
        .unwrap()
        .with_precision(Precision::F32)
        .unwrap()
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{name} shape");
    let (got, want) = (f32s(got), f32s(want));
    let rel = max_rel_diff(&got, &want);
    eprintln!(
        "{name}: max abs diff {:e}, relative {rel:e}",
        max_abs_diff(&got, &want)
    );
    assert!(rel < TOL, "{name} relative error {rel}");
}

/// `round(v)` with ties to even, as PyTorch's `torch.round`.
fn round_even(v: f32) -> i32 {
    v.round_ties_even() as i32
}

#[test]
fn checkpoint_imports_as_mbt2018_mean() {
    let Some(f) = fixture() else { return };
    let cfg = MeanScaleHyperpriorConfig { n: 64, m: 96 };
    assert_eq!(f.model.architecture, Architecture::MeanScaleHyperprior(cfg));
    assert_eq!(f.model.architecture.name(), "mbt2018-mean");
    assert!(Architecture::NAMES.contains(&"mbt2018-mean"));
    let b = f.codec.backbone();
    assert_eq!(b.architecture(), "mbt2018-mean");
    assert_eq!((b.hyper_channels(), b.latent_channels()), (64, 96));
    assert_eq!(b.injection_points(), vec![64; 3]);
    // The architecture can be named, and naming another is refused.
    let dir = fixture_dir("compressai-mean").unwrap();
    let path = dir.join("mean_scale_64_96.safetensors");
    let named = ModelFile::import(&path, Some("mbt2018-mean"), &Device::Cpu).unwrap();
    assert_eq!(named.fingerprint().unwrap(), f.model.fingerprint().unwrap());
    let wrong = ModelFile::import(&path, Some("bmshj2018-hyperprior"), &Device::Cpu).unwrap_err();
    assert!(matches!(wrong, Error::Model(_)), "{wrong}");
    // The model file round-trips with its architecture and configuration.
    let loaded = ModelFile::from_bytes(&f.model.to_bytes().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(loaded.architecture, f.model.architecture);
    assert_eq!(
        loaded.fingerprint().unwrap(),
        f.model.fingerprint().unwrap()
    );
    assert_eq!(
        Architecture::from_name_and_config("mbt2018-mean", r#"{"n":64,"m":96}"#).unwrap(),
        f.model.architecture
    );
}

#[test]
fn transforms_match_compressai() {
    let Some(f) = fixture() else { return };
    let b = f.codec.backbone();
    let x = psic::image_io::image_to_tensor(&f.image, &Device::Cpu).unwrap();
    assert_close("y", &b.analysis(&x).unwrap(), &f.refs["y"]);
    assert_close("z", &b.hyper_analysis(&f.refs["y"]).unwrap(), &f.refs["z"]);
    let params = b.hyper_synthesis(&f.refs["z_hat"]).unwrap();
    assert_close("scales_hat", &params.scales, &f.refs["scales_hat"]);
    let means = params.means.expect("the mean-scale h_s predicts means");
    assert_close("means_hat", &means, &f.refs["means_hat"]);
    let x_hat = b
        .synthesis(&f.refs["y_hat"], None)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let abs = max_abs_diff(&f32s(&x_hat), &f32s(&f.refs["x_hat"]));
    eprintln!("x_hat: max abs diff {abs:e}");
    assert!(abs < TOL, "x_hat max abs error {abs}");
}

#[test]
fn symbols_indexes_and_y_hat_match_compressai() {
    let Some(f) = fixture() else { return };
    let b = f.codec.backbone();
    let eb = b.entropy_bottleneck();
    assert_eq!(
        eb.symbols(&f.refs["z"]).unwrap(),
        i32s(&f.refs["z_symbols"])
    );
    assert_eq!(
        f32s(&eb.quantize(&f.refs["z"]).unwrap()),
        f32s(&f.refs["z_hat"])
    );
    let gc = b.gaussian_conditional();
    let (scales, means) = (&f.refs["scales_hat"], &f.refs["means_hat"]);
    assert_eq!(
        gc.build_indexes(scales).unwrap(),
        i32s(&f.refs["y_indexes"])
    );
    // The symbols are round(y - means), and y_hat = round(y - means) + means.
    let symbols = gc.symbols(&f.refs["y"], Some(means)).unwrap();
    assert_eq!(symbols, i32s(&f.refs["y_symbols"]));
    let y_hat: Vec<f32> = symbols
        .iter()
        .zip(f32s(means))
        .map(|(&s, m)| s as f32 + m)
        .collect();
    assert_eq!(y_hat, f32s(&f.refs["y_hat"]));
    let y = f32s(&f.refs["y"]);
    let by_hand: Vec<i32> = y
        .iter()
        .zip(f32s(means))
        .map(|(&y, m)| round_even(y - m))
        .collect();
    assert_eq!(by_hand, symbols);
}

#[test]
fn portable_hyper_synthesis_picks_compressai_tables() {
    let Some(f) = fixture() else { return };
    let b = f.codec.backbone();
    let p = b
        .hyper_synthesis_portable(&f.refs["z_hat"])
        .unwrap()
        .expect("mbt2018-mean has a portable h_s");
    assert_eq!(p.shape, (1, 96, 32, 48));
    let means = p.means.clone().expect("portable means");
    let (ref_scales, ref_means) = (f32s(&f.refs["scales_hat"]), f32s(&f.refs["means_hat"]));
    let differing = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count()
    };
    eprintln!(
        "portable scales: {} of {} differ from CompressAI's in some bit (max relative {:e}); \
         means: {} (max relative {:e})",
        differing(&p.scales, &ref_scales),
        ref_scales.len(),
        max_rel_diff(&p.scales, &ref_scales),
        differing(&means, &ref_means),
        max_rel_diff(&means, &ref_means),
    );
    assert!(max_rel_diff(&p.scales, &ref_scales) < TOL);
    assert!(max_rel_diff(&means, &ref_means) < TOL);
    let gc = b.gaussian_conditional();
    assert_eq!(gc.indexes_of(&p.scales), i32s(&f.refs["y_indexes"]));
    // The symbols from the portable means are CompressAI's too (for this image: a mean within
    // rounding of a half-integer away from y could round the other way).
    let y = f32s(&f.refs["y"]);
    let symbols: Vec<i32> = y
        .iter()
        .zip(&means)
        .map(|(&y, &m)| round_even(y - m))
        .collect();
    assert_eq!(symbols, i32s(&f.refs["y_symbols"]));
}

/// The float path (CompressAI's own computation) gives CompressAI's strings byte for byte.
#[test]
fn encoded_strings_are_byte_identical_to_compressai() {
    let Some(f) = fixture() else { return };
    let float = f32_codec(&f.model).with_entropy_path(EntropyPath::Float);
    let bytes = float.encode(&f.image).unwrap();
    let stream = Bitstream::from_bytes(&bytes).unwrap();
    assert_eq!(stream.entropy_path, EntropyPath::Float);
    assert_eq!((stream.width, stream.height), (768, 512));
    assert_eq!(stream.y_shape, [96, 32, 48]);
    assert_eq!(stream.z_shape, [64, 8, 12]);
    assert_eq!(stream.strings[0].len(), f.y_string.len());
    assert!(stream.strings[0] == f.y_string, "y string differs");
    assert!(stream.strings[1] == f.z_string, "z string differs");
}

/// The portable path (the default) picks CompressAI's tables and codes its z string byte for
/// byte; from CompressAI's `y` its means give CompressAI's y string byte for byte too. From
/// psic's own `y` (within 2e-6 of PyTorch's) a symbol whose `y − mean` lies within float
/// rounding of a half-integer may round the other way: such symbols, and only such, differ.
#[test]
fn portable_strings_match_compressai_but_for_half_integer_ties() {
    let Some(f) = fixture() else { return };
    let bytes = f.codec.encode(&f.image).unwrap();
    let stream = Bitstream::from_bytes(&bytes).unwrap();
    assert_eq!(stream.entropy_path, EntropyPath::Portable);
    assert!(stream.strings[1] == f.z_string, "z string differs");
    let b = f.codec.backbone();
    let p = b
        .hyper_synthesis_portable(&f.refs["z_hat"])
        .unwrap()
        .unwrap();
    let gc = b.gaussian_conditional();
    let indexes = gc.indexes_of(&p.scales);
    let means = Tensor::from_vec(p.means.clone().unwrap(), p.shape, &Device::Cpu).unwrap();
    let from_ref_y = gc
        .compress(
            &f.refs["y"],
            &indexes,
            Some(&means),
            &psic::entropy::RansCoder,
        )
        .unwrap();
    assert!(
        from_ref_y[0] == f.y_string,
        "y string from CompressAI's y differs"
    );
    // The symbols of psic's own stream against CompressAI's.
    let latent = f.codec.decode_latent(&bytes).unwrap();
    assert_eq!(latent.y_indexes, i32s(&f.refs["y_indexes"]));
    let means = p.means.unwrap();
    let (y, ref_means) = (f32s(&f.refs["y"]), f32s(&f.refs["means_hat"]));
    let refs = i32s(&f.refs["y_symbols"]);
    let mut differing = 0;
    for (i, (&v, &m)) in f32s(&latent.y_hat).iter().zip(&means).enumerate() {
        let symbol = round_even(v - m);
        if symbol != refs[i] {
            differing += 1;
            let d = y[i] - ref_means[i];
            let tie = (d - d.floor() - 0.5).abs();
            eprintln!(
                "symbol {i}: {symbol} vs CompressAI's {} (y - mean = {d})",
                refs[i]
            );
            assert!((symbol - refs[i]).abs() == 1 && tie < 1e-5, "symbol {i}");
        }
    }
    eprintln!(
        "portable stream: {differing} of {} symbols differ from CompressAI's; y string {} \
         bytes (CompressAI's {})",
        refs.len(),
        stream.strings[0].len(),
        f.y_string.len()
    );
    assert!(differing <= 8, "{differing} symbols differ");
}

/// CompressAI's strings in a psic container on `path`.
fn compressai_stream(f: &Fixture, path: EntropyPath) -> Vec<u8> {
    Bitstream {
        fingerprint: *f.codec.fingerprint(),
        width: 768,
        height: 512,
        pad_right: 0,
        pad_bottom: 0,
        y_shape: [96, 32, 48],
        z_shape: [64, 8, 12],
        entropy_path: path,
        level: None,
        strings: vec![f.y_string.clone(), f.z_string.clone()],
    }
    .to_bytes()
    .unwrap()
}

#[test]
fn decodes_compressai_strings() {
    let Some(f) = fixture() else { return };
    let b = f.codec.backbone();
    let ref_y_hat = f32s(&f.refs["y_hat"]);
    for path in [EntropyPath::Float, EntropyPath::Portable] {
        let latent = f.codec.decode_latent(&compressai_stream(&f, path)).unwrap();
        assert_eq!(latent.y_indexes, i32s(&f.refs["y_indexes"]), "{path:?}");
        // y_hat = symbols + means: the symbols exactly CompressAI's, the means ours (equal to
        // CompressAI's within f32 rounding of h_s).
        let means = match path {
            EntropyPath::Float => {
                f32s(&b.hyper_synthesis(&f.refs["z_hat"]).unwrap().means.unwrap())
            }
            _ => b
                .hyper_synthesis_portable(&f.refs["z_hat"])
                .unwrap()
                .unwrap()
                .means
                .unwrap(),
        };
        let y_hat = f32s(&latent.y_hat);
        let symbols: Vec<i32> = y_hat
            .iter()
            .zip(&means)
            .map(|(&v, &m)| round_even(v - m))
            .collect();
        assert_eq!(symbols, i32s(&f.refs["y_symbols"]), "{path:?}");
        let exact: Vec<f32> = symbols
            .iter()
            .zip(&means)
            .map(|(&s, &m)| s as f32 + m)
            .collect();
        assert_eq!(y_hat, exact, "{path:?}: y_hat is not symbols + means");
        let abs = max_abs_diff(&y_hat, &ref_y_hat);
        eprintln!("{path:?}: y_hat max abs diff from CompressAI's {abs:e}");
        assert!(max_rel_diff(&y_hat, &ref_y_hat) < TOL, "{path:?}");
        let x_hat = f
            .codec
            .synthesize(&latent, &psic::shield::Condition::FULL)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let abs = max_abs_diff(&f32s(&x_hat), &f32s(&f.refs["x_hat"]));
        eprintln!("{path:?}: x_hat max abs diff {abs:e}");
        assert!(abs < TOL, "{path:?}: x_hat max abs error {abs}");
    }
}

/// A small crop of the fixture image (the whole image is slow under a debug build).
fn crop(f: &Fixture, w: u32, h: u32) -> image::RgbImage {
    image::imageops::crop_imm(&f.image, 200, 150, w, h).to_image()
}

#[test]
fn codec_round_trip_on_the_portable_path() {
    let Some(f) = fixture() else { return };
    // Default precision (bf16 transforms where the CPU has them): the stream still decodes to
    // exactly the encoder's y_hat.
    let codec = Codec::from_model_file(&f.model, &Device::Cpu).unwrap();
    assert_eq!(codec.entropy_path(), EntropyPath::Portable);
    let img = crop(&f, 200, 130);
    let bytes = codec.encode(&img).unwrap();
    let stream = Bitstream::from_bytes(&bytes).unwrap();
    assert_eq!(stream.entropy_path, EntropyPath::Portable);
    let latent = codec.decode_latent(&bytes).unwrap();
    // The encoder's side, by hand: y of the padded image, the portable means and tables.
    let b = codec.backbone();
    let x = psic::image_io::image_to_tensor(&img, &Device::Cpu).unwrap();
    let (x, _, _) = psic::image_io::pad_to_multiple(&x, 64).unwrap();
    let y = b.analysis(&x).unwrap();
    let z_hat = b
        .entropy_bottleneck()
        .quantize(&b.hyper_analysis(&y).unwrap())
        .unwrap();
    let p = b.hyper_synthesis_portable(&z_hat).unwrap().unwrap();
    assert_eq!(
        latent.y_indexes,
        b.gaussian_conditional().indexes_of(&p.scales)
    );
    let means = p.means.unwrap();
    let want: Vec<f32> = f32s(&y)
        .iter()
        .zip(&means)
        .map(|(&y, &m)| round_even(y - m) as f32 + m)
        .collect();
    assert_eq!(f32s(&latent.y_hat), want);
    let out = codec.decode(&bytes).unwrap();
    assert_eq!(out.dimensions(), (200, 130));
    let psnr = psic::metrics::psnr(&img, &out).unwrap();
    eprintln!(
        "mbt2018-mean crop: {} bytes, PSNR {psnr:.2} dB",
        bytes.len()
    );
    assert!(psnr > 14.0, "PSNR {psnr}");
}

#[test]
fn shielded_mean_scale_keeps_the_stream_and_the_full_decode() {
    let Some(f) = fixture() else { return };
    let wrapped = f.model.with_new_cltg(7, &Device::Cpu).unwrap();
    // Through model-file bytes, as users get it.
    let wrapped = ModelFile::from_bytes(&wrapped.to_bytes().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(
        wrapped.fingerprint().unwrap(),
        f.model.fingerprint().unwrap()
    );
    let plain = Codec::from_model_file(&f.model, &Device::Cpu).unwrap();
    let shielded = Codec::from_model_file(&wrapped, &Device::Cpu).unwrap();
    assert!(plain.conditions().is_none());
    let c = shielded.conditions().unwrap();
    let img = crop(&f, 200, 136);
    // Shielding lives in the decoder only: identical bytes, fingerprint included.
    let bytes = plain.encode(&img).unwrap();
    assert_eq!(shielded.encode(&img).unwrap(), bytes);
    // The full decode of the wrapped model is exactly the plain model's decode...
    let latent = shielded.decode_latent(&bytes).unwrap();
    let full = shielded.synthesize(&latent, &c.full).unwrap();
    let reference = plain
        .synthesize(&latent, &psic::shield::Condition::FULL)
        .unwrap();
    assert_eq!(f32s(&full), f32s(&reference));
    assert_eq!(
        shielded.decode_full(&bytes, &c.full).unwrap(),
        plain.decode(&bytes).unwrap()
    );
    // ...and the shielded decode is a different image from the same stream.
    let sh = shielded.synthesize(&latent, &c.shielded).unwrap();
    assert!(max_abs_diff(&f32s(&sh), &f32s(&full)) > 1e-3);
    assert_eq!(
        shielded.decode(&bytes).unwrap(),
        shielded.decode_shielded(&bytes).unwrap()
    );
    assert!(plain.decode_shielded(&bytes).is_err());
}

/// A tiny, freshly initialised mean-scale model (N=8, M=12): no fixture needed.
fn tiny_model(seed: u64) -> ModelFile {
    let arch = Architecture::MeanScaleHyperprior(MeanScaleHyperpriorConfig { n: 8, m: 12 });
    ModelFile::initialize(arch, seed, &Device::Cpu).unwrap()
}

#[test]
fn tiny_model_codes_on_both_paths_and_shields() {
    let model = tiny_model(5);
    let loaded = ModelFile::from_bytes(&model.to_bytes().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(loaded.architecture.name(), "mbt2018-mean");
    // Another architecture with the same size has another fingerprint.
    let scale = ModelFile::initialize(
        Architecture::ScaleHyperprior(psic::backbone::ScaleHyperpriorConfig { n: 8, m: 12 }),
        5,
        &Device::Cpu,
    )
    .unwrap();
    assert_ne!(scale.fingerprint().unwrap(), model.fingerprint().unwrap());
    let img = test_image(100, 70);
    for path in [EntropyPath::Portable, EntropyPath::Float] {
        let codec = Codec::from_model_file(&loaded, &Device::Cpu)
            .unwrap()
            .with_entropy_path(path);
        let bytes = codec.encode(&img).unwrap();
        assert_eq!(Bitstream::from_bytes(&bytes).unwrap().entropy_path, path);
        let out = codec.decode(&bytes).unwrap();
        assert_eq!(out.dimensions(), (100, 70));
        // In row strips (one latent row a strip), the same stream and the same image.
        let strips = Codec::from_model_file(&loaded, &Device::Cpu)
            .unwrap()
            .with_entropy_path(path)
            .with_tile_pixels(1);
        assert_eq!(strips.encode(&img).unwrap(), bytes);
        assert_eq!(strips.decode(&bytes).unwrap(), out);
    }
    let shielded =
        Codec::from_model_file(&model.with_new_cltg(2, &Device::Cpu).unwrap(), &Device::Cpu)
            .unwrap();
    let plain = Codec::from_model_file(&model, &Device::Cpu).unwrap();
    let bytes = plain.encode(&img).unwrap();
    let c = shielded.conditions().unwrap();
    assert_eq!(
        shielded.decode_full(&bytes, &c.full).unwrap(),
        plain.decode(&bytes).unwrap()
    );
    assert_ne!(
        shielded.decode_shielded(&bytes).unwrap(),
        plain.decode(&bytes).unwrap()
    );
}

/// Recomputes the trailing CRC so that damage reaches the header checks and the rANS decoder.
fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Damaged mean-scale streams, on both entropy paths, are typed errors or (damage the CRC
/// cannot see, in the payload) images of the declared size: never a panic.
#[test]
fn corrupted_mean_scale_streams_are_errors_not_panics() {
    let model = tiny_model(1);
    for path in [EntropyPath::Portable, EntropyPath::Float] {
        let codec = Codec::from_model_file(&model, &Device::Cpu)
            .unwrap()
            .with_entropy_path(path);
        let good = codec.encode(&test_image(100, 70)).unwrap();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut rejected = 0;
        for case in 0..200 {
            let mut b = good.clone();
            match case % 4 {
                0 => b.truncate(rng.below(good.len())),
                1 => {
                    for _ in 0..1 + rng.below(8) {
                        let i = rng.below(b.len());
                        b[i] ^= 1 << rng.below(8);
                    }
                }
                2 => b.extend((0..1 + rng.below(16)).map(|_| rng.next() as u8)),
                _ => {
                    // The entropy-coded payload, behind a valid container.
                    let start = 64 + rng.below(b.len() - 68);
                    for _ in 0..1 + rng.below(4) {
                        let i = start + rng.below(b.len() - 4 - start);
                        b[i] = rng.next() as u8;
                    }
                    fix_crc(&mut b);
                }
            }
            if b == good {
                continue;
            }
            match codec.decode(&b) {
                Err(_) => rejected += 1,
                Ok(img) => {
                    assert_eq!(
                        case % 4,
                        3,
                        "{path:?} case {case}: corrupted stream decoded"
                    );
                    assert_eq!(img.dimensions(), (100, 70));
                }
            }
        }
        assert!(rejected >= 150, "{path:?}: only {rejected} of 200 rejected");
    }
}

/// Checkpoints that look like a mean-scale hyperprior but are not one are refused with typed
/// errors.
#[test]
fn malformed_mean_scale_checkpoints_are_refused() {
    let dir = std::env::temp_dir().join(format!("psic-mean-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ckpt.safetensors");
    let model = tiny_model(3);
    let save = |tensors: &std::collections::HashMap<String, Tensor>| {
        candle_core::safetensors::save(tensors, &path).unwrap();
    };
    // h_s ending with neither M nor 2M channels.
    let mut t = model.tensors.clone();
    t.insert(
        "h_s.4.weight".into(),
        Tensor::zeros((25, 18, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    save(&t);
    let err = ModelFile::import(&path, None, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Model(_)), "{err}");
    // A context model (CompressAI's joint autoregressive mbt2018) is not mis-loaded.
    let mut t = model.tensors.clone();
    t.insert(
        "context_prediction.weight".into(),
        Tensor::zeros((24, 12, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    save(&t);
    let err = ModelFile::import(&path, None, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::Model(m) if m.contains("context")),
        "{err}"
    );
    // A mean-scale model file whose h_s has the scale hyperprior's width.
    let mut bad = model.clone();
    bad.tensors.insert(
        "h_s.4.weight".into(),
        Tensor::zeros((12, 8, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = ModelFile::from_bytes(&bad.to_bytes().unwrap(), &Device::Cpu).unwrap();
    assert!(Codec::from_model_file(&bad, &Device::Cpu).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// The training rate term of a mean-scale backbone is the Gaussian likelihood of `y + u` under
/// the predicted means and scales.
#[cfg(feature = "train")]
#[test]
fn training_rate_uses_the_means() {
    use psic::init::SplitMix64;
    use psic::train::{noisy_latent, uniform_noise};
    let b = tiny_model(4).build_backbone(&Device::Cpu).unwrap();
    let x = psic::image_io::image_to_tensor(&test_image(64, 64), &Device::Cpu).unwrap();
    let (_, bpp) = noisy_latent(b.as_ref(), &x, &mut SplitMix64::new(9)).unwrap();
    // The same pass by hand, with the same noise (z first, then y).
    let mut rng = SplitMix64::new(9);
    let y = b.analysis(&x).unwrap();
    let z = b.hyper_analysis(&y).unwrap();
    let z_tilde = (&z + uniform_noise(z.dims(), &mut rng, &Device::Cpu).unwrap()).unwrap();
    let params = b.hyper_synthesis(&z_tilde).unwrap();
    let means = params
        .means
        .as_ref()
        .expect("mean-scale h_s predicts means");
    let y_tilde = (&y + uniform_noise(y.dims(), &mut rng, &Device::Cpu).unwrap()).unwrap();
    let bits = |means: Option<&Tensor>| -> f32 {
        let y_lik = b
            .gaussian_conditional()
            .likelihood(&y_tilde, &params.scales, means)
            .unwrap();
        let z_lik = b.entropy_bottleneck().likelihood(&z_tilde).unwrap();
        let nats = (y_lik.log().unwrap().sum_all().unwrap()
            + z_lik.log().unwrap().sum_all().unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        -nats / std::f32::consts::LN_2 / (64.0 * 64.0)
    };
    let bpp = bpp.to_scalar::<f32>().unwrap();
    let (with, without) = (bits(Some(means)), bits(None));
    eprintln!("bpp {bpp}: by hand with means {with}, without {without}");
    assert!((bpp - with).abs() <= 1e-5 * with.abs(), "{bpp} vs {with}");
    assert!(
        (bpp - without).abs() > 1e-3 * with.abs(),
        "the means change nothing"
    );
}

/// A fresh `mbt2018-mean` stage-0 run: a few steps, then the export is a working codec.
#[cfg(feature = "train")]
#[test]
fn tiny_stage0_run_trains_and_exports() {
    let data = std::env::temp_dir().join(format!("psic-mean-train-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..6u32 {
        image::RgbImage::from_fn(80, 72, |x, y| {
            image::Rgb([
                (x * 5 + i * 9) as u8,
                (y * 4) as u8,
                ((x ^ y) * 3 + i) as u8,
            ])
        })
        .save(data.join(format!("img{i:02}.png")))
        .unwrap();
    }
    let cfg: psic::train::TrainConfig = toml::from_str(&format!(
        r#"
        architecture = "mbt2018-mean"
        n = 8
        m = 12
        data = {data:?}
        eval_percent = 20
        crop = 64
        batch = 2
        steps = 6
        lr = 1e-3
        aux_lr = 1e-3
        lambda = 0.01
        clip = 1.0
        seed = 3
        "#
    ))
    .unwrap();
    let mut t = psic::train::Trainer::new(cfg, &Device::Cpu).unwrap();
    for _ in 0..6 {
        let s = t.step().unwrap();
        assert!(
            s.loss.is_finite() && s.bpp.is_finite() && s.bpp > 0.0,
            "{s:?}"
        );
    }
    let model = t.export().unwrap();
    assert_eq!(
        model.architecture,
        Architecture::MeanScaleHyperprior(MeanScaleHyperpriorConfig { n: 8, m: 12 })
    );
    let codec = Codec::from_model_file(&model, &Device::Cpu).unwrap();
    let img = image::open(data.join("img00.png")).unwrap().to_rgb8();
    let bytes = codec.encode(&img).unwrap();
    assert_eq!(codec.decode(&bytes).unwrap().dimensions(), (80, 72));
    std::fs::remove_dir_all(&data).ok();
}
