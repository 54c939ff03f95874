//! Models that ship with psic.
//!
//! The default model (`models/psic-default.safetensors`, embedded in the library with the
//! `default-model` cargo feature, on by default) is psic's own shielded codec: a scale
//! hyperprior (N = 64, M = 96) with a CLTG trigger generator, trained by psic's trainer against
//! EfficientNet-Lite0. Its data, training and measured figures are in `docs/MODELS.md`.

#[cfg(feature = "default-model")]
use candle_core::Device;

#[cfg(feature = "default-model")]
use crate::{Codec, ModelFile, Result};

/// Name of the default model (the file name in `models/`, without extension).
pub const DEFAULT_MODEL_NAME: &str = "psic-default";

/// The default model file's bytes.
#[cfg(feature = "default-model")]
pub fn default_model_bytes() -> &'static [u8] {
    include_bytes!("../models/psic-default.safetensors")
}

/// The default model, loaded on `device`.
#[cfg(feature = "default-model")]
pub fn default_model(device: &Device) -> Result<ModelFile> {
    ModelFile::from_bytes(default_model_bytes(), device)
}

/// A codec for the default model on the CPU.
#[cfg(feature = "default-model")]
pub fn default_codec() -> Result<Codec> {
    Codec::from_model_file(&default_model(&Device::Cpu)?, &Device::Cpu)
}

#[cfg(all(test, feature = "default-model"))]
mod tests {
    use super::*;

    #[test]
    fn default_model_is_a_shielded_codec() {
        let model = default_model(&Device::Cpu).unwrap();
        assert!(model.conditions().unwrap().is_some());
        let codec = default_codec().unwrap();
        let img =
            image::RgbImage::from_fn(70, 50, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
        let bytes = codec.encode(&img).unwrap();
        let shielded = codec.decode_shielded(&bytes).unwrap();
        let full = codec
            .decode_full(&bytes, &codec.conditions().unwrap().full)
            .unwrap();
        assert_eq!(shielded.dimensions(), (70, 50));
        assert_ne!(shielded, full);
    }
}
