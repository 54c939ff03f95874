//! im2col as a custom CPU op whose backward pass is col2im: lets a training convolution be one
//! matrix product forward and two backward, instead of candle's CPU `conv2d` backward, which
//! computes the input gradient with its slow transposed-convolution loop.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::tensor_util::{contiguous_f32, par_planes};

/// Geometry of a `k`x`k` convolution with stride `s` and padding `p` on `[b, c, h, w]`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    /// Input row and column of output `(oy, ox)` under tap `(ky, kx)`, if inside the image.
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.s + ky).checked_sub(self.p)?;
        let ix = (ox * self.s + kx).checked_sub(self.p)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }
}

/// `[B, C, H, W] -> [C·k², B·Ho·Wo]`: row `c·k² + ky·k + kx`, column `b·Ho·Wo + oy·Wo + ox`.
#[derive(Debug, Clone, Copy)]
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "psic-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(storage, layout, "im2col input")?;
        let kk = g.k * g.k;
        let n = g.b * g.ho * g.wo;
        let mut out = crate::alloc::zeroed_f32(g.c * kk * n);
        par_planes(&mut out, n, 0, |row, dst, _| {
            let (c, t) = (row / kk, row % kk);
            let (ky, kx) = (t / g.k, t % g.k);
            for b in 0..g.b {
                let plane = &x[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
                let dst = &mut dst[b * g.ho * g.wo..][..g.ho * g.wo];
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        if let Some((iy, ix)) = g.source(oy, ox, ky, kx) {
                            dst[oy * g.wo + ox] = plane[iy * g.w + ix];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.c * kk, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?))
    }
}

/// The adjoint of [`Im2Col`]: sums every column entry back onto the input pixel it came from.
#[derive(Debug, Clone, Copy)]
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "psic-col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = contiguous_f32(storage, layout, "col2im input")?;
        let kk = g.k * g.k;
        let n = g.b * g.ho * g.wo;
        let mut out = crate::alloc::zeroed_f32(g.b * g.c * g.h * g.w);
        // One (b, c) plane per task: no two tasks write the same pixel.
        par_planes(&mut out, g.h * g.w, 0, |plane, dst, _| {
            let (b, c) = (plane / g.c, plane % g.c);
            for t in 0..kk {
                let (ky, kx) = (t / g.k, t % g.k);
                let src = &cols[(c * kk + t) * n + b * g.ho * g.wo..][..g.ho * g.wo];
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        if let Some((iy, ix)) = g.source(oy, ox, ky, kx) {
                            dst[iy * g.w + ix] += src[oy * g.wo + ox];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// im2col of `x` `[B, C, H, W]` (f32 on the CPU) for a `k`x`k` kernel, stride `s`, padding `p`:
/// `[C·k², B·Ho·Wo]`, differentiable (its backward is col2im). `None` for other inputs.
pub(crate) fn im2col(
    x: &Tensor,
    k: usize,
    s: usize,
    p: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (b, c, h, w) = x.dims4()?;
    if h + 2 * p < k || w + 2 * p < k || s == 0 {
        return Ok(None);
    }
    let g = Geometry {
        b,
        c,
        h,
        w,
        k,
        s,
        p,
        ho: (h + 2 * p - k) / s + 1,
        wo: (w + 2 * p - k) / s + 1,
    };
    Ok(Some(x.contiguous()?.apply_op1(Im2Col(g))?))
}
