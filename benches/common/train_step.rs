//! The training step measured by `benches/codec.rs` (criterion) and run by
//! `examples/train_profile.rs` (for profilers): shared so both time the same work.

use candle_core::{DType, Device};
use candle_nn::Optimizer;
use psic::backbone::{ScaleHyperprior, ScaleHyperpriorConfig};
use psic::init::{seeded_var_builder, SplitMix64};
use psic::train::{rd_forward, rd_loss, uniform_noise};
use psic::LicBackbone;

/// A fresh N128/M192 scale hyperprior, a batch of 8 random 128x128 crops and AdamW.
pub struct TrainStep {
    model: ScaleHyperprior,
    x: candle_core::Tensor,
    opt: candle_nn::AdamW,
    rng: SplitMix64,
}

impl TrainStep {
    /// Builds the model and the batch (as `psic train` does, freed tensor buffers are reused by
    /// the next step: `psic::alloc::reuse_freed_memory`). The transforms train at the default
    /// precision ([`psic::Precision::auto`]).
    #[allow(dead_code)] // examples/train_profile.rs; the bench names its precisions
    pub fn new() -> Self {
        Self::with_precision(psic::Precision::auto())
    }

    /// As [`new`](Self::new), with the analysis and synthesis convolutions at `precision`.
    pub fn with_precision(precision: psic::Precision) -> Self {
        psic::alloc::reuse_freed_memory();
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = seeded_var_builder(&varmap, 0, DType::F32, &dev);
        let mut model =
            ScaleHyperprior::new(vb, &ScaleHyperpriorConfig { n: 128, m: 192 }).unwrap();
        model.set_transform_precision(precision).unwrap();
        let mut rng = SplitMix64::new(1);
        let x = (uniform_noise(&[8, 3, 128, 128], &mut rng, &dev).unwrap() + 0.5).unwrap();
        let opt = candle_nn::AdamW::new(varmap.all_vars(), Default::default()).unwrap();
        Self { model, x, opt, rng }
    }

    /// One step: forward with noise quantisation, backward, AdamW update.
    pub fn run(&mut self) {
        let out = rd_forward(&self.model, &self.x, None, &mut self.rng).unwrap();
        self.opt
            .backward_step(&rd_loss(&out, 0.01).unwrap())
            .unwrap();
    }
}
