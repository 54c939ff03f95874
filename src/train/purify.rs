//! Differentiable stand-ins of what a curious person does to a published image — JPEG
//! re-encoding and additive noise — so a shield trained through them survives the real ones, and
//! the training penalty on periodic artefacts (the share that [`crate::metrics::periodic_share`]
//! measures after decoding).
//!
//! **JPEG** ([`jpeg`]): baseline JPEG as libjpeg encodes it at a quality `q` — JFIF YCbCr, 4:2:0
//! chroma (2x2 means), 8x8 DCT blocks, the standard (Annex K) tables scaled by libjpeg's quality
//! rule — and decoded back (chroma upsampled by repetition, where libjpeg uses a triangular
//! filter). Rounding of the DCT coefficients is exact in the forward pass and the identity in the
//! backward pass (straight-through), so gradients see the quantiser's low-pass but not its zero
//! derivative.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Annex K luminance quantisation table (quality 50), row-major.
const LUMA_Q: [u8; 64] = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
    92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
];

/// Annex K chrominance quantisation table (quality 50), row-major.
const CHROMA_Q: [u8; 64] = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
];

/// A base table scaled to `quality` (1–100) by libjpeg's rule (`jpeg_quality_scaling` with
/// baseline clamping to 1..=255).
pub fn scaled_table(base: &[u8; 64], quality: u8) -> [f32; 64] {
    let q = quality.clamp(1, 100) as u32;
    let scale = if q < 50 { 5000 / q } else { 200 - 2 * q };
    let mut t = [0f32; 64];
    for (o, &b) in t.iter_mut().zip(base) {
        *o = ((b as u32 * scale + 50) / 100).clamp(1, 255) as f32;
    }
    t
}

/// The orthonormal 8-point DCT-II matrix `D` (`D·x` transforms a column).
fn dct_matrix(device: &Device) -> Result<Tensor> {
    let mut d = vec![0f32; 64];
    for k in 0..8 {
        let c = if k == 0 {
            (1.0f64 / 8.0).sqrt()
        } else {
            0.25f64.sqrt()
        };
        for n in 0..8 {
            d[k * 8 + n] =
                (c * ((2 * n + 1) as f64 * k as f64 * std::f64::consts::PI / 16.0).cos()) as f32;
        }
    }
    Ok(Tensor::from_vec(d, (8, 8), device)?)
}

/// Exact rounding forward, identity backward.
fn straight_through_round(x: &Tensor) -> Result<Tensor> {
    Ok((x + (x.round()? - x)?.detach())?)
}

/// JPEG's lossy core on one plane `[B, 1, h, w]` of level-shifted samples (`h`, `w` multiples of
/// 8): blockwise DCT, quantisation by `table`, dequantisation, inverse DCT.
fn quantise_plane(plane: &Tensor, table: &[f32; 64]) -> Result<Tensor> {
    let (b, _, h, w) = plane.dims4()?;
    let device = plane.device();
    let d = dct_matrix(device)?;
    let dt = d.t()?.contiguous()?;
    let q = Tensor::from_slice(table, (8, 8), device)?;
    let blocks = plane
        .reshape((b, h / 8, 8, w / 8, 8))?
        .permute((0, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((b * (h / 8) * (w / 8), 8, 8))?;
    let coef = d.broadcast_matmul(&blocks)?.broadcast_matmul(&dt)?;
    let levels = straight_through_round(&coef.broadcast_div(&q)?)?;
    let back = dt
        .broadcast_matmul(&levels.broadcast_mul(&q)?)?
        .broadcast_matmul(&d)?;
    Ok(back
        .reshape((b, h / 8, w / 8, 8, 8))?
        .permute((0, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((b, 1, h, w))?)
}

/// `[3, 3]` matrix applied over the channel axis of `[B, 3, H, W]`.
fn mix_channels(x: &Tensor, m: [[f32; 3]; 3]) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let flat: Vec<f32> = m.iter().flatten().copied().collect();
    let m = Tensor::from_vec(flat, (3, 3), x.device())?;
    Ok(m.broadcast_matmul(&x.reshape((b, c, h * w))?)?
        .reshape((b, c, h, w))?)
}

/// Baseline JPEG at `quality` (1–100), 4:2:0, encoded and decoded, of a `[B, 3, H, W]` batch in
/// `[0, 1]` whose sides are multiples of 16; differentiable (see the module docs).
pub fn jpeg(x: &Tensor, quality: u8) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    if c != 3 || h % 16 != 0 || w % 16 != 0 || h == 0 || w == 0 {
        return Err(Error::InvalidArgument(format!(
            "the JPEG stand-in takes [B, 3, H, W] with H and W multiples of 16, got {:?}",
            x.dims()
        )));
    }
    let x = x.to_dtype(DType::F32)?;
    // JFIF RGB -> YCbCr on 0..255, all three level-shifted by -128.
    let ycc = mix_channels(
        &(x * 255.0)?,
        [
            [0.299, 0.587, 0.114],
            [-0.168_736, -0.331_264, 0.5],
            [0.5, -0.418_688, -0.081_312],
        ],
    )?;
    let y = (ycc.narrow(1, 0, 1)? - 128.0)?;
    let luma = quantise_plane(&y, &scaled_table(&LUMA_Q, quality))?;
    let chroma_table = scaled_table(&CHROMA_Q, quality);
    let mut planes = vec![luma];
    for ch in 1..3 {
        let sub = ycc.narrow(1, ch, 1)?.avg_pool2d(2)?;
        let q = quantise_plane(&sub, &chroma_table)?;
        planes.push(q.upsample_nearest2d(h, w)?);
    }
    let ycc = Tensor::cat(&planes, 1)?;
    let rgb = mix_channels(
        &ycc,
        [
            [1.0, 0.0, 1.402],
            [1.0, -0.344_136, -0.714_136],
            [1.0, 1.772, 0.0],
        ],
    )?;
    Ok(((rgb + 128.0)? / 255.0)?.clamp(0f32, 1f32)?)
}

/// `x` plus Gaussian noise of standard deviation `sigma` (in `[0, 1]` units), clamped to
/// `[0, 1]`; the noise comes from `normal`, a source of standard normal numbers (the trainer's
/// seeded generator, so a resumed run draws the same noise).
pub fn add_noise(x: &Tensor, sigma: f64, normal: &mut dyn FnMut() -> f64) -> Result<Tensor> {
    let n: Vec<f32> = (0..x.elem_count())
        .map(|_| (normal() * sigma) as f32)
        .collect();
    let noise = Tensor::from_vec(n, x.dims(), x.device())?.to_dtype(x.dtype())?;
    Ok((x + noise)?.clamp(0f32, 1f32)?)
}

/// Mean energy per sample of the part of `e` (`[B, C, H, W]`, sides multiples of `period`)
/// that repeats with `period` pixels down the columns or along the rows: the energy of its 2-D
/// DFT on the rows `u` and columns `v` that are multiples of `H/period` and `W/period` (DC
/// included), divided by `B·C·H·W`. Computed exactly as a projection: the mean over the
/// repetitions of each `period`-row (column) band is the signal's part on those frequencies
/// (Parseval), and the union of the two sets is `P_v + P_h − P_vh`.
pub fn periodic_energy(e: &Tensor, period: usize) -> Result<Tensor> {
    let (b, c, h, w) = e.dims4()?;
    if period == 0 || h % period != 0 || w % period != 0 {
        return Err(Error::InvalidArgument(format!(
            "periodic energy needs sides that are multiples of {period}, got {h}x{w}"
        )));
    }
    let (rh, rw) = (h / period, w / period);
    let pv = e.reshape((b, c, rh, period, w))?.mean(2)?;
    let ph = e.reshape((b, c, h, rw, period))?.mean(3)?;
    let pvh = pv.reshape((b, c, period, rw, period))?.mean(3)?;
    let ev = (pv.sqr()?.sum_all()? * rh as f64)?;
    let eh = (ph.sqr()?.sum_all()? * rw as f64)?;
    let evh = (pvh.sqr()?.sum_all()? * (rh * rw) as f64)?;
    Ok((((ev + eh)? - evh)? / (b * c * h * w) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(b: usize, h: usize, w: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..b * 3 * h * w)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let smooth = ((i % w) as f32 / w as f32 + ((i / w) % h) as f32 / h as f32) / 2.0;
                0.7 * smooth + 0.3 * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect();
        Tensor::from_vec(v, (b, 3, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn tables_follow_libjpeg_scaling() {
        assert_eq!(scaled_table(&LUMA_Q, 50)[0], 16.0);
        assert_eq!(scaled_table(&LUMA_Q, 75)[0], 8.0);
        assert_eq!(scaled_table(&LUMA_Q, 90)[63], 20.0);
        assert_eq!(scaled_table(&LUMA_Q, 100)[0], 1.0);
        assert_eq!(scaled_table(&CHROMA_Q, 10)[63], 255.0);
    }

    #[cfg(feature = "eval")]
    #[test]
    fn jpeg_stand_in_is_close_to_the_real_codec_and_monotone_in_quality() {
        // psic's libjpeg-equivalent 4:2:0 baseline as the real codec.
        let x = image(1, 32, 48, 7);
        let img = crate::image_io::tensor_to_image(&x).unwrap();
        let mut errs = Vec::new();
        for q in [50u8, 90] {
            let real = crate::baseline::jpeg_roundtrip(&img, q).unwrap().decoded;
            let ours = crate::image_io::tensor_to_image(&jpeg(&x, q).unwrap()).unwrap();
            let d_real = crate::metrics::psnr(&img, &real).unwrap();
            let d_ours = crate::metrics::psnr(&img, &ours).unwrap();
            let between = crate::metrics::psnr(&real, &ours).unwrap();
            // Same distortion level within 2.5 dB, and far closer to the real decode than either
            // is to the original (they discard the same detail).
            assert!((d_real - d_ours).abs() < 2.5, "q{q}: {d_real} vs {d_ours}");
            assert!(
                between > d_real.min(d_ours),
                "q{q}: {between} {d_real} {d_ours}"
            );
            errs.push(d_ours);
        }
        assert!(errs[1] > errs[0] + 0.5, "{errs:?}");
    }

    #[test]
    fn jpeg_gradients_flow_and_bad_shapes_are_refused() {
        let v = candle_core::Var::from_tensor(&image(2, 16, 32, 3)).unwrap();
        let g = jpeg(v.as_tensor(), 75)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = g.get(v.as_tensor()).unwrap();
        let total: f32 = grad.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(total > 0.0);
        assert!(jpeg(&image(1, 20, 32, 1), 75).is_err());
    }

    #[test]
    fn periodic_energy_matches_a_direct_dft() {
        let (h, w, p) = (32usize, 48usize, 16usize);
        let x = image(1, h, w, 11).narrow(1, 0, 1).unwrap();
        let got: f32 = periodic_energy(&x, p).unwrap().to_scalar().unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut energy = 0f64;
        for u in 0..h {
            for k in 0..w {
                if u % (h / p) != 0 && k % (w / p) != 0 {
                    continue;
                }
                let (mut re, mut im) = (0f64, 0f64);
                for y in 0..h {
                    for xx in 0..w {
                        let a = -2.0
                            * std::f64::consts::PI
                            * ((u * y) as f64 / h as f64 + (k * xx) as f64 / w as f64);
                        re += v[y * w + xx] as f64 * a.cos();
                        im += v[y * w + xx] as f64 * a.sin();
                    }
                }
                energy += re * re + im * im;
            }
        }
        // Parseval: sum |X|^2 = N * sum |x|^2, so the mean energy is sum |X|^2 / N^2.
        let n = (h * w) as f64;
        let want = energy / (n * n);
        assert!(
            ((got as f64) - want).abs() < 1e-5 * want.max(1e-3),
            "{got} vs {want}"
        );
    }

    #[test]
    fn noise_has_the_requested_spread() {
        let x = (Tensor::ones((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap();
        let mut rng = crate::init::SplitMix64::new(5);
        let mut normal = || rng.next_normal();
        let y = add_noise(&x, 0.02, &mut normal).unwrap();
        let d: Vec<f32> = (y - x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let var = d.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.002, "{}", var.sqrt());
    }
}
