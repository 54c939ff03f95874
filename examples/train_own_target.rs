//! Train a shield against your own semantic model: a [`SemanticTarget`] implemented here (a
//! "classifier" that reads the dominant colour of a picture), a tiny plain codec, a few steps of
//! stage 1 (joint shielding) on a folder of generated pictures, then the exported shielded model.
//! Real runs use the same calls with a real target, a real codec and thousands of steps
//! (`docs/TRAINING.md`).
//!
//! ```text
//! cargo run --release --example train_own_target
//! ```

use psic::candle_core::{DType, Device, Tensor};
use psic::targets::SemanticTarget;
use psic::train::{TrainConfig, Trainer};

/// Reads the mean colour of an image: three classes, red, green and blue.
#[derive(Debug)]
struct ColourTarget(Device);

impl SemanticTarget for ColourTarget {
    fn device(&self) -> &Device {
        &self.0
    }
    /// Images come in as RGB in [0, 1], shape (batch, 3, height, width).
    fn preprocess(&self, images: &Tensor) -> psic::Result<Tensor> {
        Ok(images.clone())
    }
    /// One embedding per image: its mean colour, centred.
    fn embed_images(&self, input: &Tensor) -> psic::Result<Tensor> {
        Ok((input.mean((2, 3))? - 0.5)?)
    }
    /// One embedding per class: red, green, blue.
    fn class_embeddings(&self) -> psic::Result<Tensor> {
        Ok(Tensor::eye(3, DType::F32, &self.0)?)
    }
    fn logit_scale(&self) -> f32 {
        10.0
    }
    fn logits_from_embeddings(&self, e: &Tensor) -> psic::Result<Tensor> {
        Ok(e.matmul(&self.class_embeddings()?.t()?)?)
    }
}

fn main() -> psic::Result<()> {
    let device = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("psic-own-target-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| psic::Error::io(&dir, e))?;
    // Twelve 64x64 pictures, four of each colour, with some texture.
    for i in 0..12u32 {
        let base = [[200u8, 50, 50], [50, 200, 50], [50, 50, 200]][i as usize % 3];
        let img = psic::image::RgbImage::from_fn(64, 64, |x, y| {
            let t = ((x * 3 + y * 5 + i * 7) % 40) as u8;
            psic::image::Rgb(base.map(|c| c - 20 + t))
        });
        psic::image_io::save_png(dir.join(format!("img{i:02}.png")), &img)?;
    }
    // A tiny plain codec (random weights) to shield; a real run starts from a stage-0 model.
    let plain = dir.join("plain.safetensors");
    let arch = psic::model::Architecture::ScaleHyperprior(psic::backbone::ScaleHyperpriorConfig {
        n: 8,
        m: 12,
    });
    psic::ModelFile::initialize(arch, 1, &device)?.save(&plain)?;

    // Stage 1: the full decode keeps the target's reading, the shielded one loses it. The target
    // named in the config is only a label: the trainer gets the target object itself.
    let config = format!(
        "stage = 1\ninit = {plain:?}\ndata = {dir:?}\neval_percent = 25\ncrop = 64\nbatch = 3\n\
         steps = 5\nlr = 1e-3\nseed = 1\n\n[shield]\ntarget = \"colour\"\nweights = \"none\"\n\
         lambda_full = 0.1\nlambda_shielded = 0.01\nlambda_shield = 5.0\n"
    );
    let cfg: TrainConfig = toml::from_str(&config)
        .map_err(|e| psic::Error::InvalidArgument(format!("config: {e}")))?;
    let target = Box::new(ColourTarget(device.clone()));
    let mut trainer = Trainer::with_target(cfg, &device, Some(target))?;
    while trainer.step_count() < trainer.cfg.steps {
        let s = trainer.step()?;
        println!(
            "step {}: loss {:.3}, bpp {:.3}, full PSNR {:.2} dB",
            s.step, s.loss, s.bpp, s.psnr
        );
    }
    let model = dir.join("shielded.safetensors");
    trainer.export()?.save(&model)?;
    println!("shielded model: {}", model.display());
    Ok(())
}
