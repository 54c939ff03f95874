//! One bitstream, two decodes, through `Codec`: the official PSIC model against its reference
//! fixture, and a plain CompressAI hyperprior wrapped with a CLTG.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use psic::bitstream::Bitstream;
use psic::shield::Condition;
use psic::{Codec, ModelFile, Precision};

/// Both decodes of `img` by `codec` (its full and shielded conditions), before rounding.
fn both_decodes(codec: &Codec, img: &image::RgbImage) -> (Vec<f32>, Vec<f32>) {
    let bytes = codec.encode(img).unwrap();
    let c = codec.conditions().unwrap();
    let latent = codec.decode_latent(&bytes).unwrap();
    let full = f32s(&codec.synthesize(&latent, &c.full).unwrap());
    let shielded = f32s(&codec.synthesize(&latent, &c.shielded).unwrap());
    (full, shielded)
}

#[test]
fn official_psic_model_encodes_and_decodes_like_the_reference() {
    let Some(dir) = fixture_dir("psic-official") else {
        return;
    };
    let model = ModelFile::import(dir.join("state_dict.safetensors"), None, &Device::Cpu).unwrap();
    assert_eq!(model.architecture.name(), "psic-hy2018");
    // Through a model file on disk, as users get it.
    let path =
        std::env::temp_dir().join(format!("psic-official-{}.safetensors", std::process::id()));
    model.save(&path).unwrap();
    // The reference's transforms are f32: its strings and reconstructions need f32 ones.
    let codec = Codec::load(&path)
        .unwrap()
        .with_precision(Precision::F32)
        .unwrap();
    std::fs::remove_file(&path).ok();
    let conditions = codec.conditions().expect("official model is shielded");
    assert_eq!(
        (conditions.full.beta(), conditions.shielded.beta()),
        (0.0, 1.0)
    );

    let img = psic::image_io::load_image(dir.join("input.png")).unwrap();
    let bytes = codec.encode(&img).unwrap();
    let stream = Bitstream::from_bytes(&bytes).unwrap();
    assert_eq!(
        stream.strings[0],
        std::fs::read(dir.join("y_string.bin")).unwrap()
    );
    assert_eq!(
        stream.strings[1],
        std::fs::read(dir.join("z_string.bin")).unwrap()
    );

    let refs = load_tensors(&dir.join("refs.safetensors"));
    let latent = codec.decode_latent(&bytes).unwrap();
    for (condition, key) in [
        (conditions.full, "beta0.decompress_x_hat"),
        (conditions.shielded, "beta1.decompress_x_hat"),
    ] {
        let x = codec
            .synthesize(&latent, &condition)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let err = max_abs_diff(&f32s(&x), &f32s(&refs[key]));
        assert!(err < 1e-4, "{key}: max abs error {err}");
    }
    // Same stream, two different images; the default decode is the shielded one.
    let full = codec.decode_full(&bytes, &conditions.full).unwrap();
    let shielded = codec.decode_shielded(&bytes).unwrap();
    assert_ne!(full, shielded);
    assert_eq!(codec.decode(&bytes).unwrap(), shielded);
}

#[test]
fn wrapped_hyperprior_keeps_the_stream_and_the_full_decode() {
    let Some(dir) = fixture_dir("compressai") else {
        return;
    };
    let plain = ModelFile::import(
        dir.join("hyperprior_128_192.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let wrapped = plain.with_new_cltg(7, &Device::Cpu).unwrap();
    let plain = Codec::from_model_file(&plain, &Device::Cpu).unwrap();
    let shielded = Codec::from_model_file(&wrapped, &Device::Cpu).unwrap();
    assert!(plain.conditions().is_none());
    let c = shielded.conditions().unwrap();

    let img = psic::image_io::load_image(dir.join("test768x512.png")).unwrap();
    let img = image::imageops::crop_imm(&img, 0, 0, 200, 136).to_image();
    // Shielding lives in the decoder only: identical bytes, fingerprint included.
    let bytes = plain.encode(&img).unwrap();
    assert_eq!(shielded.encode(&img).unwrap(), bytes);
    // The full decode of the wrapped model is exactly the plain model's decode...
    let latent = shielded.decode_latent(&bytes).unwrap();
    let full = shielded.synthesize(&latent, &c.full).unwrap();
    let reference = plain.synthesize(&latent, &Condition::FULL).unwrap();
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
    // A plain model cannot shield, and says so.
    assert!(plain.decode_shielded(&bytes).is_err());
}

/// Gains as triggers (`Modulation::Scale` / `Affine`): model files carry them, a bias generator
/// extended with zero gains decodes exactly as before, a fresh gain-only generator starts at the
/// plain decode, and moved gains change the shielded decode in proportion to the content.
#[test]
fn modulated_generators_load_extend_and_start_where_the_model_was() {
    use psic::shield::{CltgConfig, Modulation};
    let Some(dir) = fixture_dir("compressai") else {
        return;
    };
    let cpu = Device::Cpu;
    let plain = ModelFile::import(dir.join("hyperprior_128_192.safetensors"), None, &cpu).unwrap();
    let img = psic::image_io::load_image(dir.join("test768x512.png")).unwrap();
    let img = image::imageops::crop_imm(&img, 0, 0, 128, 128).to_image();
    let decodes = |m: &ModelFile| both_decodes(&Codec::from_model_file(m, &cpu).unwrap(), &img);
    let bias = plain.with_new_cltg(7, &cpu).unwrap();
    let affine = bias.with_cltg_gains(&cpu).unwrap();
    let cfg = CltgConfig::infer_generic(&affine.tensors).unwrap().unwrap();
    assert_eq!(cfg.modulation, Modulation::Affine);
    assert!(affine.tensors.contains_key("cltg.scale.2.weight"));
    // Zero gains: both decodes bit-identical to the bias generator's.
    assert_eq!(decodes(&affine), decodes(&bias));
    // Saved and loaded, the gains survive and the decodes are the same.
    let tmp = std::env::temp_dir().join(format!("psic-affine-{}.safetensors", std::process::id()));
    affine.save(&tmp).unwrap();
    let reloaded = ModelFile::load(&tmp, &cpu).unwrap();
    std::fs::remove_file(&tmp).ok();
    assert_eq!(decodes(&reloaded), decodes(&bias));

    // A fresh gain-only generator: no biases, zero gains, so both decodes are the plain one.
    let scale = plain
        .with_new_cltg_modulated(7, Modulation::Scale, &cpu)
        .unwrap();
    assert!(!scale.tensors.contains_key("cltg.proj.0.weight"));
    let (full, shielded) = decodes(&scale);
    assert_eq!(full, shielded);
    let plain_codec = Codec::from_model_file(&plain, &cpu).unwrap();
    let bytes = plain_codec.encode(&img).unwrap();
    let latent = plain_codec.decode_latent(&bytes).unwrap();
    assert_eq!(
        full,
        f32s(&plain_codec.synthesize(&latent, &Condition::FULL).unwrap())
    );

    // Moved gains: the full decode stays the plain one (anchored), the shielded one changes.
    let mut moved = scale.clone();
    for i in 0..3 {
        let name = format!("cltg.scale.{i}.weight");
        let w = moved.tensors[&name].ones_like().unwrap();
        moved.tensors.insert(name, (w * 0.01).unwrap());
    }
    let (full2, shielded2) = decodes(&moved);
    assert_eq!(full2, full);
    assert!(max_abs_diff(&shielded2, &full2) > 1e-3);
}

#[test]
fn shield_strength_interpolates_the_triggers_and_travels_in_the_model_file() {
    use psic::shield::MAX_SHIELD_STRENGTH;
    let cpu = Device::Cpu;
    let model = psic::zoo::default_model(&cpu).unwrap();
    let img = test_image(64, 64);
    let codec = Codec::from_model_file(&model, &cpu).unwrap();
    // The shipped model records its own default strength (0.8, docs/MODELS.md).
    let own = codec.conditions().unwrap().strength;
    assert!(own > 0.0 && own <= 1.0, "{own}");
    let bytes = codec.encode(&img).unwrap();
    let decode = |c: &Codec| c.decode_shielded(&bytes).unwrap().into_raw();
    let full = codec
        .decode_full(&bytes, &codec.conditions().unwrap().full)
        .unwrap()
        .into_raw();
    let at = |s: f32| {
        Codec::from_model_file(&model, &cpu)
            .unwrap()
            .with_shield_strength(s)
            .unwrap()
    };
    let trained = decode(&at(1.0));
    assert_ne!(full, trained, "the default model shields");
    // The model's own strength is what a plain load decodes at; strength 0 is the full decode.
    assert_eq!(decode(&at(own)), decode(&codec));
    assert_eq!(decode(&at(0.0)), full);
    // In between: a decode that is neither, closer to the full one than the trained shield is.
    let half = decode(&at(0.5));
    let dist = |a: &[u8], b: &[u8]| -> u64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as i64 - y as i64).unsigned_abs())
            .sum()
    };
    assert!(half != full && half != trained);
    assert!(dist(&half, &full) < dist(&trained, &full));

    // Recorded in the model file: same fingerprint (same streams), same decode as the setter.
    let weaker = model.with_shield_strength(0.5).unwrap();
    assert_eq!(weaker.fingerprint().unwrap(), model.fingerprint().unwrap());
    let tmp =
        std::env::temp_dir().join(format!("psic-strength-{}.safetensors", std::process::id()));
    weaker.save(&tmp).unwrap();
    let loaded = Codec::load(&tmp).unwrap();
    std::fs::remove_file(&tmp).ok();
    assert_eq!(loaded.conditions().unwrap().strength, 0.5);
    assert_eq!(decode(&loaded), half);

    // Out of range: typed errors, from the setter and from a hostile model file.
    for s in [-0.1, MAX_SHIELD_STRENGTH + 0.5, f32::NAN, f32::INFINITY] {
        let err = at(1.0).with_shield_strength(s).unwrap_err();
        assert!(matches!(err, psic::Error::InvalidArgument(_)), "{s}: {err}");
        assert!(model.with_shield_strength(s).is_err());
    }
    let mut hostile = model.clone();
    hostile.extra_metadata.insert(
        "conditions".into(),
        r#"{"full":0.0,"shielded":1.0,"strength":1000.0}"#.into(),
    );
    let err = Codec::from_model_file(&hostile, &cpu).unwrap_err();
    assert!(matches!(err, psic::Error::Model(_)), "{err}");
    assert!(err.to_string().contains("strength"), "{err}");
    // A plain model has nothing to strengthen.
    assert!(tiny_codec(3).with_shield_strength(0.5).is_err());
}

/// Content-adaptive triggers (`Modulation::Adaptive`): a bias generator extended with them
/// starts exactly where it was, the model file carries them, moved weights change only the
/// shielded decode, and generators cannot be shrunk by an extension.
#[test]
fn adaptive_triggers_extend_a_generator_and_change_only_the_shielded_decode() {
    use psic::shield::{CltgConfig, Modulation};
    let cpu = Device::Cpu;
    // A bias generator (the shipped model's is adaptive already), on a tiny scale hyperprior.
    let arch = psic::model::Architecture::ScaleHyperprior(psic::backbone::ScaleHyperpriorConfig {
        n: 8,
        m: 12,
    });
    let model = ModelFile::initialize(arch, 3, &cpu)
        .unwrap()
        .with_new_cltg(7, &cpu)
        .unwrap();
    assert_eq!(
        CltgConfig::infer_generic(&model.tensors)
            .unwrap()
            .unwrap()
            .modulation,
        Modulation::Bias
    );
    let img = test_image(64, 64);
    let decodes = |m: &ModelFile| both_decodes(&Codec::from_model_file(m, &cpu).unwrap(), &img);
    let adaptive = model
        .with_cltg_modulation(Modulation::Adaptive, 5, &cpu)
        .unwrap();
    let cfg = CltgConfig::infer_generic(&adaptive.tensors)
        .unwrap()
        .unwrap();
    assert_eq!(cfg.modulation, Modulation::Adaptive);
    for name in [
        "cltg.scale.0.weight",
        "cltg.mix.2.weight",
        "cltg.adapt.1.weight",
    ] {
        assert!(adaptive.tensors.contains_key(name), "{name}");
    }
    assert_eq!(
        adaptive.fingerprint().unwrap(),
        model.fingerprint().unwrap()
    );
    let before = decodes(&model);
    assert_eq!(decodes(&adaptive), before);

    // Moved adaptive weights: full decode unchanged (anchored), shielded decode changed; and
    // the change survives a save and load.
    let mut moved = adaptive.clone();
    for i in 0..cfg.injection_points.len() {
        let name = format!("cltg.mix.{i}.weight");
        // Weights of both signs (a constant row would weigh the two codes' difference by
        // its sum, which can cancel).
        let shape = moved.tensors[&name].dims().to_vec();
        let n = shape.iter().product::<usize>() as u32;
        let w = Tensor::arange(0u32, n, &cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .affine(0.37, 0.0)
            .unwrap()
            .sin()
            .unwrap()
            .affine(0.05, 0.0)
            .unwrap()
            .reshape(shape)
            .unwrap();
        moved.tensors.insert(name, w);
    }
    let (full, shielded) = decodes(&moved);
    assert_eq!(full, before.0);
    assert!(max_abs_diff(&shielded, &before.1) > 1e-3);
    let tmp =
        std::env::temp_dir().join(format!("psic-adaptive-{}.safetensors", std::process::id()));
    moved.save(&tmp).unwrap();
    let reloaded = ModelFile::load(&tmp, &cpu).unwrap();
    std::fs::remove_file(&tmp).ok();
    assert_eq!(decodes(&reloaded), (full.clone(), shielded));
    // Strength 0 of an adaptive shield is the full decode, bit for bit.
    let codec = Codec::from_model_file(&moved, &cpu)
        .unwrap()
        .with_shield_strength(0.0)
        .unwrap();
    assert_eq!(both_decodes(&codec, &img).1, full);

    // No shrinking: adaptive -> affine would drop trained weights.
    let err = moved
        .with_cltg_modulation(Modulation::Affine, 5, &cpu)
        .unwrap_err();
    assert!(err.to_string().contains("fresh generator"), "{err}");
    // A model whose adaptive convolution lost its shape is refused on load.
    let mut broken = moved.clone();
    let w = broken.tensors["cltg.adapt.0.weight"]
        .narrow(3, 0, 2)
        .unwrap();
    broken.tensors.insert("cltg.adapt.0.weight".into(), w);
    let err = Codec::from_model_file(&broken, &cpu).unwrap_err();
    assert!(matches!(err, psic::Error::Model(_)), "{err}");
}

/// A shield moves between backbones of the same layout: the donor's generator and conditions,
/// this backbone's weights and stream; other layouts, generator-less donors and the official
/// architecture are refused.
#[test]
fn a_generator_grafts_onto_a_backbone_of_the_same_layout() {
    use psic::backbone::ScaleHyperpriorConfig;
    use psic::model::Architecture;
    let cpu = Device::Cpu;
    let tiny = |n, m, seed| {
        let arch = Architecture::ScaleHyperprior(ScaleHyperpriorConfig { n, m });
        ModelFile::initialize(arch, seed, &cpu).unwrap()
    };
    let donor = tiny(8, 12, 1)
        .with_new_cltg(5, &cpu)
        .unwrap()
        .with_shield_strength(0.5)
        .unwrap();
    let backbone = tiny(8, 12, 2);
    let grafted = backbone.with_generator_from(&donor, &cpu).unwrap();
    for (name, t) in &donor.tensors {
        let mine = &grafted.tensors[name];
        let from = if name.starts_with("cltg.") {
            t
        } else {
            &backbone.tensors[name]
        };
        assert_eq!(max_abs_diff(&f32s(mine), &f32s(from)), 0.0, "{name}");
    }
    assert_eq!(grafted.conditions().unwrap(), donor.conditions().unwrap());
    // The stream is the backbone's; the shielded decode is the donor's triggers on it.
    let img = test_image(64, 48);
    let plain = Codec::from_model_file(&backbone, &cpu).unwrap();
    let codec = Codec::from_model_file(&grafted, &cpu).unwrap();
    let bytes = plain.encode(&img).unwrap();
    assert!(
        codec.encode(&img).unwrap() == bytes,
        "the grafted model writes another stream"
    );
    let latent = codec.decode_latent(&bytes).unwrap();
    let reference = f32s(&plain.synthesize(&latent, &Condition::FULL).unwrap());
    let (full, shielded) = both_decodes(&codec, &img);
    assert_eq!(max_abs_diff(&full, &reference), 0.0);
    assert!(max_abs_diff(&shielded, &reference) > 1e-6);
    // Grafting again replaces the generator.
    let other = tiny(8, 12, 3).with_new_cltg(9, &cpu).unwrap();
    let regrafted = grafted.with_generator_from(&other, &cpu).unwrap();
    let name = regrafted
        .tensors
        .keys()
        .find(|k| k.starts_with("cltg."))
        .unwrap();
    let (mine, theirs) = (f32s(&regrafted.tensors[name]), f32s(&other.tensors[name]));
    assert_eq!(max_abs_diff(&mine, &theirs), 0.0, "{name}");
    // Refusals, each a typed error with its reason.
    let wide = tiny(16, 12, 4).with_new_cltg(5, &cpu).unwrap();
    let err = backbone.with_generator_from(&wide, &cpu).unwrap_err();
    assert!(err.to_string().contains("injection points"), "{err}");
    let err = backbone
        .with_generator_from(&tiny(8, 12, 5), &cpu)
        .unwrap_err();
    assert!(err.to_string().contains("no generic"), "{err}");
}
