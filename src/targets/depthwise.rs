//! Depthwise convolution with TensorFlow "same" padding, fast on the CPU and differentiable.
//!
//! candle's grouped `conv2d` runs one convolution per channel, which for the hundreds of
//! channels of an MBConv block is slow on the CPU. Here:
//! - on the CPU (f32), a custom op: per channel plane, the zero-padded plane is built once and
//!   every kernel tap adds `w · (shifted row)` into the output row (a vectorisable axpy at
//!   stride 1); planes are split over threads. Its backward pass is two more such ops (input
//!   gradient: the taps scattered back; weight gradient: tap-wise dot products), computed only
//!   for the arguments that need a gradient;
//! - elsewhere (CUDA, Metal, other dtypes), [`depthwise_reference`]: the same sum over taps
//!   written with tensor ops on shifted views, which autograd differentiates.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::tensor_util::{contiguous_f32 as f32_slice, par_planes};
use crate::{Error, Result};

/// TF "same" padding of a side of length `n` for kernel `k`, stride `s`: (before, after), the
/// total being `max((ceil(n/s) - 1)·s + k - n, 0)` and the smaller half going before.
pub(crate) fn same_padding(n: usize, k: usize, s: usize) -> (usize, usize) {
    let total = ((n.div_ceil(s) - 1) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// Sizes of one depthwise convolution.
///
/// The zero-padded plane is stored by column phase: padded column `j` of row `r` lives at
/// `r·s·wps + (j mod s)·wps + j/s`, so the `wo` inputs a tap reads for one output row are one
/// contiguous slice at every stride (see [`Geometry::tap`]).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    top: usize,
    left: usize,
    ho: usize,
    wo: usize,
    /// Rows and columns of the padded plane that the kernel reads: `(ho - 1)·s + k`.
    hp: usize,
    wp: usize,
    /// Columns per phase: `ceil(wp / s)`.
    wps: usize,
}

impl Geometry {
    fn new(dims: (usize, usize, usize, usize), k: usize, s: usize) -> Self {
        let (b, c, h, w) = dims;
        let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
        let wp = (wo.max(1) - 1) * s + k;
        Self {
            b,
            c,
            h,
            w,
            k,
            s,
            top: same_padding(h, k, s).0,
            left: same_padding(w, k, s).0,
            ho,
            wo,
            hp: (ho.max(1) - 1) * s + k,
            wp,
            wps: wp.div_ceil(s),
        }
    }

    /// Floats in a padded plane.
    fn pad_len(&self) -> usize {
        self.hp * self.s * self.wps
    }

    /// Offset in the padded plane of padded column `j` of row `r`.
    fn at(&self, r: usize, j: usize) -> usize {
        (r * self.s + j % self.s) * self.wps + j / self.s
    }

    /// Offset of the `wo` inputs tap `(ky, kx)` reads for output row `y`.
    fn tap(&self, y: usize, ky: usize, kx: usize) -> usize {
        self.at(self.s * y + ky, kx)
    }

    /// Copies input plane `x` (`h`x`w`) into the padded plane `pad`, zeroing the rest.
    fn pad_plane(&self, x: &[f32], pad: &mut [f32]) {
        pad.fill(0.0);
        let n = self.w.min(self.wp - self.left);
        for i in 0..self.h.min(self.hp - self.top) {
            let src = &x[i * self.w..i * self.w + n];
            if self.s == 1 {
                let d = self.at(i + self.top, self.left);
                pad[d..d + n].copy_from_slice(src);
            } else {
                for (j, v) in src.iter().enumerate() {
                    pad[self.at(i + self.top, j + self.left)] = *v;
                }
            }
        }
    }

    /// The inverse of [`pad_plane`](Self::pad_plane): the input-sized part of a padded plane
    /// into `x` (`h`x`w`), zeros where the plane does not reach.
    fn unpad_plane(&self, pad: &[f32], x: &mut [f32]) {
        x.fill(0.0);
        let n = self.w.min(self.wp - self.left);
        for i in 0..self.h.min(self.hp - self.top) {
            let dst = &mut x[i * self.w..i * self.w + n];
            if self.s == 1 {
                let d = self.at(i + self.top, self.left);
                dst.copy_from_slice(&pad[d..d + n]);
            } else {
                for (j, v) in dst.iter_mut().enumerate() {
                    *v = pad[self.at(i + self.top, j + self.left)];
                }
            }
        }
    }
}

/// Forward op: `(x [B,C,H,W], w [C, k·k]) -> [B,C,Ho,Wo]` (no bias).
#[derive(Debug, Clone, Copy)]
struct DepthwiseOp {
    k: usize,
    s: usize,
}

impl CustomOp2 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "psic-depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.shape().dims4()?, self.k, self.s);
        let x = f32_slice(s1, l1, "depthwise conv: input")?;
        let wt = f32_slice(s2, l2, "depthwise conv: kernel")?;
        let (k, kk) = (g.k, g.k * g.k);
        let mut out = vec![0f32; g.b * g.c * g.ho * g.wo];
        par_planes(&mut out, g.ho * g.wo, g.pad_len(), |p, o, pad| {
            g.pad_plane(&x[p * g.h * g.w..(p + 1) * g.h * g.w], pad);
            let wc = &wt[(p % g.c) * kk..(p % g.c + 1) * kk];
            for (y, orow) in o.chunks_mut(g.wo).enumerate() {
                for ky in 0..k {
                    for kx in 0..k {
                        let wv = wc[ky * k + kx];
                        let t = g.tap(y, ky, kx);
                        for (a, v) in orow.iter_mut().zip(&pad[t..t + g.wo]) {
                            *a += wv * v;
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let g = Geometry::new(x.dims4()?, self.k, self.s);
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &InputGradOp(g))?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &WeightGradOp(g))?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// Input gradient: `(dy [B,C,Ho,Wo], w [C,k·k]) -> dx [B,C,H,W]`.
struct InputGradOp(Geometry);

impl CustomOp2 for InputGradOp {
    fn name(&self) -> &'static str {
        "psic-depthwise-conv-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let dy = f32_slice(s1, l1, "depthwise conv: gradient")?;
        let wt = f32_slice(s2, l2, "depthwise conv: kernel")?;
        let (k, kk) = (g.k, g.k * g.k);
        let mut dx = vec![0f32; g.b * g.c * g.h * g.w];
        par_planes(&mut dx, g.h * g.w, g.pad_len(), |p, o, pad| {
            pad.fill(0.0);
            let gy = &dy[p * g.ho * g.wo..(p + 1) * g.ho * g.wo];
            let wc = &wt[(p % g.c) * kk..(p % g.c + 1) * kk];
            for (y, grow) in gy.chunks(g.wo).enumerate() {
                for ky in 0..k {
                    for kx in 0..k {
                        let wv = wc[ky * k + kx];
                        let t = g.tap(y, ky, kx);
                        for (a, v) in pad[t..t + g.wo].iter_mut().zip(grow) {
                            *a += wv * v;
                        }
                    }
                }
            }
            g.unpad_plane(pad, o);
        });
        Ok((CpuStorage::F32(dx), Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// Weight gradient: `(x [B,C,H,W], dy [B,C,Ho,Wo]) -> dw [C, k·k]`.
struct WeightGradOp(Geometry);

impl CustomOp2 for WeightGradOp {
    fn name(&self) -> &'static str {
        "psic-depthwise-conv-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s1, l1, "depthwise conv: input")?;
        let dy = f32_slice(s2, l2, "depthwise conv: gradient")?;
        let (k, kk) = (g.k, g.k * g.k);
        let mut dw = vec![0f32; g.c * kk];
        par_planes(&mut dw, kk, g.pad_len(), |c, acc, pad| {
            for b in 0..g.b {
                let p = b * g.c + c;
                g.pad_plane(&x[p * g.h * g.w..(p + 1) * g.h * g.w], pad);
                let gy = &dy[p * g.ho * g.wo..(p + 1) * g.ho * g.wo];
                for (y, grow) in gy.chunks(g.wo).enumerate() {
                    for ky in 0..k {
                        for kx in 0..k {
                            let t = g.tap(y, ky, kx);
                            let dot: f32 =
                                grow.iter().zip(&pad[t..t + g.wo]).map(|(a, b)| a * b).sum();
                            acc[ky * k + kx] += dot;
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dw), Shape::from((g.c, kk))))
    }
}

/// Depthwise `k`x`k` convolution of `x` `[B, C, H, W]` with `w` `[C, k·k]` (row-major taps),
/// stride `s`, TF "same" padding, no bias: the custom CPU op for f32 on the CPU, the
/// tensor-op [`depthwise_reference`] elsewhere. Differentiable in both arguments.
pub(crate) fn depthwise_conv(x: &Tensor, w: &Tensor, k: usize, s: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if w.dims() != [c, k * k] || k == 0 || s == 0 {
        return Err(Error::InvalidArgument(format!(
            "depthwise conv: kernel {:?} for {c} channels, k = {k}, stride {s}",
            w.dims()
        )));
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        Ok(x.contiguous()?
            .apply_op2(&w.contiguous()?, DepthwiseOp { k, s })?)
    } else {
        depthwise_reference(x, w, k, s)
    }
}

/// The same convolution as a sum over the `k²` taps of shifted (and, at stride 2, stride-phase)
/// views of the padded input times per-channel weights: tensor ops only, any device.
pub(crate) fn depthwise_reference(x: &Tensor, w: &Tensor, k: usize, s: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (ho, wo) = (h.div_ceil(s), wd.div_ceil(s));
    let (top, bottom) = same_padding(h, k, s);
    let (left, right) = same_padding(wd, k, s);
    // Round the padded size up to a multiple of s (the extra zeros are never read), then view
    // it as s x s phases: xp[s·y + dy, s·x + dx] = phases[y + dy/s, dy%s, x + dx/s, dx%s].
    let (hp, wp) = (
        (h + top + bottom).div_ceil(s),
        (wd + left + right).div_ceil(s),
    );
    let xp = x
        .pad_with_zeros(2, top, hp * s - h - top)?
        .pad_with_zeros(3, left, wp * s - wd - left)?
        .reshape((b, c, hp, s, wp, s))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        let row = xp.narrow(3, ky % s, 1)?.squeeze(3)?.narrow(2, ky / s, ho)?;
        for kx in 0..k {
            let view = row
                .narrow(4, kx % s, 1)?
                .squeeze(4)?
                .narrow(3, kx / s, wo)?;
            let tap = w.narrow(1, ky * k + kx, 1)?.reshape((1, c, 1, 1))?;
            let term = view.broadcast_mul(&tap)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    acc.ok_or_else(|| Error::InvalidArgument("depthwise kernel of size 0".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn same_padding_is_tf() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 3, 1), (1, 1));
        assert_eq!(same_padding(56, 5, 2), (1, 2));
        assert_eq!(same_padding(7, 5, 1), (2, 2));
        assert_eq!(same_padding(7, 3, 2), (1, 1));
        assert_eq!(same_padding(4, 1, 2), (0, 0));
    }

    const CASES: [(usize, usize, usize, usize); 7] = [
        (3, 1, 7, 9),
        (3, 2, 8, 8),
        (5, 2, 9, 7),
        (5, 1, 6, 5),
        (3, 2, 1, 1),
        (5, 2, 2, 3),
        (1, 2, 6, 5),
    ];

    /// Both implementations equal candle's grouped conv2d on explicitly padded input.
    #[test]
    fn forward_matches_grouped_conv() {
        let dev = Device::Cpu;
        for (k, s, h, w) in CASES {
            let c = 4;
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap();
            let (t, b) = same_padding(h, k, s);
            let (l, r) = same_padding(w, k, s);
            let want = x
                .pad_with_zeros(2, t, b)
                .unwrap()
                .pad_with_zeros(3, l, r)
                .unwrap()
                .conv2d(&wt, 0, s, 1, c)
                .unwrap();
            let flat = wt.reshape((c, k * k)).unwrap();
            for got in [
                depthwise_conv(&x, &flat, k, s).unwrap(),
                depthwise_reference(&x, &flat, k, s).unwrap(),
            ] {
                assert_eq!(got.dims(), want.dims(), "k={k} s={s} {h}x{w}");
                let err = max_diff(&got, &want);
                assert!(err < 1e-5, "k={k} s={s} {h}x{w}: {err}");
            }
        }
    }

    /// The custom op's gradients (input and weight) equal autograd through the reference.
    #[test]
    fn gradients_match_the_reference() {
        let dev = Device::Cpu;
        for (k, s, h, w) in CASES {
            let c = 3;
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, k * k), &dev).unwrap()).unwrap();
            let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
            let probe = Tensor::randn(0f32, 1.0, (2, c, ho, wo), &dev).unwrap();
            let loss = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap();
            let g1 = loss(depthwise_conv(x.as_tensor(), wt.as_tensor(), k, s).unwrap())
                .backward()
                .unwrap();
            let g2 = loss(depthwise_reference(x.as_tensor(), wt.as_tensor(), k, s).unwrap())
                .backward()
                .unwrap();
            for v in [x.as_tensor(), wt.as_tensor()] {
                let err = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(err < 1e-4, "k={k} s={s} {h}x{w}: gradient differs by {err}");
            }
        }
    }
}
