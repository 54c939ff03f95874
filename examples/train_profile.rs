//! Runs N training steps of the training-step bench's model (N128/M192 scale hyperprior, batch
//! 8 of 128x128, AdamW), for profilers: `perf stat -e page-faults,task-clock
//! target/release/examples/train_profile 4`. It keeps the system allocator on purpose, so that
//! `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (or adding `psic::alloc::HugePages` as the global
//! allocator) shows what huge pages change.
use candle_core::{DType, Device};
use candle_nn::Optimizer;
use psic::backbone::{ScaleHyperprior, ScaleHyperpriorConfig};
use psic::init::{seeded_var_builder, SplitMix64};
use psic::train::{rd_forward, rd_loss, uniform_noise};
fn main() {
    let n: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("usage: train_profile STEPS");
            std::process::exit(2);
        }
    };
    psic::alloc::reuse_freed_memory();
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &dev);
    let model = ScaleHyperprior::new(vb, &ScaleHyperpriorConfig { n: 128, m: 192 }).unwrap();
    let mut rng = SplitMix64::new(1);
    let x = (uniform_noise(&[8, 3, 128, 128], &mut rng, &dev).unwrap() + 0.5).unwrap();
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), Default::default()).unwrap();
    for _ in 0..n {
        let out = rd_forward(&model, &x, None, &mut rng).unwrap();
        opt.backward_step(&rd_loss(&out, 0.01).unwrap()).unwrap();
    }
}
