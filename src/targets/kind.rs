//! Target kinds by name ([`TargetKind`]) and loading the built-in ones ([`load_target`]).

use std::path::Path;

use candle_core::Device;

#[cfg(feature = "efficientnet-lite")]
use super::EfficientNetLite;
use super::SemanticTarget;
use crate::{Error, Result};

/// The kind of a semantic target, as `[shield] target` names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TargetKind {
    /// An ImageNet EfficientNet-Lite classifier (`efficientnet-lite`; weights: a safetensors file).
    EfficientNetLite,
    /// CLIP with a caption list (`clip`; weights: a Hugging Face CLIP folder with `captions.txt`).
    Clip,
    /// Any other name: a target of your own, passed to `Trainer::with_target` (feature `train`;
    /// the name is only recorded, [`load_target`] cannot load it).
    Custom(String),
}

impl TargetKind {
    /// The name written in configurations.
    pub fn name(&self) -> &str {
        match self {
            Self::EfficientNetLite => "efficientnet-lite",
            Self::Clip => "clip",
            Self::Custom(name) => name,
        }
    }
}

impl From<String> for TargetKind {
    fn from(name: String) -> Self {
        match name.as_str() {
            "efficientnet-lite" => Self::EfficientNetLite,
            "clip" => Self::Clip,
            _ => Self::Custom(name),
        }
    }
}

impl From<&str> for TargetKind {
    fn from(name: &str) -> Self {
        Self::from(name.to_string())
    }
}

impl From<TargetKind> for String {
    fn from(kind: TargetKind) -> String {
        kind.name().to_string()
    }
}

impl std::str::FromStr for TargetKind {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self::from(s))
    }
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Loads a semantic target by kind; a [`TargetKind::Custom`] target cannot be loaded here (pass
/// it to `Trainer::with_target`).
pub fn load_target(
    kind: &TargetKind,
    weights: &Path,
    device: &Device,
) -> Result<Box<dyn SemanticTarget>> {
    // Without the target features the arguments are only named in the errors.
    let _ = (weights, device);
    match kind {
        #[cfg(feature = "efficientnet-lite")]
        TargetKind::EfficientNetLite => Ok(Box::new(EfficientNetLite::load(weights, device)?)),
        #[cfg(not(feature = "efficientnet-lite"))]
        TargetKind::EfficientNetLite => Err(Error::InvalidArgument(
            "the efficientnet-lite target needs psic's `efficientnet-lite` cargo feature".into(),
        )),
        #[cfg(not(feature = "clip"))]
        TargetKind::Clip => Err(Error::InvalidArgument(
            "the clip target needs psic's `clip` cargo feature".into(),
        )),
        #[cfg(feature = "clip")]
        TargetKind::Clip => {
            // weights = a Hugging Face CLIP folder: config.json, model.safetensors,
            // bpe_simple_vocab_16e6.txt.gz (or merges.txt) and captions.txt (one caption a line).
            let clip = crate::targets::Clip::load(weights, device)?;
            if clip.captions().is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "CLIP target {}: no captions.txt (one caption per line) in the folder",
                    weights.display()
                )));
            }
            Ok(Box::new(clip))
        }
        TargetKind::Custom(name) => Err(Error::InvalidArgument(format!(
            "unknown target {name:?} (psic loads efficientnet-lite and clip; pass your own \
             SemanticTarget to Trainer::with_target)"
        ))),
    }
}
