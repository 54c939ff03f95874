//! Inference convolutions on the CPU as tiled im2col + one `gemm` call per tile.
//!
//! candle's CPU `conv2d` gathers its im2col tiles element by element from an NHWC copy of the
//! input, which costs more than its matrix products here. This op keeps NCHW, builds each tile's
//! columns with row copies (strided for stride 2), splits tiles over threads (each running a
//! single-threaded `gemm`, so there is no per-tile thread hand-off) and adds the bias in place.
//!
//! The same op serves transposed convolutions in stride-phase form: each output phase
//! `(ry, rx)` keeps only its own kernel taps (a 5x5 stride-2 kernel has 9, 6, 6 and 4), so no
//! multiply is spent on the zero taps that a single padded phase kernel would carry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::precision::Kernel;
use crate::tensor_util::{contiguous_f32, on_threads, par_planes};

/// Output columns (pixels) per tile, rounded to whole output rows: large enough for `gemm` to
/// run near its peak, small enough that a thread's column buffer stays a few MB. On the 2-core
/// development machine a `[128, 3200] x [3200, n]` product ran at 112–120 GFLOP/s for n = 256
/// against 93–101 for n = 512, and 768x512 encodes were faster with 256 in 8 of 10 alternating
/// rounds (decodes in 6 of 10).
const TILE_COLUMNS: usize = 256;

/// Bytes of im2col columns a plain convolution builds at a time (its taps in chunks): about
/// what the L2 cache holds next to the product's own blocks.
const CHUNK_BYTES: usize = 384 << 10;

/// One output phase: the pixels `(u·oy + ry, u·ox + rx)` of the output.
#[derive(Debug)]
pub(super) struct Phase {
    /// Input offsets `(dy, dx)` of the taps, relative to `(s·oy, s·ox)`, in the order of
    /// [`Plan::taps`].
    pub(super) taps: Vec<(isize, isize)>,
    /// Kernel position `ky·k + kx` of each tap.
    pub(super) kernel: Vec<usize>,
    /// `[O, taps·C]`, column `t·C + c`.
    pub(super) weight: Vec<f32>,
    /// The phase's taps as runs of [`Plan::taps`]: `(first shared tap, count, first own tap)`.
    segments: Vec<(usize, usize, usize)>,
    /// Sub-pixel `(ry, rx)` of this phase in the `u`x`u` output cell.
    pub(super) at: (usize, usize),
}

/// A frozen convolution (or transposed convolution in phase form) for [`apply`].
#[derive(Debug, Clone)]
pub(crate) struct CpuConv(Arc<Plan>);

/// A frozen GDN (or IGDN) applied to each output tile of a [`CpuConv`] while it is in cache:
/// `y = x / sqrt(beta + gamma · x²)` (`x * sqrt(...)` when inverse), per pixel over channels.
#[derive(Debug)]
pub(crate) struct CpuGdn {
    /// Effective `gamma` `[C, C]`, row-major.
    gamma: Vec<f32>,
    /// Effective `beta` `[C]`.
    beta: Vec<f32>,
    inverse: bool,
}

impl CpuGdn {
    /// From the effective (already reparametrised) `beta` `[C]` and `gamma` `[C, C]`.
    pub(crate) fn new(beta: &Tensor, gamma: &Tensor, inverse: bool) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: values(gamma)?,
            beta: values(beta)?,
            inverse,
        })
    }

    /// Normalises the `[C, n]` tile at `data` (row stride `rs`) in place; `sq` and `norm` are
    /// scratch of at least `C·n` floats.
    ///
    /// # Safety
    /// `data` must point to `C` rows of `n` writable floats, `rs` apart.
    unsafe fn apply(&self, data: *mut f32, rs: usize, n: usize, sq: &mut [f32], norm: &mut [f32]) {
        let c = self.beta.len();
        norm_tile(data, rs, n, &self.beta, &self.gamma, sq, norm);
        for ch in 0..c {
            let row = std::slice::from_raw_parts_mut(data.add(ch * rs), n);
            for (v, &nv) in row.iter_mut().zip(&norm[ch * n..][..n]) {
                if self.inverse {
                    *v *= nv.sqrt();
                } else {
                    *v /= nv.sqrt();
                }
            }
        }
    }
}

/// Fills `sq` with the squares of the `[C, n]` tile at `x` (row stride `rs`, `C` = the length
/// of `beta`) and `u` with `beta + gamma · sq` per pixel: the GDN norm before its square root.
/// `sq` and `u` hold at least `C·n` floats.
///
/// # Safety
/// `x` must point to `C` rows of `n` readable floats, `rs` apart.
pub(super) unsafe fn norm_tile(
    x: *const f32,
    rs: usize,
    n: usize,
    beta: &[f32],
    gamma: &[f32],
    sq: &mut [f32],
    u: &mut [f32],
) {
    let c = beta.len();
    for ch in 0..c {
        let row = std::slice::from_raw_parts(x.add(ch * rs), n);
        for (s, &v) in sq[ch * n..][..n].iter_mut().zip(row) {
            *s = v * v;
        }
        u[ch * n..][..n].fill(beta[ch]);
    }
    // SAFETY: gamma is [C, C], sq and u hold [C, n]. GDN stays f32 whatever the convolutions
    // use.
    product(
        Kernel::F32,
        (c, n, c),
        u.as_mut_ptr(),
        n,
        true,
        gamma.as_ptr(),
        (1, c),
        sq.as_ptr(),
        (1, n),
    );
}

/// The op: a convolution plan and an optional GDN epilogue.
struct ConvOp<'a> {
    plan: &'a Plan,
    gdn: Option<&'a CpuGdn>,
}

/// A convolution (or transposed convolution in phase form) with its weights rearranged per
/// output phase.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    /// Input stride between neighbouring output positions of one phase.
    pub(super) stride: usize,
    /// Output up-sampling factor (1 for a convolution, the stride for a transposed one).
    pub(super) up: usize,
    /// The output grid of a phase has `(h - shrink - 1) / stride + 1` rows.
    shrink: isize,
    pub(super) phases: Vec<Phase>,
    /// Every tap of any phase, once; the forward pass builds one set of columns for them all
    /// and each phase multiplies its own rows (a 5x5 stride-2 transposed kernel's four phases
    /// have 25 taps among 9 offsets). Ordered so that each phase's taps form few runs.
    taps: Vec<(isize, isize)>,
    pub(super) bias: Vec<f32>,
    /// Whether the source kernel is `[C, O, k, k]` (transposed) rather than `[O, C, k, k]`.
    pub(super) transposed: bool,
    /// `k²` of the source kernel.
    pub(super) kernel_area: usize,
    /// The matrix-product kernel (f32 or bf16), chosen when the plan is built.
    pub(super) kernel: Kernel,
}

/// The f32 values of a tensor, flattened (weights and biases are small).
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Fewest rows (`m`) for which [`product`] takes the bf16 kernel: it packs `rhs` once for all
/// rows, which does not pay for a product of a few rows (the 3-channel image layers' weight
/// products), so those stay in f32.
const BF16_MIN_ROWS: usize = 16;

/// `dst [m, n] (= or +=) lhs [m, k] · rhs [k, n]` on the calling thread, with explicit
/// (column, row) strides for each operand, by `kernel` (f32 `gemm`, or bf16 operands with f32
/// sums for at least [`BF16_MIN_ROWS`] rows).
///
/// # Safety
/// Each pointer must address its matrix at the given sizes and strides, and `dst` must not
/// overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: *const f32,
    (rhs_cs, rhs_rs): (usize, usize),
) {
    let (lhs_s, rhs_s) = ((lhs_cs, lhs_rs), (rhs_cs, rhs_rs));
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Bf16(cpu) if m >= BF16_MIN_ROWS => {
            // SAFETY: the caller's guarantees, passed on; `cpu` proves the instructions.
            super::bf16_gemm::product(
                cpu,
                (m, n, k),
                dst,
                dst_rs,
                accumulate,
                lhs,
                lhs_s,
                rhs,
                rhs_s,
            )
        }
        Kernel::Bf16Emulated if m >= BF16_MIN_ROWS => {
            // SAFETY: the caller's guarantees, passed on.
            super::bf16_emul::product((m, n, k), dst, dst_rs, accumulate, lhs, lhs_s, rhs, rhs_s)
        }
        _ => gemm_f32((m, n, k), dst, dst_rs, accumulate, lhs, lhs_s, rhs, rhs_s),
    }
}

/// [`product`] in f32 by the `gemm` crate.
///
/// # Safety
/// As [`product`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: *const f32,
    (rhs_cs, rhs_rs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

impl CpuConv {
    /// A `k`x`k` convolution, stride `s`, padding `p`: `weight` `[O, C, k, k]`, `bias` `[O]`.
    /// Its products run by `kernel`.
    pub(crate) fn conv(
        weight: &Tensor,
        bias: &Tensor,
        s: usize,
        p: usize,
        kernel: Kernel,
    ) -> candle_core::Result<Self> {
        let (c_out, c_in, k, _) = weight.dims4()?;
        let plan = Plan::conv(&values(weight)?, (c_out, c_in, k), values(bias)?, s, p);
        Ok(Self(Arc::new(plan.with_kernel(kernel))))
    }

    /// A transposed convolution `weight` `[C, O, k, k]` (PyTorch layout), stride `s`, padding
    /// `p`, whose output is exactly `s` times its input (`k + output_padding = s + 2p`).
    /// Its products run by `kernel`.
    pub(crate) fn transposed(
        weight: &Tensor,
        bias: &Tensor,
        s: usize,
        p: usize,
        kernel: Kernel,
    ) -> candle_core::Result<Self> {
        let (c_in, c_out, k, _) = weight.dims4()?;
        let plan = Plan::transposed(&values(weight)?, (c_in, c_out, k), values(bias)?, s, p);
        Ok(Self(Arc::new(plan.with_kernel(kernel))))
    }
}

impl Plan {
    /// See [`CpuConv::conv`]; `w` holds the `[O, C, k, k]` kernel.
    pub(super) fn conv(
        w: &[f32],
        (c_out, c_in, k): (usize, usize, usize),
        bias: Vec<f32>,
        s: usize,
        p: usize,
    ) -> Self {
        let p_i = p as isize;
        let taps: Vec<_> = (0..k * k)
            .map(|t| ((t / k) as isize - p_i, (t % k) as isize - p_i))
            .collect();
        let kk = k * k;
        let mut weight = vec![0f32; c_out * kk * c_in];
        for o in 0..c_out {
            for c in 0..c_in {
                for t in 0..kk {
                    weight[(o * kk + t) * c_in + c] = w[(o * c_in + c) * kk + t];
                }
            }
        }
        Plan {
            c_in,
            c_out,
            stride: s,
            up: 1,
            shrink: k as isize - 1 - 2 * p_i,
            phases: vec![Phase {
                taps: taps.clone(),
                kernel: (0..kk).collect(),
                weight,
                segments: vec![(0, kk, 0)],
                at: (0, 0),
            }],
            taps,
            bias,
            transposed: false,
            kernel_area: kk,
            kernel: Kernel::F32,
        }
    }

    /// See [`CpuConv::transposed`]; `w` holds the `[C, O, k, k]` kernel.
    pub(super) fn transposed(
        w: &[f32],
        (c_in, c_out, k): (usize, usize, usize),
        bias: Vec<f32>,
        s: usize,
        p: usize,
    ) -> Self {
        let (s_i, p_i, k_i) = (s as isize, p as isize, k as isize);
        // Output row s·Y + r meets input row Y + d through kernel row ky = r + p - s·d.
        let rows = |r: isize| -> Vec<(isize, usize)> {
            (-k_i..=k_i)
                .filter_map(|d| {
                    let ky = r + p_i - s_i * d;
                    (0..k_i).contains(&ky).then_some((d, ky as usize))
                })
                .collect()
        };
        let mut per_phase = Vec::with_capacity(s * s);
        for ry in 0..s {
            for rx in 0..s {
                let taps: Vec<_> = rows(ry as isize)
                    .into_iter()
                    .flat_map(|(dy, ky)| {
                        rows(rx as isize)
                            .into_iter()
                            .map(move |(dx, kx)| ((dy, dx), ky * k + kx))
                    })
                    .collect();
                per_phase.push(((ry, rx), taps));
            }
        }
        // Shared taps, those used by most phases first: then each phase's taps are a prefix
        // of the list plus a few runs.
        let mut union: Vec<(isize, isize)> = Vec::new();
        for (_, taps) in &per_phase {
            for &(d, _) in taps {
                if !union.contains(&d) {
                    union.push(d);
                }
            }
        }
        let users = |d: &(isize, isize)| {
            per_phase
                .iter()
                .filter(|(_, taps)| taps.iter().any(|(e, _)| e == d))
                .count()
        };
        union.sort_by_key(|d| (std::cmp::Reverse(users(d)), *d));
        let kk = k * k;
        let phases = per_phase
            .into_iter()
            .map(|(at, taps)| {
                // The phase's taps in shared order, and their runs in the shared list.
                let mut own: Vec<(usize, usize)> = taps
                    .iter()
                    .map(|&(d, kt)| (union.iter().position(|&u| u == d).unwrap_or(0), kt))
                    .collect();
                own.sort_unstable();
                let mut segments: Vec<(usize, usize, usize)> = Vec::new();
                for (j, &(u, _)) in own.iter().enumerate() {
                    match segments.last_mut() {
                        Some((first, count, _)) if *first + *count == u => *count += 1,
                        _ => segments.push((u, 1, j)),
                    }
                }
                let nt = own.len();
                let mut weight = vec![0f32; c_out * nt * c_in];
                for o in 0..c_out {
                    for c in 0..c_in {
                        for (t, &(_, kt)) in own.iter().enumerate() {
                            weight[(o * nt + t) * c_in + c] = w[(c * c_out + o) * kk + kt];
                        }
                    }
                }
                Phase {
                    taps: own.iter().map(|&(u, _)| union[u]).collect(),
                    kernel: own.iter().map(|&(_, kt)| kt).collect(),
                    weight,
                    segments,
                    at,
                }
            })
            .collect();
        Plan {
            c_in,
            c_out,
            stride: 1,
            up: s,
            shrink: 0,
            phases,
            taps: union,
            bias,
            transposed: true,
            kernel_area: k * k,
            kernel: Kernel::F32,
        }
    }

    /// The plan with its products run by `kernel`.
    pub(super) fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Rows and columns `(ho, wo)` of each phase's output grid for an `h`x`w` input.
    pub(super) fn grid(&self, h: usize, w: usize) -> (usize, usize) {
        let side = |n: usize| {
            let span = n as isize - self.shrink - 1;
            if span < 0 {
                0
            } else {
                span as usize / self.stride + 1
            }
        };
        (side(h), side(w))
    }

    /// Output rows per tile for a phase grid `wo` wide.
    pub(super) fn tile_rows(ho: usize, wo: usize) -> usize {
        (TILE_COLUMNS / wo.max(1)).clamp(1, ho.max(1))
    }
}

/// A raw output pointer shared by the worker threads, which write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every (batch, phase, row tile) work item writes a disjoint set of output elements.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

impl Plan {
    /// Writes the im2col columns of output rows `oy0..oy1` for `taps` of one image `xb` into
    /// `cols` `[taps·C, (oy1-oy0)·wo]` (row `t·C + c`), zeros where a tap falls outside. `xb` holds, per
    /// channel, the `s`x`s` stride phases of the input (`[C, s, s, h, w]`, see
    /// [`space_to_depth`]; the input itself when `s == 1`), so every tap is a run of contiguous
    /// copies.
    pub(super) fn fill_cols(
        &self,
        xb: &[f32],
        (h, w): (usize, usize),
        taps: &[(isize, isize)],
        (oy0, oy1): (usize, usize),
        wo: usize,
        cols: &mut [f32],
    ) {
        let s = self.stride as isize;
        let n = (oy1 - oy0) * wo;
        let ss = self.stride * self.stride;
        for (t, &(dy, dx)) in taps.iter().enumerate() {
            for c in 0..self.c_in {
                // Input (s·oy + dy, s·ox + dx) is row oy + qy, column ox + qx of phase (py, px).
                let (py, qy) = (dy.rem_euclid(s) as usize, dy.div_euclid(s));
                let (px, qx) = (dx.rem_euclid(s) as usize, dx.div_euclid(s));
                let plane = &xb[(c * ss + py * self.stride + px) * h * w..][..h * w];
                let row = &mut cols[(t * self.c_in + c) * n..][..n];
                // Output columns ox with 0 <= ox + qx < w.
                let lo = (-qx).clamp(0, wo as isize) as usize;
                let hi = (w as isize - qx).clamp(lo as isize, wo as isize) as usize;
                for (i, oy) in (oy0..oy1).enumerate() {
                    let dst = &mut row[i * wo..][..wo];
                    let iy = oy as isize + qy;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let x0 = (lo as isize + qx) as usize;
                    dst[lo..hi].copy_from_slice(&plane[iy as usize * w + x0..][..hi - lo]);
                }
            }
        }
    }

    /// The convolution of `x` `[b, C, h, w]`, bias added and `gdn` applied if given:
    /// `(output, output rows, output columns)`.
    pub(super) fn run(
        &self,
        x: &[f32],
        (b, h, w): (usize, usize, usize),
        gdn: Option<&CpuGdn>,
    ) -> (Vec<f32>, usize, usize) {
        let (s, u, o) = (self.stride, self.up, self.c_out);
        let (ho, wo) = self.grid(h, w);
        let (h_out, w_out) = (ho * u, wo * u);
        let mut out = crate::alloc::zeroed_f32(b * o * h_out * w_out);
        if ho == 0 || wo == 0 {
            return (out, h_out, w_out);
        }
        let rows = Self::tile_rows(ho, wo);
        let tiles = ho.div_ceil(rows);
        let items = b * tiles;
        let direct = u == 1 && self.phases.len() == 1;
        // Taps per column chunk of a plain convolution (all of them for phases, which share
        // their columns). Sized for a full tile (not clamped to the image's height) so that how
        // the sums are grouped, and so their rounding, does not depend on the height: a band
        // of rows gives the same values as the whole image (`crate::tiles`).
        let full = (TILE_COLUMNS / wo.max(1)).max(1) * wo;
        let chunk = if direct {
            (CHUNK_BYTES / (4 * self.c_in * full).max(1)).clamp(1, self.taps.len().max(1))
        } else {
            self.taps.len()
        };
        let cols_len = self.c_in * chunk * rows * wo;
        let gemm_len = if direct {
            0
        } else {
            self.phases.len() * o * rows * wo
        };
        let gdn_len = if gdn.is_some() { o * rows * wo } else { 0 };
        // Stride phases of the input, so that im2col is made of contiguous copies.
        let (xs, hs, ws) = if s > 1 {
            space_to_depth(x, b * self.c_in, (h, w), s)
        } else {
            (Vec::new(), h, w)
        };
        let (x, h, w) = if s > 1 { (&xs[..], hs, ws) } else { (x, h, w) };
        let plane_in = self.c_in * s * s * h * w;
        let next = AtomicUsize::new(0);
        let out_ptr = OutPtr(out.as_mut_ptr());
        let plane_out = h_out * w_out;
        let c = self.c_in;
        let worker = || {
            let mut cols = vec![0f32; cols_len];
            let mut tmp = vec![0f32; gemm_len];
            let (mut sq, mut norm) = (vec![0f32; gdn_len], vec![0f32; gdn_len]);
            loop {
                let item = next.fetch_add(1, Ordering::Relaxed);
                if item >= items {
                    break;
                }
                let (bi, ti) = (item / tiles, item % tiles);
                let (oy0, oy1) = (ti * rows, ((ti + 1) * rows).min(ho));
                let n = (oy1 - oy0) * wo;
                let xb = &x[bi * plane_in..][..plane_in];
                let out_b = unsafe { out_ptr.get().add(bi * o * plane_out) };
                if direct {
                    // A plain convolution writes its tile in place, taking the taps a chunk
                    // at a time so that the columns stay in cache for the product.
                    // SAFETY: row oy0 of image bi's first channel lies inside `out`.
                    let dst = unsafe { out_b.add(oy0 * wo) };
                    for (oc, &bv) in self.bias.iter().enumerate() {
                        // SAFETY: row oc of this item's tile inside `out`.
                        unsafe { std::slice::from_raw_parts_mut(dst.add(oc * plane_out), n) }
                            .fill(bv);
                    }
                    let phase = &self.phases[0];
                    let k_all = phase.taps.len() * c;
                    for t0 in (0..phase.taps.len()).step_by(chunk) {
                        let taps = &phase.taps[t0..(t0 + chunk).min(phase.taps.len())];
                        self.fill_cols(xb, (h, w), taps, (oy0, oy1), wo, &mut cols);
                        // SAFETY: dst is [O, n] with row stride plane_out; the weight columns
                        // t0·C.. (row stride k_all) and the columns cover taps·C entries.
                        unsafe {
                            product(
                                self.kernel,
                                (o, n, taps.len() * c),
                                dst,
                                plane_out,
                                true,
                                phase.weight.as_ptr().add(t0 * c),
                                (1, k_all),
                                cols.as_ptr(),
                                (1, n),
                            )
                        };
                    }
                    if let Some(g) = gdn {
                        // SAFETY: the tile written above.
                        unsafe { g.apply(dst, plane_out, n, &mut sq, &mut norm) };
                    }
                    continue;
                }
                // One set of columns for every tap of every phase.
                self.fill_cols(xb, (h, w), &self.taps, (oy0, oy1), wo, &mut cols);
                // Each phase's [O, n] tile goes to its part of `tmp`; all are written into the
                // output after.
                for (pi, phase) in self.phases.iter().enumerate() {
                    let part = &mut tmp[pi * o * n..][..o * n];
                    // The bias first, then the product accumulated onto it.
                    for (oc, &bv) in self.bias.iter().enumerate() {
                        part[oc * n..][..n].fill(bv);
                    }
                    let (dst, rs) = (part.as_mut_ptr(), n);
                    let k_all = phase.taps.len() * c;
                    for &(first, count, own) in &phase.segments {
                        // SAFETY: dst is [O, n] with row stride rs; the weight columns
                        // own·C.. (row stride k_all) and the column rows first·C.. cover
                        // count·C entries each.
                        unsafe {
                            product(
                                self.kernel,
                                (o, n, count * c),
                                dst,
                                rs,
                                true,
                                phase.weight.as_ptr().add(own * c),
                                (1, k_all),
                                cols.as_ptr().add(first * c * n),
                                (1, n),
                            )
                        };
                    }
                    if let Some(g) = gdn {
                        // SAFETY: the tile written above.
                        unsafe { g.apply(dst, rs, n, &mut sq, &mut norm) };
                    }
                }
                if u == 2 && self.phases.len() == 4 {
                    // Phases (ry, 0) and (ry, 1) interleave into output row 2·oy + ry: one
                    // sequential pass per row.
                    for ry in 0..2 {
                        let (a, b) = (&tmp[2 * ry * o * n..], &tmp[(2 * ry + 1) * o * n..]);
                        for oc in 0..o {
                            for (i, oy) in (oy0..oy1).enumerate() {
                                let row = oc * plane_out + (2 * oy + ry) * w_out;
                                // SAFETY: output row `2·oy + ry` of channel oc (w_out = 2·wo
                                // floats): only this tile writes it.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(out_b.add(row), 2 * wo)
                                };
                                let src = a[oc * n + i * wo..][..wo]
                                    .iter()
                                    .zip(&b[oc * n + i * wo..][..wo]);
                                for (pair, (&va, &vb)) in dst.chunks_exact_mut(2).zip(src) {
                                    pair[0] = va;
                                    pair[1] = vb;
                                }
                            }
                        }
                    }
                    continue;
                }
                for (pi, phase) in self.phases.iter().enumerate() {
                    let (ry, rx) = phase.at;
                    for oc in 0..o {
                        let src = &tmp[(pi * o + oc) * n..][..n];
                        for (i, oy) in (oy0..oy1).enumerate() {
                            let row = (oy * u + ry) * w_out + rx;
                            // SAFETY: output row `oy·u + ry` of channel oc, columns
                            // `ox·u + rx`: only this phase and tile write them.
                            let dst = unsafe { out_b.add(oc * plane_out + row) };
                            for (ox, &v) in src[i * wo..][..wo].iter().enumerate() {
                                unsafe { *dst.add(ox * u) = v };
                            }
                        }
                    }
                }
            }
        };
        on_threads(items, worker);
        (out, h_out, w_out)
    }
}

/// `[N, H, W]` planes to their `s`x`s` stride phases `[N, s, s, ⌈H/s⌉, ⌈W/s⌉]`: phase
/// `(py, px)` holds input `(s·Y + py, s·X + px)`, zero past the input's edge.
pub(super) fn space_to_depth(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    s: usize,
) -> (Vec<f32>, usize, usize) {
    let (hs, ws) = (h.div_ceil(s), w.div_ceil(s));
    let mut out = crate::alloc::zeroed_f32(planes * s * s * hs * ws);
    par_planes(&mut out, s * s * hs * ws, 0, |p, dst, _| {
        let src = &x[p * h * w..][..h * w];
        for py in 0..s {
            for (y, row) in src.chunks_exact(w).skip(py).step_by(s).enumerate() {
                if s == 2 {
                    // Both column phases of the row in one pass (the common case: a plain
                    // loop the compiler turns into shuffles).
                    let (d0, d1) = dst[py * 2 * hs * ws..].split_at_mut(hs * ws);
                    let (d0, d1) = (&mut d0[y * ws..][..ws], &mut d1[y * ws..][..ws]);
                    let pairs = row.chunks_exact(2);
                    if let &[last] = pairs.remainder() {
                        d0[w / 2] = last;
                    }
                    for ((a, b), pair) in d0.iter_mut().zip(d1.iter_mut()).zip(pairs) {
                        *a = pair[0];
                        *b = pair[1];
                    }
                    continue;
                }
                for px in 0..s {
                    let d = &mut dst[((py * s + px) * hs + y) * ws..][..ws];
                    for (d, &v) in d.iter_mut().zip(row.iter().skip(px).step_by(s)) {
                        *d = v;
                    }
                }
            }
        }
    });
    (out, hs, ws)
}

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "psic-cpu-conv"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let plan = self.plan;
        let (b, c, h, w) = layout.shape().dims4()?;
        if c != plan.c_in {
            candle_core::bail!(
                "cpu conv: input has {c} channels, kernel expects {}",
                plan.c_in
            );
        }
        if let Some(g) = self.gdn {
            if g.beta.len() != plan.c_out {
                candle_core::bail!(
                    "cpu conv: GDN over {} channels after {}",
                    g.beta.len(),
                    plan.c_out
                );
            }
        }
        let x = contiguous_f32(storage, layout, "cpu conv input")?;
        let (out, h_out, w_out) = plan.run(x, (b, h, w), self.gdn);
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, plan.c_out, h_out, w_out)),
        ))
    }
}

/// Applies `conv`, then `gdn` if given, to `x` when `x` is an f32 CPU tensor; `None` otherwise.
///
/// The op has no backward pass: frozen layers are for inference, and no gradient reaches `x`
/// through them (training builds its layers from trainable variables, which never get here).
pub(crate) fn apply(
    conv: &CpuConv,
    gdn: Option<&CpuGdn>,
    x: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let op = ConvOp { plan: &conv.0, gdn };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}
