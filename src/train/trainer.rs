//! The trainer: stage 0 (rate-distortion pretraining), stage 1 (joint shielding) and stage 2
//! (privacy emphasis, synthesis side only), with checkpoints that resume bit-identically on the
//! same device and thread count.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use image::RgbImage;

use super::adam::Adam;
use super::msssim::Distortion;
use super::uaeo::{cosine_matrix, uaeo_terms, UaeoConfig};
use super::weighting::AdaptiveWeighting;
use super::{rd_loss, RdForward};
use crate::backbone::LicBackbone;
use crate::init::SplitMix64;
use crate::model::{Architecture, ModelFile};
use crate::rate::{RateLevels, GAINS_TENSOR};
use crate::shield::{
    AnchoredGenerator, Cltg, CltgConfig, Condition, Conditions, Modulation, TriggerGenerator,
};
use crate::targets::SemanticTarget;
pub use crate::targets::{load_target, TargetKind};
use crate::{Error, Result};

/// Settings of a training run; read from TOML by the CLI's `train` (see `docs/TRAINING.md`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// What is trained ([`Stage`]; written `0`, `1`, `2` or by name).
    #[serde(default)]
    pub stage: Stage,
    /// Architecture name of a fresh stage-0 run (`bmshj2018-hyperprior`).
    #[serde(default = "default_architecture")]
    pub architecture: String,
    /// Channels `n` of a fresh stage-0 run.
    #[serde(default)]
    pub n: usize,
    /// Channels `m` of `y` of a fresh stage-0 run.
    #[serde(default)]
    pub m: usize,
    /// Model file to start from (required for stages 1 and 2; a plain model gets a fresh,
    /// seeded trigger generator).
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// Image folder; its evaluation part (see [`crate::data`]) is never used for training.
    pub data: PathBuf,
    /// More image folders to train on (their training parts, by the same split rule); images
    /// smaller than the crop are skipped. Validation uses `data` only.
    #[serde(default)]
    pub extra_data: Vec<PathBuf>,
    /// Percentage of the folder held out for evaluation.
    #[serde(default = "default_eval_percent")]
    pub eval_percent: u32,
    /// Square crop size.
    pub crop: u32,
    /// Batch size.
    pub batch: usize,
    /// Total steps.
    pub steps: u64,
    /// Learning rate of the main parameters.
    pub lr: f64,
    /// Steps at which the learning rate is multiplied by `lr_gamma`.
    #[serde(default)]
    pub lr_milestones: Vec<u64>,
    /// Factor applied at each milestone.
    #[serde(default = "default_lr_gamma")]
    pub lr_gamma: f64,
    /// Linear warm-up: the learning rate grows from `lr / warmup_steps` to `lr` over the first
    /// `warmup_steps` steps (0, the default: none). A fresh Adam's first steps move every
    /// weight by about the learning rate at once, which knocks a trained shield off (a
    /// fine-tune from a trained model measured 14 dB shielded decodes at its second step).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Learning rate of the entropy bottleneck's quantiles (auxiliary loss; stages 0 and 1).
    #[serde(default = "default_aux_lr")]
    pub aux_lr: f64,
    /// Stage 0: rate-distortion trade-off λ in `bpp + λ·D`, `D` the [`Distortion`] term.
    #[serde(default)]
    pub lambda: f64,
    /// The distortion term of every stage: `mse` (`255²·MSE`, the default) or `ms-ssim`
    /// (`1 − MS-SSIM`, which needs crops over 160 pixels). Stages 1–2 apply it to both decodes.
    #[serde(default)]
    pub distortion: Distortion,
    /// Global gradient-norm clip.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Seed of initialisation, sampling and noise.
    #[serde(default)]
    pub seed: u64,
    /// Write the checkpoint every this many steps (and at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Validate every this many steps (0: never).
    #[serde(default)]
    pub validate_every: u64,
    /// Images of the evaluation part used for validation (the first ones by name).
    #[serde(default = "default_validate_images")]
    pub validate_images: usize,
    /// Device (`auto`, `cpu`, `cuda` or `metal`; the CLI's `--device` overrides it).
    #[serde(default)]
    pub device: Option<crate::DeviceKind>,
    /// Precision of the CPU matrix products while training: the backbone's convolutions, the
    /// trigger generator's and the target's own ([`SemanticTarget::set_precision`]); `f32` or
    /// `bf16` (unset: [`Precision::auto`](crate::Precision::auto), i.e. `PSIC_PRECISION` or
    /// f32, for the backbone alone). bf16 runs as f32 on CPUs without AVX512-BF16; where it has
    /// them, a step of `configs/v20-stage1.toml` took about 0.77x the f32 time
    /// (docs/PERFORMANCE.md). Weights stay f32 either way.
    #[serde(default)]
    pub precision: Option<crate::Precision>,
    /// Shielding settings (stages 1 and 2).
    #[serde(default)]
    pub shield: Option<ShieldConfig>,
}

/// The training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "StageRepr", into = "u8")]
pub enum Stage {
    /// 0: rate-distortion pretraining of a plain backbone.
    #[default]
    Pretrain,
    /// 1: joint training of the backbone and the trigger generator (both decodes + UAEO).
    Joint,
    /// 2: privacy emphasis, synthesis side only.
    Privacy,
}

impl Stage {
    const ALL: [Stage; 3] = [Stage::Pretrain, Stage::Joint, Stage::Privacy];

    /// The stage's number (0, 1 or 2).
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The stage's name (`pretrain`, `joint`, `privacy`).
    pub fn name(self) -> &'static str {
        ["pretrain", "joint", "privacy"][self as usize]
    }

    /// Whether the stage shields (trains a trigger generator against a target).
    pub fn shields(self) -> bool {
        self != Stage::Pretrain
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.number(), self.name())
    }
}

/// How a stage is written in a configuration: its number or its name.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StageRepr {
    Number(i64),
    Name(String),
}

impl TryFrom<StageRepr> for Stage {
    type Error = String;

    fn try_from(r: StageRepr) -> std::result::Result<Self, String> {
        Stage::ALL
            .into_iter()
            .find(|s| match &r {
                StageRepr::Number(n) => i64::from(s.number()) == *n,
                StageRepr::Name(n) => s.name() == n,
            })
            .ok_or_else(|| match r {
                StageRepr::Number(n) => format!("stage must be 0, 1 or 2, got {n}"),
                StageRepr::Name(n) => {
                    format!("stage must be pretrain, joint or privacy (or 0-2), got {n:?}")
                }
            })
    }
}

impl From<Stage> for u8 {
    fn from(s: Stage) -> u8 {
        s.number()
    }
}

/// Shielding settings of stages 1 and 2.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShieldConfig {
    /// Target model kind ([`TargetKind`]: `efficientnet-lite`, `clip`, or the name of your own
    /// target passed to [`Trainer::with_target`]).
    pub target: TargetKind,
    /// The target's weights.
    pub weights: PathBuf,
    /// `l0`: distortion weight of the full decode (`½·l0·D_full`; `D = 255²·MSE` by default).
    pub lambda_full: f64,
    /// `l1`: distortion weight of the shielded decode.
    pub lambda_shielded: f64,
    /// `l_clip`: weight of the shielding loss.
    pub lambda_shield: f64,
    /// Weight of the semantic-fidelity term of the full decode (0, the default, leaves it out):
    /// `KL(p_target(original) ‖ p_target(full decode))` over the target's classes (or the
    /// batch's captions), so the full decode keeps what the target reads in the original. Not
    /// in the reference, which constrains the full decode by MSE alone.
    #[serde(default)]
    pub lambda_keep: f64,
    /// Stage 1 only: freeze the analysis side and the entropy models, as stage 2 does, but keep
    /// stage 1's fixed clean/noisy weights. The bitstream (and so the rate) of the initial
    /// backbone is kept exactly; only the synthesis transform and the CLTG learn.
    #[serde(default)]
    pub freeze_analysis: bool,
    /// With `freeze_analysis` (or in stage 2): freeze the synthesis transform too, so that only
    /// the generic trigger generator (`cltg.*`) learns. The full decode then stays exactly the
    /// initial backbone's: the shield is an add-on to a backbone trained for rate-distortion
    /// alone, which can be retrained and given the same generator again
    /// ([`ModelFile::with_generator_from`]).
    #[serde(default)]
    pub freeze_synthesis: bool,
    /// Stage 1 weight of the clean term (reference: 10).
    #[serde(default = "default_clean_weight")]
    pub clean_weight: f64,
    /// Stage 1 weight of the noisy term (reference: 0.5).
    #[serde(default = "default_noisy_weight")]
    pub noisy_weight: f64,
    /// Stage 2 smoothing of the adaptive weights (0: per batch, as the reference).
    #[serde(default)]
    pub adaptive_momentum: f64,
    /// Evidence settings.
    #[serde(default)]
    pub uaeo: UaeoConfig,
    /// Random rescaling of the shielded decode before the target, so the shield survives the
    /// resizing and smoothing a target's preprocessing (or an attacker) applies.
    #[serde(default)]
    pub augment: Option<AugmentConfig>,
    /// Weight of the periodic-artefact penalty (0, the default, leaves it out):
    /// `P₁₆(d) / (mean(d²) + 10⁻⁵)` with `d = x_shielded − x_full`, the share of the shield's
    /// change to the image that lies on the harmonics of the 16-pixel synthesis period
    /// ([`super::purify::periodic_energy`]), so the shield cannot hide in a regular grid that
    /// people see. A share rather than an energy, so it cannot be paid by shrinking the shield.
    #[serde(default)]
    pub lambda_periodic: f64,
    /// Weight of the intermediate-feature term (0, the default, leaves it out): the mean cosine
    /// similarity between the target's intermediate feature maps of the shielded decode and of
    /// the original ([`crate::targets::SemanticTarget::embed_with_features`]), pushed down so
    /// the shield disturbs the features that other models share, not only the target's head.
    #[serde(default)]
    pub lambda_feature: f64,
    /// Weight of the PSNR-gap budget (0, the default, leaves it out): a hinge
    /// `½·255²·lambda_gap·max(0, MSE_shielded − MSE_full·10^(max_psnr_gap/10))` on each batch,
    /// with the full decode's MSE held fixed, so the shielded decode pays extra only for the
    /// part of its distortion that lies more than `max_psnr_gap` dB under the full decode. The
    /// shield then takes what the budget allows instead of trading against a fixed weight.
    #[serde(default)]
    pub lambda_gap: f64,
    /// The budget of [`ShieldConfig::lambda_gap`], in dB of PSNR (default 1.5).
    #[serde(default = "default_max_psnr_gap")]
    pub max_psnr_gap: f64,
    /// Hold the budget of [`ShieldConfig::lambda_gap`] on each crop, not on the batch's mean
    /// MSEs (false, the default, as runs before it): the hinge is then the mean over the crops
    /// of each crop's excess, so no crop — no quality level with `train_levels`, no hard photo
    /// — may lie further under its full decode because others lie closer.
    #[serde(default)]
    pub gap_per_crop: bool,
    /// Probability that a batch's crops are enlarged before they are coded (0, the default:
    /// never; runs without it draw nothing for it, so they resume exactly). The side is drawn
    /// uniformly among the multiples of 64 pixels above `crop` up to `max_upscale`·`crop`, the
    /// original enlarged to it (bicubic) and every term computed at that size; the target reads
    /// the decodes through its own preprocessing, which then *downsizes* them, as it downsizes a
    /// full-size photo (Kodak: about 2x). Photos published larger than the classifier's input
    /// are the common case, and the shield must survive that downsizing.
    #[serde(default)]
    pub upscale_probability: f64,
    /// The largest enlargement of [`ShieldConfig::upscale_probability`] (default 2).
    #[serde(default = "default_max_upscale")]
    pub max_upscale: f64,
    /// Keep an enlarged batch's pixel count about that of the `batch` crops it came from (false,
    /// the default, as runs before it): enlarged to side `s`, only the first
    /// max(1, round(`batch`·`crop`²/`s`²)) crops are kept, so a step costs about the same at any
    /// enlargement and `max_upscale` 3 stays affordable on a CPU (batches of 4 crops of 256
    /// pixels: 3 crops at 320, 2 at 384, one from 448 up to 768).
    #[serde(default)]
    pub upscale_same_pixels: bool,
    /// What the generator's triggers are ([`Modulation`]: `bias`, PSIC's; `scale`, per-channel
    /// gains; `affine`, both). Absent: the `init` model's generator as it is (a new one is
    /// `bias`). `affine` on a `bias` generator adds zero-initialised gains, so training starts
    /// where the model was; any other change needs `fresh_generator`.
    #[serde(default)]
    pub modulation: Option<Modulation>,
    /// With the analysis frozen (stage 2, or `freeze_analysis`): train the synthesis on the
    /// rounded latents it decodes (`y_hat`, as [`crate::Codec`] makes them) instead of the
    /// noisy proxy `y + U(−½, ½)` (false, the default). The rate is not trained then, so
    /// nothing needs the proxy, and a shield fitted to noisy latents need not hold on rounded
    /// ones (a run measured 18–21% shielded top-1 on its batches against 48% at validation).
    #[serde(default)]
    pub rounded_latents: bool,
    /// With `rounded_latents` and an `init` model that has quality levels ([`crate::rate`]):
    /// each crop of a batch is quantised at a level drawn uniformly, so the synthesis and the
    /// shield learn every level (false, the default: every crop at the model's default level,
    /// the one a codec writes). Validation always runs at the default level.
    #[serde(default)]
    pub train_levels: bool,
    /// Replace the `init` model's generator by a fresh, seeded one (of `modulation`).
    #[serde(default)]
    pub fresh_generator: bool,
    /// Factor on the learning rate of the generic generator's weights (`cltg.*`; default 1):
    /// fresh or zero-initialised gains learn faster than the transform they modulate should.
    #[serde(default = "default_one")]
    pub generator_lr_scale: f64,
}

/// Random down-scaling of the shielded decodes the target sees during training (the target's
/// own preprocessing then resizes them back to its input size): a low-pass the shield must
/// survive. Drawn from the run's seeded generator, so resume stays exact.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Chance that a batch is rescaled.
    pub probability: f64,
    /// Smallest scale factor (the factor is uniform in `[min_scale, 1]`).
    pub min_scale: f64,
    /// Chance that a batch's shielded decodes are also Gaussian-blurred (after any rescaling),
    /// a purification an attacker would try (0, the default: never; no random numbers are
    /// drawn then, so older runs resume exactly).
    #[serde(default)]
    pub blur_probability: f64,
    /// Largest blur standard deviation in pixels; each blurred batch draws it uniformly from
    /// `[0.5, max_blur_sigma]`.
    #[serde(default = "default_max_blur_sigma")]
    pub max_blur_sigma: f64,
    /// Chance that a batch's shielded decodes get Gaussian noise first (0, the default: never).
    #[serde(default)]
    pub noise_probability: f64,
    /// Largest noise standard deviation, in 1/255 steps; drawn uniformly from `[0, max]`.
    #[serde(default = "default_max_noise")]
    pub max_noise: f64,
    /// Chance that a batch's shielded decodes go through the differentiable JPEG stand-in
    /// ([`super::purify::jpeg`]) after any noise (0, the default: never).
    #[serde(default)]
    pub jpeg_probability: f64,
    /// Lowest JPEG quality; each JPEG'd batch draws it uniformly from `[min_jpeg_quality, 95]`.
    #[serde(default = "default_min_jpeg_quality")]
    pub min_jpeg_quality: u8,
}

fn default_max_noise() -> f64 {
    5.0
}

fn default_min_jpeg_quality() -> u8 {
    50
}

fn default_max_blur_sigma() -> f64 {
    1.5
}

fn default_architecture() -> String {
    "bmshj2018-hyperprior".into()
}
fn default_eval_percent() -> u32 {
    20
}
fn default_aux_lr() -> f64 {
    1e-3
}
fn default_clip() -> f64 {
    1.0
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_lr_gamma() -> f64 {
    0.1
}
fn default_validate_images() -> usize {
    8
}
fn default_clean_weight() -> f64 {
    10.0
}
fn default_one() -> f64 {
    1.0
}
fn default_max_psnr_gap() -> f64 {
    1.5
}
fn default_max_upscale() -> f64 {
    2.0
}
fn default_noisy_weight() -> f64 {
    0.5
}

impl TrainConfig {
    /// Whether the analysis side (and the entropy models) stay frozen: stage 2, or stage 1
    /// with `freeze_analysis`.
    pub fn frozen_analysis(&self) -> bool {
        self.stage == Stage::Privacy
            || (self.stage == Stage::Joint
                && self.shield.as_ref().is_some_and(|s| s.freeze_analysis))
    }

    /// Learning rate at (1-based) step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let passed = self.lr_milestones.iter().filter(|&&m| step > m).count();
        let warm = if step < self.warmup_steps {
            step.max(1) as f64 / self.warmup_steps as f64
        } else {
            1.0
        };
        self.lr * self.lr_gamma.powi(passed as i32) * warm
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.batch == 0 || self.crop == 0 || self.steps == 0 {
            return bad("batch, crop and steps must be positive".into());
        }
        if self.crop % 64 != 0 {
            return bad(format!("crop must be a multiple of 64, got {}", self.crop));
        }
        if self.stage.shields() && (self.shield.is_none() || self.init.is_none()) {
            return bad(format!(
                "stage {} needs `init` (a model file) and a [shield] section",
                self.stage
            ));
        }
        if (self.crop as usize) < self.distortion.min_side() {
            return bad(format!(
                "the {} distortion needs crops of at least {} pixels, got {}",
                self.distortion.name(),
                self.distortion.min_side(),
                self.crop
            ));
        }
        let mut weights = vec![("lambda", self.lambda)];
        if let Some(s) = &self.shield {
            weights.extend([
                ("lambda_full", s.lambda_full),
                ("lambda_shielded", s.lambda_shielded),
                ("lambda_shield", s.lambda_shield),
                ("lambda_keep", s.lambda_keep),
                ("clean_weight", s.clean_weight),
                ("noisy_weight", s.noisy_weight),
                ("lambda_periodic", s.lambda_periodic),
                ("lambda_feature", s.lambda_feature),
                ("lambda_gap", s.lambda_gap),
                ("max_psnr_gap", s.max_psnr_gap),
            ]);
        }
        let generator_lr_scale = self.shield.as_ref().map_or(1.0, |s| s.generator_lr_scale);
        for (name, v) in [
            ("lr", self.lr),
            ("clip", self.clip),
            ("generator_lr_scale", generator_lr_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a positive number, got {v}"));
            }
        }
        if let Some((name, v)) = weights.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            return bad(format!("{name} must be a non-negative number, got {v}"));
        }
        if let Some(a) = self.shield.as_ref().and_then(|s| s.augment) {
            for (name, v) in [
                ("probability", a.probability),
                ("blur_probability", a.blur_probability),
                ("noise_probability", a.noise_probability),
                ("jpeg_probability", a.jpeg_probability),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    return bad(format!("[shield.augment] {name} must be in 0..=1, got {v}"));
                }
            }
            if !(a.min_scale > 0.0 && a.min_scale <= 1.0) {
                return bad(format!(
                    "[shield.augment] min_scale must be in (0, 1], got {}",
                    a.min_scale
                ));
            }
            if !(a.max_noise.is_finite() && (0.0..=64.0).contains(&a.max_noise)) {
                return bad(format!(
                    "[shield.augment] max_noise must be in 0..=64 (1/255 steps), got {}",
                    a.max_noise
                ));
            }
            if !(1..=95).contains(&a.min_jpeg_quality) {
                return bad(format!(
                    "[shield.augment] min_jpeg_quality must be in 1..=95, got {}",
                    a.min_jpeg_quality
                ));
            }
            if a.jpeg_probability > 0.0 && self.crop % 16 != 0 {
                return bad(format!(
                    "[shield.augment] the JPEG stand-in needs a crop that is a multiple of 16, got {}",
                    self.crop
                ));
            }
            if !(a.max_blur_sigma.is_finite() && a.max_blur_sigma >= 0.5) {
                return bad(format!(
                    "[shield.augment] max_blur_sigma must be at least 0.5, got {}",
                    a.max_blur_sigma
                ));
            }
        }
        if let Some(s) = self.shield.as_ref().filter(|s| s.train_levels) {
            if !(s.rounded_latents && self.frozen_analysis()) {
                return bad(
                    "[shield] train_levels needs rounded_latents and a frozen analysis \
                     (stage 2 or freeze_analysis)"
                        .into(),
                );
            }
        }
        if self.shield.as_ref().is_some_and(|s| s.freeze_synthesis) && !self.frozen_analysis() {
            return bad(
                "[shield] freeze_synthesis needs a frozen analysis (stage 2 or freeze_analysis): \
                 a trained analysis would change the latent the frozen synthesis decodes"
                    .into(),
            );
        }
        if let Some(s) = self
            .shield
            .as_ref()
            .filter(|s| s.upscale_probability != 0.0)
        {
            if !(s.upscale_probability > 0.0 && s.upscale_probability <= 1.0) {
                return bad(format!(
                    "[shield] upscale_probability must be in [0, 1], got {}",
                    s.upscale_probability
                ));
            }
            if upscale_sides(self.crop, s.max_upscale).is_empty() {
                return bad(format!(
                    "[shield] max_upscale {} leaves no multiple of 64 pixels above the {}-pixel \
                     crop",
                    s.max_upscale, self.crop
                ));
            }
        }
        if self
            .shield
            .as_ref()
            .is_some_and(|s| s.gap_per_crop && s.lambda_gap <= 0.0)
        {
            return bad("[shield] gap_per_crop needs a gap budget (lambda_gap > 0)".into());
        }
        if self.stage == Stage::Pretrain && self.init.is_none() && (self.n == 0 || self.m == 0) {
            return bad("a fresh stage-0 run needs n and m".into());
        }
        Ok(())
    }
}

/// Figures of one training step (shielding fields only in stages 1 and 2).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepStats {
    /// Step number (1-based).
    pub step: u64,
    /// Total loss.
    pub loss: f32,
    /// Estimated bits per pixel.
    pub bpp: f32,
    /// PSNR of the (full) noisy-quantisation reconstruction, dB.
    pub psnr: f32,
    /// Auxiliary (quantile) loss.
    pub aux: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// PSNR of the shielded reconstruction, dB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psnr_shielded: Option<f32>,
    /// UAEO clean term.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean: Option<f32>,
    /// UAEO noisy term.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noisy: Option<f32>,
    /// Semantic-fidelity term of the full decode (when `lambda_keep > 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<f32>,
    /// Periodic share of the shield's change to the image (when `lambda_periodic > 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub periodic: Option<f32>,
    /// Mean cosine similarity of the target's intermediate features, shielded against original
    /// (when `lambda_feature > 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<f32>,
    /// Samples in the clean part of the split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean_count: Option<usize>,
    /// Share of the batch the target classifies as its label (or its own original prediction)
    /// on the shielded decodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shielded_top1: Option<f32>,
    /// Stage-2 adaptive weights of the clean and noisy terms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<[f64; 2]>,
}

/// Validation figures on the fixed evaluation images (real rounding, no noise).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ValStats {
    /// Step at which they were measured.
    pub step: u64,
    /// Images used.
    pub images: usize,
    /// Estimated bits per pixel (likelihoods of the rounded latents).
    pub bpp: f32,
    /// Mean PSNR of the full decodes, dB.
    pub psnr_full: f32,
    /// Mean PSNR of the shielded decodes, dB (shielded models only).
    pub psnr_shielded: Option<f32>,
    /// Target top-1 on the originals, full and shielded decodes (stages 1-2). With unlabelled
    /// data, the labels are the target's own top-1 on the originals (so `top1_original` is 1).
    pub top1_original: Option<f32>,
    /// See `top1_original`.
    pub top1_full: Option<f32>,
    /// See `top1_original`.
    pub top1_shielded: Option<f32>,
}

/// The trainer of all three stages.
pub struct Trainer {
    /// The settings.
    pub cfg: TrainConfig,
    varmap: VarMap,
    backbone: Box<dyn LicBackbone>,
    generator: Option<Box<dyn TriggerGenerator>>,
    conditions: Conditions,
    /// The `init` model's quality levels, kept when the analysis side is frozen (the gains
    /// act on its latent, which then does not change) and written into every export.
    rate_levels: Option<RateLevels>,
    target: Option<Box<dyn SemanticTarget>>,
    architecture: Architecture,
    main: Adam,
    aux: Adam,
    weighting: AdaptiveWeighting,
    sampler: crate::data::CropSampler,
    noise: SplitMix64,
    validation: Option<(Tensor, Vec<Option<usize>>)>,
    device: Device,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("cfg", &self.cfg)
            .field("step", &self.main.steps())
            .finish()
    }
}

/// Names of variables that are buffers, not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("scale_table") || crate::model::INT_BUFFERS.iter().any(|b| name.ends_with(b))
}

/// Whether a tensor of an initial model becomes a variable of training: its float weights, not
/// its coding buffers (rebuilt) nor its quality levels (`rate.*`: fitted for the weights they
/// came with, so training drops them; fit them again with `psic rates`).
pub(crate) fn is_trained_weight(name: &str, t: &Tensor) -> bool {
    !is_buffer(name) && t.dtype().is_float() && !name.starts_with(crate::rate::TENSOR_PREFIX)
}

/// Whether a variable belongs to the decoder's synthesis side (trained in stage 2): the
/// backbone's [`synthesis_prefixes`](LicBackbone::synthesis_prefixes) or the generic generator.
fn is_synthesis_side(name: &str, synthesis_prefixes: &[String]) -> bool {
    synthesis_prefixes
        .iter()
        .any(|p| name.starts_with(p.as_str()))
        || name.starts_with(&format!("{}.", crate::shield::CltgNames::GENERIC_PREFIX))
}

/// The `init` model with the generator `[shield]` asks for: a fresh one where it has none (or
/// `fresh_generator`), extended where `modulation` asks for more than the generator has (zero
/// gains or adaptive weights, see [`ModelFile::with_cltg_modulation`]).
fn prepare_generator(model: ModelFile, shield: &ShieldConfig, seed: u64) -> Result<ModelFile> {
    let cpu = Device::Cpu;
    let wanted = shield.modulation;
    if shield.fresh_generator || model.build_generator(&cpu)?.is_none() {
        return model.with_new_cltg_modulated(seed, wanted.unwrap_or_default(), &cpu);
    }
    let Some(wanted) = wanted else {
        return Ok(model);
    };
    let have = CltgConfig::infer_generic(&model.tensors)?
        .map(|c| c.modulation)
        .unwrap_or_default();
    if have == wanted {
        return Ok(model);
    }
    // Extensions (bias -> affine -> adaptive) add zero weights and keep the start exact.
    model.with_cltg_modulation(wanted, seed, &cpu).map_err(|_| {
        Error::InvalidArgument(format!(
            "the init model's generator has {have:?} triggers, [shield] asks for {wanted:?}: \
             set fresh_generator = true to start a new generator"
        ))
    })
}

impl Trainer {
    /// A fresh run: seeded initialisation (stage 0) or the `init` model file. The target of
    /// stages 1 and 2 is loaded as `[shield]` says.
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Self> {
        Self::with_target(cfg, device, None)
    }

    /// A fresh run against your own target model (any [`SemanticTarget`]; `[shield] target`
    /// and `weights` are then only recorded). `None` loads the target the config names.
    pub fn with_target(
        cfg: TrainConfig,
        device: &Device,
        target: Option<Box<dyn SemanticTarget>>,
    ) -> Result<Self> {
        cfg.check()?;
        match &cfg.init {
            None => {
                let architecture = Architecture::from_name_and_config(
                    &cfg.architecture,
                    &serde_json::json!({"n": cfg.n, "m": cfg.m}).to_string(),
                )?;
                Self::build(cfg, architecture, None, target, device)
            }
            Some(path) => {
                // Prepared on the CPU (its integer coding tables cannot be cast on CUDA); the
                // weights move to `device` in `build`.
                let cpu = Device::Cpu;
                let mut model = ModelFile::load(path, &cpu)?;
                if let Some(shield) = cfg.shield.as_ref().filter(|_| cfg.stage.shields()) {
                    model = prepare_generator(model, shield, cfg.seed ^ 0xc17)?;
                }
                let conditions = model.conditions()?;
                // A trained analysis moves the latent the gains were fitted to: levels are only
                // carried over when it is frozen (refit them with `psic rates` otherwise).
                let frozen = cfg.frozen_analysis();
                let rate_levels = model.rate_levels()?.filter(|_| frozen);
                if cfg.shield.as_ref().is_some_and(|s| s.train_levels) && rate_levels.is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "[shield] train_levels: {} has no quality levels (fit them with \
                         `psic rates`)",
                        path.display()
                    )));
                }
                let mut t = Self::build(
                    cfg,
                    model.architecture.clone(),
                    Some(model.tensors),
                    target,
                    device,
                )?;
                t.rate_levels = rate_levels;
                if let Some(c) = conditions {
                    // Training optimises the trained shield itself (strength 1), whatever
                    // strength the initial model decodes at by default.
                    t.conditions = Conditions { strength: 1.0, ..c };
                }
                Ok(t)
            }
        }
    }

    fn build(
        cfg: TrainConfig,
        architecture: Architecture,
        tensors: Option<HashMap<String, Tensor>>,
        target: Option<Box<dyn SemanticTarget>>,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = match &tensors {
            None => crate::init::seeded_var_builder(&varmap, cfg.seed, DType::F32, device),
            Some(tensors) => {
                let mut data = varmap.data().lock().expect("VarMap lock");
                for (name, t) in tensors {
                    if is_trained_weight(name, t) {
                        let t = t.to_dtype(DType::F32)?.to_device(device)?;
                        data.insert(name.clone(), Var::from_tensor(&t)?);
                    }
                }
                drop(data);
                VarBuilder::from_varmap(&varmap, DType::F32, device)
            }
        };
        let mut backbone = architecture.build(vb.clone())?;
        if let Some(p) = cfg.precision {
            backbone.set_transform_precision(p)?;
        }
        let generator_only = cfg.shield.as_ref().is_some_and(|s| s.freeze_synthesis);
        if generator_only {
            backbone.freeze_synthesis_kernels();
        }
        let conditions = Conditions::default();
        let mut generator: Option<Box<dyn TriggerGenerator>> = match (&architecture, &tensors) {
            (Architecture::PsicHy2018(c), _) if cfg.stage.shields() => Some(Box::new(
                crate::backbone::PsicHy2018::load_cltg(vb.clone(), c)?,
            )),
            (_, Some(t)) if cfg.stage.shields() => {
                let gen_cfg = CltgConfig::infer_generic(t)?.ok_or_else(|| {
                    Error::Model("the initial model has no cltg.* generator".into())
                })?;
                Some(Box::new(AnchoredGenerator::new(
                    Cltg::new(vb.clone(), &gen_cfg)?,
                    conditions.full,
                )))
            }
            _ => None,
        };
        if let (Some(g), Some(p)) = (&mut generator, cfg.precision) {
            g.set_precision(p)?;
        }
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let frozen_analysis = cfg.frozen_analysis();
        let (aux_vars, main_vars): (Vec<_>, Vec<_>) = if generator_only {
            let prefix = format!("{}.", crate::shield::CltgNames::GENERIC_PREFIX);
            let vars: Vec<_> = named
                .into_iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .collect();
            if vars.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "[shield] freeze_synthesis trains the generic generator ({prefix}*) alone, \
                     and {} has none",
                    architecture.name()
                )));
            }
            (vec![], vars)
        } else if frozen_analysis {
            (
                vec![],
                named
                    .into_iter()
                    .filter(|(k, _)| is_synthesis_side(k, &backbone.synthesis_prefixes()))
                    .collect(),
            )
        } else {
            named
                .into_iter()
                .partition(|(k, _)| k.ends_with("quantiles"))
        };
        let mut target = match (&cfg.shield, target) {
            (_, Some(t)) if cfg.stage.shields() => Some(t),
            (Some(s), None) if cfg.stage.shields() => {
                Some(load_target(&s.target, &s.weights, device)?)
            }
            _ => None,
        };
        if let (Some(t), Some(p)) = (&mut target, cfg.precision) {
            t.set_precision(p)?;
        }
        let folder = crate::data::ImageFolder::open(&cfg.data)?;
        let sampler = training_sampler(&cfg, &folder)?;
        let validation = if cfg.validate_every > 0 {
            let eval: Vec<PathBuf> = folder
                .part(crate::data::Split::Eval, cfg.eval_percent)
                .into_iter()
                .take(cfg.validate_images)
                .collect();
            if eval.is_empty() {
                None
            } else {
                let labels = eval.iter().map(|f| folder.label(f)).collect();
                Some((center_crops(&eval, cfg.crop, device)?, labels))
            }
        } else {
            None
        };
        let momentum = cfg.shield.as_ref().map_or(0.0, |s| s.adaptive_momentum);
        Ok(Self {
            main: {
                let mut adam = Adam::new(main_vars, cfg.lr)?;
                if let Some(s) = &cfg.shield {
                    let prefix = format!("{}.", crate::shield::CltgNames::GENERIC_PREFIX);
                    adam.scale_lr(|name| name.starts_with(&prefix), s.generator_lr_scale);
                }
                adam
            },
            aux: Adam::new(aux_vars, cfg.aux_lr)?,
            weighting: AdaptiveWeighting::new(2, 1e-6, momentum)?,
            noise: SplitMix64::new(cfg.seed ^ 0x401e),
            cfg,
            varmap,
            backbone,
            generator,
            conditions,
            rate_levels: None,
            target,
            architecture,
            sampler,
            validation,
            device: device.clone(),
        })
    }

    /// Steps done so far.
    pub fn step_count(&self) -> u64 {
        self.main.steps()
    }

    /// The device the run is on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The run's configuration (a resumed run's as its checkpoint stored it, with the paths
    /// the resume moved).
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// One step of the configured stage.
    pub fn step(&mut self) -> Result<StepStats> {
        let lr = self.cfg.lr_at(self.main.steps() + 1);
        self.main.lr = lr;
        let mut stats = if self.cfg.stage == Stage::Pretrain {
            self.rd_step()?
        } else {
            self.shield_step()?
        };
        stats.lr = lr;
        Ok(stats)
    }

    fn aux_step(&mut self) -> Result<f32> {
        let aux = self.backbone.entropy_bottleneck().aux_loss()?;
        self.aux.step(&aux.backward()?, None)?;
        Ok(aux.to_scalar::<f32>()?)
    }

    fn rd_step(&mut self) -> Result<StepStats> {
        let x = self.sampler.next_batch(self.cfg.batch, &self.device)?;
        let out = super::rd_forward(self.backbone.as_ref(), &x, None, &mut self.noise)?;
        let loss = match self.cfg.distortion {
            Distortion::Mse => rd_loss(&out, self.cfg.lambda)?,
            d => (&out.bpp + (d.term(&out.x_hat, &x)? * self.cfg.lambda)?)?,
        };
        let grad_norm = self.main.step(&loss.backward()?, Some(self.cfg.clip))?;
        let aux = self.aux_step()?;
        Ok(StepStats {
            step: self.main.steps(),
            loss: loss.to_scalar::<f32>()?,
            bpp: out.bpp.to_scalar::<f32>()?,
            psnr: psnr_of(&out.mse)?,
            aux,
            grad_norm,
            ..Default::default()
        })
    }

    fn shield_step(&mut self) -> Result<StepStats> {
        let shield = self
            .cfg
            .shield
            .clone()
            .expect("checked in TrainConfig::check");
        let crate::data::Batch {
            images: x,
            mut labels,
            mut captions,
        } = self
            .sampler
            .next_annotated_batch(self.cfg.batch, &self.device)?;
        let x = if shield.upscale_probability > 0.0 {
            upscale_batch(&mut self.noise, &x, self.cfg.crop, &shield)?
        } else {
            x
        };
        let b = x.dim(0)?;
        // An enlarged batch may keep only its first crops (`upscale_same_pixels`).
        labels.truncate(b);
        captions.truncate(b);
        let frozen_analysis = self.cfg.frozen_analysis();
        let (y_tilde, bpp) = if frozen_analysis && shield.rounded_latents {
            let levels = self.pick_levels(b, shield.train_levels);
            let gains = self.level_gains(&levels)?;
            super::rounded_latent(self.backbone.as_ref(), &x, gains.as_ref())?
        } else {
            let (y, bpp) = super::noisy_latent(self.backbone.as_ref(), &x, &mut self.noise)?;
            // A frozen analysis side: keep backward out of it.
            (if frozen_analysis { y.detach() } else { y }, bpp)
        };
        // Both decodes in one synthesis pass: the first half full, the second shielded.
        let generator = self
            .generator
            .as_ref()
            .expect("stages 1-2 have a generator");
        let (full, shielded) = (self.conditions.full.beta(), self.conditions.shielded.beta());
        let betas: Vec<f32> = (0..2 * b)
            .map(|i| if i < b { full } else { shielded })
            .collect();
        let betas = Tensor::from_vec(betas, 2 * b, &self.device)?;
        let triggers = generator.triggers_for_betas(&betas)?;
        let x_hat = self
            .backbone
            .synthesis(&Tensor::cat(&[&y_tilde, &y_tilde], 0)?, Some(&triggers))?;
        let (x_full, x_sh) = (x_hat.narrow(0, 0, b)?, x_hat.narrow(0, b, b)?);
        let mse_full = (&x_full - &x)?.sqr()?.mean_all()?;
        let mse_sh = (&x_sh - &x)?.sqr()?.mean_all()?;
        let distortion = match self.cfg.distortion {
            Distortion::Mse => {
                (((&mse_full * shield.lambda_full)? + (&mse_sh * shield.lambda_shielded)?)?
                    * (0.5 * 255.0 * 255.0))?
            }
            d => {
                (((d.term(&x_full, &x)? * shield.lambda_full)?
                    + (d.term(&x_sh, &x)? * shield.lambda_shielded)?)?
                    * 0.5)?
            }
        };

        let target = self.target.as_ref().expect("stages 1-2 have a target");
        let use_features = shield.lambda_feature > 0.0;
        let (e_orig, f_orig) = if use_features {
            target.embed_with_features(&target.preprocess(&x)?)?
        } else {
            (target.embed_images(&target.preprocess(&x)?)?, Vec::new())
        };
        let e_orig = e_orig.detach();
        // Captioned data and a target that reads text (CLIP): the batch's own captions, as the
        // reference does. Otherwise the target's classes.
        let batch_captions: Option<Vec<String>> = captions.into_iter().collect();
        let caption_embeddings = match &batch_captions {
            Some(c) => {
                let refs: Vec<&str> = c.iter().map(String::as_str).collect();
                target.embed_captions(&refs)?.map(|t| t.detach())
            }
            None => None,
        };
        let caption_mode = caption_embeddings.is_some();
        let texts = match caption_embeddings {
            Some(t) => t,
            None => target.class_embeddings()?,
        };
        let scores_orig = (cosine_matrix(&e_orig, &texts)? * shield.uaeo.score_scale)?;
        let own: Vec<usize> = if caption_mode {
            (0..b).collect()
        } else if labels.iter().all(Option::is_some) {
            labels.iter().flatten().copied().collect()
        } else {
            // Unlabelled images: the target's own reading of the original is the "caption".
            let read = crate::targets::top_k(&target.logits_from_embeddings(&e_orig)?, 1)?;
            labels
                .iter()
                .zip(read)
                .map(|(l, r)| l.unwrap_or(r[0]))
                .collect()
        };
        let seen = purify(&mut self.noise, &x_sh, shield.augment)?;
        let (e_sh, f_sh) = if use_features {
            // The target's preprocessing brings every purified decode back to its input size, so
            // the maps line up with the original's.
            target.embed_with_features(&target.preprocess(&seen)?)?
        } else {
            (target.embed_images(&target.preprocess(&seen)?)?, Vec::new())
        };
        let logits_sh = if caption_mode {
            target.caption_logits(&e_sh, &texts)?
        } else {
            target.logits_from_embeddings(&e_sh)?
        };
        let terms = uaeo_terms(
            &scores_orig,
            &e_sh,
            &texts,
            &logits_sh,
            &own,
            caption_mode,
            &shield.uaeo,
        )?;
        let zero = || Tensor::zeros((), DType::F32, &self.device);
        let (shield_loss, weights) = if self.cfg.stage == Stage::Joint {
            let c = match &terms.clean {
                Some(t) => (t * shield.clean_weight)?,
                None => zero()?,
            };
            let n = match &terms.noisy {
                Some(t) => (t * shield.noisy_weight)?,
                None => zero()?,
            };
            ((c + n)?, None)
        } else {
            match self
                .weighting
                .combine(&[terms.clean.as_ref(), terms.noisy.as_ref()])?
            {
                Some((sum, w)) => (sum, Some([w[0], w[1]])),
                None => (zero()?, None),
            }
        };
        let mut loss = (distortion + (shield_loss * shield.lambda_shield)?)?;
        let periodic = if shield.lambda_periodic > 0.0 {
            // A share, not an energy: a penalty on the energy alone is cheapest to pay by
            // shrinking the whole shield (a first run lost it in 50 steps that way).
            let change = (&x_sh - x_full.detach())?;
            let total = (change.sqr()?.mean_all()? + 1e-5)?;
            let p = (super::purify::periodic_energy(&change, 16)? / total)?;
            loss = (loss + (&p * shield.lambda_periodic)?)?;
            Some(p)
        } else {
            None
        };
        if shield.lambda_gap > 0.0 {
            let excess = if shield.gap_per_crop {
                let per_crop = |d: Tensor| d.sqr()?.flatten_from(1)?.mean(1);
                gap_excess(
                    &per_crop((&x_sh - &x)?)?,
                    &per_crop((&x_full - &x)?)?,
                    shield.max_psnr_gap,
                )?
            } else {
                gap_excess(&mse_sh, &mse_full, shield.max_psnr_gap)?
            };
            loss = (loss + (excess * (0.5 * 255.0 * 255.0 * shield.lambda_gap))?)?;
        }
        let feature = if use_features && !f_orig.is_empty() {
            let f = feature_similarity(&f_sh, &f_orig)?;
            loss = (loss + (&f * shield.lambda_feature)?)?;
            Some(f)
        } else {
            None
        };
        let keep = if shield.lambda_keep > 0.0 {
            let e_full = target.embed_images(&target.preprocess(&x_full)?)?;
            let (logits_orig, logits_full) = if caption_mode {
                (
                    target.caption_logits(&e_orig, &texts)?,
                    target.caption_logits(&e_full, &texts)?,
                )
            } else {
                (
                    target.logits_from_embeddings(&e_orig)?,
                    target.logits_from_embeddings(&e_full)?,
                )
            };
            let keep = kl_divergence(&logits_orig.detach(), &logits_full)?;
            loss = (loss + (&keep * shield.lambda_keep)?)?;
            Some(keep)
        } else {
            None
        };
        if !frozen_analysis {
            loss = (loss + &bpp)?;
        }
        let grad_norm = self.main.step(&loss.backward()?, Some(self.cfg.clip))?;
        let aux = if !frozen_analysis {
            self.aux_step()?
        } else {
            0.0
        };
        let predicted = crate::targets::top_k(&logits_sh, 1)?;
        let hits = predicted
            .iter()
            .zip(&own)
            .filter(|(p, &o)| p[0] == o)
            .count();
        let scalar = |t: &Option<Tensor>| -> Result<Option<f32>> {
            t.as_ref().map(|t| Ok(t.to_scalar::<f32>()?)).transpose()
        };
        Ok(StepStats {
            step: self.main.steps(),
            loss: loss.to_scalar::<f32>()?,
            bpp: bpp.to_scalar::<f32>()?,
            psnr: psnr_of(&mse_full)?,
            aux,
            grad_norm,
            lr: 0.0,
            psnr_shielded: Some(psnr_of(&mse_sh)?),
            clean: scalar(&terms.clean)?,
            noisy: scalar(&terms.noisy)?,
            keep: scalar(&keep)?,
            periodic: scalar(&periodic)?,
            feature: scalar(&feature)?,
            clean_count: Some(terms.split.clean.len()),
            shielded_top1: Some(hits as f32 / b as f32),
            weights,
        })
    }

    /// The quality level of each of `b` crops: drawn uniformly from the run's generator when
    /// `sample`, else the default level (all 0 for a model without levels).
    fn pick_levels(&mut self, b: usize, sample: bool) -> Vec<usize> {
        let (n, default) = self
            .rate_levels
            .as_ref()
            .map_or((1, 0), |l| (l.len(), l.default_level()));
        (0..b)
            .map(|_| {
                if sample {
                    (self.noise.next_u64() % n as u64) as usize
                } else {
                    default
                }
            })
            .collect()
    }

    /// The channel gains of crops at `levels` (`[B, M]`); `None` without quality levels (all
    /// gains 1).
    fn level_gains(&self, levels: &[usize]) -> Result<Option<Tensor>> {
        let Some(rate) = &self.rate_levels else {
            return Ok(None);
        };
        let mut flat = Vec::with_capacity(levels.len() * rate.channels());
        for &l in levels {
            let g = rate.gains(l).ok_or(Error::UnknownLevel {
                level: l,
                levels: rate.len(),
            })?;
            flat.extend_from_slice(g);
        }
        let shape = (levels.len(), rate.channels());
        Ok(Some(Tensor::from_vec(flat, shape, &self.device)?))
    }

    /// Validation on the fixed evaluation crops (`None` when validation is off): real rounding
    /// of the latents, both decodes, target top-1 where labels and a target exist. Also returns
    /// a grid (rows: original, full, shielded) of up to four of the images.
    pub fn validate(&self) -> Result<Option<(ValStats, RgbImage)>> {
        let Some((x, labels)) = &self.validation else {
            return Ok(None);
        };
        let b = x.dim(0)?;
        let bb = self.backbone.as_ref();
        let default = self
            .rate_levels
            .as_ref()
            .map_or(0, RateLevels::default_level);
        let gains = self.level_gains(&vec![default; b])?;
        let (y_hat, bpp) = super::rounded_latent(bb, x, gains.as_ref())?;
        let decode = |c: Option<&Condition>| -> Result<Tensor> {
            let t = match (c, &self.generator) {
                (Some(c), Some(g)) => Some(g.triggers(c, b)?),
                _ => None,
            };
            Ok(bb
                .synthesis(&y_hat, t.as_ref())?
                .clamp(0f32, 1f32)?
                .detach())
        };
        let full = decode(Some(&self.conditions.full))?;
        let shielded = match &self.generator {
            Some(_) => Some(decode(Some(&self.conditions.shielded))?),
            None => None,
        };
        let mean_psnr = |r: &Tensor| -> Result<f32> {
            let mse = (r - x)?.sqr()?.mean((1, 2, 3))?.to_vec1::<f32>()?;
            Ok(mse
                .iter()
                .map(|m| -10.0 * m.max(1e-10).log10())
                .sum::<f32>()
                / b as f32)
        };
        let mut stats = ValStats {
            step: self.main.steps(),
            images: b,
            bpp: bpp.to_scalar::<f32>()?,
            psnr_full: mean_psnr(&full)?,
            psnr_shielded: shielded.as_ref().map(mean_psnr).transpose()?,
            ..Default::default()
        };
        if let Some(target) = &self.target {
            // Unlabelled data: agreement with the target's reading of the originals.
            let labels = match labels.iter().copied().collect::<Option<Vec<_>>>() {
                Some(l) => l,
                None => target.classify(x, 1)?.into_iter().map(|p| p[0]).collect(),
            };
            let top1 = |imgs: &Tensor| -> Result<f32> {
                let p = target.classify(imgs, 1)?;
                let hits = p.iter().zip(&labels).filter(|(p, &l)| p[0] == l).count();
                Ok(hits as f32 / b as f32)
            };
            stats.top1_original = Some(top1(x)?);
            stats.top1_full = Some(top1(&full)?);
            stats.top1_shielded = shielded.as_ref().map(top1).transpose()?;
        }
        let shown = b.min(4);
        let mut rows = vec![x.narrow(0, 0, shown)?, full.narrow(0, 0, shown)?];
        if let Some(s) = &shielded {
            rows.push(s.narrow(0, 0, shown)?);
        }
        Ok(Some((stats, grid(&rows)?)))
    }

    /// Writes a resume checkpoint (weights, optimisers, generator states, settings) atomically.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self
            .varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .map(|(k, v)| (format!("model.{k}"), v.as_tensor().clone()))
            .collect();
        tensors.extend(self.main.state("adam.main")?);
        tensors.extend(self.aux.state("adam.aux")?);
        let rng = Tensor::new(
            &[self.sampler.rng_state() as i64, self.noise.state() as i64],
            &self.device,
        )?;
        tensors.push(("rng".into(), rng));
        tensors.push((
            "weighting".into(),
            Tensor::new(self.weighting.state().as_slice(), &self.device)?,
        ));
        if let Some(levels) = &self.rate_levels {
            tensors.push((GAINS_TENSOR.into(), levels.gains_tensor()?));
        }
        let mut meta = HashMap::from([
            ("format".to_string(), "psic-train-checkpoint".to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.cfg).unwrap_or_default(),
            ),
            (
                "architecture".to_string(),
                self.architecture.name().to_string(),
            ),
            (
                "architecture_config".to_string(),
                self.architecture.config_json().to_string(),
            ),
            (
                "conditions".to_string(),
                serde_json::to_string(&self.conditions).unwrap_or_default(),
            ),
        ]);
        if let Some(levels) = &self.rate_levels {
            meta.extend(levels.metadata());
        }
        let bytes = crate::model::serialize_safetensors(
            "checkpoint",
            tensors.iter().map(|(k, t)| (k.as_str(), t)),
            meta,
        )?;
        crate::image_io::write_atomic(path, &bytes)
    }

    /// Resumes a run from a checkpoint: continues exactly where it stopped, bit for bit on the
    /// same device with the same number of CPU threads (the gradient sums are added in an order
    /// fixed by the thread count). `overrides` may change settings that do not alter the run's
    /// state (device, steps, schedule, validation, checkpoint interval).
    pub fn resume(
        path: impl AsRef<Path>,
        device: &Device,
        overrides: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        Self::resume_with_target(path, device, overrides, None)
    }

    /// [`resume`](Self::resume) against your own target (see [`with_target`](Self::with_target)).
    pub fn resume_with_target(
        path: impl AsRef<Path>,
        device: &Device,
        overrides: impl FnOnce(&mut TrainConfig),
        target: Option<Box<dyn SemanticTarget>>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let info = meta.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some("psic-train-checkpoint") {
            return Err(Error::Model(format!(
                "{} is not a psic training checkpoint",
                path.display()
            )));
        }
        let mut cfg: TrainConfig =
            serde_json::from_str(info.get("config").map(String::as_str).unwrap_or(""))
                .map_err(|e| Error::Model(format!("{}: bad config: {e}", path.display())))?;
        overrides(&mut cfg);
        cfg.check()?;
        let architecture = match (info.get("architecture"), info.get("architecture_config")) {
            (Some(name), Some(c)) => Architecture::from_name_and_config(name, c)?,
            _ => Architecture::from_name_and_config(
                &cfg.architecture,
                &serde_json::json!({"n": cfg.n, "m": cfg.m}).to_string(),
            )?,
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        let model: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("model.").map(|n| (n.to_string(), v.clone())))
            .collect();
        let mut t = Self::build(cfg, architecture, Some(model), target, device)?;
        if let Some(c) = info.get("conditions") {
            t.conditions = serde_json::from_str(c)
                .map_err(|e| Error::Model(format!("{}: bad conditions: {e}", path.display())))?;
        }
        t.rate_levels = RateLevels::from_model_parts(tensors.get(GAINS_TENSOR), |k| {
            info.get(k).map(String::as_str)
        })?;
        t.main.load_state(&tensors, "adam.main")?;
        t.aux.load_state(&tensors, "adam.aux")?;
        let rng = tensors
            .get("rng")
            .ok_or_else(|| Error::Model("checkpoint lacks rng".into()))?
            .to_vec1::<i64>()?;
        t.sampler.set_rng_state(rng[0] as u64);
        t.noise = SplitMix64::new(rng[1] as u64);
        if let Some(w) = tensors.get("weighting") {
            t.weighting.set_state(&w.to_vec1::<f64>()?);
        }
        Ok(t)
    }

    /// The trained model as a psic model file (coding tables built from the learned densities).
    pub fn export(&self) -> Result<ModelFile> {
        let meta = std::collections::BTreeMap::from([
            (
                "source".to_string(),
                format!(
                    "psic stage-{} training, {} steps",
                    self.cfg.stage.number(),
                    self.main.steps()
                ),
            ),
            (
                "training".to_string(),
                serde_json::to_string(&self.cfg).unwrap_or_default(),
            ),
        ]);
        let mut model =
            ModelFile::from_varmap(self.architecture.clone(), &self.varmap, meta, &self.device)?;
        if self.generator.is_some() {
            let json = serde_json::to_string(&self.conditions).unwrap_or_default();
            model.extra_metadata.insert("conditions".into(), json);
        }
        model.with_rate_levels(self.rate_levels.as_ref())
    }

    /// The current forward pass of a batch without triggers (tests and diagnostics).
    pub fn rd_forward(&mut self, x: &Tensor) -> Result<RdForward> {
        super::rd_forward(self.backbone.as_ref(), x, None, &mut self.noise)
    }
}

/// Mean over the batch of `KL(softmax(reference) ‖ softmax(logits))`, in nats; the gradient
/// flows through `logits` only when `reference` is detached.
/// The purifications drawn for this batch, applied to the shielded decodes: noise, then
/// the JPEG stand-in (on the decoded size), then the random down-scaling (the target's
/// preprocessing scales back up), then blur. Draws are made in the order the older options
/// came (scale, blur, noise, JPEG), and only for options that are on, so runs without the
/// newer ones resume exactly.
fn purify(rng: &mut SplitMix64, x_sh: &Tensor, augment: Option<AugmentConfig>) -> Result<Tensor> {
    let Some(a) = augment else {
        return Ok(x_sh.clone());
    };
    let scale = (rng.next_f64() < a.probability)
        .then(|| a.min_scale + (1.0 - a.min_scale) * rng.next_f64());
    let blur = (a.blur_probability > 0.0 && rng.next_f64() < a.blur_probability)
        .then(|| 0.5 + (a.max_blur_sigma - 0.5) * rng.next_f64());
    let noise = (a.noise_probability > 0.0 && rng.next_f64() < a.noise_probability)
        .then(|| a.max_noise / 255.0 * rng.next_f64());
    let quality = (a.jpeg_probability > 0.0 && rng.next_f64() < a.jpeg_probability).then(|| {
        let lo = a.min_jpeg_quality as f64;
        (lo + (95.0 - lo + 1.0) * rng.next_f64()).floor().min(95.0) as u8
    });
    let mut seen = x_sh.clone();
    if let Some(sigma) = noise {
        seen = super::purify::add_noise(&seen, sigma, &mut || rng.next_normal())?;
    }
    if let Some(q) = quality {
        seen = super::purify::jpeg(&seen.clamp(0f32, 1f32)?, q)?;
    }
    if let Some(scale) = scale {
        let (_, _, h, w) = seen.dims4()?;
        let short = ((h.min(w) as f64 * scale).round() as usize).max(8);
        seen = crate::targets::preprocess::resize_shorter_side(&seen, short)?;
    }
    if let Some(sigma) = blur {
        seen = super::augment::gaussian_blur(&seen, sigma)?;
    }
    Ok(seen)
}

/// The sides a batch of `crop`-pixel crops may be enlarged to: the multiples of 64 above
/// `crop`, up to `max_upscale`·`crop` (NaN or a factor at most 1 give none).
fn upscale_sides(crop: u32, max_upscale: f64) -> Vec<usize> {
    let top = (crop as f64 * max_upscale).floor();
    (crop as usize / 64 + 1..)
        .map(|k| 64 * k)
        .take_while(|&side| (side as f64) <= top)
        .collect()
}

/// [`ShieldConfig::upscale_probability`]: with that probability the batch enlarged (bicubic,
/// clamped to [0, 1]) to a side drawn from [`upscale_sides`], and with
/// [`ShieldConfig::upscale_same_pixels`] cut to its first [`same_pixel_count`] crops;
/// otherwise as it is.
fn upscale_batch(
    rng: &mut SplitMix64,
    x: &Tensor,
    crop: u32,
    shield: &ShieldConfig,
) -> Result<Tensor> {
    if rng.next_f64() >= shield.upscale_probability {
        return Ok(x.clone());
    }
    let sides = upscale_sides(crop, shield.max_upscale);
    let side = sides[(rng.next_u64() % sides.len() as u64) as usize];
    let x = if shield.upscale_same_pixels {
        x.narrow(0, 0, same_pixel_count(x.dim(0)?, crop, side))?
    } else {
        x.clone()
    };
    let big = crate::targets::preprocess::resize_bicubic(&x, side, side)?;
    Ok(big.clamp(0f32, 1f32)?)
}

/// How many of `batch` crops of side `crop` hold about as many pixels enlarged to `side`: at
/// least one, at most `batch`.
fn same_pixel_count(batch: usize, crop: u32, side: usize) -> usize {
    let ratio = (crop as f64 / side as f64).powi(2);
    ((batch as f64 * ratio).round() as usize).clamp(1, batch)
}

/// Mean cosine similarity, per sample and map, between feature maps of the shielded decodes
/// and the (constant) maps of the originals.
fn feature_similarity(shielded: &[Tensor], original: &[Tensor]) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for (s, o) in shielded.iter().zip(original) {
        let b = s.dim(0)?;
        let (s, o) = (s.reshape((b, ()))?, o.detach().reshape((b, ()))?);
        let dot = (&s * &o)?.sum(1)?;
        let norms = ((s.sqr()?.sum(1)? * o.sqr()?.sum(1)?)?.sqrt()? + 1e-8)?;
        let cos = (dot / norms)?.mean_all()?;
        sum = Some(match sum {
            Some(t) => (t + cos)?,
            None => cos,
        });
    }
    let n = shielded.len().max(1) as f64;
    match sum {
        Some(t) => Ok((t / n)?),
        None => Err(Error::InvalidArgument("no feature maps to compare".into())),
    }
}

/// The crop sampler over the training parts of `data` and every `extra_data` folder (images
/// of the extra folders smaller than the crop are skipped), with each file's label and caption.
fn training_sampler(
    cfg: &TrainConfig,
    folder: &crate::data::ImageFolder,
) -> Result<crate::data::CropSampler> {
    let mut files = folder.part(crate::data::Split::Train, cfg.eval_percent);
    if files.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no training images left after holding out {}%",
            cfg.data.display(),
            cfg.eval_percent
        )));
    }
    let mut labels: Vec<Option<usize>> = files.iter().map(|f| folder.label(f)).collect();
    let mut captions: Vec<Option<String>> = files.iter().map(|f| folder.caption(f)).collect();
    for dir in &cfg.extra_data {
        let extra = crate::data::ImageFolder::open(dir)?;
        for f in extra.part(crate::data::Split::Train, cfg.eval_percent) {
            let (w, h) = image::image_dimensions(&f)
                .map_err(|e| Error::Image(format!("{}: {e}", f.display())))?;
            if w < cfg.crop || h < cfg.crop {
                continue;
            }
            labels.push(extra.label(&f));
            captions.push(extra.caption(&f));
            files.push(f);
        }
    }
    crate::data::CropSampler::new(&files, cfg.crop, cfg.seed ^ 0x5eed)?
        .with_labels(labels)?
        .with_captions(captions)
}

fn kl_divergence(reference: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(reference, 1)?;
    let log_q = candle_nn::ops::log_softmax(logits, 1)?;
    let per_sample = (log_p.exp()? * (&log_p - &log_q)?)?.sum(1)?;
    Ok(per_sample.mean_all()?)
}

fn psnr_of(mse: &Tensor) -> Result<f32> {
    Ok(-10.0 * mse.to_scalar::<f32>()?.max(1e-10).log10())
}

/// Central `crop`x`crop` patches of images (each at least that large), `[N, 3, crop, crop]`.
fn center_crops(files: &[PathBuf], crop: u32, device: &Device) -> Result<Tensor> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let img = crate::image_io::load_image(f)?;
        if img.width() < crop || img.height() < crop {
            return Err(Error::Image(format!(
                "{}: smaller than the {crop}x{crop} crop",
                f.display()
            )));
        }
        let x0 = (img.width() - crop) / 2;
        let y0 = (img.height() - crop) / 2;
        let patch = image::imageops::crop_imm(&img, x0, y0, crop, crop).to_image();
        out.push(crate::image_io::image_to_tensor(&patch, device)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Tiles rows of `[n, 3, H, W]` images into one picture, 4 pixels of white between tiles.
pub fn grid(rows: &[Tensor]) -> Result<RgbImage> {
    let gap = 4u32;
    let (n, _, h, w) = rows
        .first()
        .ok_or_else(|| Error::InvalidArgument("empty grid".into()))?
        .dims4()?;
    let (h, w) = (h as u32, w as u32);
    let mut canvas = RgbImage::from_pixel(
        n as u32 * (w + gap) - gap,
        rows.len() as u32 * (h + gap) - gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for i in 0..n {
            let tile = crate::image_io::tensor_to_image(&row.narrow(0, i, 1)?)?;
            image::imageops::replace(
                &mut canvas,
                &tile,
                (i as u32 * (w + gap)) as i64,
                (r as u32 * (h + gap)) as i64,
            );
        }
    }
    Ok(canvas)
}

/// The part of the shielded decode's MSE above the budget `max_gap_db` dB of PSNR under the full
/// decode (whose MSE is held fixed): `max(0, mse_sh − mse_full·10^(max_gap_db/10))`, averaged
/// when the MSEs are per crop (`[B]`; scalars give the batch's hinge).
fn gap_excess(mse_sh: &Tensor, mse_full: &Tensor, max_gap_db: f64) -> Result<Tensor> {
    let allowed = (mse_full.detach() * 10f64.powf(max_gap_db / 10.0))?;
    Ok((mse_sh - allowed)?.relu()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_ramps_the_learning_rate_then_milestones_apply() {
        let cfg: TrainConfig = toml::from_str(
            r#"
            data = "d"
            crop = 64
            batch = 1
            steps = 100
            lr = 1e-3
            lambda = 0.01
            warmup_steps = 4
            lr_milestones = [10]
            "#,
        )
        .unwrap();
        let lrs: Vec<f64> = [1, 2, 4, 5, 10, 11].map(|s| cfg.lr_at(s)).to_vec();
        let want = [2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3, 1e-4];
        for (got, want) in lrs.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{lrs:?}");
        }
        let none = TrainConfig {
            warmup_steps: 0,
            ..cfg
        };
        assert_eq!(none.lr_at(1), 1e-3);
    }

    #[test]
    fn bad_settings_are_refused_with_the_field_named() {
        let base = r#"
            stage = 1
            init = "m.safetensors"
            data = "d"
            crop = 256
            batch = 2
            steps = 5
            lr = 1e-4
            [shield]
            target = "efficientnet-lite"
            weights = "w"
            lambda_full = 0.01
            lambda_shielded = 0.01
            lambda_shield = 0.3
        "#;
        let parse = |text: &str| -> TrainConfig { toml::from_str(text).unwrap() };
        assert!(parse(base).check().is_ok());
        for (edit, field) in [
            (("stage = 1", "stage = 3"), "stage must be 0, 1 or 2"),
            (("stage = 1", "stage = \"final\""), "stage must be pretrain"),
            (("stage = 1", "device = \"tpu\"\nstage = 1"), "unknown variant `tpu`"),
            (("crop = 256", "crop = 100"), "multiple of 64"),
            (("lr = 1e-4", "lr = 0.0"), "lr"),
            (
                ("lambda_shield = 0.3", "lambda_shield = 0.3\ngenerator_lr_scale = 0.0"),
                "generator_lr_scale",
            ),
            (
                ("lambda_shield = 0.3", "lambda_shield = -0.3"),
                "lambda_shield",
            ),
            (("lambda_full = 0.01", "lambda_full = nan"), "lambda_full"),
            (
                (
                    "lambda_shield = 0.3",
                    "lambda_shield = 0.3\nlambda_keep = -1.0",
                ),
                "lambda_keep",
            ),
            (
                ("crop = 256", "crop = 128\ndistortion = \"ms-ssim\""),
                "ms-ssim",
            ),
            (
                (
                    "lambda_shield = 0.3",
                    "lambda_shield = 0.3\n[shield.augment]\nprobability = 0.5\nmin_scale = 0.4\nblur_probability = 1.5",
                ),
                "blur_probability",
            ),
            (
                (
                    "lambda_shield = 0.3",
                    "lambda_shield = 0.3\n[shield.augment]\nprobability = 0.5\nmin_scale = 0.0",
                ),
                "min_scale",
            ),
            (
                (
                    "lambda_shield = 0.3",
                    "lambda_shield = 0.3\n[shield.augment]\nprobability = 0.5\nmin_scale = 0.4\nblur_probability = 0.5\nmax_blur_sigma = 0.1",
                ),
                "max_blur_sigma",
            ),
            (
                ("lambda_shield = 0.3", "lambda_shield = 0.3\ngap_per_crop = true"),
                "gap_per_crop",
            ),
            (
                ("lambda_shield = 0.3", "lambda_shield = 0.3\nupscale_probability = 1.5"),
                "upscale_probability",
            ),
            (
                (
                    "lambda_shield = 0.3",
                    "lambda_shield = 0.3\nupscale_probability = 0.5\nmax_upscale = 1.1",
                ),
                "max_upscale",
            ),
        ] {
            // A value outside a closed set fails to parse; the others fail the check.
            let err = match toml::from_str::<TrainConfig>(&base.replacen(edit.0, edit.1, 1)) {
                Err(e) => e.to_string(),
                Ok(cfg) => cfg.check().expect_err(edit.1).to_string(),
            };
            assert!(err.contains(field), "{}: {err}", edit.1);
        }
        // Stages by number or by name; numbers are written back.
        let named = parse(&base.replacen("stage = 1", "stage = \"joint\"", 1));
        assert_eq!(named.stage, Stage::Joint);
        assert!(toml::to_string(&named).unwrap().contains("stage = 1"));
        // Target kinds: the known ones and, for your own target, any other name.
        assert_eq!(named.shield.unwrap().target, TargetKind::EfficientNetLite);
        let own = parse(&base.replacen("\"efficientnet-lite\"", "\"colour\"", 1));
        let kind = own.shield.unwrap().target;
        assert_eq!(kind, TargetKind::Custom("colour".into()));
        let err = load_target(&kind, Path::new("w"), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("Trainer::with_target"), "{err}");
    }

    #[test]
    fn kl_divergence_matches_a_hand_computation() {
        let dev = Device::Cpu;
        let p = Tensor::new(&[[0.0f32, 1.0, 2.0], [1.0, 1.0, 1.0]], &dev).unwrap();
        let q = Tensor::new(&[[2.0f32, 1.0, 0.0], [1.0, 1.0, 1.0]], &dev).unwrap();
        let softmax = |v: [f64; 3]| {
            let z: f64 = v.iter().map(|a| a.exp()).sum();
            v.map(|a| a.exp() / z)
        };
        let (a, b) = (softmax([0.0, 1.0, 2.0]), softmax([2.0, 1.0, 0.0]));
        let first: f64 = (0..3).map(|i| a[i] * (a[i] / b[i]).ln()).sum();
        // The second row is identical in both: KL 0.
        let want = first / 2.0;
        let got = kl_divergence(&p, &q).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let same = kl_divergence(&p, &p).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-6);
    }

    #[test]
    fn the_gap_budget_charges_only_the_excess_and_only_the_shielded_decode() {
        let dev = Device::Cpu;
        let full = candle_core::Var::new(0.01f32, &dev).unwrap();
        // 10^(1.5/10) = 1.4125: the budget allows an MSE of 0.014125 at 1.5 dB.
        for (sh, want) in [(0.014f32, 0.0f64), (0.02, 0.02 - 0.01 * 10f64.powf(0.15))] {
            let sh = candle_core::Var::new(sh, &dev).unwrap();
            let e = gap_excess(sh.as_tensor(), full.as_tensor(), 1.5).unwrap();
            let got = e.to_scalar::<f32>().unwrap() as f64;
            assert!((got - want).abs() < 1e-7, "{got} vs {want}");
            let grads = e.backward().unwrap();
            let d_sh = grads
                .get(sh.as_tensor())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d_sh, if want > 0.0 { 1.0 } else { 0.0 });
            // The full decode's MSE is the reference, not something the budget pushes on.
            assert!(grads.get(full.as_tensor()).is_none());
        }
    }

    #[test]
    fn upscaling_draws_a_multiple_of_64_up_to_the_limit() {
        assert_eq!(upscale_sides(256, 2.0), vec![320, 384, 448, 512]);
        assert_eq!(upscale_sides(256, 1.2), Vec::<usize>::new());
        assert_eq!(upscale_sides(64, 2.0), vec![128]);
        assert!(upscale_sides(256, f64::NAN).is_empty());
        let dev = Device::Cpu;
        let x = Tensor::rand(0f32, 1f32, (2, 3, 64, 64), &dev).unwrap();
        let cfg = |p: f64| -> ShieldConfig {
            toml::from_str(&format!(
                "target = \"t\"\nweights = \"w\"\nlambda_full = 0.1\nlambda_shielded = 0.1\n\
                 lambda_shield = 1.0\nupscale_probability = {p}\nmax_upscale = 3.0"
            ))
            .unwrap()
        };
        let mut rng = SplitMix64::new(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let y = upscale_batch(&mut rng, &x, 64, &cfg(1.0)).unwrap();
            let (b, c, h, w) = y.dims4().unwrap();
            assert_eq!((b, c, h), (2, 3, w));
            seen.insert(h);
            let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|v| (0.0..=1.0).contains(v)));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![128, 192]);
        // At probability 0.5 about half the batches keep their size.
        let kept = (0..200)
            .filter(|_| {
                let y = upscale_batch(&mut rng, &x, 64, &cfg(0.5)).unwrap();
                y.dim(2).unwrap() == 64
            })
            .count();
        assert!((70..130).contains(&kept), "{kept}");
    }

    #[test]
    fn same_pixel_upscaling_keeps_about_the_batch_pixel_count() {
        assert_eq!(same_pixel_count(4, 256, 320), 3);
        assert_eq!(same_pixel_count(4, 256, 384), 2);
        assert_eq!(same_pixel_count(4, 256, 448), 1);
        assert_eq!(same_pixel_count(4, 256, 768), 1);
        assert_eq!(same_pixel_count(16, 256, 512), 4);
        assert_eq!(same_pixel_count(4, 256, 256), 4);
        let x = Tensor::rand(0f32, 1f32, (4, 3, 64, 64), &Device::Cpu).unwrap();
        let cfg: ShieldConfig = toml::from_str(
            "target = \"t\"\nweights = \"w\"\nlambda_full = 0.1\nlambda_shielded = 0.1\n\
             lambda_shield = 1.0\nupscale_probability = 1.0\nmax_upscale = 3.0\n\
             upscale_same_pixels = true",
        )
        .unwrap();
        let mut rng = SplitMix64::new(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let y = upscale_batch(&mut rng, &x, 64, &cfg).unwrap();
            let (b, side) = (y.dim(0).unwrap(), y.dim(2).unwrap());
            seen.insert((side, b));
            // The kept crops are the first ones, enlarged.
            let first =
                crate::targets::preprocess::resize_bicubic(&x.narrow(0, 0, b).unwrap(), side, side)
                    .unwrap()
                    .clamp(0f32, 1f32)
                    .unwrap();
            let d = (y - first).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![(128, 1), (192, 1)]
        );
    }

    #[test]
    fn a_per_crop_budget_charges_the_crop_over_it_even_when_the_mean_is_under() {
        let dev = Device::Cpu;
        let full = Tensor::new(&[0.01f32, 0.01], &dev).unwrap();
        // Crop 0 is 1.76 dB under its full decode, crop 1 exactly at it: their mean MSE is
        // under a 1.5 dB budget, crop 0 alone is not.
        let sh = candle_core::Var::new(&[0.015f32, 0.01], &dev).unwrap();
        let mean = |t: &Tensor| t.mean_all().unwrap();
        let batch = gap_excess(&mean(sh.as_tensor()), &mean(&full), 1.5).unwrap();
        assert_eq!(batch.to_scalar::<f32>().unwrap(), 0.0);
        let e = gap_excess(sh.as_tensor(), &full, 1.5).unwrap();
        let want = (0.015 - 0.01 * 10f64.powf(0.15)) / 2.0;
        let got = e.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        // Only the crop over its budget gets a gradient, of 1/B.
        let grads = e.backward().unwrap();
        let d = grads.get(sh.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(d, vec![0.5, 0.0]);
    }
}
