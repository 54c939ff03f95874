//! GDN as one custom CPU op with its backward pass written out.
//!
//! As tensor ops, GDN is a square, a channel matmul, a bias add, a square root and a division,
//! each a pass over the activation, and its backward pass is a dozen more (each also added onto
//! a fresh zero tensor by candle's autograd): at 128 channels and 64x64 it cost about seven
//! times its forward pass. This op works per tile of pixels that stays in cache, forward and
//! backward, and recomputes the norm in the backward pass instead of keeping it.
//!
//! With `u = beta + gamma · x²` per pixel and `n = sqrt(u)`, GDN is `y = x / n` and IGDN
//! `y = x · n`. For an output gradient `g`, with `v = ∂L/∂u` (GDN: `-g·x / (2u·n)`, IGDN:
//! `g·x / (2n)`): `∂L/∂beta = Σ v`, `∂L/∂gamma = Σ v · (x²)ᵀ` and
//! `∂L/∂x = g / n` (IGDN: `g · n`) `+ 2x · (gammaᵀ v)`.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::cpu_conv::{norm_tile, product, OutPtr};
use crate::precision::Kernel;
use crate::tensor_util::{contiguous_f32, cpu_f32, on_ranges};

/// Pixels per tile: a tile's scratch (`4 · C` rows of this many floats) stays in the L2 cache.
const TILE: usize = 512;

/// `apply_op3(x, beta, gamma)` for f32 CPU tensors: `x` `[B, C, H, W]`, the effective `beta`
/// `[C]` and `gamma` `[C, C]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GdnOp {
    pub(crate) inverse: bool,
}

/// The geometry of one call: `b` images of `c` channels of `p` pixels, in tiles of `TILE`.
#[derive(Clone, Copy)]
struct Tiles {
    b: usize,
    c: usize,
    p: usize,
}

impl Tiles {
    fn per_image(&self) -> usize {
        self.p.div_ceil(TILE)
    }

    fn count(&self) -> usize {
        self.b * self.per_image()
    }

    /// Offset of tile `i`'s first element (channel 0) and its width.
    fn tile(&self, i: usize) -> (usize, usize) {
        let (bi, ti) = (i / self.per_image(), i % self.per_image());
        let p0 = ti * TILE;
        (bi * self.c * self.p + p0, TILE.min(self.p - p0))
    }
}

/// Runs `work(tile, scratch)` over every tile on the available threads (a fixed contiguous
/// share each, so the backward sums are reproducible) and returns each thread's accumulator
/// (made by `init`), in tile order.
fn for_tiles<A: Send>(
    tiles: Tiles,
    init: impl Fn() -> A + Sync,
    work: impl Fn(usize, &mut A) + Sync,
) -> Vec<A> {
    on_ranges(tiles.count(), |range| {
        let mut acc = init();
        for i in range {
            work(i, &mut acc);
        }
        acc
    })
}

impl CustomOp3 for GdnOp {
    fn name(&self) -> &'static str {
        "psic-gdn"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "GDN input")?;
        let beta = contiguous_f32(bs, bl, "GDN beta")?;
        let gamma = contiguous_f32(gs, gl, "GDN gamma")?;
        let (b, c, h, w) = xl.shape().dims4()?;
        if beta.len() != c || gamma.len() != c * c {
            candle_core::bail!("GDN over {} channels applied to {c}", beta.len());
        }
        let tiles = Tiles { b, c, p: h * w };
        let mut out = crate::alloc::zeroed_f32(x.len());
        let out_ptr = OutPtr(out.as_mut_ptr());
        let inverse = self.inverse;
        for_tiles(
            tiles,
            || (vec![0f32; c * TILE], vec![0f32; c * TILE]),
            |i, (sq, u)| {
                let (off, n) = tiles.tile(i);
                let xt = &x[off..];
                // SAFETY: the tile's C rows of n floats, p apart, lie inside x.
                unsafe { norm_tile(xt.as_ptr(), tiles.p, n, beta, gamma, sq, u) };
                for ch in 0..c {
                    // SAFETY: channel ch's pixels of this tile; no other tile writes them.
                    let y = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.get().add(off + ch * tiles.p), n)
                    };
                    for ((y, &xv), &uv) in y
                        .iter_mut()
                        .zip(&xt[ch * tiles.p..][..n])
                        .zip(&u[ch * n..][..n])
                    {
                        *y = if inverse {
                            xv * uv.sqrt()
                        } else {
                            xv / uv.sqrt()
                        };
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        beta: &Tensor,
        gamma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_dx = x.track_op();
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (b, c, h, w) = x.dims4()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (bs, bl) = beta.storage_and_layout();
        let (gms, gml) = gamma.storage_and_layout();
        let xv = cpu_f32(&xs, xl, "GDN input")?;
        let g = cpu_f32(&gs, gl, "GDN output gradient")?;
        let beta_v = cpu_f32(&bs, bl, "GDN beta")?;
        let gamma_v = cpu_f32(&gms, gml, "GDN gamma")?;
        let tiles = Tiles { b, c, p: h * w };
        let p = tiles.p;
        let mut dx = if need_dx {
            crate::alloc::zeroed_f32(xv.len())
        } else {
            Vec::new()
        };
        let dx_ptr = OutPtr(dx.as_mut_ptr());
        let inverse = self.inverse;
        let parts = for_tiles(
            tiles,
            || {
                (
                    [(); 3].map(|_| vec![0f32; c * TILE]),
                    vec![0f32; c],
                    vec![0f32; c * c],
                )
            },
            |i, ([sq, u, v], d_beta, d_gamma)| {
                let (off, n) = tiles.tile(i);
                let (xt, gt) = (&xv[off..], &g[off..]);
                // SAFETY: the tile's C rows of n floats, p apart, lie inside the input.
                unsafe { norm_tile(xt.as_ptr(), p, n, beta_v, gamma_v, sq, u) };
                // v = ∂L/∂u; u is overwritten with the direct part of ∂L/∂x.
                for ch in 0..c {
                    let rows = xt[ch * p..][..n].iter().zip(&gt[ch * p..][..n]);
                    let mut sum = 0f32;
                    for ((uv, vv), (&xv, &gv)) in u[ch * n..][..n]
                        .iter_mut()
                        .zip(&mut v[ch * n..][..n])
                        .zip(rows)
                    {
                        let nrm = uv.sqrt();
                        let (direct, dv) = if inverse {
                            (gv * nrm, gv * xv / (2.0 * nrm))
                        } else {
                            (gv / nrm, -gv * xv / (2.0 * *uv * nrm))
                        };
                        *uv = direct;
                        *vv = dv;
                        sum += dv;
                    }
                    d_beta[ch] += sum;
                }
                // SAFETY: d_gamma is [C, C]; v and sq are [C, n] (sqᵀ read with strides).
                unsafe {
                    product(
                        Kernel::F32,
                        (c, c, n),
                        d_gamma.as_mut_ptr(),
                        c,
                        true,
                        v.as_ptr(),
                        (1, n),
                        sq.as_ptr(),
                        (n, 1),
                    );
                }
                if !need_dx {
                    return;
                }
                // sq = gammaᵀ v (sq is free now).
                // SAFETY: gamma is [C, C] (read transposed), v and sq are [C, n].
                unsafe {
                    product(
                        Kernel::F32,
                        (c, n, c),
                        sq.as_mut_ptr(),
                        n,
                        false,
                        gamma_v.as_ptr(),
                        (c, 1),
                        v.as_ptr(),
                        (1, n),
                    );
                }
                for ch in 0..c {
                    // SAFETY: channel ch's pixels of this tile; no other tile writes them.
                    let d = unsafe {
                        std::slice::from_raw_parts_mut(dx_ptr.get().add(off + ch * p), n)
                    };
                    let src = u[ch * n..][..n].iter().zip(&sq[ch * n..][..n]);
                    for ((d, &xv), (&direct, &t)) in d.iter_mut().zip(&xt[ch * p..][..n]).zip(src) {
                        *d = direct + 2.0 * xv * t;
                    }
                }
            },
        );
        let (mut d_beta, mut d_gamma) = (vec![0f32; c], vec![0f32; c * c]);
        for (_, pb, pg) in parts {
            d_beta.iter_mut().zip(pb).for_each(|(d, v)| *d += v);
            d_gamma.iter_mut().zip(pg).for_each(|(d, v)| *d += v);
        }
        let dev = x.device();
        Ok((
            need_dx
                .then(|| Tensor::from_vec(dx, (b, c, h, w), dev))
                .transpose()?,
            Some(Tensor::from_vec(d_beta, c, dev)?),
            Some(Tensor::from_vec(d_gamma, (c, c), dev)?),
        ))
    }
}
