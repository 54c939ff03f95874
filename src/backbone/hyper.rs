//! The encoder side shared by every hyperprior backbone: `g_a`, `h_a`, `h_s` and the two
//! entropy models of Ballé et al. 2018, under CompressAI's names.

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::portable::{PortableHyperSynthesis, PortableKind, PortableLayer, PortableParams};
use super::GaussianParams;
use crate::entropy::{EntropyBottleneck, GaussianConditional};
use crate::layers::{Conv2d, ConvTranspose2d, Gdn};
use crate::{Error, Precision, Result};

/// Latent rows of context a band of `g_a` needs on each side ([`LicBackbone::analysis_halo`]):
/// four 5x5 stride-2 convolutions (GDN is per pixel) give latent row `j` the image rows
/// `16j - 30 ..= 16j + 30`, within two latent rows (32 pixels) either side.
///
/// [`LicBackbone::analysis_halo`]: super::LicBackbone::analysis_halo
pub(crate) const ANALYSIS_HALO: usize = 2;

/// `g_a` (4 strided 5x5 convolutions with GDN), `h_a` (3x3, then two strided 5x5, ReLU),
/// `h_s` (two 5x5 transposed convolutions and a 3x3, ReLU) and the entropy models.
/// Weights: `g_a.{0..6}`, `h_a.{0,2,4}`, `h_s.{0,2,4}`, `entropy_bottleneck.*`,
/// `gaussian_conditional.*`.
#[derive(Debug, Clone)]
pub(crate) struct HyperpriorCore {
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
    /// Loads (or creates) the transforms for `n` hidden and `m` latent channels.
    pub(crate) fn new(vb: &VarBuilder, n: usize, m: usize) -> Result<Self> {
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
        let h_s = (
            vec![
                ConvTranspose2d::new(vb.pp("h_s.0"), n, n, 5, 2)?,
                ConvTranspose2d::new(vb.pp("h_s.2"), n, n, 5, 2)?,
            ],
            Conv2d::new(vb.pp("h_s.4"), n, m, 3, 1)?,
        );
        // The tensors of `h_s` above, created first (with their initialisation, for a VarMap):
        // a VarMap returns its existing variables.
        let portable = |name: &str, kind, shape: (usize, usize, usize, usize), stride| {
            let vb = vb.pp(name);
            let o = match kind {
                PortableKind::Conv => shape.0,
                PortableKind::Transposed => shape.1,
            };
            PortableLayer::new(kind, &vb.get(shape, "weight")?, &vb.get(o, "bias")?, stride)
        };
        let (t, c) = (PortableKind::Transposed, PortableKind::Conv);
        let h_s_portable = PortableHyperSynthesis::new(vec![
            portable("h_s.0", t, (n, n, 5, 5), 2)?,
            portable("h_s.2", t, (n, n, 5, 5), 2)?,
            portable("h_s.4", c, (m, n, 3, 3), 1)?,
        ])?;
        Ok(Self {
            h_s_portable,
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

    /// `h_a(|y|)`, calling `visit` with the output of each of its 5 layers (the last is `z`).
    pub(crate) fn hyper_analysis_with(
        &self,
        y: &Tensor,
        visit: &mut dyn FnMut(&Tensor),
    ) -> Result<Tensor> {
        let mut h = y.abs()?;
        for (i, conv) in self.h_a.iter().enumerate() {
            h = conv.forward(&h)?;
            visit(&h);
            if i + 1 < self.h_a.len() {
                h = h.relu()?;
                visit(&h);
            }
        }
        Ok(h)
    }

    /// `h_s` on the portable entropy path: the scales, bit-exact on every device and kernel.
    pub(crate) fn hyper_synthesis_portable(&self, z_hat: &Tensor) -> Result<PortableParams> {
        self.h_s_portable.forward(z_hat)
    }

    /// `h_s`, calling `visit` with the output of each of its 6 layers (the last is the scales).
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
            h = h.relu()?;
            visit(&h);
        }
        h = last.forward(&h)?;
        visit(&h);
        let scales = h.relu()?;
        visit(&scales);
        Ok(GaussianParams {
            scales,
            means: None,
        })
    }
}
