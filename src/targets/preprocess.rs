//! Differentiable image preprocessing for semantic targets: antialiased bicubic resizing and
//! centre cropping, built only from candle tensor ops so gradients flow back to the pixels.
//!
//! Images are `[B, C, H, W]` float tensors. Resizing is two matrix products with constant
//! interpolation matrices (`x · Wᵀ` along the width, then `H · x` along the height), so it works
//! on any device and backpropagates like any matmul.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The bicubic kernel with `a = -0.5` (PIL's and torchvision's antialiased bicubic).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The `[out, in]` matrix of an antialiased bicubic resampling from `input` to `output` samples,
/// computed the way PIL's `ImagingResample` does: sample centres at `(i + 0.5) · in/out`, the
/// kernel support widened by the down-scaling factor (antialiasing), taps outside the image
/// dropped and each row's weights normalised to sum to one.
pub fn bicubic_matrix(input: usize, output: usize) -> Result<Vec<f32>> {
    if input == 0 || output == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot resize {input} samples to {output}"
        )));
    }
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let center = (o as f64 + 0.5) * scale;
        // `as usize` truncates toward zero and saturates at 0, as PIL's int() then max(…, 0).
        let lo = (center - support + 0.5).max(0.0) as usize;
        let hi = ((center + support + 0.5) as usize).min(input);
        let weights: Vec<f64> = (lo..hi)
            .map(|i| bicubic((i as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = weights.iter().sum();
        for (i, w) in (lo..hi).zip(weights) {
            m[o * input + i] = if total != 0.0 {
                (w / total) as f32
            } else {
                0.0
            };
        }
    }
    Ok(m)
}

/// Resizes `[B, C, H, W]` to `[B, C, out_h, out_w]` with antialiased bicubic interpolation
/// (PIL's `Image.resize(..., BICUBIC)` / torchvision's `Resize(antialias=True)` kernels, but
/// without rounding to 8 bits in between). Values are not clamped: bicubic may overshoot the
/// input range slightly near edges. Same size in, same tensor out.
pub fn resize_bicubic(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dev = x.device();
    let dtype = x.dtype();
    let mut y = x.clone();
    if w != out_w {
        let mw = matrix(w, out_w, dtype, dev)?; // [out_w, w]
        y = y.broadcast_matmul(&mw.t()?)?;
    }
    if h != out_h {
        let mh = matrix(h, out_h, dtype, dev)?; // [out_h, h]
        y = mh.broadcast_matmul(&y)?;
    }
    Ok(y)
}

fn matrix(input: usize, output: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(bicubic_matrix(input, output)?, (output, input), dev)?.to_dtype(dtype)?)
}

/// The output size of torchvision's `Resize(short)` for an `h`x`w` image: the shorter side
/// becomes `short`, the longer one `floor(short · long / short_side)` (aspect ratio kept).
pub fn shorter_side_size(h: usize, w: usize, short: usize) -> (usize, usize) {
    if h <= w {
        (short, short * w / h.max(1))
    } else {
        (short * h / w.max(1), short)
    }
}

/// Resizes so the shorter side is `short` (see [`shorter_side_size`]); a no-op when it already is.
pub fn resize_shorter_side(x: &Tensor, short: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = shorter_side_size(h, w, short);
    resize_bicubic(x, oh, ow)
}

/// Offset of a centred crop of `crop` out of `size`, as torchvision's `CenterCrop`:
/// `round((size - crop) / 2)` with Python's round-half-to-even.
pub fn center_crop_offset(size: usize, crop: usize) -> usize {
    let diff = size.saturating_sub(crop);
    let half = diff / 2;
    if diff % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// The central `h`x`w` crop of `[B, C, H, W]` (a `narrow`, so gradients flow).
pub fn center_crop(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if ih < h || iw < w {
        return Err(Error::InvalidArgument(format!(
            "cannot crop {h}x{w} out of a {ih}x{iw} image"
        )));
    }
    Ok(x.narrow(2, center_crop_offset(ih, h), h)?
        .narrow(3, center_crop_offset(iw, w), w)?)
}

/// Checks that `images` is a `[B, 3, H, W]` batch (the input of every target's `preprocess`).
pub fn check_rgb(images: &Tensor) -> Result<()> {
    let (_, c, _, _) = images.dims4()?;
    if c != 3 {
        return Err(crate::Error::InvalidArgument(format!(
            "expected [B, 3, H, W] images, got {:?}",
            images.dims()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn rows_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(256, 224), (256, 274), (768, 256), (5, 13), (13, 5), (7, 7)] {
            let m = bicubic_matrix(i, o).unwrap();
            for row in m.chunks(i) {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{i}->{o}: row sums to {s}");
            }
        }
        let m = bicubic_matrix(6, 6).unwrap();
        for r in 0..6 {
            for c in 0..6 {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((m[r * 6 + c] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn downscaling_by_two_is_the_widened_kernel() {
        // 8 -> 4: output 0 is centred at 1.0, support 4, kernel at x/2: taps 0..5 (PIL's bounds).
        let m = bicubic_matrix(8, 4).unwrap();
        let raw: Vec<f64> = (0..5)
            .map(|i| bicubic((i as f64 - 1.0 + 0.5) / 2.0))
            .collect();
        let total: f64 = raw.iter().sum();
        for (i, r) in raw.iter().enumerate() {
            assert!((m[i] as f64 - r / total).abs() < 1e-6);
        }
        assert!(m[5..8].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn constants_stay_constant_and_ramps_stay_ramps() {
        let dev = Device::Cpu;
        let c = (Tensor::ones((2, 3, 10, 17), DType::F32, &dev).unwrap() * 0.3).unwrap();
        let y = resize_bicubic(&c, 23, 6).unwrap();
        assert_eq!(y.dims(), &[2, 3, 23, 6]);
        assert!(vals(&y).iter().all(|v| (v - 0.3).abs() < 1e-5));
        // A horizontal ramp up-sampled 2x stays a ramp away from the borders.
        let ramp = Tensor::arange(0f32, 16.0, &dev)
            .unwrap()
            .reshape((1, 1, 1, 16))
            .unwrap()
            .repeat((1, 1, 4, 1))
            .unwrap();
        let y = resize_bicubic(&ramp, 4, 32).unwrap();
        let row: Vec<f32> = vals(&y)[..32].to_vec();
        for (x, v) in row.iter().enumerate().take(28).skip(4) {
            let want = (x as f32 + 0.5) / 2.0 - 0.5;
            assert!((v - want).abs() < 1e-4, "x={x}: {v} vs {want}");
        }
    }

    #[test]
    fn crop_offsets_follow_torchvision() {
        assert_eq!(center_crop_offset(256, 224), 16);
        assert_eq!(center_crop_offset(225, 224), 0); // round(0.5) = 0
        assert_eq!(center_crop_offset(227, 224), 2); // round(1.5) = 2
        assert_eq!(center_crop_offset(229, 224), 2); // round(2.5) = 2
        assert_eq!(shorter_side_size(256, 256, 274), (274, 274));
        assert_eq!(shorter_side_size(512, 768, 256), (256, 384));
        assert_eq!(shorter_side_size(768, 512, 256), (384, 256));
        let x = Tensor::arange(0f32, 36.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 6, 6))
            .unwrap();
        let c = center_crop(&x, 2, 4).unwrap();
        assert_eq!(vals(&c), vec![13., 14., 15., 16., 19., 20., 21., 22.]);
        assert!(center_crop(&x, 7, 2).is_err());
    }

    #[test]
    fn resize_backpropagates() {
        let x = candle_core::Var::from_tensor(
            &Tensor::rand(0f32, 1.0, (1, 3, 9, 12), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = resize_bicubic(x.as_tensor(), 5, 7).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        // The column sums of the matrices: every pixel contributes, total mass 5*7 per channel.
        let total: f32 = vals(gx).iter().sum();
        assert!((total - 3.0 * 35.0).abs() < 1e-3, "{total}");
    }
}
