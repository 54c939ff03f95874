//! Fitting quality levels ([`crate::rate`]): the channel gains `g_l` of each level, for a list
//! of λ, with the transforms, the hyperprior and the entropy models frozen.
//!
//! Each level minimises CompressAI's `bpp + λ·255²·MSE` ([`rd_loss`]) over `log g` with Adam,
//! on random crops. The forward pass is the coder's with quantisation replaced by additive
//! uniform noise in the *scaled* domain, as CompressAI trains: `v = (y − μ)·g + u`, the rate of
//! `v` under the Gaussian of scale `σ·g` (σ and μ from the quantised `z`, as the decoder sees
//! them), and the reconstruction `g_s(v / g + μ)` (the full decode: no triggers).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::{bits_per_pixel, rd_loss, uniform_noise, Adam, RdForward};
use crate::backbone::LicBackbone;
use crate::data::{CropSampler, ImageFolder, Split};
use crate::init::SplitMix64;
use crate::model::ModelFile;
use crate::rate::{LevelInfo, RateLevels, MAX_GAIN, MIN_GAIN};
use crate::{Error, Result};

/// What [`fit_rate_levels`] does.
#[derive(Debug, Clone)]
pub struct RateFitConfig {
    /// The λ of each level, in level order.
    pub lambdas: Vec<f64>,
    /// Adam steps (each step updates every level on the same batch).
    pub steps: usize,
    /// Crops per batch.
    pub batch: usize,
    /// Adam's learning rate on `log g`.
    pub lr: f64,
    /// Seed of the noise.
    pub seed: u64,
    /// The λ the model was trained for: levels then start from `g = sqrt(λ / reference)` (the
    /// step that keeps `λ·step²` constant); without it, from `g = 1`.
    pub reference_lambda: Option<f64>,
}

impl Default for RateFitConfig {
    fn default() -> Self {
        Self {
            lambdas: vec![0.002, 0.0085, 0.03],
            steps: 300,
            batch: 4,
            lr: 0.02,
            seed: 0,
            reference_lambda: None,
        }
    }
}

/// One level's figures on one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelStep {
    /// The loss `bpp + λ·255²·MSE`.
    pub loss: f64,
    /// Estimated bits per pixel (`y` and `z`).
    pub bpp: f64,
    /// PSNR of the noisy reconstruction (dB).
    pub psnr: f64,
    /// Mean of the level's `log g`.
    pub mean_log_gain: f64,
}

/// The crop sampler over the training part (all but `eval_percent` %, [`crate::data::split_of`])
/// of each folder, skipping images smaller than the crop.
pub fn training_crops(
    dirs: &[PathBuf],
    eval_percent: u32,
    crop: u32,
    seed: u64,
) -> Result<CropSampler> {
    let mut files = Vec::new();
    for dir in dirs {
        for f in ImageFolder::open(dir)?.part(Split::Train, eval_percent) {
            let (w, h) = image::image_dimensions(&f)
                .map_err(|e| Error::Image(format!("{}: {e}", f.display())))?;
            if w >= crop && h >= crop {
                files.push(f);
            }
        }
    }
    CropSampler::new(&files, crop, seed)
}

/// The trainable copy of a model's backbone (weights as variables, so that gradients flow
/// through its layers; nothing updates them here).
pub(super) fn trainable_backbone(
    model: &ModelFile,
    device: &Device,
) -> Result<Box<dyn LicBackbone>> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("VarMap lock");
        // As the trainer loads a model: the float weights; the buffers are rebuilt.
        for (name, t) in &model.tensors {
            if super::trainer::is_trained_weight(name, t) {
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                data.insert(name.clone(), Var::from_tensor(&t)?);
            }
        }
    }
    model
        .architecture
        .build(VarBuilder::from_varmap(&varmap, DType::F32, device))
}

/// What the frozen encoder gives for a batch: `y − μ`, `μ`, `σ` and the bits of `z`.
struct Encoded {
    centred: Tensor,
    means: Option<Tensor>,
    scales: Tensor,
    z_lik: Tensor,
}

fn encode_batch(b: &dyn LicBackbone, x: &Tensor) -> Result<Encoded> {
    let y = b.analysis(x)?;
    let z = b.hyper_analysis(&y)?;
    let eb = b.entropy_bottleneck();
    let z_hat = eb.quantize(&z)?;
    let z_lik = eb.likelihood(&z_hat)?;
    let params = b.hyper_synthesis(&z_hat)?;
    let centred = match &params.means {
        Some(m) => (&y - m)?,
        None => y,
    };
    Ok(Encoded {
        centred,
        means: params.means,
        scales: params.scales,
        z_lik,
    })
}

/// One level's forward pass on an encoded batch: the noisy latent in the scaled domain, its
/// rate under `σ·g`, and the full reconstruction of `v / g + μ`.
fn level_forward(
    synth: &dyn LicBackbone,
    enc: &Encoded,
    log_gain: &Var,
    x: &Tensor,
    rng: &mut SplitMix64,
) -> Result<RdForward> {
    let dev = x.device();
    let m = log_gain.dims()[0];
    let g = log_gain.as_tensor().exp()?.reshape((1, m, 1, 1))?;
    let noise = uniform_noise(enc.centred.dims(), rng, dev)?;
    let v = (enc.centred.broadcast_mul(&g)? + noise)?;
    let scales = enc.scales.broadcast_mul(&g)?;
    let y_lik = synth.gaussian_conditional().likelihood(&v, &scales, None)?;
    let (b, _, h, w) = x.dims4()?;
    let bpp = bits_per_pixel(&y_lik, &enc.z_lik, b * h * w)?;
    let y_tilde = v.broadcast_div(&g)?;
    let y_tilde = match &enc.means {
        Some(mu) => (y_tilde + mu)?,
        None => y_tilde,
    };
    let x_hat = synth.synthesis(&y_tilde, None)?;
    let mse = (&x_hat - x)?.sqr()?.mean_all()?;
    Ok(RdForward { x_hat, bpp, mse })
}

/// Fits one gain vector per λ of `cfg` for `model` on crops from `sampler`, everything else
/// frozen; `progress` sees every step's figures, one per level. Returns the levels (each
/// described by its λ), gains clamped to [`MIN_GAIN`]..=[`MAX_GAIN`].
pub fn fit_rate_levels(
    model: &ModelFile,
    sampler: &mut CropSampler,
    cfg: &RateFitConfig,
    device: &Device,
    mut progress: impl FnMut(usize, &[LevelStep]),
) -> Result<RateLevels> {
    if cfg.lambdas.is_empty() || cfg.lambdas.iter().any(|l| !(l.is_finite() && *l > 0.0)) {
        return Err(Error::InvalidArgument(
            "rate levels need one or more positive λ".into(),
        ));
    }
    let frozen = model.build_backbone(device)?;
    let synth = trainable_backbone(model, device)?;
    let m = frozen.latent_channels();
    let mut levels = Vec::with_capacity(cfg.lambdas.len());
    for &lambda in &cfg.lambdas {
        let start = cfg
            .reference_lambda
            .map_or(0.0, |r| 0.5 * (lambda / r).ln());
        let var = Var::from_tensor(&Tensor::full(start as f32, m, device)?)?;
        let adam = Adam::new(vec![("log_gain".into(), var.clone())], cfg.lr)?;
        levels.push((lambda, var, adam));
    }
    let mut rng = SplitMix64::new(cfg.seed);
    for step in 0..cfg.steps {
        let x = sampler.next_batch(cfg.batch, device)?;
        let enc = encode_batch(frozen.as_ref(), &x)?;
        let mut stats = Vec::with_capacity(levels.len());
        for (lambda, var, adam) in &mut levels {
            let out = level_forward(synth.as_ref(), &enc, var, &x, &mut rng)?;
            let loss = rd_loss(&out, *lambda)?;
            adam.step(&loss.backward()?, None)?;
            stats.push(LevelStep {
                loss: f64::from(loss.to_scalar::<f32>()?),
                bpp: f64::from(out.bpp.to_scalar::<f32>()?),
                psnr: -10.0 * f64::from(out.mse.to_scalar::<f32>()?).max(1e-10).log10(),
                mean_log_gain: f64::from(var.as_tensor().mean_all()?.to_scalar::<f32>()?),
            });
        }
        progress(step, &stats);
    }
    let (lo, hi) = (MIN_GAIN.ln(), MAX_GAIN.ln());
    let mut gains = Vec::with_capacity(levels.len());
    let mut info = Vec::with_capacity(levels.len());
    for (lambda, var, _) in &levels {
        let log_g = var.as_tensor().to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        gains.push(
            log_g
                .into_iter()
                .map(|v| v.clamp(lo, hi).exp().clamp(MIN_GAIN, MAX_GAIN))
                .collect(),
        );
        info.push(Some(LevelInfo {
            lambda: *lambda,
            kodak_bpp: None,
            kodak_psnr: None,
        }));
    }
    RateLevels::new(gains, info)
}
