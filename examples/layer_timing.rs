//! Times the training layers of the N128/M192 bench model one by one, forward and forward +
//! backward, at batch 8 (the sizes of a 128x128 training step): where a training step's time
//! goes. `cargo run --release --example layer_timing` prints median [min–max] of 5 runs.

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use psic::init::seeded_var_builder;
use psic::layers::{Conv2d, ConvTranspose2d, Gdn};

#[global_allocator]
static ALLOC: psic::alloc::HugePages = psic::alloc::HugePages;

/// Runs `f` once to warm up, then 5 times; prints the median and the range in ms.
fn time(name: &str, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<()> {
    f()?;
    let mut ms = Vec::with_capacity(5);
    for _ in 0..5 {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    println!("| {name} | {:.1} ms | {:.1}–{:.1} |", ms[2], ms[0], ms[4]);
    Ok(())
}

fn main() -> candle_core::Result<()> {
    psic::alloc::reuse_freed_memory();
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &dev);
    let build = |e: psic::Error| candle_core::Error::Msg(e.to_string());
    let gdn = Gdn::new(vb.pp("gdn"), 128, false).map_err(build)?;
    let conv1 = Conv2d::new(vb.pp("conv1"), 3, 128, 5, 2).map_err(build)?;
    let conv2 = Conv2d::new(vb.pp("conv2"), 128, 128, 5, 2).map_err(build)?;
    let deconv3 = ConvTranspose2d::new(vb.pp("deconv3"), 128, 128, 5, 2).map_err(build)?;
    let deconv4 = ConvTranspose2d::new(vb.pp("deconv4"), 128, 3, 5, 2).map_err(build)?;
    let input = |dims: (usize, usize, usize, usize)| -> candle_core::Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &dev)?)
    };
    let image = Tensor::rand(0f32, 1.0, (8, 3, 128, 128), &dev)?;
    let x64 = input((8, 128, 64, 64))?;
    let x32 = input((8, 128, 32, 32))?;
    let backward = |y: Tensor| y.sum_all()?.backward().map(|_| ());
    println!("| layer (batch 8) | median | range |\n| --- | --- | --- |");
    time("GDN 128 ch 64x64, forward", || {
        gdn.forward(&x64).map(|_| ())
    })?;
    time("GDN 128 ch 64x64, forward + backward", || {
        backward(gdn.forward(&x64)?)
    })?;
    time("conv 3->128 5x5/2 on the image, forward + backward", || {
        backward(conv1.forward(&image)?)
    })?;
    time("conv 128->128 5x5/2 64x64->32x32, forward", || {
        conv2.forward(&x64).map(|_| ())
    })?;
    time(
        "conv 128->128 5x5/2 64x64->32x32, forward + backward",
        || backward(conv2.forward(&x64)?),
    )?;
    time("deconv 128->128 5x5/2 32x32->64x64, forward", || {
        deconv3.forward(&x32).map(|_| ())
    })?;
    time(
        "deconv 128->128 5x5/2 32x32->64x64, forward + backward",
        || backward(deconv3.forward(&x32)?),
    )?;
    time(
        "deconv 128->3 5x5/2 64x64->128x128, forward + backward",
        || backward(deconv4.forward(&x64)?),
    )?;
    Ok(())
}
