//! Training building blocks (the trainer itself is not built yet): the rate-distortion forward
//! pass of a backbone with CompressAI's additive-noise quantisation, and its loss.

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
    let x_hat = backbone.synthesis(&y_tilde, triggers)?;
    let bits = ((y_lik.log()?.sum_all()? + z_lik.log()?.sum_all()?)? * (-1.0 / 2f64.ln()))?;
    let bpp = (bits / (b * h * w) as f64)?;
    let mse = (&x_hat - x)?.sqr()?.mean_all()?;
    Ok(RdForward { x_hat, bpp, mse })
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

/// Adam with optional global-norm gradient clipping, whose state (moments, step) can be saved
/// and restored exactly — candle's optimisers keep theirs private, which rules out exact resume.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, candle_core::Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    /// Learning rate.
    pub lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Adam {
    /// Adam (β = 0.9, 0.999; ε = 1e-8) over named variables.
    pub fn new(vars: Vec<(String, candle_core::Var)>, lr: f64) -> Result<Self> {
        let zeros = |v: &candle_core::Var| v.as_tensor().zeros_like();
        Ok(Self {
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            vars,
            step: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// One update from `grads`; with `clip`, gradients are scaled so that their global L2 norm
    /// is at most `clip`. Returns the norm before clipping.
    pub fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        clip: Option<f64>,
    ) -> Result<f64> {
        let gs: Vec<Option<&Tensor>> = self
            .vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()))
            .collect();
        let mut sq = 0f64;
        for g in gs.iter().flatten() {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        let scale = match clip {
            Some(c) if norm > c => c / norm,
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, g) in gs.into_iter().enumerate() {
            let Some(g) = g else { continue };
            // Detached: the moments must not keep each step's autograd graph alive (that grows
            // memory without bound over a run).
            let g = (g.detach() * scale)?;
            self.m[i] = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?.detach();
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = ((m_hat / (v_hat.sqrt()? + self.eps)?)? * self.lr)?;
            let var = &self.vars[i].1;
            var.set(&(var.as_tensor().detach() - update)?)?;
        }
        Ok(norm)
    }

    /// Number of updates done.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The state as named tensors (`{prefix}.m.{var}`, `{prefix}.v.{var}`, `{prefix}.step`).
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.vars.len() + 1);
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("{prefix}.m.{name}"), self.m[i].clone()));
            out.push((format!("{prefix}.v.{name}"), self.v[i].clone()));
        }
        let step = Tensor::new(
            &[self.step as i64],
            self.m.first().map(|t| t.device()).unwrap_or(&Device::Cpu),
        )?;
        out.push((format!("{prefix}.step"), step));
        Ok(out)
    }

    /// Restores a state saved by [`state`](Self::state).
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<()> {
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .ok_or_else(|| crate::Error::Model(format!("checkpoint lacks {k}")))
        };
        for (i, (name, _)) in self.vars.iter().enumerate() {
            self.m[i] = get(format!("{prefix}.m.{name}"))?;
            self.v[i] = get(format!("{prefix}.v.{name}"))?;
        }
        self.step = get(format!("{prefix}.step"))?.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}

/// Settings of a stage-0 (rate-distortion) training run; read from TOML by the CLI's `train`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Architecture name (`bmshj2018-hyperprior`).
    pub architecture: String,
    /// Channels `n` of the transforms and of `z`.
    pub n: usize,
    /// Channels `m` of `y`.
    pub m: usize,
    /// Image folder; its evaluation part (see [`crate::data`]) is never used.
    pub data: std::path::PathBuf,
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
    /// Learning rate of the entropy bottleneck's quantiles (auxiliary loss).
    #[serde(default = "default_aux_lr")]
    pub aux_lr: f64,
    /// Rate-distortion trade-off λ in `bpp + λ·255²·MSE`.
    pub lambda: f64,
    /// Global gradient-norm clip.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Seed of initialisation, sampling and noise.
    #[serde(default)]
    pub seed: u64,
    /// Write the checkpoint every this many steps (and at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
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

/// Figures of one training step.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepStats {
    /// Step number (1-based).
    pub step: u64,
    /// Rate-distortion loss.
    pub loss: f32,
    /// Estimated bits per pixel.
    pub bpp: f32,
    /// PSNR of the noisy-quantisation reconstruction, dB.
    pub psnr: f32,
    /// Auxiliary (quantile) loss.
    pub aux: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// Stage-0 trainer: rate-distortion training of a plain backbone with exact resume.
pub struct Trainer {
    /// The settings.
    pub cfg: TrainConfig,
    varmap: candle_nn::VarMap,
    backbone: Box<dyn LicBackbone>,
    architecture: crate::model::Architecture,
    main: Adam,
    aux: Adam,
    sampler: crate::data::CropSampler,
    noise: SplitMix64,
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

impl Trainer {
    /// A fresh run (seeded initialisation).
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Self> {
        let architecture = crate::model::Architecture::from_name_and_config(
            &cfg.architecture,
            &serde_json::json!({"n": cfg.n, "m": cfg.m}).to_string(),
        )?;
        let varmap = candle_nn::VarMap::new();
        let vb =
            crate::init::seeded_var_builder(&varmap, cfg.seed, candle_core::DType::F32, device);
        let backbone = architecture.build(vb)?;
        let mut named: Vec<(String, candle_core::Var)> = varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (aux_vars, main_vars): (Vec<_>, Vec<_>) = named
            .into_iter()
            .partition(|(k, _)| k.ends_with("quantiles"));
        let folder = crate::data::ImageFolder::open(&cfg.data)?;
        let files = folder.part(crate::data::Split::Train, cfg.eval_percent);
        let sampler = crate::data::CropSampler::new(&files, cfg.crop, cfg.seed ^ 0x5eed)?;
        Ok(Self {
            main: Adam::new(main_vars, cfg.lr)?,
            aux: Adam::new(aux_vars, cfg.aux_lr)?,
            noise: SplitMix64::new(cfg.seed ^ 0x401e),
            cfg,
            varmap,
            backbone,
            architecture,
            sampler,
            device: device.clone(),
        })
    }

    /// Steps done so far.
    pub fn step_count(&self) -> u64 {
        self.main.steps()
    }

    /// One step: a batch of crops, the RD loss, Adam on the main parameters (clipped) and on the
    /// quantiles (auxiliary loss).
    pub fn step(&mut self) -> Result<StepStats> {
        let x = self.sampler.next_batch(self.cfg.batch, &self.device)?;
        let out = rd_forward(self.backbone.as_ref(), &x, None, &mut self.noise)?;
        let loss = rd_loss(&out, self.cfg.lambda)?;
        let grad_norm = self.main.step(&loss.backward()?, Some(self.cfg.clip))?;
        let aux = self.backbone.entropy_bottleneck().aux_loss()?;
        self.aux.step(&aux.backward()?, None)?;
        let mse = out.mse.to_scalar::<f32>()?;
        Ok(StepStats {
            step: self.main.steps(),
            loss: loss.to_scalar::<f32>()?,
            bpp: out.bpp.to_scalar::<f32>()?,
            psnr: -10.0 * mse.max(1e-10).log10(),
            aux: aux.to_scalar::<f32>()?,
            grad_norm,
        })
    }

    /// Writes a resume checkpoint (weights, both optimisers, generator states, settings)
    /// atomically.
    pub fn save_checkpoint(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
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
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = std::collections::HashMap::from([
            ("format".to_string(), "psic-train-checkpoint".to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.cfg).unwrap_or_default(),
            ),
        ]);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
                .map_err(|e| crate::Error::Model(format!("cannot serialise checkpoint: {e}")))?;
        crate::image_io::write_atomic(path, &bytes)
    }

    /// Resumes a run from a checkpoint: continues exactly where it stopped.
    pub fn resume(path: impl AsRef<std::path::Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| crate::Error::Model(format!("{}: {e}", path.display())))?;
        let info = meta.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some("psic-train-checkpoint") {
            return Err(crate::Error::Model(format!(
                "{} is not a psic training checkpoint",
                path.display()
            )));
        }
        let cfg: TrainConfig =
            serde_json::from_str(info.get("config").map(String::as_str).unwrap_or(""))
                .map_err(|e| crate::Error::Model(format!("{}: bad config: {e}", path.display())))?;
        let mut t = Self::new(cfg, device)?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        for (name, var) in t.varmap.data().lock().expect("VarMap lock").iter() {
            let saved = tensors
                .get(&format!("model.{name}"))
                .ok_or_else(|| crate::Error::Model(format!("checkpoint lacks model.{name}")))?;
            var.set(saved)?;
        }
        t.main.load_state(&tensors, "adam.main")?;
        t.aux.load_state(&tensors, "adam.aux")?;
        let rng = tensors
            .get("rng")
            .ok_or_else(|| crate::Error::Model("checkpoint lacks rng".into()))?
            .to_vec1::<i64>()?;
        t.sampler.set_rng_state(rng[0] as u64);
        t.noise = SplitMix64::new(rng[1] as u64);
        Ok(t)
    }

    /// The trained model as a psic model file (coding tables built from the learned densities).
    pub fn export(&self) -> Result<crate::model::ModelFile> {
        let meta = std::collections::BTreeMap::from([
            (
                "source".to_string(),
                format!("psic stage-0 training, {} steps", self.main.steps()),
            ),
            (
                "training".to_string(),
                serde_json::to_string(&self.cfg).unwrap_or_default(),
            ),
        ]);
        crate::model::ModelFile::from_varmap(
            self.architecture.clone(),
            &self.varmap,
            meta,
            &self.device,
        )
    }
}
