//! Small conversions between candle tensors and plain vectors, with typed errors.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Flattens any float tensor into `Vec<f32>` (NCHW order). Converts on the CPU: CUDA has no
/// kernels for some casts (e.g. from `i32`).
pub(crate) fn tensor_to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// Reads an integer buffer stored either as an integer tensor or as exact float values (as some
/// converted CompressAI checkpoints do). Non-integral or out-of-range values are an error.
pub(crate) fn int_buffer(t: &Tensor) -> Result<Vec<i32>> {
    let vals = t
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    vals.iter()
        .map(|&v| {
            if v.fract() == 0.0 && v >= i32::MIN as f64 && v <= i32::MAX as f64 {
                Ok(v as i32)
            } else {
                Err(Error::Model(format!(
                    "integer buffer holds the non-integer value {v}"
                )))
            }
        })
        .collect()
}

/// Dimension `i` of tensor `name` in a state dict, or an error naming the missing tensor.
pub(crate) fn state_dim(
    tensors: &std::collections::HashMap<String, Tensor>,
    name: &str,
    i: usize,
) -> Result<usize> {
    tensors
        .get(name)
        .and_then(|t| t.dims().get(i).copied())
        .ok_or_else(|| Error::Model(format!("checkpoint lacks {name}")))
}

/// `vb` reading onto the CPU: integer buffers are read and converted there (CUDA has no kernels
/// for casts from `i32`).
pub(crate) fn cpu_view<'a>(vb: &candle_nn::VarBuilder<'a>) -> candle_nn::VarBuilder<'a> {
    vb.clone().set_device(Device::Cpu)
}

/// Runs `f(plane_index, chunk, scratch)` over the `chunk`-sized pieces of `out`, split over
/// threads; each thread gets its own `scratch` buffer of `scratch_len` floats.
pub(crate) fn par_planes(
    out: &mut [f32],
    chunk: usize,
    scratch_len: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    let chunk = chunk.max(1);
    let planes = out.len() / chunk;
    let threads = candle_core::utils::get_num_threads().clamp(1, planes.max(1));
    let per_thread = planes.div_ceil(threads).max(1);
    let run = |first: usize, group: &mut [f32]| {
        let mut scratch = vec![0f32; scratch_len];
        for (i, o) in group.chunks_mut(chunk).enumerate() {
            f(first + i, o, &mut scratch);
        }
    };
    if threads <= 1 {
        run(0, out);
        return;
    }
    std::thread::scope(|scope| {
        for (t, group) in out.chunks_mut(chunk * per_thread).enumerate() {
            let run = &run;
            scope.spawn(move || run(t * per_thread, group));
        }
    });
}

/// Runs `worker` over `0..items` split into one contiguous range per thread (candle's thread
/// count, at most `items`; the calling thread takes the first) and returns the results in range
/// order. Reductions use it rather than [`on_threads`]: a fixed split sums in the same order on
/// every run, so training is bit-reproducible for a given thread count (resuming from a
/// checkpoint retraces the uninterrupted run exactly).
pub(crate) fn on_ranges<R: Send>(
    items: usize,
    worker: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    let threads = candle_core::utils::get_num_threads().clamp(1, items.max(1));
    let range = |t: usize| t * items / threads..(t + 1) * items / threads;
    if threads == 1 {
        return vec![worker(0..items)];
    }
    std::thread::scope(|scope| {
        let worker = &worker;
        let handles: Vec<_> = (1..threads)
            .map(|t| scope.spawn(move || worker(range(t))))
            .collect();
        let mut all = vec![worker(range(0))];
        all.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("worker thread panicked")),
        );
        all
    })
}

/// Runs `worker` on up to `items` threads (candle's thread count, at least one; the calling
/// thread is one of them) and returns each run's result. The workers share out the items
/// themselves (an atomic counter, typically).
pub(crate) fn on_threads<R: Send>(items: usize, worker: impl Fn() -> R + Sync) -> Vec<R> {
    let threads = candle_core::utils::get_num_threads().clamp(1, items.max(1));
    if threads == 1 {
        return vec![worker()];
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads).map(|_| scope.spawn(&worker)).collect();
        let mut all = vec![worker()];
        all.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("worker thread panicked")),
        );
        all
    })
}

/// The f32 data of a contiguous CPU tensor, for custom ops (`what` names it in errors).
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        candle_core::CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what} must be f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The f32 data of a CPU tensor's storage (from `Tensor::storage_and_layout`), for the backward
/// passes of custom ops (`what` names it in errors).
pub(crate) fn cpu_f32<'a>(
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(cpu) => contiguous_f32(cpu, l, what),
        _ => candle_core::bail!("{what} must be on the CPU"),
    }
}
