//! Row strips (`psic::tiles`): large images are analysed and synthesised a band of rows at a
//! time, and the result must not change. Small strips are forced here so that an image of a
//! few hundred pixels is cut into several.
#![cfg(feature = "default-model")]

mod common;

use candle_core::{Device, Tensor};
use common::{f32s, test_image};
use psic::backbone::PsicHy2018Config;
use psic::model::Architecture;
use psic::tiles::{analyse, plan_strips, synthesise, synthesise_tensor};
use psic::{Codec, LicBackbone, ModelFile, Precision};

/// The default model at f32 (the precision the streams of the other tests are checked at).
fn default_codec() -> Codec {
    psic::zoo::default_codec()
        .unwrap()
        .with_precision(Precision::F32)
        .unwrap()
}

/// The budget that gives strips of `rows` latent rows for a `width`-pixel-wide padded image.
fn budget(b: &dyn LicBackbone, width: usize, rows: usize) -> u64 {
    (b.latent_stride() * width * rows) as u64
}

/// 320x400 pads to 320x448: 28 latent rows, cut into 10 strips of 3 (the last 1) with 2 rows
/// of context a side, the first and last clamped at the image's edges.
const W: u32 = 320;
const H: u32 = 400;
const PADDED: (usize, usize) = (320, 448);

#[test]
fn strips_analyse_exactly_like_one_pass() {
    let codec = default_codec();
    let b = codec.backbone();
    let img = test_image(W, H);
    let small = budget(b, PADDED.0, 3);
    assert_eq!(
        plan_strips(28, small / 3, b.analysis_halo(), small).len(),
        10
    );
    let whole = analyse(b, &img, PADDED, u64::MAX).unwrap();
    let strips = analyse(b, &img, PADDED, small).unwrap();
    assert_eq!(whole.dims(), [1, 96, 28, 20]);
    let (a, c) = (f32s(&whole), f32s(&strips));
    let diff = a.iter().zip(&c).position(|(x, y)| x != y);
    assert!(
        diff.is_none(),
        "y differs first at {diff:?}: max |diff| {}",
        common::max_abs_diff(&a, &c)
    );
    // The same y as the transform on the whole padded tensor, as the codec computed it before.
    let x = psic::image_io::image_to_tensor(&img, &Device::Cpu).unwrap();
    let (x, _, _) = psic::image_io::pad_to_multiple(&x, 64).unwrap();
    assert_eq!(f32s(&b.analysis(&x).unwrap()), f32s(&whole));
}

#[test]
fn strips_give_the_same_stream_and_decodes() {
    let img = test_image(W, H);
    let one = default_codec().with_tile_pixels(u64::MAX);
    let cut = default_codec().with_tile_pixels(budget(one.backbone(), PADDED.0, 3));
    let bytes = one.encode(&img).unwrap();
    assert_eq!(cut.encode(&img).unwrap(), bytes, "streams differ");
    let conditions = one.conditions().unwrap();
    for condition in [conditions.shielded, conditions.full] {
        let a = one.decode_with_condition(&bytes, &condition).unwrap();
        let b = cut.decode_with_condition(&bytes, &condition).unwrap();
        assert_eq!(a, b, "decode at beta {} differs", condition.beta());
        // The synthesis before rounding, and the image of the one-pass synthesis.
        let latent = one.decode_latent(&bytes).unwrap();
        let x = one.synthesize(&latent, &condition).unwrap();
        assert_eq!(
            f32s(&x),
            f32s(&cut.synthesize(&latent, &condition).unwrap())
        );
        assert_eq!(psic::image_io::tensor_to_image(&x).unwrap(), a);
    }
}

/// The official architecture's deeper synthesis (residual blocks, sub-pixel convolutions)
/// with its halo of 8 latent rows, on a small random model.
#[test]
fn psic_hy2018_strips_equal_one_pass() {
    let arch = Architecture::PsicHy2018(PsicHy2018Config { n: 16, m: 24 });
    let init = ModelFile::initialize(arch, 7, &Device::Cpu).unwrap();
    let model = ModelFile::from_bytes(&init.to_bytes().unwrap(), &Device::Cpu).unwrap();
    let b = model.build_backbone(&Device::Cpu).unwrap();
    let img = test_image(W, H);
    let small = budget(b.as_ref(), PADDED.0, 3);
    let y = analyse(b.as_ref(), &img, PADDED, u64::MAX).unwrap();
    assert_eq!(
        f32s(&y),
        f32s(&analyse(b.as_ref(), &img, PADDED, small).unwrap())
    );
    let y_hat = y.round().unwrap();
    let triggers = psic::backbone::Triggers::additive(
        (0..8)
            .map(|i| Tensor::full(0.05 * i as f32, (1, 16), &Device::Cpu).unwrap())
            .collect(),
    );
    let size = (W as usize, H as usize);
    for t in [None, Some(&triggers)] {
        let a = synthesise_tensor(b.as_ref(), &y_hat, t, size, u64::MAX).unwrap();
        let c = synthesise_tensor(b.as_ref(), &y_hat, t, size, small).unwrap();
        assert_eq!(a.dims(), [1, 3, H as usize, W as usize]);
        assert_eq!(
            f32s(&a),
            f32s(&c),
            "synthesis differs (triggers: {})",
            t.is_some()
        );
        let img = synthesise(b.as_ref(), &y_hat, t, size, small).unwrap();
        assert_eq!(img, psic::image_io::tensor_to_image(&a).unwrap());
    }
}
