//! Criterion benchmarks: encode and decode of the 768x512 CompressAI fixture image with the
//! fixture model (ScaleHyperprior N128/M192), and the rANS coder alone on that image's y symbols.
//!
//! `cargo bench --bench codec` (needs `../shared/fixtures/compressai`; skips with a message
//! otherwise).

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use psic::entropy::{EntropyCoder, RansCoder};
use psic::{Codec, ModelFile, Precision};

mod common {
    pub mod train_step;
}

// Large tensor buffers get transparent huge pages (psic::alloc::HugePages): fewer page faults.
#[global_allocator]
static ALLOC: psic::alloc::HugePages = psic::alloc::HugePages;

fn fixture() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/compressai");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipped: {} not found", dir.display());
        None
    }
}

fn benches(c: &mut Criterion) {
    let Some(dir) = fixture() else { return };
    let model = ModelFile::import(
        dir.join("hyperprior_128_192.safetensors"),
        None,
        &Device::Cpu,
    )
    .expect("fixture model");
    let img = psic::image_io::load_image(dir.join("test768x512.png")).expect("image");
    let codec_at = |p: Precision| {
        Codec::from_model_file(&model, &Device::Cpu)
            .and_then(|c| c.with_precision(p))
            .expect("codec")
    };
    let codec = codec_at(Precision::F32);
    let bytes = codec.encode(&img).expect("encode");

    // f32 and bf16 transforms side by side, alternating (bf16 only where the CPU has it).
    let mut g = c.benchmark_group("codec_768x512_n128_m192");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for p in precisions() {
        let codec = codec_at(p);
        g.bench_function(format!("encode_{p}"), |b| {
            b.iter(|| codec.encode(&img).unwrap())
        });
        g.bench_function(format!("decode_{p}"), |b| {
            b.iter(|| codec.decode(&bytes).unwrap())
        });
    }
    g.finish();

    // The coder alone, on the real symbols and tables of this image.
    let latent = codec.decode_latent(&bytes).expect("latent");
    let gc = codec.backbone().gaussian_conditional();
    let indexes = &latent.y_indexes;
    let symbols = gc.symbols(&latent.y_hat, None).unwrap();
    let y_string = &latent.stream.strings[0];
    let mut g = c.benchmark_group("rans_y_symbols");
    g.throughput(Throughput::Elements(symbols.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| {
            RansCoder
                .encode_with_indexes(&symbols, indexes, gc.tables())
                .unwrap()
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            RansCoder
                .decode_with_indexes(y_string, indexes, gc.tables())
                .unwrap()
        })
    });
    g.finish();
}

/// One training step (forward with noise quantisation, backward, AdamW update) of a fresh
/// N128/M192 scale hyperprior on a batch of 8 random 128x128 crops. Needs no fixture.
/// f32 and, where the CPU has AVX512-BF16, bf16 transforms.
fn train_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("train_step_n128_m192_b8_128x128");
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    for p in precisions() {
        let mut step = common::train_step::TrainStep::with_precision(p);
        g.bench_function(format!("forward_backward_adamw_{p}"), |b| {
            b.iter(|| step.run())
        });
    }
    g.finish();
}

/// The precisions to time: f32, and bf16 where the CPU runs the AVX512-BF16 kernel (its
/// portable emulation is slower than f32 and not timed).
fn precisions() -> Vec<Precision> {
    let mut out = vec![Precision::F32];
    if Precision::bf16_supported() {
        out.push(Precision::Bf16);
    } else {
        eprintln!("bf16 not timed: this CPU has no AVX512-BF16");
    }
    out
}

criterion_group!(codec_benches, benches, train_step);
criterion_main!(codec_benches);
