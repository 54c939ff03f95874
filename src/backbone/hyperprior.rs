//! Ballé et al. 2018 scale hyperprior (CompressAI's `ScaleHyperprior`, zoo name
//! `bmshj2018-hyperprior`).

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::hyper::HyperpriorCore;
use super::{GaussianParams, LicBackbone, PortableParams, Triggers};
use crate::entropy::{EntropyBottleneck, GaussianConditional};
use crate::layers::{ConvTranspose2d, Gdn};
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
    g_s: (Vec<ConvTranspose2d>, Vec<Gdn>),
}

impl ScaleHyperprior {
    /// Loads (or creates, for training) the model from `vb`. Loaded (frozen) weights run in
    /// f32 until [`LicBackbone::set_transform_precision`] (which [`Codec`](crate::Codec) calls);
    /// a model created for training takes [`Precision::auto`] for `g_a` and `g_s` (bf16 where
    /// the CPU has it, unless `PSIC_PRECISION=f32`).
    pub fn new(vb: VarBuilder, cfg: &ScaleHyperpriorConfig) -> Result<Self> {
        let (n, m) = (cfg.n, cfg.m);
        let core = HyperpriorCore::new(&vb, n, m)?;
        let g_s_dims = [(m, n), (n, n), (n, n), (n, 3)];
        let g_s_convs = g_s_dims
            .iter()
            .enumerate()
            .map(|(i, &(i_c, o_c))| {
                ConvTranspose2d::new(vb.pp(format!("g_s.{}", 2 * i)), i_c, o_c, 5, 2)
            })
            .collect::<Result<Vec<_>>>()?;
        let g_s_gdns = (0..3)
            .map(|i| Gdn::new(vb.pp(format!("g_s.{}", 2 * i + 1)), n, true))
            .collect::<Result<Vec<_>>>()?;
        let mut model = Self {
            cfg: *cfg,
            core,
            g_s: (g_s_convs, g_s_gdns),
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
        // Each 5x5 stride-2 transposed convolution reads input rows Y-1..=Y+1 for output rows
        // 2Y and 2Y+1 (IGDN and the triggers are per pixel): output rows 16a..16b need latent
        // rows a-2..=b (2 above, 1 below).
        Some(2)
    }

    fn injection_points(&self) -> Vec<usize> {
        vec![self.cfg.n; 3]
    }

    fn synthesis(&self, y_hat: &Tensor, triggers: Option<&Triggers>) -> Result<Tensor> {
        if let Some(t) = triggers {
            t.check(&self.injection_points(), y_hat.dims4()?.0)?;
        }
        let (convs, gdns) = &self.g_s;
        let mut h = y_hat.clone();
        for (i, conv) in convs.iter().enumerate() {
            h = match gdns.get(i) {
                Some(gdn) => conv.forward_gdn(&h, gdn)?,
                None => conv.forward(&h)?,
            };
            if let Some(t) = triggers.filter(|_| i < gdns.len()) {
                h = t.inject(i, &h)?;
            }
        }
        Ok(h)
    }

    fn set_transform_precision(&mut self, precision: Precision) -> Result<()> {
        self.core.set_analysis_precision(precision)?;
        for conv in &mut self.g_s.0 {
            conv.set_precision(precision)?;
        }
        Ok(())
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
