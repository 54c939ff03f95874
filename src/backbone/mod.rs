//! Learned image compression backbones behind one trait, [`LicBackbone`].
//!
//! A backbone is the four transforms of a hyperprior codec plus its two entropy models:
//!
//! ```text
//! x ──g_a──▶ y ──h_a(|y|)──▶ z ──EntropyBottleneck──▶ z_hat ──h_s──▶ scales (means)
//!                 y ──GaussianConditional(scales)──▶ y_hat ──g_s(+ triggers)──▶ x_hat
//! ```
//!
//! Shielding (PSIC) only touches the synthesis `g_s`: a backbone declares *injection points* —
//! places between synthesis layers where a per-channel bias ("trigger") may be added — and
//! [`LicBackbone::synthesis`] takes the triggers for them. Encoding never sees the triggers, so
//! the bitstream is the same whatever decode is asked for.
//!
//! Backbones defined outside psic join through the registry ([`register_backbone`], a
//! [`BackboneFactory`]): their model files then load, shield, train and save like psic's own.

mod hyper;
mod hyperprior;
mod mean_scale;
mod portable;
mod psic_hy2018;
mod registry;

pub use hyperprior::{ScaleHyperprior, ScaleHyperpriorConfig};
pub use mean_scale::{MeanScaleHyperprior, MeanScaleHyperpriorConfig, MBT2018_MEAN};
pub use portable::{
    PortableActivation, PortableHyperSynthesis, PortableKind, PortableLayer, PortableParams,
    LEAKY_RELU_SLOPE,
};
pub use psic_hy2018::{PsicHy2018, PsicHy2018Config, PSIC_HY2018};
pub(crate) use registry::{factories, factory};
pub use registry::{
    register_backbone, registered_backbones, BackboneFactory, RegisteredArchitecture,
};

use candle_core::{Device, Tensor};

use crate::entropy::{EntropyBottleneck, GaussianConditional};
use crate::{Error, Precision, Result};

/// Parameters of the conditional Gaussian of `y`, predicted by the hyper-synthesis.
#[derive(Debug, Clone)]
pub struct GaussianParams {
    /// Standard deviations, shape of `y`.
    pub scales: Tensor,
    /// Means, shape of `y`; `None` for zero-mean models (Ballé's scale hyperprior).
    pub means: Option<Tensor>,
}

/// What a trigger generator feeds a synthesis transform's injection points: per-channel biases
/// (PSIC's triggers) and, for a modulating generator, per-channel gains. Entry `i` of each list
/// has shape `[B, C_i]` (or `[1, C_i]`, broadcast over the batch), `C_i` the width of injection
/// point `i`; the activation `x` at point `i` becomes `x·(1 + scale_i) + bias_i`.
///
/// A content-adaptive generator adds, at each point, a learned convolution of the activation
/// weighted per channel ([`AdaptiveTrigger`]): `+ mix_i ⊙ (K_i ∗ x)`, a change that follows the
/// image's local structure rather than one value per channel.
#[derive(Debug, Clone)]
pub struct Triggers {
    /// Per-channel biases (`None`: the generator only modulates).
    pub bias: Option<Vec<Tensor>>,
    /// Per-channel gains minus one (`None`: the generator only adds, as PSIC's does).
    pub scale: Option<Vec<Tensor>>,
    /// Content-adaptive terms, one per injection point (`None` for all but
    /// [`crate::shield::Modulation::Adaptive`] generators).
    pub adaptive: Option<Vec<AdaptiveTrigger>>,
}

/// The content-adaptive term of a trigger at one injection point: `mix ⊙ (conv ∗ x)`, with `x`
/// the activation there (`[B, C, H, W]`), `conv` a `C → C` convolution that keeps the size,
/// and `mix` (`[B, C]` or `[1, C]`) its weight per channel, which the condition sets.
#[derive(Debug, Clone)]
pub struct AdaptiveTrigger {
    /// Per-channel weight of the convolution's output.
    pub mix: Tensor,
    /// The convolution (shared by every condition of a generator).
    pub conv: std::sync::Arc<crate::layers::Conv2d>,
}

impl Triggers {
    /// Additive triggers (PSIC's): one bias per injection point.
    pub fn additive(bias: Vec<Tensor>) -> Self {
        Self {
            bias: Some(bias),
            scale: None,
            adaptive: None,
        }
    }

    /// The per-channel lists present (biases, gains, adaptive weights), each with one entry
    /// per injection point.
    fn lists(&self) -> impl Iterator<Item = Vec<&Tensor>> {
        let mix = self
            .adaptive
            .as_ref()
            .map(|a| a.iter().map(|t| &t.mix).collect());
        let bias = self.bias.as_ref().map(|v| v.iter().collect());
        let scale = self.scale.as_ref().map(|v| v.iter().collect());
        bias.into_iter().chain(scale).chain(mix)
    }

    /// Applies `f` to every per-channel tensor (e.g. to broadcast over a batch); the adaptive
    /// terms keep their convolutions.
    pub fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        let apply = |v: &Vec<Tensor>| v.iter().map(&f).collect::<candle_core::Result<Vec<_>>>();
        let adaptive = |v: &Vec<AdaptiveTrigger>| {
            v.iter()
                .map(|t| {
                    Ok(AdaptiveTrigger {
                        mix: f(&t.mix)?,
                        conv: t.conv.clone(),
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(Self {
            bias: self.bias.as_ref().map(apply).transpose()?,
            scale: self.scale.as_ref().map(apply).transpose()?,
            adaptive: self.adaptive.as_ref().map(adaptive).transpose()?,
        })
    }

    /// Combines two triggers of the same kind entry by entry (e.g. to subtract an anchor).
    pub fn zip_map(
        &self,
        other: &Self,
        f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Self> {
        let apply = |a: &Option<Vec<Tensor>>, b: &Option<Vec<Tensor>>| match (a, b) {
            (None, None) => Ok(None),
            (Some(a), Some(b)) if a.len() == b.len() => a
                .iter()
                .zip(b)
                .map(|(a, b)| f(a, b))
                .collect::<candle_core::Result<Vec<_>>>()
                .map(Some)
                .map_err(Error::from),
            _ => Err(Error::InvalidArgument(
                "triggers of different kinds cannot be combined".into(),
            )),
        };
        let different =
            || Error::InvalidArgument("triggers of different kinds cannot be combined".into());
        let adaptive = match (&self.adaptive, &other.adaptive) {
            (None, None) => None,
            (Some(a), Some(b)) if a.len() == b.len() => Some(
                a.iter()
                    .zip(b)
                    .map(|(a, b)| {
                        // One convolution, two weights: combining the weights is exact.
                        if !std::sync::Arc::ptr_eq(&a.conv, &b.conv) {
                            return Err(Error::InvalidArgument(
                                "adaptive triggers of different convolutions cannot be combined"
                                    .into(),
                            ));
                        }
                        Ok(AdaptiveTrigger {
                            mix: f(&a.mix, &b.mix)?,
                            conv: a.conv.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            _ => return Err(different()),
        };
        Ok(Self {
            bias: apply(&self.bias, &other.bias)?,
            scale: apply(&self.scale, &other.scale)?,
            adaptive,
        })
    }

    /// Latent rows of context the adaptive terms add to a synthesis strip's halo (see
    /// [`crate::tiles`]): `k / 2` per point for a `k`x`k` convolution, an upper bound, since
    /// injection points run at the latent's resolution or finer. 0 without adaptive terms.
    pub fn halo_rows(&self) -> usize {
        self.adaptive.as_ref().map_or(0, |a| {
            a.iter()
                .map(|t| t.conv.weight().dims().get(2).copied().unwrap_or(1) / 2)
                .sum()
        })
    }

    /// These triggers without their adaptive terms if every weight of those is exactly zero
    /// (as an anchored generator's are for the full condition): `x + 0·(K ∗ x)` is `x`, so the
    /// convolutions need not run. Decided once, where the triggers are made.
    pub fn without_zero_adaptive(mut self) -> Result<Self> {
        if let Some(adaptive) = &self.adaptive {
            let mut all_zero = true;
            for t in adaptive {
                let any = t.mix.abs()?.max_all()?.to_dtype(candle_core::DType::F32)?;
                all_zero &= any.to_scalar::<f32>()? == 0.0;
            }
            if all_zero && (self.bias.is_some() || self.scale.is_some()) {
                self.adaptive = None;
            }
        }
        Ok(self)
    }

    /// Checks the triggers against a backbone's injection points and batch size.
    pub fn check(&self, points: &[usize], batch: usize) -> Result<()> {
        if self.bias.is_none() && self.scale.is_none() && self.adaptive.is_none() {
            return Err(Error::InvalidArgument(
                "triggers with neither bias, scale nor adaptive term".into(),
            ));
        }
        for list in self.lists() {
            if list.len() != points.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} triggers for {} injection points",
                    list.len(),
                    points.len()
                )));
            }
            for (i, (t, &c)) in list.iter().zip(points).enumerate() {
                let dims = t.dims();
                if dims.len() != 2 || dims[1] != c || (dims[0] != batch && dims[0] != 1) {
                    return Err(Error::InvalidArgument(format!(
                        "trigger {i} has shape {dims:?}, expected [{batch} or 1, {c}]"
                    )));
                }
            }
        }
        for (i, (t, &c)) in self.adaptive.iter().flatten().zip(points).enumerate() {
            let (o, inp, kh, kw) = t.conv.weight().dims4()?;
            let pad = t.conv.padding();
            let plain = t.conv.stride() == 1;
            if !plain || (o, inp) != (c, c) || kh != kw || kh % 2 == 0 || 2 * pad + 1 != kh {
                return Err(Error::InvalidArgument(format!(
                    "adaptive trigger {i}: a {o}x{inp}x{kh}x{kw} convolution (padding {pad}) \
                     does not map the point's {c} channels onto themselves at the same size"
                )));
            }
        }
        Ok(())
    }

    /// Applies trigger `i` to a `[B, C, H, W]` activation, broadcast over `H` and `W`:
    /// `x·(1 + scale_i) + bias_i (+ mix_i ⊙ (K_i ∗ x))`, computed as `x + x·scale_i` so that a
    /// zero scale leaves `x` bit-identical.
    pub fn inject(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let as4 = |t: &Tensor| -> Result<Tensor> {
            let (b, c) = t.dims2()?;
            Ok(t.reshape((b, c, 1, 1))?)
        };
        let mut h = x.clone();
        if let Some(scale) = &self.scale {
            h = (&h + h.broadcast_mul(&as4(&scale[i])?)?)?;
        }
        if let Some(bias) = &self.bias {
            h = h.broadcast_add(&as4(&bias[i])?)?;
        }
        if let Some(adaptive) = &self.adaptive {
            let t = &adaptive[i];
            let k = candle_core::Module::forward(t.conv.as_ref(), x)?;
            h = (h + k.broadcast_mul(&as4(&t.mix)?)?)?;
        }
        Ok(h)
    }
}

/// A learned image codec with a hyperprior: the transforms and entropy models of CompressAI's
/// `CompressionModel`s, typed.
///
/// Images enter as `[B, 3, H, W]` floats in `[0, 1]` with `H` and `W` multiples of
/// [`alignment`](Self::alignment); the codec layer pads and crops.
pub trait LicBackbone: Send + Sync + std::fmt::Debug {
    /// Architecture name as written in model files (e.g. `bmshj2018-hyperprior`).
    fn architecture(&self) -> &'static str;
    /// The architecture's configuration as JSON (written to, and read from, model files).
    fn config_json(&self) -> serde_json::Value;
    /// Device the weights live on.
    fn device(&self) -> &Device;
    /// Input sizes must be multiples of this (the hyper-latent's total stride).
    fn alignment(&self) -> usize {
        64
    }
    /// Spatial stride of `y` relative to the image.
    fn latent_stride(&self) -> usize {
        16
    }
    /// Channels of the latent `y`.
    fn latent_channels(&self) -> usize;
    /// Channels of the hyper-latent `z`.
    fn hyper_channels(&self) -> usize;

    /// Analysis transform `g_a`: image to latent `y`.
    fn analysis(&self, x: &Tensor) -> Result<Tensor>;
    /// Hyper analysis `h_a`: latent `y` to hyper-latent `z`.
    fn hyper_analysis(&self, y: &Tensor) -> Result<Tensor>;
    /// Hyper synthesis `h_s`: quantised hyper-latent to the Gaussian parameters of `y`.
    fn hyper_synthesis(&self, z_hat: &Tensor) -> Result<GaussianParams>;
    /// The same hyper-synthesis computed bit-exactly ([`PortableHyperSynthesis`]): identical
    /// values on every device, thread count and kernel path, for the portable entropy path
    /// ([`EntropyPath::Portable`](crate::bitstream::EntropyPath::Portable)). `Ok(None)`, the
    /// default, when the backbone has no such form: its codec then writes streams on the float
    /// path.
    fn hyper_synthesis_portable(&self, z_hat: &Tensor) -> Result<Option<PortableParams>> {
        let _ = z_hat;
        Ok(None)
    }
    /// Latent rows of context on each side that make [`analysis`](Self::analysis) of a band
    /// of image rows exact: with this many latent rows (times the latent stride in pixels)
    /// above and below, the band's own latent rows equal those of the whole image's analysis
    /// (the receptive field, rounded up to whole latent rows). `None`, the default: not
    /// known, so the codec analyses every image in one pass ([`crate::tiles`]).
    fn analysis_halo(&self) -> Option<usize> {
        None
    }
    /// Latent rows of context on each side that make [`synthesis`](Self::synthesis) of a
    /// band of latent rows exact, as [`analysis_halo`](Self::analysis_halo). `None`, the
    /// default: the codec synthesises every image in one pass.
    fn synthesis_halo(&self) -> Option<usize> {
        None
    }
    /// Widths of the synthesis transform's injection points, in the order they are applied.
    fn injection_points(&self) -> Vec<usize>;
    /// Synthesis transform `g_s`: quantised latent to image (not clamped), with optional
    /// triggers at the injection points. `None` is the plain synthesis.
    fn synthesis(&self, y_hat: &Tensor, triggers: Option<&Triggers>) -> Result<Tensor>;

    /// Name prefixes of the decoder-side parameters: the synthesis transform and, for a
    /// backbone with a built-in trigger generator, that generator. Training with a frozen
    /// analysis side (stage 2, or stage 1 with `freeze_analysis`) updates exactly the variables
    /// whose names start with one of these (plus a wrapped backbone's generic `cltg.*`
    /// generator); everything else stays as it is. The default is CompressAI's `g_s`.
    fn synthesis_prefixes(&self) -> Vec<String> {
        vec!["g_s".into()]
    }

    /// Sets the precision of the analysis (`g_a`) and synthesis (`g_s`) convolutions on the
    /// CPU. The hyper transforms `h_a`/`h_s` stay f32 whatever is set: `h_s` decides the table
    /// indexes of `y`, which must not depend on the precision, so that a stream written at one
    /// precision decodes to the same `y_hat` at the other. The default does nothing (the
    /// backbone stays f32).
    fn set_transform_precision(&mut self, precision: Precision) -> Result<()> {
        let _ = precision;
        Ok(())
    }
    /// The precision the analysis and synthesis convolutions use (after any fallback to f32 on
    /// CPUs without bf16 instructions).
    fn transform_precision(&self) -> Precision {
        Precision::F32
    }

    /// Training: the synthesis' convolutions compute no kernel gradients from now on (their
    /// weights are trained by no optimiser: `[shield] freeze_synthesis`); gradients still flow
    /// through them to whatever feeds them (the triggers). The default does nothing: a backbone
    /// without it trains as before, only slower.
    fn freeze_synthesis_kernels(&mut self) {}

    /// The entropy model of `z`.
    fn entropy_bottleneck(&self) -> &EntropyBottleneck;
    /// The entropy model of `y`.
    fn gaussian_conditional(&self) -> &GaussianConditional;
}
