//! Conformance with CompressAI's own ScaleHyperprior(128, 192): transforms, symbols, strings and
//! reconstructions of `../shared/fixtures/compressai` (made by CompressAI 1.2.8, not by us).

mod common;

use candle_core::Device;
use common::*;
use psic::bitstream::{Bitstream, EntropyPath};
use psic::{Codec, ModelFile};

fn fixture() -> Option<CompressAiFixture> {
    compressai_fixture("compressai", "hyperprior_128_192.safetensors", 41704)
}

#[test]
fn transforms_match_compressai() {
    let Some(f) = fixture() else { return };
    let b = f.codec.backbone();
    let x = psic::image_io::image_to_tensor(&f.image, &Device::Cpu).unwrap();
    // The PNG decodes to exactly CompressAI's input.
    assert_eq!(max_abs_diff(&f32s(&x), &f32s(&f.refs["x"])), 0.0);
    let y = b.analysis(&x).unwrap();
    let rel = max_rel_diff(&f32s(&y), &f32s(&f.refs["y"]));
    assert!(rel < 1e-4, "y relative error {rel}");
    let z = b.hyper_analysis(&f.refs["y"]).unwrap();
    let rel = max_rel_diff(&f32s(&z), &f32s(&f.refs["z"]));
    assert!(rel < 1e-4, "z relative error {rel}");
    let scales = b.hyper_synthesis(&f.refs["z_hat"]).unwrap().scales;
    let rel = max_rel_diff(&f32s(&scales), &f32s(&f.refs["scales_hat"]));
    assert!(rel < 1e-4, "scales relative error {rel}");
    let x_hat = b
        .synthesis(&f.refs["y_hat"], None)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let abs = max_abs_diff(&f32s(&x_hat), &f32s(&f.refs["x_hat"]));
    assert!(abs < 1e-4, "x_hat max abs error {abs}");
}

#[test]
fn symbols_and_indexes_match_compressai() {
    let Some(f) = fixture() else { return };
    let b = f.codec.backbone();
    let eb = b.entropy_bottleneck();
    assert_eq!(
        eb.symbols(&f.refs["z"]).unwrap(),
        i32s(&f.refs["z_symbols"])
    );
    let z_hat = eb.quantize(&f.refs["z"]).unwrap();
    assert_eq!(f32s(&z_hat), f32s(&f.refs["z_hat"]));
    let gc = b.gaussian_conditional();
    assert_eq!(
        gc.build_indexes(&f.refs["scales_hat"]).unwrap(),
        i32s(&f.refs["y_indexes"])
    );
    assert_eq!(
        gc.symbols(&f.refs["y"], None).unwrap(),
        i32s(&f.refs["y_symbols"])
    );
    // The portable entropy path picks CompressAI's tables too (for this image: its scales differ
    // from PyTorch's in the last bits, but none crosses a table threshold).
    let portable = b
        .hyper_synthesis_portable(&f.refs["z_hat"])
        .unwrap()
        .expect("the hyperprior has a portable h_s");
    let reference = f32s(&f.refs["scales_hat"]);
    let differing = portable
        .scales
        .iter()
        .zip(&reference)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    eprintln!(
        "portable scales: {differing} of {} differ from CompressAI's in some bit, max relative \
         difference {:e}",
        reference.len(),
        max_rel_diff(&portable.scales, &reference)
    );
    assert_eq!(gc.indexes_of(&portable.scales), i32s(&f.refs["y_indexes"]));
}

#[test]
fn encoded_strings_are_byte_identical_to_compressai() {
    let Some(f) = fixture() else { return };
    // Both entropy paths: the portable one (the default) and the float one (CompressAI's own).
    let float = Codec::from_model_file(
        &ModelFile::import(
            fixture_dir("compressai")
                .unwrap()
                .join("hyperprior_128_192.safetensors"),
            None,
            &Device::Cpu,
        )
        .unwrap(),
        &Device::Cpu,
    )
    .unwrap()
    .with_entropy_path(EntropyPath::Float);
    for (codec, path) in [
        (&f.codec, EntropyPath::Portable),
        (&float, EntropyPath::Float),
    ] {
        let bytes = codec.encode(&f.image).unwrap();
        let stream = Bitstream::from_bytes(&bytes).unwrap();
        assert_eq!(stream.entropy_path, path);
        assert_eq!(stream.strings[0].len(), f.y_string.len());
        assert!(
            stream.strings[0] == f.y_string,
            "y string differs ({path:?})"
        );
        assert!(
            stream.strings[1] == f.z_string,
            "z string differs ({path:?})"
        );
        assert_eq!((stream.width, stream.height), (768, 512));
    }
}

#[test]
fn decodes_compressai_strings_exactly() {
    let Some(f) = fixture() else { return };
    let stream = Bitstream {
        fingerprint: *f.codec.fingerprint(),
        width: 768,
        height: 512,
        pad_right: 0,
        pad_bottom: 0,
        y_shape: [192, 32, 48],
        z_shape: [128, 8, 12],
        entropy_path: EntropyPath::Float,
        level: None,
        strings: vec![f.y_string.clone(), f.z_string.clone()],
    };
    let latent = f.codec.decode_latent(&stream.to_bytes().unwrap()).unwrap();
    assert_eq!(f32s(&latent.y_hat), f32s(&f.refs["y_hat"]), "y_hat differs");
    assert_eq!(
        latent.y_indexes,
        i32s(&f.refs["y_indexes"]),
        "y indexes differ"
    );
    let x_hat = f
        .codec
        .backbone()
        .synthesis(&latent.y_hat, None)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let abs = max_abs_diff(&f32s(&x_hat), &f32s(&f.refs["x_hat"]));
    assert!(abs < 1e-4, "x_hat max abs error {abs}");
}
