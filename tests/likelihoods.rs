//! The entropy models' differentiable likelihoods (the rate term of training) against the
//! official PSIC fixture's `z_likelihoods` / `y_likelihoods` and bit counts.

mod common;

use candle_core::Device;
use common::*;
use psic::ModelFile;

#[test]
fn likelihoods_match_the_reference() {
    let Some(dir) = fixture_dir("psic-official") else {
        return;
    };
    let model = ModelFile::import(dir.join("state_dict.safetensors"), None, &Device::Cpu).unwrap();
    let b = model.build_backbone(&Device::Cpu).unwrap();
    let refs = load_tensors(&dir.join("refs.safetensors"));
    let z_lik = b.entropy_bottleneck().likelihood(&refs["z_hat"]).unwrap();
    let err = max_rel_diff(&f32s(&z_lik), &f32s(&refs["z_likelihoods"]));
    assert!(err < 1e-4, "z likelihoods: relative error {err}");
    let y_lik = b
        .gaussian_conditional()
        .likelihood(&refs["y_hat"], &refs["scales_hat"], None)
        .unwrap();
    let err = max_rel_diff(&f32s(&y_lik), &f32s(&refs["y_likelihoods"]));
    assert!(err < 1e-4, "y likelihoods: relative error {err}");
    let bits = |t: &candle_core::Tensor| -> f32 { f32s(t).iter().map(|p| -p.log2()).sum() };
    let (zb, yb) = (bits(&z_lik), bits(&y_lik));
    let (zr, yr) = (f32s(&refs["z_bits"])[0], f32s(&refs["y_bits"])[0]);
    assert!((zb - zr).abs() < 1e-3 * zr.max(1.0), "z bits {zb} vs {zr}");
    assert!((yb - yr).abs() < 1e-2, "y bits {yb} vs {yr}");
}
