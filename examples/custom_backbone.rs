//! A backbone defined outside psic, end to end: registered, initialised, shielded with a fresh
//! CLTG, trained for a few steps (rate-distortion, then shielding with a frozen encoder), saved
//! as a psic model file, loaded back and decoded both ways.
//!
//! ```sh
//! cargo run --release --example custom_backbone
//! ```
//!
//! The backbone (`tiny-hyperprior`) is a small hyperprior codec whose weights live under names
//! of its own (`enc.*`, `hyper_enc.*`, `hyper_dec.*`, `dec.*`; only the two entropy models keep
//! CompressAI's names, which psic's coding tables use) and whose synthesis has three injection
//! points of different widths. Everything psic needs to know about it comes from the
//! [`LicBackbone`] trait and the [`BackboneFactory`] registered for its name.

use std::path::{Path, PathBuf};

use psic::backbone::{register_backbone, BackboneFactory, GaussianParams, LicBackbone, Triggers};
use psic::candle_core::{Device, Module, Tensor};
use psic::candle_nn::VarBuilder;
use psic::entropy::{EntropyBottleneck, GaussianConditional};
use psic::init::SplitMix64;
use psic::layers::{Conv2d, ConvTranspose2d, Gdn};
use psic::model::Architecture;
use psic::targets::SemanticTarget;
use psic::train::{TrainConfig, Trainer};
use psic::{Codec, Error, ModelFile, Result};

/// The architecture name written into the model files.
const NAME: &str = "tiny-hyperprior";

/// Configuration of the tiny backbone (the model file's `config` metadata).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TinyConfig {
    /// Channels of the hidden layers and of `z`.
    n: usize,
    /// Channels of `y`.
    m: usize,
}

/// A small hyperprior: GDN analysis, ReLU hyper transforms, a synthesis of three IGDN/ReLU
/// stages with a trigger after each (widths `n`, `n`, `n / 2`).
#[derive(Debug)]
struct TinyHyperprior {
    cfg: TinyConfig,
    enc: Vec<(Conv2d, Option<Gdn>)>,
    hyper_enc: Vec<Conv2d>,
    hyper_dec: (Vec<ConvTranspose2d>, Conv2d),
    dec: Vec<(ConvTranspose2d, Option<Gdn>)>,
    entropy_bottleneck: EntropyBottleneck,
    gaussian_conditional: GaussianConditional,
    device: Device,
}

impl TinyHyperprior {
    fn new(vb: VarBuilder, cfg: TinyConfig) -> Result<Self> {
        let TinyConfig { n, m } = cfg;
        if n < 2 || m == 0 {
            return Err(Error::Model(format!("{NAME}: bad size n={n}, m={m}")));
        }
        let enc = [(3, n), (n, n), (n, n), (n, m)]
            .iter()
            .enumerate()
            .map(|(i, &(c_in, c_out))| {
                let conv = Conv2d::new(vb.pp(format!("enc.{}", 2 * i)), c_in, c_out, 5, 2)?;
                let gdn = (i < 3)
                    .then(|| Gdn::new(vb.pp(format!("enc.{}", 2 * i + 1)), c_out, false))
                    .transpose()?;
                Ok((conv, gdn))
            })
            .collect::<Result<Vec<_>>>()?;
        let dec = [(m, n), (n, n), (n, n / 2), (n / 2, 3)]
            .iter()
            .enumerate()
            .map(|(i, &(c_in, c_out))| {
                let conv =
                    ConvTranspose2d::new(vb.pp(format!("dec.{}", 2 * i)), c_in, c_out, 5, 2)?;
                // IGDN after the first two up-samplings, ReLU (no weights) after the third.
                let gdn = (i < 2)
                    .then(|| Gdn::new(vb.pp(format!("dec.{}", 2 * i + 1)), c_out, true))
                    .transpose()?;
                Ok((conv, gdn))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            enc,
            hyper_enc: vec![
                Conv2d::new(vb.pp("hyper_enc.0"), m, n, 3, 1)?,
                Conv2d::new(vb.pp("hyper_enc.2"), n, n, 5, 2)?,
                Conv2d::new(vb.pp("hyper_enc.4"), n, n, 5, 2)?,
            ],
            hyper_dec: (
                vec![
                    ConvTranspose2d::new(vb.pp("hyper_dec.0"), n, n, 5, 2)?,
                    ConvTranspose2d::new(vb.pp("hyper_dec.2"), n, n, 5, 2)?,
                ],
                Conv2d::new(vb.pp("hyper_dec.4"), n, m, 3, 1)?,
            ),
            entropy_bottleneck: EntropyBottleneck::new(vb.pp("entropy_bottleneck"), n)?,
            dec,
            gaussian_conditional: GaussianConditional::new(vb.pp("gaussian_conditional"))?,
            device: vb.device().clone(),
        })
    }
}

impl LicBackbone for TinyHyperprior {
    fn architecture(&self) -> &'static str {
        NAME
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self.cfg).unwrap_or_default()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn latent_channels(&self) -> usize {
        self.cfg.m
    }

    fn hyper_channels(&self) -> usize {
        self.cfg.n
    }

    fn analysis(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (conv, gdn) in &self.enc {
            h = match gdn {
                Some(gdn) => conv.forward_gdn(&h, gdn)?,
                None => conv.forward(&h)?,
            };
        }
        Ok(h)
    }

    fn hyper_analysis(&self, y: &Tensor) -> Result<Tensor> {
        let mut h = y.abs()?;
        for (i, conv) in self.hyper_enc.iter().enumerate() {
            h = conv.forward(&h)?;
            if i + 1 < self.hyper_enc.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    fn hyper_synthesis(&self, z_hat: &Tensor) -> Result<GaussianParams> {
        let (deconvs, last) = &self.hyper_dec;
        let mut h = z_hat.clone();
        for d in deconvs {
            h = d.forward(&h)?.relu()?;
        }
        Ok(GaussianParams {
            scales: last.forward(&h)?.relu()?,
            means: None,
        })
    }

    fn injection_points(&self) -> Vec<usize> {
        vec![self.cfg.n, self.cfg.n, self.cfg.n / 2]
    }

    fn synthesis(&self, y_hat: &Tensor, triggers: Option<&Triggers>) -> Result<Tensor> {
        if let Some(t) = triggers {
            t.check(&self.injection_points(), y_hat.dims4()?.0)?;
        }
        let mut h = y_hat.clone();
        for (i, (conv, gdn)) in self.dec.iter().enumerate() {
            h = match gdn {
                Some(gdn) => conv.forward_gdn(&h, gdn)?,
                None if i < 3 => conv.forward(&h)?.relu()?,
                None => conv.forward(&h)?,
            };
            if let Some(t) = triggers.filter(|_| i < 3) {
                h = t.inject(i, &h)?;
            }
        }
        Ok(h)
    }

    fn synthesis_prefixes(&self) -> Vec<String> {
        // What a frozen-encoder shielding run may change: the decoder, nothing else.
        vec!["dec.".into()]
    }

    fn entropy_bottleneck(&self) -> &EntropyBottleneck {
        &self.entropy_bottleneck
    }

    fn gaussian_conditional(&self) -> &GaussianConditional {
        &self.gaussian_conditional
    }
}

/// Builds [`TinyHyperprior`]s from model files.
struct TinyFactory;

impl TinyFactory {
    fn config(config: &serde_json::Value) -> Result<TinyConfig> {
        serde_json::from_value(config.clone())
            .map_err(|e| Error::Model(format!("{NAME}: bad config {config}: {e}")))
    }
}

impl BackboneFactory for TinyFactory {
    fn name(&self) -> &str {
        NAME
    }

    fn hyper_channels(&self, config: &serde_json::Value) -> Result<usize> {
        Ok(Self::config(config)?.n)
    }

    fn build(&self, config: &serde_json::Value, vb: VarBuilder) -> Result<Box<dyn LicBackbone>> {
        Ok(Box::new(TinyHyperprior::new(vb, Self::config(config)?)?))
    }
}

/// A small fixed random classifier for the shielding loss: a 3x3 stride-2 convolution with 8
/// filters and ReLU, average pooling to 4x4, a tanh layer of width 16, 4 classes.
#[derive(Debug)]
struct TinyTarget {
    conv: Tensor,
    hidden: Tensor,
    classes: Tensor,
    device: Device,
}

impl TinyTarget {
    fn new(seed: u64) -> Result<Self> {
        let dev = Device::Cpu;
        let mut rng = SplitMix64::new(seed);
        let mut normal = |shape: &[usize], scale: f64| -> Result<Tensor> {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.next_normal() * scale) as f32).collect();
            Ok(Tensor::from_vec(v, shape, &dev)?)
        };
        Ok(Self {
            conv: normal(&[8, 3, 3, 3], 0.5)?,
            hidden: normal(&[16, 128], 0.3)?,
            classes: normal(&[4, 16], 1.0)?,
            device: Device::Cpu,
        })
    }
}

impl SemanticTarget for TinyTarget {
    fn device(&self) -> &Device {
        &self.device
    }
    fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        Ok(images.affine(4.0, -2.0)?)
    }
    fn embed_images(&self, input: &Tensor) -> Result<Tensor> {
        let (_, _, h, _) = input.dims4()?;
        let f = input.conv2d(&self.conv, 1, 2, 1, 1)?.relu()?;
        let f = f.avg_pool2d(h / 8)?.flatten_from(1)?;
        Ok(f.matmul(&self.hidden.t()?)?.tanh()?)
    }
    fn class_embeddings(&self) -> Result<Tensor> {
        Ok(self.classes.clone())
    }
    fn logit_scale(&self) -> f32 {
        1.0
    }
    fn logits_from_embeddings(&self, e: &Tensor) -> Result<Tensor> {
        Ok((e.matmul(&self.classes.t()?)? * 4.0)?)
    }
}

/// 24 seeded 64x64 pictures (stripes, gradients and a blob) to train on.
fn training_folder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = SplitMix64::new(42);
    for i in 0..24u32 {
        let p: Vec<f64> = (0..9).map(|_| rng.next_f64()).collect();
        let img = psic::image::RgbImage::from_fn(64, 64, |x, y| {
            let (fx, fy) = (x as f64 / 64.0, y as f64 / 64.0);
            let stripes = ((fx * p[0] + fy * p[1]) * 5.0).sin() * 0.5 + 0.5;
            let blob = (-((fx - p[2]).powi(2) + (fy - p[3]).powi(2)) * 8.0).exp();
            let ch = |k: usize| {
                let v = p[4 + k] * stripes + (1.0 - p[4 + k]) * fx * p[7] + blob * p[8];
                (v.clamp(0.0, 1.0) * 255.0) as u8
            };
            psic::image::Rgb([ch(0), ch(1), ch(2)])
        });
        psic::image_io::save_png(dir.join(format!("img{i:02}.png")), &img)?;
    }
    Ok(())
}

/// A training configuration from JSON (the CLI reads the same fields from TOML).
fn train_config(value: serde_json::Value) -> Result<TrainConfig> {
    serde_json::from_value(value).map_err(|e| Error::InvalidArgument(format!("config: {e}")))
}

/// The tensors whose names start with `prefix`, sorted by name, as flat f32 vectors.
fn weights(model: &ModelFile, prefix: &str) -> Result<Vec<(String, Vec<f32>)>> {
    let mut names: Vec<&String> = model
        .tensors
        .keys()
        .filter(|k| k.starts_with(prefix))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|k| Ok((k.clone(), model.tensors[k].flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

fn main() -> Result<()> {
    let t0 = std::time::Instant::now();
    let dev = Device::Cpu;
    let dir: PathBuf =
        std::env::temp_dir().join(format!("psic-custom-backbone-{}", std::process::id()));
    let data = dir.join("photos");
    training_folder(&data)?;

    // 1. Register the architecture: from here on, model files naming it load like psic's own.
    register_backbone(TinyFactory)?;
    let arch = Architecture::from_name_and_config(NAME, r#"{"n":16,"m":24}"#)?;

    // 2. A seeded, untrained model, trained for a few rate-distortion steps (stage 0).
    let init = ModelFile::initialize(arch, 1, &dev)?;
    let init_path = dir.join("init.safetensors");
    init.save(&init_path)?;
    let mut stage0 = Trainer::new(
        train_config(serde_json::json!({
            "stage": 0, "architecture": NAME, "n": 16, "m": 24, "init": init_path,
            "data": data, "eval_percent": 0, "crop": 64, "batch": 4, "steps": 150,
            "lr": 3e-3, "lambda": 0.05, "seed": 1,
        }))?,
        &dev,
    )?;
    for _ in 0..150 {
        stage0.step()?;
    }
    let plain = stage0.export()?;
    println!(
        "stage 0: {} steps of {NAME} (fingerprint {})",
        stage0.step_count(),
        psic::bitstream::fingerprint_hex(&plain.fingerprint()?)
    );

    // 3. Shield it: a fresh CLTG for the backbone's injection points ([16, 16, 8]). The encoder
    //    and the fingerprint stay the plain model's, so the streams do too.
    let shielded = plain.with_new_cltg(7, &dev)?;
    assert_eq!(shielded.fingerprint()?, plain.fingerprint()?);
    let shielded_path = dir.join("shielded-init.safetensors");
    shielded.save(&shielded_path)?;

    // 4. Train the shield for a few steps against the tiny classifier, encoder frozen: the
    //    trainer updates what the backbone's `synthesis_prefixes` name (`dec.*`) and the CLTG.
    let mut stage1 = Trainer::with_target(
        train_config(serde_json::json!({
            "stage": 1, "init": shielded_path, "data": data, "eval_percent": 0, "crop": 64,
            "batch": 4, "steps": 20, "lr": 1e-3, "seed": 2,
            "shield": {
                "target": "tiny", "weights": "none", "lambda_full": 0.1,
                "lambda_shielded": 0.01, "lambda_shield": 5.0, "freeze_analysis": true,
            },
        }))?,
        &dev,
        Some(Box::new(TinyTarget::new(3)?)),
    )?;
    let mut last = None;
    for _ in 0..20 {
        last = Some(stage1.step()?);
    }
    if let Some(s) = last {
        println!(
            "stage 1: {} steps, loss {:.3}, PSNR full {:.2} dB / shielded {:.2} dB",
            s.step,
            s.loss,
            s.psnr,
            s.psnr_shielded.unwrap_or(f32::NAN)
        );
    }

    // 5. Save, load back by path alone (the registry builds the backbone from its name).
    let trained = stage1.export()?;
    let path = dir.join("tiny-shielded.safetensors");
    trained.save(&path)?;
    let loaded = ModelFile::load(&path, &dev)?;
    assert_eq!(loaded.architecture.name(), NAME);
    assert_eq!(loaded.fingerprint()?, trained.fingerprint()?);
    // The frozen encoder is bit for bit the plain model's; the decoder learned.
    assert_eq!(weights(&loaded, "enc.")?, weights(&plain, "enc.")?);
    assert_ne!(weights(&loaded, "dec.")?, weights(&plain, "dec.")?);

    // 6. Encode once, decode both ways.
    let codec = Codec::from_model_file(&loaded, &dev)?;
    let img = psic::image_io::load_image(data.join("img03.png"))?;
    let bytes = codec.encode(&img)?;
    let shielded_img = codec.decode(&bytes)?;
    let conditions = codec
        .conditions()
        .ok_or_else(|| Error::Model("the trained model has no conditions".into()))?;
    let full_img = codec.decode_full(&bytes, &conditions.full)?;
    println!(
        "{} bytes ({:.3} bpp); PSNR full {:.2} dB, shielded {:.2} dB; decodes differ: {}",
        bytes.len(),
        bytes.len() as f64 * 8.0 / (img.width() * img.height()) as f64,
        psic::metrics::psnr(&img, &full_img)?,
        psic::metrics::psnr(&img, &shielded_img)?,
        full_img != shielded_img
    );
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    println!("done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
