//! Training: stage 0 (rate-distortion pretraining of a backbone), stage 1 (joint shielding: both
//! decodes plus the UAEO loss against a frozen semantic target) and stage 2 (privacy emphasis,
//! synthesis side only, adaptive weighting), on candle's autograd.
//!
//! - [`rd_forward`] / [`rd_loss`]: CompressAI's noise-quantised forward pass and RD loss;
//! - [`uaeo`]: the evidential split and the shielding terms;
//! - [`AdaptiveWeighting`]: inverse-loss weighting of several terms;
//! - [`Adam`]: Adam with gradient clipping and exactly resumable state;
//! - [`Trainer`] and [`TrainConfig`]: the three stages, checkpoints, validation;
//! - [`rates`]: fitting the channel gains of quality levels ([`crate::rate`]) on a frozen model;
//! - [`refine`]: encoder-side refinement of an image's latent (a slower, better encoder).

mod adam;
pub mod augment;
pub mod msssim;
pub mod purify;
pub mod rates;
pub mod refine;
mod trainer;
pub mod uaeo;
mod weighting;

pub use adam::Adam;
pub use msssim::Distortion;
pub use trainer::{
    grid, load_target, AugmentConfig, ShieldConfig, Stage, StepStats, TargetKind, TrainConfig,
    Trainer, ValStats,
};
pub use weighting::AdaptiveWeighting;

use candle_core::{Device, Tensor};

use crate::backbone::{LicBackbone, Triggers};
use crate::init::SplitMix64;
use crate::Result;

/// What one training forward pass gives.
#[derive(Debug, Clone)]
pub struct RdForward {
    /// The reconstruction (not clamped), `[B, 3, H, W]`.
    pub x_hat: Tensor,
    /// Estimated bits per pixel from the likelihoods of `y` and `z` (a scalar).
    pub bpp: Tensor,
    /// Mean squared error to the input, on the `[0, 1]` scale (a scalar).
    pub mse: Tensor,
}

/// Uniform noise in `[-1/2, 1/2)` of `shape`, from a seeded generator (candle's CPU generator
/// cannot be seeded, and training must be reproducible).
pub fn uniform_noise(shape: &[usize], rng: &mut SplitMix64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The training forward pass: quantisation replaced by additive uniform noise on `y` and `z`
/// (as CompressAI trains), likelihoods from both entropy models, synthesis with optional
/// triggers. Differentiable in every parameter of the backbone (and of the triggers).
pub fn rd_forward(
    backbone: &dyn LicBackbone,
    x: &Tensor,
    triggers: Option<&Triggers>,
    rng: &mut SplitMix64,
) -> Result<RdForward> {
    let (y_tilde, bpp) = noisy_latent(backbone, x, rng)?;
    let x_hat = backbone.synthesis(&y_tilde, triggers)?;
    let mse = (&x_hat - x)?.sqr()?.mean_all()?;
    Ok(RdForward { x_hat, bpp, mse })
}

/// The latent the decoder sees, detached, and the estimated bits per pixel of its symbols and
/// of `z_hat = round(z − median) + median`: what a [`crate::Codec`] decodes, for validation and
/// for training the synthesis alone (see
/// [`ShieldConfig::rounded_latents`](crate::train::ShieldConfig::rounded_latents)).
///
/// At a quality level with channel gains `g` (`[B or 1, M]`, [`crate::rate`]) the symbols are
/// `round((y − μ)·g)` under the Gaussian of scale `σ·g`, and `y_hat = symbols / g + μ`; without
/// gains (`g = 1`), `y_hat = round(y − μ) + μ` (μ = 0 without means).
pub fn rounded_latent(
    backbone: &dyn LicBackbone,
    x: &Tensor,
    gains: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, _, h, w) = x.dims4()?;
    let y = backbone.analysis(x)?.detach();
    let eb = backbone.entropy_bottleneck();
    let z_hat = eb.round_to_medians(&backbone.hyper_analysis(&y)?)?.detach();
    let params = backbone.hyper_synthesis(&z_hat)?;
    let centred = match &params.means {
        Some(mu) => (&y - mu)?,
        None => y,
    };
    let (symbols, scales, centred_hat) = match gains {
        Some(g) => {
            let (gb, m) = g.dims2()?;
            let g = g.reshape((gb, m, 1, 1))?.to_dtype(centred.dtype())?;
            let s = centred.broadcast_mul(&g)?.round()?;
            let c = s.broadcast_div(&g)?;
            (s, params.scales.broadcast_mul(&g)?, c)
        }
        None => {
            let s = centred.round()?;
            (s.clone(), params.scales.clone(), s)
        }
    };
    let y_hat = match &params.means {
        Some(mu) => (centred_hat + mu)?,
        None => centred_hat,
    }
    .detach();
    let y_lik = backbone
        .gaussian_conditional()
        .likelihood(&symbols, &scales, None)?;
    let z_lik = eb.likelihood(&z_hat)?;
    let bpp = bits_per_pixel(&y_lik, &z_lik, b * h * w)?.detach();
    Ok((y_hat, bpp))
}

/// The encoder half of [`rd_forward`]: the noise-quantised latent `y + u` and the estimated
/// bits per pixel of `y` and `z` (noise drawn for `z` first, then `y`).
pub fn noisy_latent(
    backbone: &dyn LicBackbone,
    x: &Tensor,
    rng: &mut SplitMix64,
) -> Result<(Tensor, Tensor)> {
    let (b, _, h, w) = x.dims4()?;
    let align = backbone.alignment();
    if h % align != 0 || w % align != 0 {
        return Err(crate::Error::InvalidArgument(format!(
            "training inputs must be multiples of {align} pixels, got {w}x{h}"
        )));
    }
    let dev = x.device();
    let y = backbone.analysis(x)?;
    let z = backbone.hyper_analysis(&y)?;
    let z_tilde = (&z + uniform_noise(z.dims(), rng, dev)?)?;
    let z_lik = backbone.entropy_bottleneck().likelihood(&z_tilde)?;
    let params = backbone.hyper_synthesis(&z_tilde)?;
    let y_tilde = (&y + uniform_noise(y.dims(), rng, dev)?)?;
    let y_lik = backbone.gaussian_conditional().likelihood(
        &y_tilde,
        &params.scales,
        params.means.as_ref(),
    )?;
    Ok((y_tilde, bits_per_pixel(&y_lik, &z_lik, b * h * w)?))
}

/// The estimated bits per pixel of the likelihoods of `y` and `z` over `pixels` pixels (the
/// batch's): `−(Σ log₂ p_y + Σ log₂ p_z) / pixels`.
pub fn bits_per_pixel(y_lik: &Tensor, z_lik: &Tensor, pixels: usize) -> Result<Tensor> {
    let bits = ((y_lik.log()?.sum_all()? + z_lik.log()?.sum_all()?)? * (-1.0 / 2f64.ln()))?;
    Ok((bits / pixels as f64)?)
}

/// CompressAI's rate-distortion loss `bpp + lambda · 255² · MSE`.
pub fn rd_loss(out: &RdForward, lambda: f64) -> Result<Tensor> {
    Ok((&out.bpp + (&out.mse * (lambda * 255.0 * 255.0))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{ScaleHyperprior, ScaleHyperpriorConfig};
    use candle_core::DType;
    use candle_nn::Optimizer;

    #[test]
    fn rounded_latents_follow_each_crops_level_gains() {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 3, DType::F32, &dev);
        let model = ScaleHyperprior::new(vb, &ScaleHyperpriorConfig { n: 8, m: 12 }).unwrap();
        let mut rng = SplitMix64::new(9);
        let x = (uniform_noise(&[2, 3, 64, 64], &mut rng, &dev).unwrap() + 0.5).unwrap();
        let (plain, bpp_plain) = rounded_latent(&model, &x, None).unwrap();
        let y = model.analysis(&x).unwrap();
        let diff = (&plain - y.round().unwrap()).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // Crop 0 at gains 1, crop 1 at gains 4: its latent moves in steps of 1/4.
        let g = Tensor::from_vec([vec![1f32; 12], vec![4f32; 12]].concat(), (2, 12), &dev).unwrap();
        let (levelled, bpp) = rounded_latent(&model, &x, Some(&g)).unwrap();
        let first = (levelled.get(0).unwrap() - plain.get(0).unwrap()).unwrap();
        assert_eq!(
            first
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        for v in levelled
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
        {
            assert_eq!((v * 4.0).fract(), 0.0, "{v}");
        }
        let (a, b) = (
            bpp_plain.to_scalar::<f32>().unwrap(),
            bpp.to_scalar::<f32>().unwrap(),
        );
        assert!(b > a, "finer steps cost more bits: {b} vs {a}");
    }

    #[test]
    fn one_adam_step_lowers_the_loss_on_a_fixed_batch() {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 11, DType::F32, &dev);
        let model = ScaleHyperprior::new(vb, &ScaleHyperpriorConfig { n: 8, m: 12 }).unwrap();
        let mut rng = SplitMix64::new(5);
        let x = (uniform_noise(&[2, 3, 64, 64], &mut rng, &dev).unwrap() + 0.5).unwrap();
        let loss_at = |seed| {
            let out = rd_forward(&model, &x, None, &mut SplitMix64::new(seed)).unwrap();
            rd_loss(&out, 0.01).unwrap()
        };
        // Main parameters only (the quantiles belong to the auxiliary optimiser).
        let params: Vec<_> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.ends_with("quantiles"))
            .map(|(_, v)| v.clone())
            .collect();
        let mut opt = candle_nn::AdamW::new(
            params,
            candle_nn::ParamsAdamW {
                lr: 1e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        let before = loss_at(9);
        opt.backward_step(&before).unwrap();
        let after = loss_at(9);
        let (b, a) = (
            before.to_scalar::<f32>().unwrap(),
            after.to_scalar::<f32>().unwrap(),
        );
        assert!(a < b, "loss {b} -> {a}");
    }

    #[test]
    fn rd_loss_by_hand() {
        let dev = Device::Cpu;
        let out = RdForward {
            x_hat: Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).unwrap(),
            bpp: Tensor::new(0.5f32, &dev).unwrap(),
            mse: Tensor::new(0.001f32, &dev).unwrap(),
        };
        // 0.5 + 0.01 * 65025 * 0.001 = 1.15025
        let l = rd_loss(&out, 0.01).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - 1.15025).abs() < 1e-6, "{l}");
    }

    #[test]
    fn forward_gives_a_finite_rate_and_a_full_size_reconstruction() {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 2, DType::F32, &dev);
        let model = ScaleHyperprior::new(vb, &ScaleHyperpriorConfig { n: 4, m: 6 }).unwrap();
        let x = Tensor::full(0.5f32, (1, 3, 64, 64), &dev).unwrap();
        let out = rd_forward(&model, &x, None, &mut SplitMix64::new(1)).unwrap();
        let bpp = out.bpp.to_scalar::<f32>().unwrap();
        assert!(bpp.is_finite() && bpp > 0.0, "bpp {bpp}");
        assert_eq!(out.x_hat.dims(), &[1, 3, 64, 64]);
    }
}
