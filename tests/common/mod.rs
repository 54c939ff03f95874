//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `../shared/fixtures/<name>` if it exists; otherwise prints why the test is skipped.
pub fn fixture_dir(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(name);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: {} not found (the shared fixtures are absent)",
            dir.display()
        );
        None
    }
}

/// A CompressAI conformance fixture (`../shared/fixtures/<name>`): the imported checkpoint, an
/// f32 codec of it (CompressAI's transforms are f32: byte-identical strings need f32 ones; bf16
/// would change some y symbols), the reference intermediates, `compress()`'s y and z strings
/// and the 768x512 test image.
pub struct CompressAiFixture {
    pub model: psic::ModelFile,
    pub codec: psic::Codec,
    pub refs: HashMap<String, Tensor>,
    pub y_string: Vec<u8>,
    pub z_string: Vec<u8>,
    pub image: image::RgbImage,
}

/// Loads the fixture `name` whose checkpoint is `checkpoint` and whose `test_strings.bin` holds a
/// y string of `y_len` bytes followed by the z string; `None` (skipped) without the fixtures.
pub fn compressai_fixture(name: &str, checkpoint: &str, y_len: usize) -> Option<CompressAiFixture> {
    let dir = fixture_dir(name)?;
    let model = psic::ModelFile::import(dir.join(checkpoint), None, &Device::Cpu)
        .expect("import CompressAI checkpoint");
    let codec = psic::Codec::from_model_file(&model, &Device::Cpu)
        .unwrap()
        .with_precision(psic::Precision::F32)
        .unwrap();
    let strings = std::fs::read(dir.join("test_strings.bin")).unwrap();
    let (y, z) = strings.split_at(y_len);
    let image = dir.join("../compressai/test768x512.png");
    Some(CompressAiFixture {
        model,
        codec,
        refs: load_tensors(&dir.join("test_intermediates.safetensors")),
        y_string: y.to_vec(),
        z_string: z.to_vec(),
        image: psic::image_io::load_image(image).unwrap(),
    })
}

/// Loads every tensor of a safetensors file onto the CPU.
pub fn load_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("fixture tensors load")
}

/// Flattens a tensor to f32.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Flattens an integer tensor to i32.
pub fn i32s(t: &Tensor) -> Vec<i32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as i32)
        .collect()
}

/// max |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a - b| / max |b|.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f32::max).max(1e-12);
    max_abs_diff(a, b) / scale
}

/// A tiny randomly initialised scale hyperprior (N=8, M=12) with computed CDF tables: fast
/// enough for hundreds of decodes, and needs no fixture.
pub fn tiny_codec(seed: u64) -> psic::Codec {
    use psic::backbone::{ScaleHyperprior, ScaleHyperpriorConfig};
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = psic::init::seeded_var_builder(&varmap, seed, DType::F32, &dev);
    let mut hp = ScaleHyperprior::new(vb, &ScaleHyperpriorConfig { n: 8, m: 12 }).unwrap();
    hp.entropy_bottleneck_mut().update().unwrap();
    let mut fp = [0u8; 16];
    fp[..8].copy_from_slice(&seed.to_le_bytes());
    psic::Codec::new(Box::new(hp), fp)
}

/// A deterministic test image with texture and colour.
pub fn test_image(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + y * 3) as u8,
            ((x ^ y) * 5) as u8,
            (128.0 + 100.0 * ((x as f32) * 0.2).sin() * ((y as f32) * 0.15).cos()) as u8,
        ])
    })
}

/// xorshift64*: a tiny deterministic generator for fuzz-style tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
