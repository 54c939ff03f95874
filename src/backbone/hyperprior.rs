//! Ballé et al. 2018 scale hyperprior (CompressAI's `ScaleHyperprior`, zoo name
//! `bmshj2018-hyperprior`).

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{GaussianParams, LicBackbone, Triggers};
use crate::entropy::{EntropyBottleneck, GaussianConditional};
use crate::layers::{Conv2d, ConvTranspose2d, Gdn};
use crate::{Error, Result};

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
    g_a: (Vec<Conv2d>, Vec<Gdn>),
    g_s: (Vec<ConvTranspose2d>, Vec<Gdn>),
    h_a: Vec<Conv2d>,
    h_s: (Vec<ConvTranspose2d>, Conv2d),
    entropy_bottleneck: EntropyBottleneck,
    gaussian_conditional: GaussianConditional,
    device: Device,
}

impl ScaleHyperprior {
    /// Loads (or creates, for training) the model from `vb`.
    pub fn new(vb: VarBuilder, cfg: &ScaleHyperpriorConfig) -> Result<Self> {
        let (n, m) = (cfg.n, cfg.m);
        if n == 0 || m == 0 {
            return Err(Error::Model(format!(
                "invalid hyperprior size N={n}, M={m}"
            )));
        }
        let g_a_dims = [(3, n), (n, n), (n, n), (n, m)];
        let g_a_convs = g_a_dims
            .iter()
            .enumerate()
            .map(|(i, &(i_c, o_c))| Conv2d::new(vb.pp(format!("g_a.{}", 2 * i)), i_c, o_c, 5, 2))
            .collect::<Result<Vec<_>>>()?;
        let g_a_gdns = (0..3)
            .map(|i| Gdn::new(vb.pp(format!("g_a.{}", 2 * i + 1)), n, false))
            .collect::<Result<Vec<_>>>()?;
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
        let h_a = vec![
            Conv2d::new(vb.pp("h_a.0"), m, n, 3, 1)?,
            Conv2d::new(vb.pp("h_a.2"), n, n, 5, 2)?,
            Conv2d::new(vb.pp("h_a.4"), n, n, 5, 2)?,
        ];
        let h_s = (
            vec![
                ConvTranspose2d::new(vb.pp("h_s.0"), n, n, 5, 2)?,
                ConvTranspose2d::new(vb.pp("h_s.2"), n, n, 5, 2)?,
            ],
            Conv2d::new(vb.pp("h_s.4"), n, m, 3, 1)?,
        );
        Ok(Self {
            cfg: *cfg,
            g_a: (g_a_convs, g_a_gdns),
            g_s: (g_s_convs, g_s_gdns),
            h_a,
            h_s,
            entropy_bottleneck: EntropyBottleneck::new(vb.pp("entropy_bottleneck"), n)?,
            gaussian_conditional: GaussianConditional::new(vb.pp("gaussian_conditional"))?,
            device: vb.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ScaleHyperpriorConfig {
        &self.cfg
    }

    /// Mutable entropy bottleneck (to rebuild its tables after training).
    pub fn entropy_bottleneck_mut(&mut self) -> &mut EntropyBottleneck {
        &mut self.entropy_bottleneck
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
        &self.device
    }

    fn latent_channels(&self) -> usize {
        self.cfg.m
    }

    fn hyper_channels(&self) -> usize {
        self.cfg.n
    }

    fn analysis(&self, x: &Tensor) -> Result<Tensor> {
        let (convs, gdns) = &self.g_a;
        let mut h = x.clone();
        for (i, conv) in convs.iter().enumerate() {
            h = conv.forward(&h)?;
            if let Some(gdn) = gdns.get(i) {
                h = gdn.forward(&h)?;
            }
        }
        Ok(h)
    }

    fn hyper_analysis(&self, y: &Tensor) -> Result<Tensor> {
        let mut h = y.abs()?;
        for (i, conv) in self.h_a.iter().enumerate() {
            h = conv.forward(&h)?;
            if i + 1 < self.h_a.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    fn hyper_synthesis(&self, z_hat: &Tensor) -> Result<GaussianParams> {
        let (deconvs, last) = &self.h_s;
        let mut h = z_hat.clone();
        for d in deconvs {
            h = d.forward(&h)?.relu()?;
        }
        Ok(GaussianParams {
            scales: last.forward(&h)?.relu()?,
            means: None,
        })
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
            h = conv.forward(&h)?;
            if let Some(gdn) = gdns.get(i) {
                h = gdn.forward(&h)?;
                if let Some(t) = triggers {
                    h = t.inject(i, &h)?;
                }
            }
        }
        Ok(h)
    }

    fn entropy_bottleneck(&self) -> &EntropyBottleneck {
        &self.entropy_bottleneck
    }

    fn gaussian_conditional(&self) -> &GaussianConditional {
        &self.gaussian_conditional
    }
}
