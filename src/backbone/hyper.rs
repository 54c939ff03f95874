//! The parts shared by the hyperprior backbones: `g_a`, `h_a`, `h_s` and the two entropy models
//! of Ballé et al. 2018 and of Minnen et al. 2018's mean-scale variant, and the IGDN synthesis
//! `g_s` of both, under CompressAI's names.

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::portable::{
    PortableActivation, PortableHyperSynthesis, PortableKind, PortableLayer, PortableParams,
    LEAKY_RELU_SLOPE,
};
use super::{GaussianParams, Triggers};
use crate::entropy::{EntropyBottleneck, GaussianConditional};
use crate::layers::{Conv2d, ConvTranspose2d, Gdn};
use crate::{Error, Precision, Result};

/// Latent rows of context a band of `g_a` needs on each side ([`LicBackbone::analysis_halo`]):
/// four 5x5 stride-2 convolutions (GDN is per pixel) give latent row `j` the image rows
/// `16j - 30 ..= 16j + 30`, within two latent rows (32 pixels) either side.
///
/// [`LicBackbone::analysis_halo`]: super::LicBackbone::analysis_halo
pub(crate) const ANALYSIS_HALO: usize = 2;

/// Latent rows of context a band of [`IgdnSynthesis`] needs on each side
/// ([`LicBackbone::synthesis_halo`]): each 5x5 stride-2 transposed convolution reads input rows
/// `Y-1..=Y+1` for output rows `2Y` and `2Y+1` (IGDN and the triggers are per pixel), so output
/// rows `16a..16b` need latent rows `a-2..=b` (2 above, 1 below).
///
/// [`LicBackbone::synthesis_halo`]: super::LicBackbone::synthesis_halo
pub(crate) const SYNTHESIS_HALO: usize = 2;

/// Which hyper transforms a hyperprior backbone has (its `g_a` and entropy models are the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HyperVariant {
    /// Ballé et al. 2018 (CompressAI's `ScaleHyperprior`): `h_a(|y|)` and `h_s` (widths
    /// `N → N → N → M`) with ReLUs, a ReLU after the last layer too; `h_s` gives the scales.
    Scale,
    /// Minnen et al. 2018 (CompressAI's `MeanScaleHyperprior`): `h_a(y)` with leaky ReLUs,
    /// `h_s` (widths `N → M → 3M/2 → 2M`) with leaky ReLUs between its layers and none after
    /// the last, whose channels are the scales then the means (`chunk(2, 1)`).
    MeanScale,
}

impl HyperVariant {
    /// `(in, out)` channels of the three layers of `h_s` (`h_s.0`, `h_s.2`, `h_s.4`).
    fn h_s_widths(self, n: usize, m: usize) -> [(usize, usize); 3] {
        match self {
            HyperVariant::Scale => [(n, n), (n, n), (n, m)],
            HyperVariant::MeanScale => [(n, m), (m, m * 3 / 2), (m * 3 / 2, 2 * m)],
        }
    }

    /// The activation between the layers of `h_a` and of `h_s`.
    fn activation(self) -> PortableActivation {
        match self {
            HyperVariant::Scale => PortableActivation::Relu,
            HyperVariant::MeanScale => PortableActivation::LeakyRelu,
        }
    }

    /// The activation after the last layer of `h_s`.
    fn last_activation(self) -> PortableActivation {
        match self {
            HyperVariant::Scale => PortableActivation::Relu,
            HyperVariant::MeanScale => PortableActivation::Identity,
        }
    }
}

/// An activation on the float path: the same function as the portable path's, on tensors
/// (differentiable, for training).
fn activate(activation: PortableActivation, x: &Tensor) -> Result<Tensor> {
    Ok(match activation {
        PortableActivation::Relu => x.relu()?,
        PortableActivation::LeakyRelu => candle_nn::ops::leaky_relu(x, LEAKY_RELU_SLOPE)?,
        PortableActivation::Identity => x.clone(),
    })
}

/// `g_a` (4 strided 5x5 convolutions with GDN), `h_a` (3x3, then two strided 5x5), `h_s` (two
/// 5x5 transposed convolutions and a 3x3) of a [`HyperVariant`], and the entropy models.
/// Weights: `g_a.{0..6}`, `h_a.{0,2,4}`, `h_s.{0,2,4}`, `entropy_bottleneck.*`,
/// `gaussian_conditional.*`.
#[derive(Debug, Clone)]
pub(crate) struct HyperpriorCore {
    variant: HyperVariant,
    g_a: (Vec<Conv2d>, Vec<Gdn>),
    h_a: Vec<Conv2d>,
    h_s: (Vec<ConvTranspose2d>, Conv2d),
    /// `h_s` on the portable entropy path (same weights, fixed-order f64 arithmetic).
    h_s_portable: PortableHyperSynthesis,
    pub(crate) entropy_bottleneck: EntropyBottleneck,
    pub(crate) gaussian_conditional: GaussianConditional,
    pub(crate) device: Device,
}

impl HyperpriorCore {
    /// Loads (or creates) the transforms of `variant` for `n` hidden and `m` latent channels.
    pub(crate) fn new(vb: &VarBuilder, n: usize, m: usize, variant: HyperVariant) -> Result<Self> {
        if n == 0 || m == 0 {
            return Err(Error::Model(format!(
                "invalid hyperprior size N={n}, M={m}"
            )));
        }
        let g_a_convs = [(3, n), (n, n), (n, n), (n, m)]
            .iter()
            .enumerate()
            .map(|(i, &(i_c, o_c))| Conv2d::new(vb.pp(format!("g_a.{}", 2 * i)), i_c, o_c, 5, 2))
            .collect::<Result<Vec<_>>>()?;
        let g_a_gdns = (0..3)
            .map(|i| Gdn::new(vb.pp(format!("g_a.{}", 2 * i + 1)), n, false))
            .collect::<Result<Vec<_>>>()?;
        let [w0, w1, w2] = variant.h_s_widths(n, m);
        let h_s = (
            vec![
                ConvTranspose2d::new(vb.pp("h_s.0"), w0.0, w0.1, 5, 2)?,
                ConvTranspose2d::new(vb.pp("h_s.2"), w1.0, w1.1, 5, 2)?,
            ],
            Conv2d::new(vb.pp("h_s.4"), w2.0, w2.1, 3, 1)?,
        );
        Ok(Self {
            h_s_portable: Self::portable_h_s(vb, variant, n, m)?,
            variant,
            g_a: (g_a_convs, g_a_gdns),
            h_a: vec![
                Conv2d::new(vb.pp("h_a.0"), m, n, 3, 1)?,
                Conv2d::new(vb.pp("h_a.2"), n, n, 5, 2)?,
                Conv2d::new(vb.pp("h_a.4"), n, n, 5, 2)?,
            ],
            h_s,
            entropy_bottleneck: EntropyBottleneck::new(vb.pp("entropy_bottleneck"), n)?,
            gaussian_conditional: GaussianConditional::new(vb.pp("gaussian_conditional"))?,
            device: vb.device().clone(),
        })
    }

    /// `h_s` on the portable path, over the tensors of `h_s` (created first, with their
    /// initialisation, by [`new`](Self::new): a VarMap returns its existing variables).
    fn portable_h_s(
        vb: &VarBuilder,
        variant: HyperVariant,
        n: usize,
        m: usize,
    ) -> Result<PortableHyperSynthesis> {
        let (t, c) = (PortableKind::Transposed, PortableKind::Conv);
        let [w0, w1, w2] = variant.h_s_widths(n, m);
        let (act, last) = (variant.activation(), variant.last_activation());
        let specs = [
            ("h_s.0", t, (w0.0, w0.1, 5, 5), 2, act),
            ("h_s.2", t, (w1.0, w1.1, 5, 5), 2, act),
            ("h_s.4", c, (w2.1, w2.0, 3, 3), 1, last),
        ];
        let layers = specs
            .into_iter()
            .map(|(name, kind, shape, stride, activation)| {
                let vb = vb.pp(name);
                let o = match kind {
                    PortableKind::Conv => shape.0,
                    PortableKind::Transposed => shape.1,
                };
                let (w, b) = (vb.get(shape, "weight")?, vb.get(o, "bias")?);
                Ok(PortableLayer::new(kind, &w, &b, stride)?.with_activation(activation))
            })
            .collect::<Result<Vec<_>>>()?;
        let h_s = PortableHyperSynthesis::new(layers)?;
        match variant {
            HyperVariant::Scale => Ok(h_s),
            HyperVariant::MeanScale => h_s.with_means(),
        }
    }

    /// Sets the precision of `g_a`'s convolutions (`h_a` and `h_s` always stay f32).
    pub(crate) fn set_analysis_precision(&mut self, precision: Precision) -> Result<()> {
        for conv in &mut self.g_a.0 {
            conv.set_precision(precision)?;
        }
        Ok(())
    }

    /// The precision of `g_a`'s convolutions.
    pub(crate) fn analysis_precision(&self) -> Precision {
        self.g_a.0[0].precision()
    }

    /// Whether the weights are trainable variables (a model built for training).
    pub(crate) fn trainable(&self) -> bool {
        self.g_a.0[0].is_trainable()
    }

    /// `g_a`, each convolution fused with the GDN after it where the layers allow it.
    pub(crate) fn analysis(&self, x: &Tensor) -> Result<Tensor> {
        let (convs, gdns) = &self.g_a;
        let mut h = x.clone();
        for (i, conv) in convs.iter().enumerate() {
            h = match gdns.get(i) {
                Some(gdn) => conv.forward_gdn(&h, gdn)?,
                None => conv.forward(&h)?,
            };
        }
        Ok(h)
    }

    /// `g_a`, calling `visit` with the output of each of its 7 layers (the last is `y`).
    pub(crate) fn analysis_with(
        &self,
        x: &Tensor,
        visit: &mut dyn FnMut(&Tensor),
    ) -> Result<Tensor> {
        let (convs, gdns) = &self.g_a;
        let mut h = x.clone();
        for (i, conv) in convs.iter().enumerate() {
            h = conv.forward(&h)?;
            visit(&h);
            if let Some(gdn) = gdns.get(i) {
                h = gdn.forward(&h)?;
                visit(&h);
            }
        }
        Ok(h)
    }

    /// `h_a` (of `|y|` for the scale hyperprior, of `y` for the mean-scale one), calling
    /// `visit` with the output of each of its 5 layers (the last is `z`).
    pub(crate) fn hyper_analysis_with(
        &self,
        y: &Tensor,
        visit: &mut dyn FnMut(&Tensor),
    ) -> Result<Tensor> {
        let mut h = match self.variant {
            HyperVariant::Scale => y.abs()?,
            HyperVariant::MeanScale => y.clone(),
        };
        for (i, conv) in self.h_a.iter().enumerate() {
            h = conv.forward(&h)?;
            visit(&h);
            if i + 1 < self.h_a.len() {
                h = activate(self.variant.activation(), &h)?;
                visit(&h);
            }
        }
        Ok(h)
    }

    /// `h_s` on the portable entropy path: the scales (and the means), bit-exact on every
    /// device and kernel.
    pub(crate) fn hyper_synthesis_portable(&self, z_hat: &Tensor) -> Result<PortableParams> {
        self.h_s_portable.forward(z_hat)
    }

    /// `h_s`, calling `visit` with the output of each of its layers and activations (6 for the
    /// scale hyperprior, the last being the scales; 5 for the mean-scale one, the last being
    /// the scales and means before they are split).
    pub(crate) fn hyper_synthesis_with(
        &self,
        z_hat: &Tensor,
        visit: &mut dyn FnMut(&Tensor),
    ) -> Result<GaussianParams> {
        let (deconvs, last) = &self.h_s;
        let mut h = z_hat.clone();
        for d in deconvs {
            h = d.forward(&h)?;
            visit(&h);
            h = activate(self.variant.activation(), &h)?;
            visit(&h);
        }
        h = last.forward(&h)?;
        visit(&h);
        match self.variant {
            HyperVariant::Scale => {
                let scales = activate(self.variant.last_activation(), &h)?;
                visit(&scales);
                Ok(GaussianParams {
                    scales,
                    means: None,
                })
            }
            HyperVariant::MeanScale => {
                // CompressAI's `scales_hat, means_hat = gaussian_params.chunk(2, 1)`.
                let c = h.dim(1)? / 2;
                Ok(GaussianParams {
                    scales: h.narrow(1, 0, c)?.contiguous()?,
                    means: Some(h.narrow(1, c, c)?.contiguous()?),
                })
            }
        }
    }
}

/// CompressAI's synthesis `g_s` of the hyperprior family: four 5x5 stride-2 transposed
/// convolutions (`M → N → N → N → 3`) with an IGDN after each of the first three. Weights
/// `g_s.{0..6}`. Its injection points are after each IGDN (`N` channels each).
#[derive(Debug, Clone)]
pub(crate) struct IgdnSynthesis {
    convs: Vec<ConvTranspose2d>,
    gdns: Vec<Gdn>,
    n: usize,
}

impl IgdnSynthesis {
    /// Loads (or creates) `g_s` for `n` hidden and `m` latent channels.
    pub(crate) fn new(vb: &VarBuilder, n: usize, m: usize) -> Result<Self> {
        let convs = [(m, n), (n, n), (n, n), (n, 3)]
            .iter()
            .enumerate()
            .map(|(i, &(i_c, o_c))| {
                ConvTranspose2d::new(vb.pp(format!("g_s.{}", 2 * i)), i_c, o_c, 5, 2)
            })
            .collect::<Result<Vec<_>>>()?;
        let gdns = (0..3)
            .map(|i| Gdn::new(vb.pp(format!("g_s.{}", 2 * i + 1)), n, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { convs, gdns, n })
    }

    /// Widths of the injection points: after each IGDN.
    pub(crate) fn injection_points(&self) -> Vec<usize> {
        vec![self.n; self.gdns.len()]
    }

    /// `g_s(y_hat)` (not clamped), each convolution fused with the IGDN after it where the
    /// layers allow it, the triggers (checked first) added after each IGDN.
    pub(crate) fn forward(&self, y_hat: &Tensor, triggers: Option<&Triggers>) -> Result<Tensor> {
        if let Some(t) = triggers {
            t.check(&self.injection_points(), y_hat.dims4()?.0)?;
        }
        let mut h = y_hat.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            h = match self.gdns.get(i) {
                Some(gdn) => conv.forward_gdn(&h, gdn)?,
                None => conv.forward(&h)?,
            };
            if let Some(t) = triggers.filter(|_| i < self.gdns.len()) {
                h = t.inject(i, &h)?;
            }
        }
        Ok(h)
    }

    /// Sets the precision of the convolutions.
    pub(crate) fn set_precision(&mut self, precision: Precision) -> Result<()> {
        for conv in &mut self.convs {
            conv.set_precision(precision)?;
        }
        Ok(())
    }

    /// Training computes no kernel gradients here ([`ConvTranspose2d::freeze_kernel`]).
    pub(crate) fn freeze_kernels(&mut self) {
        for conv in &mut self.convs {
            conv.freeze_kernel();
        }
    }
}

/// Implements [`LicBackbone`](super::LicBackbone) for a CompressAI hyperprior made of a
/// [`HyperpriorCore`] (`core`), an [`IgdnSynthesis`] (`g_s`) and a configuration with `m` and
/// `n` (`cfg`): the scale and mean-scale hyperpriors differ only in their core's
/// [`HyperVariant`] and their names, so they share this one implementation.
macro_rules! hyperprior_backbone {
    ($ty:ty, $name:expr) => {
        impl $crate::backbone::LicBackbone for $ty {
            fn architecture(&self) -> &'static str {
                $name
            }

            fn config_json(&self) -> serde_json::Value {
                serde_json::to_value(self.cfg).unwrap_or_default()
            }

            fn device(&self) -> &candle_core::Device {
                &self.core.device
            }

            fn latent_channels(&self) -> usize {
                self.cfg.m
            }

            fn hyper_channels(&self) -> usize {
                self.cfg.n
            }

            fn analysis(&self, x: &candle_core::Tensor) -> $crate::Result<candle_core::Tensor> {
                self.core.analysis(x)
            }

            fn hyper_analysis(
                &self,
                y: &candle_core::Tensor,
            ) -> $crate::Result<candle_core::Tensor> {
                self.core.hyper_analysis_with(y, &mut |_| {})
            }

            fn hyper_synthesis(
                &self,
                z_hat: &candle_core::Tensor,
            ) -> $crate::Result<$crate::backbone::GaussianParams> {
                self.core.hyper_synthesis_with(z_hat, &mut |_| {})
            }

            fn hyper_synthesis_portable(
                &self,
                z_hat: &candle_core::Tensor,
            ) -> $crate::Result<Option<$crate::backbone::PortableParams>> {
                self.core.hyper_synthesis_portable(z_hat).map(Some)
            }

            fn analysis_halo(&self) -> Option<usize> {
                Some($crate::backbone::hyper::ANALYSIS_HALO)
            }

            fn synthesis_halo(&self) -> Option<usize> {
                Some($crate::backbone::hyper::SYNTHESIS_HALO)
            }

            fn injection_points(&self) -> Vec<usize> {
                self.g_s.injection_points()
            }

            fn synthesis(
                &self,
                y_hat: &candle_core::Tensor,
                triggers: Option<&$crate::backbone::Triggers>,
            ) -> $crate::Result<candle_core::Tensor> {
                self.g_s.forward(y_hat, triggers)
            }

            fn set_transform_precision(
                &mut self,
                precision: $crate::Precision,
            ) -> $crate::Result<()> {
                self.core.set_analysis_precision(precision)?;
                self.g_s.set_precision(precision)
            }

            fn transform_precision(&self) -> $crate::Precision {
                self.core.analysis_precision()
            }

            fn freeze_synthesis_kernels(&mut self) {
                self.g_s.freeze_kernels()
            }

            fn entropy_bottleneck(&self) -> &$crate::entropy::EntropyBottleneck {
                &self.core.entropy_bottleneck
            }

            fn gaussian_conditional(&self) -> &$crate::entropy::GaussianConditional {
                &self.core.gaussian_conditional
            }
        }
    };
}
pub(crate) use hyperprior_backbone;
