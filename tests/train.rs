//! Stage-0 training: losses fall on a tiny run, a resumed run continues bit-identically, and a
//! configuration's `precision` is applied and kept.

use candle_core::Device;
use psic::train::{TrainConfig, Trainer};

fn folder() -> std::path::PathBuf {
    folder_named("psic-train")
}

/// Twelve small photos in a fresh temporary folder of this name (per process).
fn folder_named(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..12u32 {
        image::RgbImage::from_fn(80, 72, |x, y| {
            image::Rgb([
                (x * 5 + i * 9) as u8,
                (y * 4) as u8,
                ((x ^ y) * 3 + i) as u8,
            ])
        })
        .save(dir.join(format!("img{i:02}.png")))
        .unwrap();
    }
    dir
}

fn config(data: std::path::PathBuf) -> TrainConfig {
    toml::from_str(&format!(
        r#"
        architecture = "bmshj2018-hyperprior"
        n = 8
        m = 12
        data = {data:?}
        eval_percent = 20
        crop = 64
        batch = 2
        steps = 10
        lr = 1e-3
        lr_milestones = [3]
        lr_gamma = 0.5
        aux_lr = 1e-3
        lambda = 0.01
        clip = 1.0
        seed = 3
        checkpoint_every = 5
        "#
    ))
    .unwrap()
}

#[test]
fn resumed_training_continues_bit_identically() {
    let data = folder();
    let dev = Device::Cpu;
    let mut a = Trainer::new(config(data.clone()), &dev).unwrap();
    for _ in 0..2 {
        a.step().unwrap();
    }
    let ckpt = data.join("ckpt.safetensors");
    a.save_checkpoint(&ckpt).unwrap();
    let cont_a: Vec<_> = (0..3).map(|_| a.step().unwrap()).collect();
    let mut b = Trainer::resume(&ckpt, &dev, |_| {}).unwrap();
    assert_eq!(b.step_count(), 2);
    let cont_b: Vec<_> = (0..3).map(|_| b.step().unwrap()).collect();
    for (x, y) in cont_a.iter().zip(&cont_b) {
        assert_eq!(
            (
                x.step,
                x.loss.to_bits(),
                x.bpp.to_bits(),
                x.aux.to_bits(),
                x.lr
            ),
            (
                y.step,
                y.loss.to_bits(),
                y.bpp.to_bits(),
                y.aux.to_bits(),
                y.lr
            )
        );
    }
    // The schedule: lr 1e-3 up to step 3, halved after.
    assert_eq!((cont_a[0].lr, cont_a[1].lr), (1e-3, 5e-4));
    // The export is a working codec.
    let model = b.export().unwrap();
    let codec = psic::Codec::from_model_file(&model, &dev).unwrap();
    let img = image::open(data.join("img00.png")).unwrap().to_rgb8();
    let bytes = codec.encode(&img).unwrap();
    assert_eq!(codec.decode(&bytes).unwrap().dimensions(), (80, 72));
    std::fs::remove_dir_all(&data).ok();
}

#[test]
fn a_configured_precision_is_applied_and_kept_on_resume() {
    let data = folder_named("psic-train-precision");
    let dev = Device::Cpu;
    let with = |p: &str| {
        // 16 channels: products of fewer rows stay in f32 whatever the precision.
        let mut cfg = config(data.clone());
        (cfg.n, cfg.m) = (16, 16);
        cfg.precision = Some(p.parse().unwrap());
        cfg
    };
    // bf16-emulated rounds every convolution operand to bf16 on any CPU, so its first step
    // differs from f32's: the key reaches the backbone.
    let f32_loss = Trainer::new(with("f32"), &dev)
        .unwrap()
        .step()
        .unwrap()
        .loss;
    let mut a = Trainer::new(with("bf16-emulated"), &dev).unwrap();
    let bf16_loss = a.step().unwrap().loss;
    assert_ne!(f32_loss.to_bits(), bf16_loss.to_bits());
    let ckpt = data.join("ckpt.safetensors");
    a.save_checkpoint(&ckpt).unwrap();
    let mut b = Trainer::resume(&ckpt, &dev, |_| {}).unwrap();
    assert_eq!(b.config().precision, Some(psic::Precision::Bf16Emulated));
    assert_eq!(
        a.step().unwrap().loss.to_bits(),
        b.step().unwrap().loss.to_bits(),
        "the resumed run keeps the configured precision"
    );
    let text = "precision = \"bf17\"\n";
    assert!(toml::from_str::<TrainConfig>(text).is_err());
    std::fs::remove_dir_all(&data).ok();
}

#[test]
fn loss_falls_over_a_short_run() {
    let data = folder()
        .join("..")
        .join(format!("psic-train2-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..6u32 {
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 6) as u8, (i * 40) as u8])
        })
        .save(data.join(format!("p{i}.png")))
        .unwrap();
    }
    let mut t = Trainer::new(config(data.clone()), &Device::Cpu).unwrap();
    let losses: Vec<f32> = (0..40).map(|_| t.step().unwrap().loss).collect();
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[35..].iter().sum::<f32>() / 5.0;
    assert!(last < first, "mean loss {first} -> {last}");
    std::fs::remove_dir_all(&data).ok();
}

#[test]
fn ms_ssim_distortion_trains_and_needs_large_crops() {
    let data = folder()
        .join("..")
        .join(format!("psic-train-msssim-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4u32 {
        image::RgbImage::from_fn(192, 192, |x, y| {
            image::Rgb([(x + i * 30) as u8, (y * 2) as u8, ((x ^ y) + i * 20) as u8])
        })
        .save(data.join(format!("m{i}.png")))
        .unwrap();
    }
    let mut cfg = config(data.clone());
    cfg.distortion = psic::train::Distortion::MsSsim;
    cfg.lambda = 10.0;
    cfg.lr = 3e-3;
    cfg.lr_milestones.clear();
    // MS-SSIM's five scales need sides over 160 pixels: a 64-pixel crop is refused up front.
    let err = Trainer::new(cfg.clone(), &Device::Cpu)
        .expect_err("crop 64 with ms-ssim must be refused")
        .to_string();
    assert!(err.contains("161"), "{err}");
    cfg.crop = 192;
    cfg.batch = 1;
    let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
    let stats: Vec<_> = (0..16).map(|_| t.step().unwrap()).collect();
    let mean = |f: &dyn Fn(&psic::train::StepStats) -> f32, r: std::ops::Range<usize>| {
        stats[r.clone()].iter().map(f).sum::<f32>() / r.len() as f32
    };
    let (first, last) = (mean(&|s| s.loss, 0..4), mean(&|s| s.loss, 12..16));
    assert!(last < first, "mean loss {first} -> {last}");
    // The reconstructions improve too (the rate alone could lower the loss).
    let (p0, p1) = (mean(&|s| s.psnr, 0..4), mean(&|s| s.psnr, 12..16));
    assert!(p1 > p0, "PSNR {p0} -> {p1}");
    std::fs::remove_dir_all(&data).ok();
}
