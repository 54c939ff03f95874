//! Ballé et al. 2018 scale hyperprior (CompressAI's `ScaleHyperprior`, zoo name
//! `bmshj2018-hyperprior`).

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::hyper::{HyperVariant, HyperpriorCore, IgdnSynthesis};
use super::{GaussianParams, LicBackbone, PortableParams, Triggers};
use crate::entropy::{EntropyBottleneck, GaussianConditional};
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
    /// a model created for training takes [`Precision::auto`] for `g_a` and `g_s` (bf16 where
    /// the CPU has it, unless `PSIC_PRECISION=f32`).
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

impl LicBackbone for ScaleHyperprior {
    fn architecture(&self) -> &'static str {
        "bmshj2018-hyperprior"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self.cfg).unwrap_or_default()
    }

    fn device(&self) -> &Device {
        &self.core.device
    }

    fn latent_channels(&self) -> usize {
        self.cfg.m
    }

    fn hyper_channels(&self) -> usize {
        self.cfg.n
    }

    fn analysis(&self, x: &Tensor) -> Result<Tensor> {
        self.core.analysis(x)
    }

    fn hyper_analysis(&self, y: &Tensor) -> Result<Tensor> {
        self.core.hyper_analysis_with(y, &mut |_| {})
    }

    fn hyper_synthesis(&self, z_hat: &Tensor) -> Result<GaussianParams> {
        self.core.hyper_synthesis_with(z_hat, &mut |_| {})
    }

    fn hyper_synthesis_portable(&self, z_hat: &Tensor) -> Result<Option<PortableParams>> {
        self.core.hyper_synthesis_portable(z_hat).map(Some)
    }

    fn analysis_halo(&self) -> Option<usize> {
        Some(super::hyper::ANALYSIS_HALO)
    }

    fn synthesis_halo(&self) -> Option<usize> {
        Some(super::hyper::SYNTHESIS_HALO)
    }

    fn injection_points(&self) -> Vec<usize> {
        self.g_s.injection_points()
    }

    fn synthesis(&self, y_hat: &Tensor, triggers: Option<&Triggers>) -> Result<Tensor> {
        self.g_s.forward(y_hat, triggers)
    }

    fn set_transform_precision(&mut self, precision: Precision) -> Result<()> {
        self.core.set_analysis_precision(precision)?;
        self.g_s.set_precision(precision)
    }

    fn transform_precision(&self) -> Precision {
        self.core.analysis_precision()
    }

    fn entropy_bottleneck(&self) -> &EntropyBottleneck {
        &self.core.entropy_bottleneck
    }

    fn gaussian_conditional(&self) -> &GaussianConditional {
        &self.core.gaussian_conditional
    }
}
