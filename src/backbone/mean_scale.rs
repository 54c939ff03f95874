//! Minnen et al. 2018 mean-scale hyperprior (CompressAI's `MeanScaleHyperprior`, zoo name
//! `mbt2018-mean`).

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::hyper::{HyperVariant, HyperpriorCore, IgdnSynthesis};
use super::LicBackbone;
use crate::entropy::EntropyBottleneck;
use crate::{Precision, Result};

/// Architecture name written into model files.
pub const MBT2018_MEAN: &str = "mbt2018-mean";

/// Configuration: `n` channels in the transforms and the hyper-latent, `m` in the latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeanScaleHyperpriorConfig {
    /// Channels of the hidden layers and of `z`.
    pub n: usize,
    /// Channels of `y`.
    pub m: usize,
}

/// The mean-scale hyperprior: the scale hyperprior's GDN analysis and IGDN synthesis, leaky-ReLU
/// hyper transforms (`h_a` of `y` itself, not `|y|`), a factorized prior on `z` and a Gaussian
/// on `y` whose scales *and means* come from `h_s`.
///
/// `h_s` is `deconv5 s2 (N → M)`, leaky ReLU, `deconv5 s2 (M → 3M/2)`, leaky ReLU,
/// `conv3 s1 (3M/2 → 2M)`; its output is split into the scales (first `M` channels) and the
/// means (last `M`). `y` is coded as the symbols `round(y − means)` with the Gaussian table the
/// scale picks, and decodes to `y_hat = symbols + means`.
///
/// Weight names are CompressAI's (`g_a.0.weight`, `g_s.1.gamma`, `h_s.4.bias`,
/// `entropy_bottleneck.*`, `gaussian_conditional.*`), so its state dicts load unchanged.
/// Injection points: after each of the three IGDNs of `g_s` (`n` channels each), as the scale
/// hyperprior's.
#[derive(Debug, Clone)]
pub struct MeanScaleHyperprior {
    cfg: MeanScaleHyperpriorConfig,
    core: HyperpriorCore,
    g_s: IgdnSynthesis,
}

impl MeanScaleHyperprior {
    /// Loads (or creates, for training) the model from `vb`. As
    /// [`ScaleHyperprior::new`](super::ScaleHyperprior::new): loaded (frozen) weights run in
    /// f32 until [`LicBackbone::set_transform_precision`]; a model created for training takes
    /// [`Precision::auto`] for `g_a` and `g_s`.
    pub fn new(vb: VarBuilder, cfg: &MeanScaleHyperpriorConfig) -> Result<Self> {
        let (n, m) = (cfg.n, cfg.m);
        let core = HyperpriorCore::new(&vb, n, m, HyperVariant::MeanScale)?;
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
    pub fn config(&self) -> &MeanScaleHyperpriorConfig {
        &self.cfg
    }

    /// Mutable entropy bottleneck (to rebuild its tables after training).
    pub fn entropy_bottleneck_mut(&mut self) -> &mut EntropyBottleneck {
        &mut self.core.entropy_bottleneck
    }
}

super::hyper::hyperprior_backbone!(MeanScaleHyperprior, MBT2018_MEAN);

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn tiny() -> MeanScaleHyperprior {
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 4, DType::F32, &Device::Cpu);
        MeanScaleHyperprior::new(vb, &MeanScaleHyperpriorConfig { n: 8, m: 12 }).unwrap()
    }

    #[test]
    fn float_and_portable_h_s_agree_and_split_scales_from_means() {
        let model = tiny();
        let z_hat = (Tensor::randn(0f32, 3f32, (2, 8, 3, 5), &Device::Cpu)
            .unwrap()
            .round())
        .unwrap();
        let float = model.hyper_synthesis(&z_hat).unwrap();
        let means = float.means.expect("means");
        assert_eq!(float.scales.dims(), &[2, 12, 12, 20]);
        assert_eq!(means.dims(), &[2, 12, 12, 20]);
        let p = model.hyper_synthesis_portable(&z_hat).unwrap().unwrap();
        assert_eq!(p.shape, (2, 12, 12, 20));
        let close = |a: &Tensor, b: &[f32]| {
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
        };
        assert!(close(&float.scales, &p.scales));
        assert!(close(&means, p.means.as_deref().unwrap()));
        // No ReLU on the last layer: a fresh model predicts negative scales and means too.
        assert!(p.scales.iter().any(|&s| s < 0.0));
        assert!(p.means.unwrap().iter().any(|&m| m < 0.0));
    }

    #[test]
    fn h_a_reads_y_not_its_magnitude() {
        let model = tiny();
        let y = Tensor::randn(0f32, 2f32, (1, 12, 8, 8), &Device::Cpu).unwrap();
        let z = model.hyper_analysis(&y).unwrap();
        let z_abs = model.hyper_analysis(&y.abs().unwrap()).unwrap();
        let diff = (z - z_abs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff > 1e-3, "{diff}");
    }
}
