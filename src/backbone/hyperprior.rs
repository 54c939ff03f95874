//! Ballé et al. 2018 scale hyperprior (CompressAI's `ScaleHyperprior`, zoo name
//! `bmshj2018-hyperprior`).

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::hyper::{HyperVariant, HyperpriorCore, IgdnSynthesis};
use super::LicBackbone;
use crate::entropy::EntropyBottleneck;
use crate::{Precision, Result};

/// Configuration: `n` channels in the transforms and the hyper-latent, `m` in the latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleHyperpriorConfig {
    /// Channels of the hidden layers and of `z`.
    pub n: usize,
    /// Channels of `y`.
    pub m: usize,
}

/// The scale hyperprior: GDN analysis, IGDN synthesis, ReLU hyper transforms, a factorized prior
/// on `z` and a zero-mean Gaussian on `y`.
///
/// Weight names are CompressAI's (`g_a.0.weight`, `g_s.1.gamma`, `h_s.4.bias`,
/// `entropy_bottleneck.*`, `gaussian_conditional.*`), so its state dicts load unchanged.
/// Injection points: after each of the three IGDNs of `g_s` (`n` channels each).
#[derive(Debug, Clone)]
pub struct ScaleHyperprior {
    cfg: ScaleHyperpriorConfig,
    core: HyperpriorCore,
    g_s: IgdnSynthesis,
}

impl ScaleHyperprior {
    /// Loads (or creates, for training) the model from `vb`. Loaded (frozen) weights run in
    /// f32 until [`LicBackbone::set_transform_precision`] (which [`Codec`](crate::Codec) calls);
    /// a model created for training takes [`Precision::auto`] for `g_a` and `g_s`
    /// (`PSIC_PRECISION`, else f32; a training configuration's `precision` overrides it).
    pub fn new(vb: VarBuilder, cfg: &ScaleHyperpriorConfig) -> Result<Self> {
        let (n, m) = (cfg.n, cfg.m);
        let core = HyperpriorCore::new(&vb, n, m, HyperVariant::Scale)?;
        let mut model = Self {
            cfg: *cfg,
            core,
            g_s: IgdnSynthesis::new(&vb, n, m)?,
        };
        if model.core.trainable() {
            model.set_transform_precision(Precision::auto())?;
        }
        Ok(model)
    }

    /// The configuration.
    pub fn config(&self) -> &ScaleHyperpriorConfig {
        &self.cfg
    }

    /// Mutable entropy bottleneck (to rebuild its tables after training).
    pub fn entropy_bottleneck_mut(&mut self) -> &mut EntropyBottleneck {
        &mut self.core.entropy_bottleneck
    }
}

super::hyper::hyperprior_backbone!(ScaleHyperprior, "bmshj2018-hyperprior");
