//! Encoder-side latent refinement: a slower, better encoder for the same decoder.
//!
//! The decoder only sees the symbols, so an encoder may send any latent. The analysis transform
//! `g_a` gives a good one in one pass (it is trained across many images); refining that `y` for
//! the one image at hand with gradient steps on the rate-distortion loss the model was trained
//! with, `bpp + λ·255²·MSE`, closes part of the gap between what `g_a` gives and the best latent
//! the decoder can turn into this image (the "amortisation gap": Campos et al. 2019, "Content
//! adaptive optimization for neural image compression"; Yang et al. 2020, "Improving inference
//! for neural image compression").
//!
//! Each step measures the loss as the encoder will code the latent: `z = h_a(y)` rounded to
//! the entropy bottleneck's medians, the symbols `v = round((y − μ)·g)` at the codec's level
//! gains `g` (μ, σ from the hyper-synthesis of the rounded `z`), their rates under the
//! bottleneck and the Gaussian of scale `σ·g`, and the synthesis of `v / g + μ` against the
//! image's own pixels (the padding is free). The roundings pass gradients straight through;
//! Adam moves `y`. The latent kept is the best one measured, the analysis' own included, so the
//! estimated loss is never worse than a plain encode's. The stream is an ordinary psic stream of
//! the same level: decoders need nothing to know, and the shielded decode uses the same
//! triggers. The shield is not in the loss, so how well it holds on refined latents is a
//! measured figure (`docs/MODELS.md`), not a guarantee of this module.

use candle_core::{DType, Tensor, Var};
use image::RgbImage;

use super::{bits_per_pixel, Adam};
use crate::backbone::LicBackbone;
use crate::model::ModelFile;
use crate::{Codec, Error, Result};

/// What [`refine_latent`] does. The defaults were chosen on one Kodak photo (kodim23, level 2
/// of the default model: 150 steps at 0.003 gave +0.21 dB at the same size, 0.01 and 0.03
/// less, `docs/MODELS.md` "Encoder effort").
#[derive(Debug, Clone, PartialEq)]
pub struct RefineConfig {
    /// Adam steps on `y` (0: the analysis' latent unchanged).
    pub steps: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// The λ of `bpp + λ·255²·MSE`; `None`: the λ the model records for the codec's level.
    pub lambda: Option<f64>,
    /// The largest image refined, in pixels: a step holds the whole image's training graph
    /// (about 0.6 GB a megapixel for the default model), so larger images are refused.
    pub max_pixels: u64,
}

impl Default for RefineConfig {
    fn default() -> Self {
        Self {
            steps: 150,
            lr: 0.003,
            lambda: None,
            max_pixels: 1 << 22,
        }
    }
}

/// One measurement's figures (the latent after that many updates).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefineStep {
    /// `bpp + λ·255²·MSE`.
    pub loss: f64,
    /// Estimated bits per pixel of the symbols of `y` and `z`.
    pub bpp: f64,
    /// PSNR of the decoded (rounded) latent's full decode, in dB.
    pub psnr: f64,
}

/// The image, the model's decoder as trainable operations, and what stays fixed while `y`
/// moves.
struct Problem {
    synth: Box<dyn LicBackbone>,
    /// The image itself, `[1, 3, H, W]` (the loss ignores the padding).
    x: Tensor,
    gains: Option<Tensor>,
    lambda: f64,
}

/// Refines the latent of `img` for `codec` (whose model file is `model`): `cfg.steps` Adam
/// steps from [`Codec::analyse`]'s latent, keeping the best latent measured. Pass the result
/// to [`Codec::encode_latent`]; `progress` sees each measurement (`0..=steps`).
pub fn refine_latent(
    model: &ModelFile,
    codec: &Codec,
    img: &RgbImage,
    cfg: &RefineConfig,
    mut progress: impl FnMut(usize, RefineStep),
) -> Result<Tensor> {
    let problem = Problem::new(model, codec, img, cfg)?;
    let y0 = codec.analyse(img)?.to_dtype(DType::F32)?;
    if cfg.steps == 0 {
        return Ok(y0);
    }
    let var = Var::from_tensor(&y0)?;
    let mut adam = Adam::new(vec![("y".into(), var.clone())], cfg.lr)?;
    let mut best = (f64::INFINITY, y0);
    // Step `i` measures the latent after `i` updates; the last measurement makes no update.
    for step in 0..=cfg.steps {
        let (loss, stats) = problem.loss(var.as_tensor())?;
        if stats.loss < best.0 {
            best = (stats.loss, var.as_tensor().detach().copy()?);
        }
        if step < cfg.steps {
            adam.step(&loss.backward()?, None)?;
        }
        progress(step, stats);
    }
    Ok(best.1)
}

/// `f(t)` forward, the identity backward (the straight-through estimator of a rounding).
fn straight_through(t: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    Ok((t + (f(t)? - t)?.detach())?)
}

/// [`refine_latent`], then [`Codec::encode_latent`]: a psic stream of `img`.
pub fn encode_refined(
    model: &ModelFile,
    codec: &Codec,
    img: &RgbImage,
    cfg: &RefineConfig,
    progress: impl FnMut(usize, RefineStep),
) -> Result<Vec<u8>> {
    let y = refine_latent(model, codec, img, cfg, progress)?;
    codec.encode_latent(img.width(), img.height(), &y)
}

impl Problem {
    fn new(model: &ModelFile, codec: &Codec, img: &RgbImage, cfg: &RefineConfig) -> Result<Self> {
        if model.fingerprint()? != *codec.fingerprint() {
            return Err(Error::InvalidArgument(
                "refinement needs the model file the codec was built from".into(),
            ));
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "refinement learning rate {} is not positive",
                cfg.lr
            )));
        }
        let pixels = u64::from(img.width()) * u64::from(img.height());
        if pixels > cfg.max_pixels {
            return Err(Error::InvalidArgument(format!(
                "refinement holds the whole image in memory: {}x{} is over its limit of {} pixels",
                img.width(),
                img.height(),
                cfg.max_pixels
            )));
        }
        let levels = codec.rate_levels();
        let level = codec.level();
        let lambda = cfg
            .lambda
            .or_else(|| levels.and_then(|l| l.info(level)).map(|i| i.lambda))
            .filter(|l| l.is_finite() && *l > 0.0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "refinement needs a positive λ: the model records none for level {level}"
                ))
            })?;
        let device = codec.backbone().device().clone();
        let gains = match levels.and_then(|l| l.gains(level)) {
            Some(g) => Some(Tensor::new(g, &device)?.reshape((1, g.len(), 1, 1))?),
            None => None,
        };
        Ok(Self {
            synth: super::rates::trainable_backbone(model, &device)?,
            x: crate::image_io::image_to_tensor(img, &device)?,
            gains,
            lambda,
        })
    }

    /// The loss at latent `y` and the step's figures.
    fn loss(&self, y: &Tensor) -> Result<(Tensor, RefineStep)> {
        let b = self.synth.as_ref();
        let eb = b.entropy_bottleneck();
        let z_hat = straight_through(&b.hyper_analysis(y)?, |z| eb.round_to_medians(z))?;
        let z_lik = eb.likelihood(&z_hat)?;
        let params = b.hyper_synthesis(&z_hat)?;
        let centred = match &params.means {
            Some(mu) => (y - mu)?,
            None => y.clone(),
        };
        let (v, scales) = match &self.gains {
            Some(g) => (centred.broadcast_mul(g)?, params.scales.broadcast_mul(g)?),
            None => (centred, params.scales.clone()),
        };
        let v_hat = straight_through(&v, |v| Ok(v.round()?))?;
        let y_lik = b.gaussian_conditional().likelihood(&v_hat, &scales, None)?;
        let centred_hat = match &self.gains {
            Some(g) => v_hat.broadcast_div(g)?,
            None => v_hat,
        };
        let y_hat = match &params.means {
            Some(mu) => (centred_hat + mu)?,
            None => centred_hat,
        };
        let (_, _, h, w) = self.x.dims4()?;
        let x_hat = b
            .synthesis(&y_hat, None)?
            .narrow(2, 0, h)?
            .narrow(3, 0, w)?;
        let mse = (&x_hat - &self.x)?.sqr()?.mean_all()?;
        let bpp = bits_per_pixel(&y_lik, &z_lik, w * h)?;
        let loss = (&bpp + (&mse * (self.lambda * 255.0 * 255.0))?)?;
        let mse_f = f64::from(mse.to_scalar::<f32>()?);
        let stats = RefineStep {
            loss: f64::from(loss.to_scalar::<f32>()?),
            bpp: f64::from(bpp.to_scalar::<f32>()?),
            psnr: -10.0 * mse_f.max(1e-10).log10(),
        };
        Ok((loss, stats))
    }
}
