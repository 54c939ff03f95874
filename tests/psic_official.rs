//! Conformance with the official PSIC model (`Hy2018` of the authors' code, N=64, M=96, random
//! weights): transforms, trigger generation and reconstructions of
//! `../shared/fixtures/psic-official` (made by the authors' code on CompressAI 1.2.8, not by us).
//! Also: PSIC wrapped around a plain CompressAI scale hyperprior.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use psic::backbone::{PsicHy2018, PsicHy2018Config, Triggers};
use psic::entropy::RansCoder;
use psic::shield::{Cltg, CltgConfig, Condition, ShieldedBackbone, TriggerGenerator};
use psic::{LicBackbone, ModelFile};

/// Max absolute error allowed on every float tensor.
const TOL: f32 = 1e-4;

struct Fixture {
    dir: std::path::PathBuf,
    model: PsicHy2018,
    cltg: Cltg,
    refs: HashMap<String, Tensor>,
}

fn fixture() -> Option<Fixture> {
    let dir = fixture_dir("psic-official")?;
    let tensors = load_tensors(&dir.join("state_dict.safetensors"));
    assert!(PsicHy2018Config::matches(&tensors));
    let cfg = PsicHy2018Config::infer(&tensors).unwrap();
    assert_eq!(cfg, PsicHy2018Config { n: 64, m: 96 });
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let (model, cltg) = PsicHy2018::with_cltg(vb, &cfg).unwrap();
    Some(Fixture {
        refs: load_tensors(&dir.join("refs.safetensors")),
        dir,
        model,
        cltg,
    })
}

/// Asserts max |a - b| <= tol and prints it.
fn check(name: &str, a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{name}: shape");
    let err = max_abs_diff(&f32s(a), &f32s(b));
    let scale = f32s(b).iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("{name:<40} max abs err {err:.3e}  (max |ref| {scale:.3e})");
    assert!(err <= tol, "{name}: max abs error {err} > {tol}");
}

/// The stress case decodes y symbols up to 70000: the synthesis then runs through activations of
/// up to ~4e14 (IGDN squares them) and the few output pixels that land inside [0, 1] next to
/// such activations are ill-conditioned. There the reference's own float32 rounding is about
/// 1e-3 (our float64 synthesis differs from it by up to 8e-3), so no float32 port with another
/// summation order can meet 1e-4 on every pixel. Required: at most 0.05% of the pixels above
/// 1e-4, none above 1e-2.
fn check_stress(name: &str, a: &Tensor, b: &Tensor) {
    let (a, b) = (f32s(a), f32s(b));
    let err = max_abs_diff(&a, &b);
    let over = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| (*x - *y).abs() > TOL)
        .count();
    eprintln!(
        "{name:<40} max abs err {err:.3e}, {over} of {} pixels above {TOL:e}",
        a.len()
    );
    assert!(err <= 1e-2, "{name}: max abs error {err} > 1e-2");
    assert!(
        over * 2000 <= a.len(),
        "{name}: {over} pixels off by more than {TOL}"
    );
}

fn beta(b: f32) -> Tensor {
    Tensor::new(&[b], &Device::Cpu).unwrap()
}

fn triggers(f: &Fixture, cond: Condition) -> Triggers {
    f.cltg.triggers(&cond, 1).unwrap()
}

#[test]
fn trigger_generation_matches_official() {
    let Some(f) = fixture() else { return };
    assert_eq!(f.cltg.injection_points(), &[64; 8]);
    assert_eq!(f.model.injection_points(), vec![64; 8]);
    for b in [0u8, 1] {
        let beta_ref = &f.refs[&format!("beta{b}.beta")];
        assert_eq!(f32s(beta_ref), vec![b as f32]);
        let ff = f.cltg.fourier_features(beta_ref).unwrap();
        check(
            &format!("beta{b}.fourier_features"),
            &ff,
            &f.refs[&format!("beta{b}.fourier_features")],
            1e-6,
        );
        let code = f.cltg.code(&beta(b as f32)).unwrap();
        check(
            &format!("beta{b}.beta_mlp"),
            &code,
            &f.refs[&format!("beta{b}.beta_mlp")],
            TOL,
        );
    }
}

#[test]
fn analysis_and_hyper_transforms_match_official() {
    let Some(f) = fixture() else { return };
    let m = &f.model;
    let r = &f.refs;
    // The PNG decodes to exactly the reference input.
    let img = psic::image_io::load_image(f.dir.join("input.png")).unwrap();
    let x = psic::image_io::image_to_tensor(&img, &Device::Cpu).unwrap();
    check("x (input.png)", &x, &r["x"], 0.0);

    let ga = m.analysis_trace(&r["x"]).unwrap();
    check("debug.g_a.5", &ga[5], &r["debug.g_a.5"], TOL);
    check("y (trace)", &ga[6], &r["y"], TOL);
    let y = m.analysis(&r["x"]).unwrap();
    check("y", &y, &r["y"], TOL);

    let ha = m.hyper_analysis_trace(&r["y"]).unwrap();
    check("debug.h_a.1", &ha[1], &r["debug.h_a.1"], TOL);
    check("debug.h_a.3", &ha[3], &r["debug.h_a.3"], TOL);
    let z = m.hyper_analysis(&r["y"]).unwrap();
    check("z", &z, &r["z"], TOL);

    let eb = m.entropy_bottleneck();
    assert_eq!(eb.medians(), f32s(&r["z_medians"]).as_slice());
    assert_eq!(eb.symbols(&r["z"]).unwrap(), i32s(&r["z_symbols"]));
    check("z_hat", &eb.quantize(&r["z"]).unwrap(), &r["z_hat"], 0.0);

    let hs = m.hyper_synthesis_trace(&r["z_hat"]).unwrap();
    check("debug.h_s.1", &hs[1], &r["debug.h_s.1"], TOL);
    check("debug.h_s.3", &hs[3], &r["debug.h_s.3"], TOL);
    let params = m.hyper_synthesis(&r["z_hat"]).unwrap();
    assert!(params.means.is_none());
    check("scales_hat", &params.scales, &r["scales_hat"], TOL);

    let gc = m.gaussian_conditional();
    assert_eq!(
        gc.build_indexes(&r["scales_hat"]).unwrap(),
        i32s(&r["gaussian_indexes"])
    );
    assert_eq!(
        gc.build_indexes(&params.scales).unwrap(),
        i32s(&r["gaussian_indexes"])
    );
    assert_eq!(gc.symbols(&r["y"], None).unwrap(), i32s(&r["y_symbols"]));
    let y_hat = r["y"].round().unwrap();
    check("y_hat", &y_hat, &r["y_hat"], 0.0);
    check(
        "decoded.y_hat == y_hat",
        &r["decoded.y_hat"],
        &r["y_hat"],
        0.0,
    );
    check(
        "decoded.z_hat == z_hat",
        &r["decoded.z_hat"],
        &r["z_hat"],
        0.0,
    );
}

#[test]
fn conditional_synthesis_matches_official() {
    let Some(f) = fixture() else { return };
    let m = &f.model;
    let r = &f.refs;
    let t0 = triggers(&f, Condition::FULL);
    let stages = m.synthesis_trace(&r["y_hat"], Some(&t0)).unwrap();
    for (i, stage) in stages.iter().take(3).enumerate() {
        let name = format!("debug.beta0.g_s_cond.{i}");
        check(&name, stage, &r[&name], TOL);
    }
    check("beta0.x_hat (trace)", &stages[7], &r["beta0.x_hat"], TOL);
    for (b, cond) in [(0, Condition::FULL), (1, Condition::SHIELDED)] {
        let t = triggers(&f, cond);
        let x_hat = m.synthesis(&r["y_hat"], Some(&t)).unwrap();
        check(
            &format!("beta{b}.x_hat"),
            &x_hat,
            &r[&format!("beta{b}.x_hat")],
            TOL,
        );
        check(
            &format!("beta{b}.x_hat_clamped"),
            &x_hat.clamp(0f32, 1f32).unwrap(),
            &r[&format!("beta{b}.x_hat_clamped")],
            TOL,
        );
        let x_dec = m
            .synthesis(&r["decoded.y_hat"], Some(&t))
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        check(
            &format!("beta{b}.decompress_x_hat"),
            &x_dec,
            &r[&format!("beta{b}.decompress_x_hat")],
            TOL,
        );
    }
    // The two decodes differ, as in the reference (up to 0.12 there).
    let d = max_abs_diff(&f32s(&r["beta0.x_hat"]), &f32s(&r["beta1.x_hat"]));
    assert!(d > 0.01, "beta0 vs beta1 reference differ by {d}");

    // No triggers is exactly all-zero triggers.
    let zeros = t0.map(|t| t.zeros_like()).unwrap();
    let none = m.synthesis(&r["y_hat"], None).unwrap();
    let zero = m.synthesis(&r["y_hat"], Some(&zeros)).unwrap();
    assert_eq!(f32s(&none), f32s(&zero));
}

#[test]
fn stress_pipeline_matches_official() {
    let Some(f) = fixture() else { return };
    let m = &f.model;
    let r = &f.refs;
    let eb = m.entropy_bottleneck();
    let z_hat = eb
        .dequantize(&i32s(&r["stress_pipeline.z_symbols"]), (1, 64, 4, 4))
        .unwrap();
    let scales = m.hyper_synthesis(&z_hat).unwrap().scales;
    check(
        "stress_pipeline.scales_hat",
        &scales,
        &r["stress_pipeline.scales_hat"],
        TOL,
    );
    let gc = m.gaussian_conditional();
    let ref_idx = i32s(&r["stress_pipeline.gaussian_indexes"]);
    assert_eq!(
        gc.build_indexes(&r["stress_pipeline.scales_hat"]).unwrap(),
        ref_idx
    );
    // Our own scales may pick a neighbouring table only next to a scale-table boundary.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.dir.join("refs.json")).unwrap()).unwrap();
    let allowed: Vec<usize> = json["stress_pipeline"]["scales_nearest_threshold"]
        ["flat_positions_within_1e-4"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let own = gc.build_indexes(&scales).unwrap();
    let mismatches: Vec<usize> = (0..own.len()).filter(|&i| own[i] != ref_idx[i]).collect();
    eprintln!(
        "stress_pipeline own gaussian indexes: {} mismatches {mismatches:?}",
        mismatches.len()
    );
    assert!(mismatches.iter().all(|i| allowed.contains(i)));

    let y_hat = r["stress_pipeline.y_symbols"].to_dtype(DType::F32).unwrap();
    for (b, cond) in [(0, Condition::FULL), (1, Condition::SHIELDED)] {
        let x_hat = m
            .synthesis(&y_hat, Some(&triggers(&f, cond)))
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let name = format!("stress_pipeline.beta{b}.decompress_x_hat");
        check_stress(&name, &x_hat, &r[&name]);
    }

    // Diagnostic: the same synthesis in float64 is no closer to the reference.
    let tensors = load_tensors(&f.dir.join("state_dict.safetensors"));
    let vb = VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
    let (m64, c64) = PsicHy2018::with_cltg(vb, m.config()).unwrap();
    let y64 = y_hat.to_dtype(DType::F64).unwrap();
    for (b, cond) in [(0, Condition::FULL), (1, Condition::SHIELDED)] {
        let t = c64.triggers(&cond, 1).unwrap();
        let x64 = m64
            .synthesis(&y64, Some(&t))
            .unwrap()
            .clamp(0f64, 1f64)
            .unwrap();
        let name = format!("stress_pipeline.beta{b}.decompress_x_hat");
        let err = max_abs_diff(&f32s(&x64), &f32s(&r[&name]));
        eprintln!("{name} float64 synthesis: max abs err {err:.3e} (reference rounding)");
    }
}

/// Parses the official test script's container: big-endian u32 H, W, z height, z width,
/// number of strings, then (length, bytes) per string.
fn parse_official_stream(bytes: &[u8]) -> ([u32; 4], Vec<Vec<u8>>) {
    fn take<'a>(bytes: &'a [u8], pos: &mut usize, n: usize) -> &'a [u8] {
        let s = &bytes[*pos..*pos + n];
        *pos += n;
        s
    }
    let u32be = |pos: &mut usize| u32::from_be_bytes(take(bytes, pos, 4).try_into().unwrap());
    let mut pos = 0;
    let head = [(); 4].map(|_| u32be(&mut pos));
    let n = u32be(&mut pos);
    let mut strings = vec![];
    for _ in 0..n {
        let len = u32be(&mut pos) as usize;
        strings.push(take(bytes, &mut pos, len).to_vec());
    }
    assert_eq!(pos, bytes.len(), "trailing bytes");
    (head, strings)
}

/// The whole official decode: `stream.bin` → z_hat → scales → y_hat → x_hat for both betas.
#[test]
fn official_streams_decode_to_official_images() {
    let Some(f) = fixture() else { return };
    let m = &f.model;
    let r = &f.refs;
    let coder = RansCoder;
    for (stream, prefix, y_file, z_file) in [
        ("stream.bin", "", "y_string.bin", "z_string.bin"),
        (
            "stress_stream.bin",
            "stress_pipeline.",
            "stress_y_string.bin",
            "stress_z_string.bin",
        ),
    ] {
        let (head, strings) = parse_official_stream(&std::fs::read(f.dir.join(stream)).unwrap());
        assert_eq!(head, [256, 256, 4, 4]);
        assert_eq!(strings.len(), 2);
        assert_eq!(strings[0], std::fs::read(f.dir.join(y_file)).unwrap());
        assert_eq!(strings[1], std::fs::read(f.dir.join(z_file)).unwrap());
        let z_hat = m
            .entropy_bottleneck()
            .decompress(&[&strings[1]], (4, 4), &coder)
            .unwrap();
        let scales = m.hyper_synthesis(&z_hat).unwrap().scales;
        let gc = m.gaussian_conditional();
        // The stress case has scales within 2e-7 of a table boundary: use the official indexes
        // there (see the fixture README), our own elsewhere.
        let indexes = if prefix.is_empty() {
            gc.build_indexes(&scales).unwrap()
        } else {
            i32s(&r["stress_pipeline.gaussian_indexes"])
        };
        let y_hat = gc
            .decompress(
                &[&strings[0]],
                &indexes,
                (1, 96, 16, 16),
                None,
                &coder,
                &Device::Cpu,
            )
            .unwrap();
        if prefix.is_empty() {
            check("decoded.y_hat (ours)", &y_hat, &r["decoded.y_hat"], 0.0);
            check("decoded.z_hat (ours)", &z_hat, &r["decoded.z_hat"], 0.0);
        } else {
            let want = r["stress_pipeline.y_symbols"].to_dtype(DType::F32).unwrap();
            check("stress y_hat (ours)", &y_hat, &want, 0.0);
        }
        for (b, cond) in [(0, Condition::FULL), (1, Condition::SHIELDED)] {
            let x_hat = m
                .synthesis(&y_hat, Some(&triggers(&f, cond)))
                .unwrap()
                .clamp(0f32, 1f32)
                .unwrap();
            let name = format!("{prefix}beta{b}.decompress_x_hat");
            let label = format!("{name} (from {stream})");
            if prefix.is_empty() {
                check(&label, &x_hat, &r[&name], TOL);
            } else {
                check_stress(&label, &x_hat, &r[&name]);
            }
        }
    }
}

/// PSIC plugged into a plain CompressAI scale hyperprior: a fresh CLTG for its injection points.
#[test]
fn wrapped_hyperprior_shields_only_the_synthesis() {
    let Some(dir) = fixture_dir("compressai") else {
        return;
    };
    let model = ModelFile::import(
        dir.join("hyperprior_128_192.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let plain = model.build_backbone(&Device::Cpu).unwrap();
    let backbone = model.build_backbone(&Device::Cpu).unwrap();
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let cltg = Cltg::new(vb, &CltgConfig::new(backbone.injection_points())).unwrap();
    assert_eq!(cltg.injection_points(), &[128, 128, 128]);
    // fc1, fc2 (weight + bias each) and three projections: all trainable.
    assert_eq!(map.all_vars().len(), 7);
    let shielded = ShieldedBackbone::new(backbone, cltg).unwrap();

    // A small image: the codec path is untouched (same y, z, scales as the plain backbone).
    let x = Tensor::rand(0f32, 1f32, (2, 3, 64, 128), &Device::Cpu).unwrap();
    let y = shielded.backbone().analysis(&x).unwrap();
    assert_eq!(f32s(&y), f32s(&plain.analysis(&x).unwrap()));
    let z = shielded.backbone().hyper_analysis(&y).unwrap();
    assert_eq!(f32s(&z), f32s(&plain.hyper_analysis(&y).unwrap()));
    let y_hat = y.round().unwrap();

    let x_plain = plain.synthesis(&y_hat, None).unwrap();
    let x_none = shielded.backbone().synthesis(&y_hat, None).unwrap();
    assert_eq!(f32s(&x_none), f32s(&x_plain));
    let zeros = Triggers::additive(
        shielded
            .backbone()
            .injection_points()
            .iter()
            .map(|&c| Tensor::zeros((2, c), DType::F32, &Device::Cpu).unwrap())
            .collect(),
    );
    let x_zero = shielded.backbone().synthesis(&y_hat, Some(&zeros)).unwrap();
    assert_eq!(f32s(&x_zero), f32s(&x_plain), "zero triggers = plain");

    let x_sh = shielded.synthesize(&y_hat, &Condition::SHIELDED).unwrap();
    let x_full = shielded.synthesize(&y_hat, &Condition::FULL).unwrap();
    let d_sh = max_abs_diff(&f32s(&x_sh), &f32s(&x_plain));
    let d_full = max_abs_diff(&f32s(&x_full), &f32s(&x_plain));
    let d_cond = max_abs_diff(&f32s(&x_sh), &f32s(&x_full));
    eprintln!("wrapped hyperprior: |shielded - plain| {d_sh:.3e}, |full - plain| {d_full:.3e}, |shielded - full| {d_cond:.3e}");
    assert!(d_sh > 1e-3 && d_full > 1e-3 && d_cond > 1e-4);

    // Per-sample conditions (training): sample 0 shielded, sample 1 full.
    let betas = Tensor::new(&[1f32, 0.0], &Device::Cpu).unwrap();
    let x_mixed = shielded.synthesize_betas(&y_hat, &betas).unwrap();
    let sample = |t: &Tensor, i| f32s(&t.narrow(0, i, 1).unwrap());
    assert!(max_abs_diff(&sample(&x_mixed, 0), &sample(&x_sh, 0)) < 1e-5);
    assert!(max_abs_diff(&sample(&x_mixed, 1), &sample(&x_full, 1)) < 1e-5);

    // Round trip through a state dict, as a model file holding backbone + `cltg.*` would.
    let mut tensors = model.tensors.clone();
    for (k, v) in map.data().lock().unwrap().iter() {
        tensors.insert(k.clone(), v.as_tensor().clone());
    }
    let cfg = CltgConfig::infer_generic(&tensors).unwrap().unwrap();
    assert_eq!(cfg, *shielded.generator().config());
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let reloaded = Cltg::new(vb, &cfg).unwrap();
    let a = reloaded.triggers(&Condition::SHIELDED, 1).unwrap();
    let b = shielded
        .generator()
        .triggers(&Condition::SHIELDED, 1)
        .unwrap();
    for (a, b) in a.bias.unwrap().iter().zip(&b.bias.unwrap()) {
        assert_eq!(f32s(a), f32s(b));
    }

    // A generator for other injection points is refused.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let wrong = Cltg::new(vb, &CltgConfig::new(vec![128, 128])).unwrap();
    assert!(ShieldedBackbone::new(model.build_backbone(&Device::Cpu).unwrap(), wrong).is_err());
}

/// A fresh (VarMap-backed, trainable) paper-size model creates exactly the official parameter
/// names and shapes of `state_dict_layout_N192_M320.json`; only buffers are left to the file.
#[test]
fn fresh_paper_size_model_has_the_official_layout() {
    let Some(dir) = fixture_dir("psic-official") else {
        return;
    };
    let layout: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("state_dict_layout_N192_M320.json")).unwrap(),
    )
    .unwrap();
    const BUFFERS: [&str; 9] = [
        "_reparam.",
        "likelihood_lower_bound",
        "._quantized_cdf",
        "._offset",
        "._cdf_length",
        "scale_table",
        "scale_bound",
        "lower_bound_scale",
        "entropy_bottleneck.target",
    ];
    let buffer = |k: &str| BUFFERS.iter().any(|p| k.contains(p));
    let mut official: Vec<(String, Vec<usize>)> = layout["keys"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !buffer(k))
        .map(|(k, v)| {
            let shape = v["shape"].as_array().unwrap();
            (
                k.clone(),
                shape.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect();
    official.sort();

    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let cfg = PsicHy2018Config { n: 192, m: 320 };
    let (model, cltg) = PsicHy2018::with_cltg(vb, &cfg).unwrap();
    let mut ours: Vec<(String, Vec<usize>)> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    ours.sort();
    assert_eq!(ours.len(), official.len());
    assert_eq!(ours, official);
    assert_eq!(model.injection_points(), vec![192; 8]);
    assert_eq!(cltg.injection_points(), &[192; 8]);
    assert_eq!(model.config_json(), serde_json::json!({"n": 192, "m": 320}));
}
