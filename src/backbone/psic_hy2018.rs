//! The official PSIC model, `Hy2018` of the authors' `models/hy_cond.py` (architecture name
//! `psic-hy2018`): Ballé's scale hyperprior analysis and hyper transforms with a conditional
//! residual synthesis steered by triggers.

use std::collections::HashMap;

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::hyper::{HyperVariant, HyperpriorCore};
use super::{GaussianParams, LicBackbone, PortableParams, Triggers};
use crate::entropy::{EntropyBottleneck, GaussianConditional};
use crate::layers::{Conv2d, Gdn, SubpelConv2d};
use crate::shield::{Cltg, CltgConfig, CltgNames};
use crate::{Precision, Result};

/// Architecture name written into model files.
pub const PSIC_HY2018: &str = "psic-hy2018";

/// Configuration: `n` channels in the transforms and the hyper-latent, `m` in the latent
/// (the paper uses N=192, M=320).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsicHy2018Config {
    /// Channels of the hidden layers and of `z`.
    pub n: usize,
    /// Channels of `y`.
    pub m: usize,
}

impl PsicHy2018Config {
    /// Whether a state dict has the official layout (looks for the conditional synthesis and
    /// the beta MLP).
    pub fn matches(tensors: &HashMap<String, Tensor>) -> bool {
        tensors.contains_key("g_s_cond.synthesis_transform.0.conv1.weight")
            && tensors.contains_key("global_cond.beta_mlp.fc1.weight")
    }

    /// Reads `n` and `m` from the shapes of an official state dict.
    pub fn infer(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let dim = |name: &str, i: usize| crate::tensor_util::state_dim(tensors, name, i);
        Ok(Self {
            n: dim("g_a.0.weight", 0)?,
            m: dim("g_a.6.weight", 0)?,
        })
    }

    /// The configuration of the matching official trigger generator: 10 Fourier frequencies,
    /// width 512, eight injection points of `n` channels.
    pub fn cltg_config(&self) -> CltgConfig {
        CltgConfig::new(vec![self.n; 8])
    }
}

/// CompressAI's `ResidualBlock` made conditional (the reference's `CondRes`):
/// `conv3x3 → GELU → + t1 → conv3x3 → GELU → + t2 → + skip(x)`.
#[derive(Debug, Clone)]
struct CondRes {
    conv1: Conv2d,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl CondRes {
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.conv1.set_precision(precision)?;
        self.conv2.set_precision(precision)?;
        if let Some(s) = &mut self.skip {
            s.set_precision(precision)?;
        }
        Ok(())
    }

    fn new(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(vb.pp("conv1"), in_c, out_c, 3, 1)?,
            conv2: Conv2d::new(vb.pp("conv2"), out_c, out_c, 3, 1)?,
            skip: if in_c != out_c {
                Some(Conv2d::new(vb.pp("skip"), in_c, out_c, 1, 1)?)
            } else {
                None
            },
        })
    }

    /// `first` is the index of this block's first trigger.
    fn forward(&self, x: &Tensor, triggers: Option<&Triggers>, first: usize) -> Result<Tensor> {
        let mut h = self.conv1.forward(x)?.gelu_erf()?;
        if let Some(t) = triggers {
            h = t.inject(first, &h)?;
        }
        h = self.conv2.forward(&h)?.gelu_erf()?;
        if let Some(t) = triggers {
            h = t.inject(first + 1, &h)?;
        }
        let identity = match &self.skip {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((h + identity)?)
    }
}

/// CompressAI's `ResidualBlockUpsample` with GELU: `subpel_conv → GELU → conv3x3 → IGDN`,
/// plus an `upsample` sub-pixel convolution of the input.
#[derive(Debug, Clone)]
struct ResUp {
    subpel_conv: SubpelConv2d,
    conv: Conv2d,
    igdn: Gdn,
    upsample: SubpelConv2d,
}

impl ResUp {
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.subpel_conv.set_precision(precision)?;
        self.conv.set_precision(precision)?;
        self.upsample.set_precision(precision)
    }

    fn new(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        Ok(Self {
            subpel_conv: SubpelConv2d::new(vb.pp("subpel_conv"), in_c, out_c, 3, 2)?,
            conv: Conv2d::new(vb.pp("conv"), out_c, out_c, 3, 1)?,
            igdn: Gdn::new(vb.pp("igdn"), out_c, true)?,
            upsample: SubpelConv2d::new(vb.pp("upsample"), in_c, out_c, 3, 2)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.subpel_conv.forward(x)?.gelu_erf()?;
        let h = self.conv.forward_gdn(&h, &self.igdn)?;
        Ok((h + self.upsample.forward(x)?)?)
    }
}

/// The official PSIC `Hy2018` as a [`LicBackbone`].
///
/// - `g_a`, `h_a`, `h_s`, `entropy_bottleneck.*`, `gaussian_conditional.*`: as the scale
///   hyperprior, under the same CompressAI names (`g_a.{0..6}`, `h_a.{0,2,4}`, `h_s.{0,2,4}`).
/// - Synthesis `g_s_cond.synthesis_transform.{0..7}`: conditional residual blocks at 0, 2, 4, 6
///   (`conv1`, `conv2`, and `skip` in block 0 where the width changes from M to N), residual
///   up-sampling blocks at 1, 3, 5 (`subpel_conv.0`, `conv`, `igdn`, `upsample.0`), and `7.0`, a
///   3x3 convolution N → 12 followed by `PixelShuffle(2)`.
///
/// Injection points: eight of `n` channels, two per conditional block in order (after the first
/// GELU, after the second GELU). The trigger generator's weights (`global_cond.beta_mlp.*`,
/// `g_s_cond.synthesis_transform.{k}._proj{1,2}.0.weight`) are not part of the backbone; load
/// them with [`PsicHy2018::with_cltg`] or [`PsicHy2018::load_cltg`].
///
/// `synthesis(y_hat, None)` adds no triggers (the same as all-zero triggers). The official model
/// has no such path: even `beta = 0` (the full decode) yields non-zero triggers, so decoders
/// must always pass the generator's triggers for this architecture; `None` is only a
/// well-defined fallback (e.g. for diagnostics), not a decode the model was trained for.
#[derive(Debug, Clone)]
pub struct PsicHy2018 {
    cfg: PsicHy2018Config,
    core: HyperpriorCore,
    cond_res: Vec<CondRes>,
    res_up: Vec<ResUp>,
    last: SubpelConv2d,
}

impl PsicHy2018 {
    /// Loads (or creates, for training) the backbone from `vb` (the model's root builder).
    pub fn new(vb: VarBuilder, cfg: &PsicHy2018Config) -> Result<Self> {
        let (n, m) = (cfg.n, cfg.m);
        let core = HyperpriorCore::new(&vb, n, m, HyperVariant::Scale)?;
        let st = vb.pp("g_s_cond.synthesis_transform");
        let cond_res = (0..4)
            .map(|i| CondRes::new(st.pp(2 * i), if i == 0 { m } else { n }, n))
            .collect::<Result<Vec<_>>>()?;
        let res_up = (0..3)
            .map(|i| ResUp::new(st.pp(2 * i + 1), n, n))
            .collect::<Result<Vec<_>>>()?;
        let last = SubpelConv2d::new(st.pp(7), n, 3, 3, 2)?;
        let mut model = Self {
            cfg: *cfg,
            core,
            cond_res,
            res_up,
            last,
        };
        // As ScaleHyperprior::new: a model created for training takes the default precision.
        if model.core.trainable() {
            model.set_transform_precision(Precision::auto())?;
        }
        Ok(model)
    }

    /// Loads the official trigger generator for a model of size `cfg` from `vb`
    /// (`global_cond.beta_mlp.*` and the `_proj*` weights, [`CltgNames::psic_hy2018`]).
    pub fn load_cltg(vb: VarBuilder, cfg: &PsicHy2018Config) -> Result<Cltg> {
        Cltg::with_names(vb, &cfg.cltg_config(), &CltgNames::psic_hy2018())
    }

    /// Loads both the backbone and its official trigger generator from one builder.
    pub fn with_cltg(vb: VarBuilder, cfg: &PsicHy2018Config) -> Result<(Self, Cltg)> {
        let cltg = Self::load_cltg(vb.clone(), cfg)?;
        Ok((Self::new(vb, cfg)?, cltg))
    }

    /// The configuration.
    pub fn config(&self) -> &PsicHy2018Config {
        &self.cfg
    }

    /// Mutable entropy bottleneck (to rebuild its tables after training).
    pub fn entropy_bottleneck_mut(&mut self) -> &mut EntropyBottleneck {
        &mut self.core.entropy_bottleneck
    }

    /// Every intermediate of `g_a`: the outputs of `g_a.0` … `g_a.6` (7 tensors; the last is
    /// `y`). For conformance tests and debugging.
    pub fn analysis_trace(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(7);
        self.core.analysis_with(x, &mut |t| out.push(t.clone()))?;
        Ok(out)
    }

    /// Every intermediate of `h_a(|y|)`: the outputs of `h_a.0` … `h_a.4` (5 tensors; the last
    /// is `z`).
    pub fn hyper_analysis_trace(&self, y: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(5);
        self.core
            .hyper_analysis_with(y, &mut |t| out.push(t.clone()))?;
        Ok(out)
    }

    /// Every intermediate of `h_s`: the outputs of `h_s.0` … `h_s.5` (6 tensors; the last is
    /// the scales).
    pub fn hyper_synthesis_trace(&self, z_hat: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(6);
        self.core
            .hyper_synthesis_with(z_hat, &mut |t| out.push(t.clone()))?;
        Ok(out)
    }

    /// The outputs of the eight synthesis blocks `g_s_cond.synthesis_transform.{0..7}` (the last
    /// is `x_hat`, not clamped).
    pub fn synthesis_trace(
        &self,
        y_hat: &Tensor,
        triggers: Option<&Triggers>,
    ) -> Result<Vec<Tensor>> {
        if let Some(t) = triggers {
            t.check(&self.injection_points(), y_hat.dims4()?.0)?;
        }
        let mut out = Vec::with_capacity(8);
        let mut h = y_hat.clone();
        for (i, block) in self.cond_res.iter().enumerate() {
            h = block.forward(&h, triggers, 2 * i)?;
            out.push(h.clone());
            if let Some(up) = self.res_up.get(i) {
                h = up.forward(&h)?;
                out.push(h.clone());
            }
        }
        out.push(self.last.forward(&h)?);
        Ok(out)
    }
}

impl LicBackbone for PsicHy2018 {
    fn architecture(&self) -> &'static str {
        PSIC_HY2018
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
        // Rows of context, output back to the latent (3x3 convolutions read 1 row a side, a
        // residual block 2, a sub-pixel convolution 1 row of its input, then doubles): 1 at
        // 1/2 scale for the last layer, +2 (block) +1 (conv) = 4, 1/4: 2 + 1 = 3, +2 +1 = 6,
        // 1/8: 3 + 1 = 4, +2 +1 = 7, 1/16: 4 + 1 = 5, +2 = 7 latent rows; 8 with a margin.
        Some(8)
    }

    fn injection_points(&self) -> Vec<usize> {
        vec![self.cfg.n; 8]
    }

    fn synthesis_prefixes(&self) -> Vec<String> {
        // The conditional synthesis `g_s_cond.*` and the official generator's MLP.
        vec!["g_s".into(), "global_cond.".into()]
    }

    fn synthesis(&self, y_hat: &Tensor, triggers: Option<&Triggers>) -> Result<Tensor> {
        if let Some(t) = triggers {
            t.check(&self.injection_points(), y_hat.dims4()?.0)?;
        }
        let mut h = y_hat.clone();
        for (i, block) in self.cond_res.iter().enumerate() {
            h = block.forward(&h, triggers, 2 * i)?;
            if let Some(up) = self.res_up.get(i) {
                h = up.forward(&h)?;
            }
        }
        Ok(self.last.forward(&h)?)
    }

    fn set_transform_precision(&mut self, precision: Precision) -> Result<()> {
        self.core.set_analysis_precision(precision)?;
        for block in &mut self.cond_res {
            block.set_precision(precision)?;
        }
        for block in &mut self.res_up {
            block.set_precision(precision)?;
        }
        self.last.set_precision(precision)
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
