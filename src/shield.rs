//! Shielding: conditions, trigger generators, and a backbone wrapped with one.
//!
//! PSIC steers only the synthesis transform. A [`Condition`] (in the reference, a scalar
//! `beta`) is turned by a [`TriggerGenerator`] into [`Triggers`]: one per-channel bias per
//! injection point of the backbone's synthesis ([`LicBackbone::injection_points`]). The encoder
//! and the bitstream never see the condition.
//!
//! The generator of the paper is [`Cltg`] (conditional latent trigger generation):
//!
//! ```text
//! beta ──Fourier──▶ [beta, sin(2^0 beta), cos(2^0 beta), …, sin(2^(F-1) beta), cos(2^(F-1) beta)]
//!      ──Linear(1+2F, H)─ReLU─Linear(H, H)─ReLU──▶ code c (H = 512)
//!      ──Linear(H, C_i, no bias), one per injection point i──▶ trigger i  [B, C_i]
//! ```
//!
//! PSIC's triggers are biases ([`Modulation::Bias`]). A constant bias entering a stack of
//! stride-2 transposed convolutions comes out as a pattern that repeats with the synthesis
//! period (16 pixels): psic's generators can instead (or also) emit per-channel gains
//! ([`Modulation::Scale`], [`Modulation::Affine`]), `x·(1 + s) + b`, whose effect on the image
//! follows its content, and a content-adaptive term ([`Modulation::Adaptive`]): a learned
//! convolution of the activation weighted per channel by the condition.
//!
//! [`ShieldedBackbone`] pairs any backbone with a generator built for its injection points, which
//! is how PSIC plugs into an existing codec.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::backbone::{AdaptiveTrigger, LicBackbone, Triggers};
use crate::{Error, Result};

/// The decode condition: the reference's scalar `beta`.
///
/// In the reference code (and in every PSIC model file) `beta = 0` asks for the **full**
/// reconstruction (all semantics) and `beta = 1` for the **shielded** one. Other values are
/// accepted (the generator is a continuous function of `beta`) but no model is trained for them.
/// The condition is never written to the bitstream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Condition(pub f32);

impl Condition {
    /// `beta = 0`: the full reconstruction, with all semantics.
    pub const FULL: Condition = Condition(0.0);
    /// `beta = 1`: the shielded reconstruction (the default decode).
    pub const SHIELDED: Condition = Condition(1.0);

    /// A condition with an explicit `beta`.
    pub const fn new(beta: f32) -> Self {
        Condition(beta)
    }

    /// The scalar `beta`.
    pub const fn beta(&self) -> f32 {
        self.0
    }
}

impl Default for Condition {
    /// The shielded decode is the default.
    fn default() -> Self {
        Condition::SHIELDED
    }
}

/// Which conditions a model was trained for: recorded in every shielded model file (metadata
/// key `conditions`), since the bitstream never carries one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Conditions {
    /// The condition of the full reconstruction.
    pub full: Condition,
    /// The condition of the shielded reconstruction (the default decode).
    pub shielded: Condition,
    /// Strength of the shielded decode: its triggers are `T_full + strength·(T_shielded −
    /// T_full)`, where `T_c` are the generator's triggers for condition `c`. 1 (the default,
    /// and what training optimises) is the trained shield; 0 makes the shielded decode the full
    /// one; values in between trade protection for fidelity (`docs/MODELS.md` measures the
    /// trade-off). Recorded in the model file only when it is not 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub strength: f32,
}

fn one() -> f32 {
    1.0
}

fn is_one(v: &f32) -> bool {
    *v == 1.0
}

/// Largest accepted [`Conditions::strength`]: past the trained shield the decode is an
/// extrapolation no model was trained for, so it is bounded.
pub const MAX_SHIELD_STRENGTH: f32 = 4.0;

impl Conditions {
    /// These conditions with the shielded decode at `strength` (see
    /// [`strength`](Self::strength)); an [`Error::InvalidArgument`] unless `0 ≤ strength ≤`
    /// [`MAX_SHIELD_STRENGTH`].
    pub fn with_strength(mut self, strength: f32) -> Result<Self> {
        self.strength = strength;
        self.check()?;
        Ok(self)
    }

    /// Checks the strength is a finite number in `[0, MAX_SHIELD_STRENGTH]`.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=MAX_SHIELD_STRENGTH).contains(&self.strength) {
            return Err(Error::InvalidArgument(format!(
                "shield strength must be in [0, {MAX_SHIELD_STRENGTH}], got {}",
                self.strength
            )));
        }
        Ok(())
    }

    /// The triggers of the full and of the shielded decode, for a batch of one, each computed
    /// once: `(T_full, T_full + strength·(T_shielded − T_full))` (the shielded ones exactly
    /// `T_shielded` at strength 1).
    pub fn decode_triggers(
        &self,
        generator: &dyn TriggerGenerator,
    ) -> Result<(Triggers, Triggers)> {
        let full = generator.triggers(&self.full, 1)?;
        let shielded = generator.triggers(&self.shielded, 1)?;
        if self.strength == 1.0 {
            return Ok((full, shielded));
        }
        let s = f64::from(self.strength);
        let shielded = shielded.zip_map(&full, |sh, f| f + ((sh - f)? * s)?)?;
        Ok((full, shielded))
    }
}

impl Default for Conditions {
    /// The official PSIC convention: `beta = 0` full, `beta = 1` shielded, full strength.
    fn default() -> Self {
        Self {
            full: Condition::FULL,
            shielded: Condition::SHIELDED,
            strength: 1.0,
        }
    }
}

/// Turns a decode condition into triggers for a synthesis transform's injection points.
pub trait TriggerGenerator: Send + Sync + std::fmt::Debug {
    /// Widths `C_i` of the injection points this generator produces triggers for, in order. Must
    /// equal the backbone's [`LicBackbone::injection_points`].
    fn injection_points(&self) -> &[usize];

    /// Triggers for one condition, shared by a batch of `batch` items: entry `i` has shape
    /// `[batch, C_i]`, every row the same. [`Cltg`] computes them once and broadcasts, so the
    /// values do not depend on `batch` (decodes are the same whatever the batch size).
    fn triggers(&self, condition: &Condition, batch: usize) -> Result<Triggers>;

    /// Per-sample triggers for training: `betas` has shape `[B]` (one condition per sample) and
    /// entry `i` of the result has shape `[B, C_i]`. Differentiable with respect to the
    /// generator's weights.
    fn triggers_for_betas(&self, betas: &Tensor) -> Result<Triggers>;

    /// Runs the generator's own CPU convolutions (the adaptive triggers' kernels) at
    /// `precision`, as a training run's `precision` or
    /// [`Codec::with_precision`](crate::Codec::with_precision) asks; call it before taking
    /// triggers. The default (for generators without convolutions) ignores it.
    fn set_precision(&mut self, _precision: crate::Precision) -> Result<()> {
        Ok(())
    }
}

/// How a generator's triggers act on the synthesis features `x` at an injection point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modulation {
    /// `x + b`: PSIC's per-channel biases.
    #[default]
    Bias,
    /// `x·(1 + s)`: per-channel gains only; the change follows the image content.
    Scale,
    /// `x·(1 + s) + b`: gains and biases (FiLM).
    Affine,
    /// `x·(1 + s) + b + m ⊙ (K ∗ x)`: gains, biases and a content-adaptive term, a learned 3×3
    /// convolution `K` of the activation weighted per channel by `m` (which the condition
    /// sets; [`crate::backbone::AdaptiveTrigger`]). The change follows the image's local
    /// structure, not only its per-channel level.
    Adaptive,
}

impl Modulation {
    /// Whether the triggers carry biases.
    pub fn has_bias(self) -> bool {
        matches!(self, Self::Bias | Self::Affine | Self::Adaptive)
    }

    /// Whether the triggers carry gains.
    pub fn has_scale(self) -> bool {
        matches!(self, Self::Scale | Self::Affine | Self::Adaptive)
    }

    /// Whether the triggers carry content-adaptive terms.
    pub fn has_adaptive(self) -> bool {
        matches!(self, Self::Adaptive)
    }
}

/// Configuration of a [`Cltg`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CltgConfig {
    /// Number `F` of Fourier frequencies `2^0 … 2^(F-1)`; the embedding has `1 + 2F` values.
    /// The reference uses 10.
    pub fourier_frequencies: usize,
    /// Width `H` of the MLP and of the code. The reference uses 512.
    pub hidden: usize,
    /// Widths `C_i` of the injection points (one bias-free projection each for the biases and
    /// one for the gains, as `modulation` says).
    pub injection_points: Vec<usize>,
    /// What the triggers are (PSIC's biases when absent).
    #[serde(default)]
    pub modulation: Modulation,
}

impl CltgConfig {
    /// The reference sizes (10 frequencies, width 512) for the given injection points.
    pub fn new(injection_points: Vec<usize>) -> Self {
        Self {
            fourier_frequencies: 10,
            hidden: 512,
            injection_points,
            modulation: Modulation::Bias,
        }
    }

    /// The same sizes with another [`Modulation`].
    pub fn with_modulation(mut self, modulation: Modulation) -> Self {
        self.modulation = modulation;
        self
    }

    /// Reads the sizes and modulation of a generically named generator ([`CltgNames::generic`])
    /// from a state dict: `None` when it holds no `cltg.beta_mlp.fc1.weight`.
    pub fn infer_generic(tensors: &HashMap<String, Tensor>) -> Result<Option<Self>> {
        let names = CltgNames::generic(0);
        let Some(fc1) = tensors.get(&format!("{}.weight", names.fc1)) else {
            return Ok(None);
        };
        let (hidden, embedding) = fc1.dims2()?;
        if embedding % 2 != 1 {
            return Err(Error::Model(format!(
                "{}.weight has {embedding} inputs: not 1 + 2F",
                names.fc1
            )));
        }
        let p = CltgNames::GENERIC_PREFIX;
        let widths = |kind: &str| {
            (0..)
                .map_while(|i| tensors.get(&format!("{p}.{kind}.{i}.weight")))
                .map(|w| Ok(w.dims2()?.0))
                .collect::<Result<Vec<_>>>()
        };
        let (bias, scale, mix) = (widths("proj")?, widths("scale")?, widths("mix")?);
        let (modulation, injection_points) = match (bias.is_empty(), scale.is_empty()) {
            _ if !mix.is_empty() && bias == scale && bias == mix => (Modulation::Adaptive, mix),
            _ if !mix.is_empty() => {
                return Err(Error::Model(format!(
                    "{p}.mix.* widths {mix:?} need {p}.proj.* and {p}.scale.* of the same \
                     widths, got {bias:?} and {scale:?}"
                )))
            }
            (_, true) => (Modulation::Bias, bias),
            (true, false) => (Modulation::Scale, scale),
            (false, false) if bias == scale => (Modulation::Affine, bias),
            _ => {
                return Err(Error::Model(format!(
                    "{p}.proj.* widths {bias:?} and {p}.scale.* widths {scale:?} differ"
                )))
            }
        };
        Ok(Some(Self {
            fourier_frequencies: embedding / 2,
            hidden,
            injection_points,
            modulation,
        }))
    }

    /// Length `1 + 2F` of the Fourier embedding.
    pub fn embedding_dim(&self) -> usize {
        1 + 2 * self.fourier_frequencies
    }
}

/// Where a [`Cltg`]'s weights live, relative to the model's root [`VarBuilder`].
///
/// Every name is a prefix holding `weight` (and `bias` for the MLP layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CltgNames {
    /// First MLP layer, `Linear(1 + 2F, H)`.
    pub fc1: String,
    /// Second MLP layer, `Linear(H, H)`.
    pub fc2: String,
    /// One bias-free `Linear(H, C_i)` per injection point: the biases.
    pub projections: Vec<String>,
    /// One bias-free `Linear(H, C_i)` per injection point: the gains (empty where the layout
    /// has none).
    pub scale_projections: Vec<String>,
    /// One bias-free `Linear(H, C_i)` per injection point: the weights of the adaptive terms
    /// (empty where the layout has none).
    pub mix_projections: Vec<String>,
    /// One bias-free `Conv2d(C_i, C_i, 3, padding 1)` per injection point: the adaptive terms'
    /// convolutions (empty where the layout has none).
    pub adaptive_convs: Vec<String>,
}

impl CltgNames {
    /// Prefix of the generic naming scheme.
    pub const GENERIC_PREFIX: &'static str = "cltg";

    /// The generic scheme for a wrapped backbone with `points` injection points:
    /// `cltg.beta_mlp.fc1`, `cltg.beta_mlp.fc2`, `cltg.proj.{i}` (biases), `cltg.scale.{i}`
    /// (gains).
    pub fn generic(points: usize) -> Self {
        let p = Self::GENERIC_PREFIX;
        Self {
            fc1: format!("{p}.beta_mlp.fc1"),
            fc2: format!("{p}.beta_mlp.fc2"),
            projections: (0..points).map(|i| format!("{p}.proj.{i}")).collect(),
            scale_projections: (0..points).map(|i| format!("{p}.scale.{i}")).collect(),
            mix_projections: (0..points).map(|i| format!("{p}.mix.{i}")).collect(),
            adaptive_convs: (0..points).map(|i| format!("{p}.adapt.{i}")).collect(),
        }
    }

    /// Names and shapes of every tensor a generator with `cfg` has under these names.
    pub fn tensor_shapes(&self, cfg: &CltgConfig) -> Vec<(String, Vec<usize>)> {
        let (e, h) = (cfg.embedding_dim(), cfg.hidden);
        let mut out = vec![
            (format!("{}.weight", self.fc1), vec![h, e]),
            (format!("{}.bias", self.fc1), vec![h]),
            (format!("{}.weight", self.fc2), vec![h, h]),
            (format!("{}.bias", self.fc2), vec![h]),
        ];
        let m = cfg.modulation;
        for (names, used) in [
            (&self.projections, m.has_bias()),
            (&self.scale_projections, m.has_scale()),
            (&self.mix_projections, m.has_adaptive()),
        ] {
            if used {
                for (p, &c) in names.iter().zip(&cfg.injection_points) {
                    out.push((format!("{p}.weight"), vec![c, h]));
                }
            }
        }
        if m.has_adaptive() {
            for (p, &c) in self.adaptive_convs.iter().zip(&cfg.injection_points) {
                let k = ADAPTIVE_KERNEL;
                out.push((format!("{p}.weight"), vec![c, c, k, k]));
            }
        }
        out
    }

    /// The official PSIC `Hy2018` layout: `global_cond.beta_mlp.fc{1,2}` and, for the conditional
    /// residual blocks `k = 0, 2, 4, 6` of the synthesis,
    /// `g_s_cond.synthesis_transform.{k}._proj1.0` then `._proj2.0`.
    pub fn psic_hy2018() -> Self {
        Self {
            fc1: "global_cond.beta_mlp.fc1".into(),
            fc2: "global_cond.beta_mlp.fc2".into(),
            projections: [0, 2, 4, 6]
                .iter()
                .flat_map(|k| {
                    [1, 2].map(|j| format!("g_s_cond.synthesis_transform.{k}._proj{j}.0"))
                })
                .collect(),
            scale_projections: Vec::new(),
            mix_projections: Vec::new(),
            adaptive_convs: Vec::new(),
        }
    }
}

/// Kernel size of the adaptive terms' convolutions ([`Modulation::Adaptive`]).
pub const ADAPTIVE_KERNEL: usize = 3;

/// A `Linear(in, out)` initialised as PyTorch's `nn.Linear` (uniform in `±1/sqrt(in)`).
fn linear(vb: &VarBuilder, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear> {
    let bound = 1.0 / (inp as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    linear_init(vb, prefix, inp, out, bias, init)
}

/// A `Linear(in, out)` whose fresh weights (and bias) are drawn from `init`.
fn linear_init(
    vb: &VarBuilder,
    prefix: &str,
    inp: usize,
    out: usize,
    bias: bool,
    init: Init,
) -> Result<Linear> {
    let vb = vb.pp(prefix);
    let weight = vb.get_with_hints((out, inp), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// A bias-free `Conv2d(c, c, ADAPTIVE_KERNEL, padding to keep the size)` at `prefix`: psic's
/// convolution, so frozen weights take the CPU inference op and trainable ones the training op.
fn adaptive_conv(
    vb: &VarBuilder,
    prefix: &str,
    c: usize,
) -> Result<std::sync::Arc<crate::layers::Conv2d>> {
    let k = ADAPTIVE_KERNEL;
    let bound = 1.0 / ((c * k * k) as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.pp(prefix).get_with_hints((c, c, k, k), "weight", init)?;
    Ok(std::sync::Arc::new(crate::layers::Conv2d::from_weights(
        weight, None, 1,
    )?))
}

/// Conditional latent trigger generation (PSIC's CLTG): Fourier embedding of `beta`, a two-layer
/// ReLU MLP, and one bias-free linear projection per injection point.
///
/// Built with [`Cltg::new`] (generic names, see [`CltgNames::generic`]) or
/// [`Cltg::with_names`]; a `VarMap`-backed builder creates trainable variables, initialised as
/// PyTorch's `nn.Linear`.
#[derive(Debug, Clone)]
pub struct Cltg {
    cfg: CltgConfig,
    fc1: Linear,
    fc2: Linear,
    projections: Vec<Linear>,
    scale_projections: Vec<Linear>,
    mix_projections: Vec<Linear>,
    adaptive_convs: Vec<std::sync::Arc<crate::layers::Conv2d>>,
    device: Device,
    dtype: DType,
}

impl Cltg {
    /// Loads (or creates) a generator with the generic names ([`CltgNames::generic`]) under `vb`
    /// (the model's root builder).
    pub fn new(vb: VarBuilder, cfg: &CltgConfig) -> Result<Self> {
        Self::with_names(vb, cfg, &CltgNames::generic(cfg.injection_points.len()))
    }

    /// Loads (or creates) a generator whose weights live at `names` under `vb`.
    pub fn with_names(vb: VarBuilder, cfg: &CltgConfig, names: &CltgNames) -> Result<Self> {
        let m = cfg.modulation;
        for (list, used) in [
            (&names.projections, m.has_bias()),
            (&names.scale_projections, m.has_scale()),
            (&names.mix_projections, m.has_adaptive()),
            (&names.adaptive_convs, m.has_adaptive()),
        ] {
            if used && list.len() != cfg.injection_points.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} projection names for {} injection points ({m:?} triggers)",
                    list.len(),
                    cfg.injection_points.len()
                )));
            }
        }
        if cfg.hidden == 0 || cfg.injection_points.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "invalid CLTG sizes: hidden {}, injection points {:?}",
                cfg.hidden, cfg.injection_points
            )));
        }
        let h = cfg.hidden;
        let fc1 = linear(&vb, &names.fc1, cfg.embedding_dim(), h, true)?;
        let fc2 = linear(&vb, &names.fc2, h, h, true)?;
        // Fresh gain projections start at zero: a generator gains its modulation from training,
        // and a bias generator extended with gains starts where it was.
        let projections = |list: &[String], used: bool, init: Option<Init>| {
            list.iter()
                .zip(&cfg.injection_points)
                .filter(|_| used)
                .map(|(name, &c)| match init {
                    Some(init) => linear_init(&vb, name, h, c, false, init),
                    None => linear(&vb, name, h, c, false),
                })
                .collect::<Result<Vec<_>>>()
        };
        let bias = projections(&names.projections, m.has_bias(), None)?;
        let scale = projections(
            &names.scale_projections,
            m.has_scale(),
            Some(Init::Const(0.)),
        )?;
        // Adaptive weights start at zero too (the term is then exactly 0); their convolutions
        // start as PyTorch's `nn.Conv2d` (uniform in ±1/sqrt(fan-in)), so the weights get a
        // gradient from the first step.
        let mix = projections(
            &names.mix_projections,
            m.has_adaptive(),
            Some(Init::Const(0.)),
        )?;
        let convs = names
            .adaptive_convs
            .iter()
            .zip(&cfg.injection_points)
            .filter(|_| m.has_adaptive())
            .map(|(name, &c)| adaptive_conv(&vb, name, c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            fc1,
            fc2,
            projections: bias,
            scale_projections: scale,
            mix_projections: mix,
            adaptive_convs: convs,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CltgConfig {
        &self.cfg
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The Fourier embedding of `betas` (`[B]`): `[B, 1 + 2F]`, laid out as
    /// `[b, sin(2^0 b), cos(2^0 b), sin(2^1 b), cos(2^1 b), …]`.
    pub fn fourier_features(&self, betas: &Tensor) -> Result<Tensor> {
        let b = betas.dims1()?;
        let betas = betas
            .to_dtype(self.dtype)?
            .to_device(&self.device)?
            .reshape((b, 1))?;
        let f = self.cfg.fourier_frequencies;
        let freqs: Vec<f32> = (0..f).map(|k| (k as f32).exp2()).collect();
        let freqs = Tensor::from_vec(freqs, (1, f), &self.device)?.to_dtype(self.dtype)?;
        let arg = betas.broadcast_mul(&freqs)?;
        let sc = Tensor::stack(&[arg.sin()?, arg.cos()?], 2)?.reshape((b, 2 * f))?;
        Ok(Tensor::cat(&[&betas, &sc], 1)?)
    }

    /// The code `c = ReLU(fc2(ReLU(fc1(fourier(betas)))))`, `[B, H]` (the reference's
    /// `global_cond(beta)`).
    pub fn code(&self, betas: &Tensor) -> Result<Tensor> {
        let e = self.fourier_features(betas)?;
        let h = self.fc1.forward(&e)?.relu()?;
        Ok(self.fc2.forward(&h)?.relu()?)
    }

    /// Triggers from a code `c` (`[B, H]`): bias `i` is `proj_i(c)` and gain `i` is
    /// `scale_i(c)`, each `[B, C_i]`, as the configuration's [`Modulation`] says.
    pub fn triggers_from_code(&self, code: &Tensor) -> Result<Triggers> {
        let project = |list: &[Linear]| {
            list.iter()
                .map(|p| p.forward(code))
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let m = self.cfg.modulation;
        let adaptive = || -> Result<Vec<AdaptiveTrigger>> {
            let mix = project(&self.mix_projections)?;
            Ok(mix
                .into_iter()
                .zip(&self.adaptive_convs)
                .map(|(mix, conv)| AdaptiveTrigger {
                    mix,
                    conv: conv.clone(),
                })
                .collect())
        };
        Ok(Triggers {
            bias: m
                .has_bias()
                .then(|| project(&self.projections))
                .transpose()?,
            scale: m
                .has_scale()
                .then(|| project(&self.scale_projections))
                .transpose()?,
            adaptive: m.has_adaptive().then(adaptive).transpose()?,
        })
    }
}

impl TriggerGenerator for Cltg {
    fn injection_points(&self) -> &[usize] {
        &self.cfg.injection_points
    }

    fn set_precision(&mut self, precision: crate::Precision) -> Result<()> {
        for conv in &mut self.adaptive_convs {
            // A clone shares the weight variable, so training still updates the same weights.
            std::sync::Arc::make_mut(conv).set_precision(precision)?;
        }
        Ok(())
    }

    fn triggers(&self, condition: &Condition, batch: usize) -> Result<Triggers> {
        if batch == 0 {
            return Err(Error::InvalidArgument("batch size 0".into()));
        }
        let beta = Tensor::new(&[condition.beta()], &self.device)?;
        let one = self.triggers_for_betas(&beta)?;
        if batch == 1 {
            return Ok(one);
        }
        one.map(|t| {
            let c = t.dim(1)?;
            t.broadcast_as((batch, c))?.contiguous()
        })
    }

    fn triggers_for_betas(&self, betas: &Tensor) -> Result<Triggers> {
        self.triggers_from_code(&self.code(betas)?)
    }
}

/// A backbone paired with a trigger generator for its injection points: the plug-and-play form
/// of PSIC. Analysis, hyper transforms and entropy models are the backbone's, untouched; only
/// the synthesis takes a [`Condition`].
#[derive(Debug)]
pub struct ShieldedBackbone<B: LicBackbone + ?Sized = dyn LicBackbone, G: TriggerGenerator = Cltg> {
    backbone: Box<B>,
    generator: G,
}

impl<B: LicBackbone + ?Sized, G: TriggerGenerator> ShieldedBackbone<B, G> {
    /// Pairs a backbone with a generator; fails unless the generator's injection points are the
    /// backbone's.
    pub fn new(backbone: Box<B>, generator: G) -> Result<Self> {
        let points = backbone.injection_points();
        if generator.injection_points() != points.as_slice() {
            return Err(Error::InvalidArgument(format!(
                "trigger generator made for injection points {:?}, backbone {} has {:?}",
                generator.injection_points(),
                backbone.architecture(),
                points
            )));
        }
        Ok(Self {
            backbone,
            generator,
        })
    }

    /// The wrapped backbone (use it for analysis, hyper transforms, entropy models and the
    /// plain synthesis).
    pub fn backbone(&self) -> &B {
        &self.backbone
    }

    /// The trigger generator.
    pub fn generator(&self) -> &G {
        &self.generator
    }

    /// Splits into the backbone and the generator.
    pub fn into_parts(self) -> (Box<B>, G) {
        (self.backbone, self.generator)
    }

    /// Conditional synthesis (not clamped): `g_s(y_hat, triggers(condition))`.
    pub fn synthesize(&self, y_hat: &Tensor, condition: &Condition) -> Result<Tensor> {
        let batch = y_hat.dims4()?.0;
        let t = self.generator.triggers(condition, batch)?;
        self.backbone.synthesis(y_hat, Some(&t))
    }

    /// Conditional synthesis with one `beta` per sample (`betas` is `[B]`), for training.
    pub fn synthesize_betas(&self, y_hat: &Tensor, betas: &Tensor) -> Result<Tensor> {
        let t = self.generator.triggers_for_betas(betas)?;
        self.backbone.synthesis(y_hat, Some(&t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn fresh(points: Vec<usize>) -> (VarMap, Cltg) {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let cltg = Cltg::new(vb, &CltgConfig::new(points)).unwrap();
        (map, cltg)
    }

    #[test]
    fn conditions() {
        assert_eq!(Condition::FULL.beta(), 0.0);
        assert_eq!(Condition::SHIELDED.beta(), 1.0);
        assert_eq!(Condition::default(), Condition::SHIELDED);
    }

    #[test]
    fn fourier_layout() {
        let (_m, cltg) = fresh(vec![4]);
        let b = Tensor::new(&[0.5f32, 1.0], &Device::Cpu).unwrap();
        let e = cltg.fourier_features(&b).unwrap().to_vec2::<f32>().unwrap();
        for (row, beta) in e.iter().zip([0.5f32, 1.0]) {
            assert_eq!(row.len(), 21);
            assert_eq!(row[0], beta);
            for k in 0..10 {
                let a = beta * (1 << k) as f32;
                assert!((row[1 + 2 * k] - a.sin()).abs() < 1e-6);
                assert!((row[2 + 2 * k] - a.cos()).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn shapes_variables_and_batching() {
        let (map, cltg) = fresh(vec![8, 16, 8]);
        // fc1 (w, b), fc2 (w, b), three projections.
        assert_eq!(map.all_vars().len(), 7);
        let names = map
            .data()
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>();
        assert!(names.contains(&"cltg.proj.1.weight".to_string()));
        let t = cltg.triggers(&Condition::SHIELDED, 3).unwrap();
        t.check(&[8, 16, 8], 3).unwrap();
        let betas = Tensor::new(&[1f32, 0.0, 1.0], &Device::Cpu).unwrap();
        let per = cltg.triggers_for_betas(&betas).unwrap();
        per.check(&[8, 16, 8], 3).unwrap();
        let full = cltg.triggers(&Condition::FULL, 1).unwrap();
        // Matrix products of different batch sizes may round differently: compare loosely.
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        let (t, per, full) = (t.bias.unwrap(), per.bias.unwrap(), full.bias.unwrap());
        for (i, (a, b)) in t.iter().zip(&per).enumerate() {
            let a = a.to_vec2::<f32>().unwrap();
            let b = b.to_vec2::<f32>().unwrap();
            // One condition for the batch: every row is the same.
            assert_eq!(a[0], a[1], "trigger {i}");
            assert_eq!(a[0], a[2], "trigger {i}");
            assert!(close(&a[0], &b[0]), "trigger {i}, sample 0");
            assert!(close(&a[2], &b[2]), "trigger {i}, sample 2");
            assert!(close(&full[i].to_vec2::<f32>().unwrap()[0], &b[1]));
            assert!(!close(&b[0], &b[1]));
        }
    }

    #[test]
    fn adaptive_convolutions_take_the_precision_asked_for() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let cfg = CltgConfig {
            modulation: Modulation::Adaptive,
            ..CltgConfig::new(vec![16, 16])
        };
        let mut g = AnchoredGenerator::new(Cltg::new(vb, &cfg).unwrap(), Condition::FULL);
        let precisions = |g: &AnchoredGenerator| -> Vec<crate::Precision> {
            let t = g.triggers(&Condition::SHIELDED, 1).unwrap();
            t.adaptive
                .unwrap()
                .iter()
                .map(|a| a.conv.precision())
                .collect()
        };
        assert_eq!(precisions(&g), vec![crate::Precision::F32; 2]);
        g.set_precision(crate::Precision::Bf16Emulated).unwrap();
        assert_eq!(precisions(&g), vec![crate::Precision::Bf16Emulated; 2]);
        // The convolutions still hold the trained variables (not frozen copies).
        assert!(g
            .inner()
            .adaptive_convs
            .iter()
            .all(|c| c.weight().is_variable()));
    }

    #[test]
    fn infer_generic_config() {
        let (map, _cltg) = fresh(vec![8, 16, 8]);
        let tensors: HashMap<String, Tensor> = map
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let cfg = CltgConfig::infer_generic(&tensors).unwrap().unwrap();
        assert_eq!(cfg, CltgConfig::new(vec![8, 16, 8]));
        assert!(CltgConfig::infer_generic(&HashMap::new())
            .unwrap()
            .is_none());
    }

    #[test]
    fn names_count_checked() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let err = Cltg::with_names(vb, &CltgConfig::new(vec![4, 4]), &CltgNames::generic(1));
        assert!(err.is_err());
        assert_eq!(CltgNames::psic_hy2018().projections.len(), 8);
        assert_eq!(
            CltgNames::psic_hy2018().projections[3],
            "g_s_cond.synthesis_transform.2._proj2.0"
        );
    }
}

/// A generator whose triggers are measured from those of an *anchor* condition:
/// `triggers(c) = inner(c) − inner(anchor)`. Anchored at the full condition, a wrapped backbone's
/// full decode gets exactly zero triggers, so it is bit-identical to the unwrapped backbone:
/// shielding can only ever change the shielded decode. psic uses this for every backbone it
/// wraps (not for the official PSIC model, whose synthesis was trained with absolute triggers).
#[derive(Debug)]
pub struct AnchoredGenerator<G: TriggerGenerator = Cltg> {
    inner: G,
    anchor: Condition,
}

impl<G: TriggerGenerator> AnchoredGenerator<G> {
    /// Anchors `inner` at `anchor` (normally the full condition).
    pub fn new(inner: G, anchor: Condition) -> Self {
        Self { inner, anchor }
    }

    /// The wrapped generator.
    pub fn inner(&self) -> &G {
        &self.inner
    }

    /// The anchor condition.
    pub fn anchor(&self) -> Condition {
        self.anchor
    }

    fn subtract_anchor(&self, triggers: Triggers) -> Result<Triggers> {
        let base = self.inner.triggers(&self.anchor, 1)?;
        triggers.zip_map(&base, |t, b| t.broadcast_sub(b))
    }
}

impl<G: TriggerGenerator> TriggerGenerator for AnchoredGenerator<G> {
    fn injection_points(&self) -> &[usize] {
        self.inner.injection_points()
    }

    fn triggers(&self, condition: &Condition, batch: usize) -> Result<Triggers> {
        self.subtract_anchor(self.inner.triggers(condition, batch)?)
    }

    fn triggers_for_betas(&self, betas: &Tensor) -> Result<Triggers> {
        self.subtract_anchor(self.inner.triggers_for_betas(betas)?)
    }

    fn set_precision(&mut self, precision: crate::Precision) -> Result<()> {
        self.inner.set_precision(precision)
    }
}
