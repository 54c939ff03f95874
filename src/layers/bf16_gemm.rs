//! bf16 matrix products with f32 accumulation on AVX512-BF16 CPUs (`vdpbf16ps`).
//!
//! `dst [m, n] (= or +=) lhs [m, k] · rhs [k, n]` with f32 operands at any strides, as
//! [`super::cpu_conv::product`] takes them: the operands are rounded to bf16 (nearest even)
//! while they are packed, and each `vdpbf16ps` adds the products of a pair of reduction values
//! into f32 lanes. So the reduction dimension is packed in pairs (a zero pads an odd tail).
//!
//! Blocking (BLIS style): the reduction runs in blocks of [`KC`] values. For each block `lhs`
//! is packed once, in panels of [`MR`] rows (each row its `KC / 2` pairs, contiguous), and
//! `rhs` one strip of [`NR`] columns at a time (pair-interleaved: per pair, `NR` 32-bit pairs);
//! each strip then meets every panel in the register-blocked micro-kernel, whose 6 x 64 tile
//! of f32 sums stays in 24 of the 32 vector registers. Edges (`m` not a multiple of 6, `n` of
//! 16, odd `k`) are zero-padded when packing and masked when storing.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::bf16_emul::bf16_bits;
use crate::precision::Avx512Bf16;

/// Rows of a micro-tile (broadcast operand).
const MR: usize = 6;
/// 16-lane vectors per micro-tile row.
const NV: usize = 4;
/// Columns of a micro-tile.
const NR: usize = 16 * NV;
/// Reduction values per block (a multiple of 32, so the vector packers see whole pairs).
const KC: usize = 256;

/// An f32 matrix operand: its first element and its (column, row) strides in elements.
#[derive(Clone, Copy, Debug)]
struct Operand {
    ptr: *const f32,
    cs: usize,
    rs: usize,
}

impl Operand {
    /// The operand starting `rows` rows and `cols` columns further on.
    ///
    /// # Safety
    /// The new start must lie inside (or one past) the matrix.
    unsafe fn at(self, rows: usize, cols: usize) -> Self {
        Self {
            ptr: self.ptr.add(rows * self.rs + cols * self.cs),
            ..self
        }
    }
}

thread_local! {
    /// Per-thread packing buffers (packed `lhs` block, packed `rhs` strip), kept between calls.
    static SCRATCH: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst [m, n] (= or +=) lhs [m, k] · rhs [k, n]` in bf16 with f32 accumulation, on the calling
/// thread. Same arguments as [`super::cpu_conv::product`], plus the proof that the CPU has the
/// instructions.
///
/// # Safety
/// Each pointer must address its matrix at the given sizes and strides, and `dst` must not
/// overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    cpu: Avx512Bf16,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: *const f32,
    (rhs_cs, rhs_rs): (usize, usize),
) {
    let _ = cpu;
    debug_assert!(std::arch::is_x86_feature_detected!("avx512bf16"));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    let a = Operand {
        ptr: lhs,
        cs: lhs_cs,
        rs: lhs_rs,
    };
    let b = Operand {
        ptr: rhs,
        cs: rhs_cs,
        rs: rhs_rs,
    };
    SCRATCH.with(|scratch| {
        let (apack, bpack) = &mut *scratch.borrow_mut();
        // SAFETY: `cpu` exists only where the CPU has AVX512F/BW/BF16 (`Avx512Bf16::detect`);
        // the caller vouches for the pointers.
        unsafe { blocked((m, n, k), dst, dst_rs, accumulate, a, b, apack, bpack) }
    });
}

/// The blocked loops of [`product`] (see the module docs).
///
/// # Safety
/// As [`product`], and the CPU must have AVX512F, AVX512BW and AVX512-BF16.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn blocked(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    apack: &mut Vec<u32>,
    bpack: &mut Vec<u32>,
) {
    let panels = m.div_ceil(MR);
    for k0 in (0..k).step_by(KC) {
        let kc = (k - k0).min(KC);
        let kp = kc.div_ceil(2);
        apack.resize(panels * MR * kp, 0);
        bpack.resize(kp * NR, 0);
        pack_lhs(a.at(0, k0), m, kc, apack);
        let overwrite = !accumulate && k0 == 0;
        for j0 in (0..n).step_by(NR) {
            let nr = (n - j0).min(NR);
            pack_rhs(b.at(k0, j0), kc, nr, bpack);
            for (pi, panel) in apack.chunks_exact(MR * kp).enumerate() {
                let r0 = pi * MR;
                let tile = Tile {
                    ptr: dst.add(r0 * dst_rs + j0),
                    rs: dst_rs,
                    rows: (m - r0).min(MR),
                    cols: nr,
                    overwrite,
                };
                debug_assert_eq!(panel.len(), MR * kp);
                // SAFETY: `panel` holds MR rows of kp pairs, `bpack` kp pairs of NR columns;
                // the tile lies inside `dst` (rows and cols clipped to m and n).
                micro(kp, panel.as_ptr(), bpack.as_ptr(), tile);
            }
        }
    }
}

/// Where a micro-kernel writes: `rows` x `cols` floats at `ptr`, rows `rs` apart, overwritten
/// or added to.
#[derive(Clone, Copy)]
struct Tile {
    ptr: *mut f32,
    rs: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
}

/// Lanes `0..n` of a 16-lane mask (`n` at most 16).
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    debug_assert!(n <= 16);
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// The `MR` x `NR` micro-kernel: `tile (= or +=) Σ_p a[·, p] · b[p, ·]` over `kp` pairs.
///
/// # Safety
/// `a` holds `MR` rows of `kp` packed pairs (row `r` at `a + r·kp`), `b` holds `kp` rows of
/// `NR` packed pairs, the tile's `rows` x `cols` floats are writable, and the CPU has
/// AVX512F/BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro(kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..kp {
        let bp = b.add(p * NR);
        let mut bv = [_mm512_setzero_si512(); NV];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(bp.add(16 * j).cast());
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
            for (s, &v) in row.iter_mut().zip(&bv) {
                *s = _mm512_dpbf16_ps(*s, av, std::mem::transmute::<__m512i, __m512bh>(v));
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(tile.rows) {
        let out = tile.ptr.add(r * tile.rs);
        for (j, &v) in row.iter().enumerate() {
            let n = tile.cols.saturating_sub(16 * j).min(16);
            if n == 0 {
                break;
            }
            let mask = lanes(n);
            let at = out.add(16 * j);
            let v = if tile.overwrite {
                v
            } else {
                _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, at))
            };
            _mm512_mask_storeu_ps(at, mask, v);
        }
    }
}

/// The 32-bit pair `(lo, hi)` as `vdpbf16ps` reads it: `lo` in the low half.
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// Packs `lhs [m, kc]` as panels of `MR` rows, each row its `kc / 2` pairs (rounded up)
/// contiguous; rows past `m` and the odd tail are zero.
///
/// # Safety
/// `a` addresses an `m` x `kc` matrix; `out` holds `⌈m / MR⌉·MR·⌈kc / 2⌉` values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_lhs(a: Operand, m: usize, kc: usize, out: &mut [u32]) {
    let kp = kc.div_ceil(2);
    debug_assert_eq!(out.len(), m.div_ceil(MR) * MR * kp);
    for (r, row) in out.chunks_exact_mut(kp).enumerate() {
        if r >= m {
            row.fill(0);
            continue;
        }
        let src = a.at(r, 0);
        if a.cs == 1 {
            // 32 values (16 pairs) at a time: they are already in pair order.
            for q in (0..kc).step_by(32) {
                let v = pairs_of_run(src.ptr.add(q), kc - q);
                let np = (kc - q).div_ceil(2).min(16);
                _mm512_mask_storeu_epi32(row.as_mut_ptr().add(q / 2).cast(), lanes(np), v);
            }
        } else {
            for (p, d) in row.iter_mut().enumerate() {
                let lo = *src.ptr.add(2 * p * a.cs);
                let hi = if 2 * p + 1 < kc {
                    *src.ptr.add((2 * p + 1) * a.cs)
                } else {
                    0.0
                };
                *d = pair(lo, hi);
            }
        }
    }
}

/// The first `min(len, 32)` floats at `src` (zeros after) as 16 bf16 pairs.
///
/// # Safety
/// `src` addresses `min(len, 32)` readable floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs_of_run(src: *const f32, len: usize) -> __m512i {
    let lo = _mm512_maskz_loadu_ps(lanes(len.min(16)), src);
    let hi = _mm512_maskz_loadu_ps(lanes(len.saturating_sub(16).min(16)), src.add(16));
    // Words 0..16 from `lo`, 16..32 from `hi`: the floats in order.
    std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
}

/// Packs the strip `rhs [kc, nr]` (`nr` at most `NR`) as `⌈kc / 2⌉` rows of `NR` pairs:
/// `(rhs[2p, j], rhs[2p + 1, j])` at `p·NR + j`, zero past `kc` and `nr`.
///
/// # Safety
/// `b` addresses a `kc` x `nr` matrix; `out` holds `⌈kc / 2⌉·NR` values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rhs(b: Operand, kc: usize, nr: usize, out: &mut [u32]) {
    debug_assert!(nr <= NR && out.len() == kc.div_ceil(2) * NR);
    if b.cs == 1 {
        pack_rhs_rows(b, kc, nr, out);
    } else if b.rs == 1 {
        pack_rhs_columns(b, kc, nr, out);
    } else {
        for (p, row) in out.chunks_exact_mut(NR).enumerate() {
            for (j, d) in row.iter_mut().enumerate() {
                *d = if j < nr {
                    let lo = *b.at(2 * p, j).ptr;
                    let hi = if 2 * p + 1 < kc {
                        *b.at(2 * p + 1, j).ptr
                    } else {
                        0.0
                    };
                    pair(lo, hi)
                } else {
                    0
                };
            }
        }
    }
}

/// [`pack_rhs`] for contiguous rows: two rows are loaded, rounded and interleaved per pair.
///
/// # Safety
/// As [`pack_rhs`], with `b.cs == 1`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rhs_rows(b: Operand, kc: usize, nr: usize, out: &mut [u32]) {
    // Word 2i from the first row's lane i, word 2i + 1 from the second's.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for (p, row) in out.chunks_exact_mut(NR).enumerate() {
        let first = b.at(2 * p, 0).ptr;
        let second = (2 * p + 1 < kc).then(|| b.at(2 * p + 1, 0).ptr);
        for j in 0..NV {
            let mask = lanes(nr.saturating_sub(16 * j).min(16));
            let lo = _mm512_maskz_loadu_ps(mask, first.add(16 * j));
            let hi = match second {
                Some(s) => _mm512_maskz_loadu_ps(mask, s.add(16 * j)),
                None => _mm512_setzero_ps(),
            };
            let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let v = _mm512_permutexvar_epi16(interleave, words);
            _mm512_storeu_si512(row.as_mut_ptr().add(16 * j).cast(), v);
        }
    }
}

/// [`pack_rhs`] for contiguous columns (`rhs` is the transpose of a row-major matrix): each
/// column's run of 32 values is 16 pairs, and 16 columns' runs are transposed as a 16 x 16
/// block of pairs.
///
/// # Safety
/// As [`pack_rhs`], with `b.rs == 1`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rhs_columns(b: Operand, kc: usize, nr: usize, out: &mut [u32]) {
    let kp = kc.div_ceil(2);
    for g in 0..NV {
        for q in (0..kc).step_by(32) {
            let mut block = [_mm512_setzero_si512(); 16];
            for (c, v) in block.iter_mut().enumerate() {
                let j = 16 * g + c;
                if j < nr {
                    *v = pairs_of_run(b.at(q, j).ptr, kc - q);
                }
            }
            let t = transpose16(block);
            for (i, v) in t.iter().enumerate().take(kp - q / 2) {
                _mm512_storeu_si512(out.as_mut_ptr().add((q / 2 + i) * NR + 16 * g).cast(), *v);
            }
        }
    }
}

/// The transpose of a 16 x 16 block of 32-bit values (row `i` = vector `i`).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane: 32-bit, then 64-bit interleaves (u[4G + i] holds element
    // 4L + i of rows 4G..4G + 4 in lane L) ...
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_unpacklo_epi64(a, c);
        u[4 * g + 1] = _mm512_unpackhi_epi64(a, c);
        u[4 * g + 2] = _mm512_unpacklo_epi64(b, d);
        u[4 * g + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // ... then the 128-bit lanes: output 4L + i gathers lane L of u[i], u[4 + i], u[8 + i],
    // u[12 + i].
    let mut out = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let v = _mm512_shuffle_i32x4::<0x44>(u[i], u[4 + i]);
        let w = _mm512_shuffle_i32x4::<0xEE>(u[i], u[4 + i]);
        let x = _mm512_shuffle_i32x4::<0x44>(u[8 + i], u[12 + i]);
        let y = _mm512_shuffle_i32x4::<0xEE>(u[8 + i], u[12 + i]);
        out[i] = _mm512_shuffle_i32x4::<0x88>(v, x);
        out[4 + i] = _mm512_shuffle_i32x4::<0xDD>(v, x);
        out[8 + i] = _mm512_shuffle_i32x4::<0x88>(w, y);
        out[12 + i] = _mm512_shuffle_i32x4::<0xDD>(w, y);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-1, 1].
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = crate::init::SplitMix64::new(seed);
        (0..n)
            .map(|_| (s.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    fn round(x: f32) -> f64 {
        f32::from_bits(bf16_bits(x) << 16) as f64
    }

    /// The product at every (transposed or not) operand layout against an f64 product of the
    /// bf16-rounded operands: the only difference left is f32 summation, so the bound is tight.
    #[test]
    fn product_matches_rounded_reference_at_odd_sizes() {
        let Some(cpu) = Avx512Bf16::detect() else {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 3),
            (13, 70, 33),
            (6, 64, 256),
            (19, 131, 517),
            (128, 75, 9),
            (5, 3, 600),
        ] {
            let a = values(m * k, 1 + m as u64);
            let b = values(k * n, 2 + n as u64);
            // (value, Σ |terms|) of each output.
            let want: Vec<(f64, f64)> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (0..k)
                        .map(|p| round(a[r * k + p]) * round(b[p * n + c]))
                        .fold((0.0, 0.0), |(s, t), v| (s + v, t + v.abs()))
                })
                .collect();
            // rhs row-major, and the same values stored transposed (column-contiguous);
            // lhs row-major, and transposed.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            type Layout<'a> = (&'a [f32], (usize, usize), &'a [f32], (usize, usize));
            let layouts: [Layout; 3] = [
                (&a, (1, k), &b, (1, n)),
                (&a, (1, k), &bt, (k, 1)),
                (&at, (m, 1), &b, (1, n)),
            ];
            for (li, &(lhs, ls, rhs, rs)) in layouts.iter().enumerate() {
                for accumulate in [false, true] {
                    let mut dst = vec![if accumulate { 0.5 } else { f32::NAN }; m * n];
                    unsafe {
                        product(
                            cpu,
                            (m, n, k),
                            dst.as_mut_ptr(),
                            n,
                            accumulate,
                            lhs.as_ptr(),
                            ls,
                            rhs.as_ptr(),
                            rs,
                        )
                    };
                    let base = if accumulate { 0.5 } else { 0.0 };
                    for (i, (&d, &(w, size))) in dst.iter().zip(&want).enumerate() {
                        let err = (d as f64 - base - w).abs();
                        assert!(
                            err <= 1e-6 * (size + 1.0),
                            "{m}x{n}x{k} layout {li} accumulate {accumulate}: [{i}] {d} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn transpose16_transposes() {
        if Avx512Bf16::detect().is_none() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let rows: [[u32; 16]; 16] =
            std::array::from_fn(|i| std::array::from_fn(|j| (i * 16 + j) as u32));
        // SAFETY: the CPU has AVX512F (checked above).
        let out: [[u32; 16]; 16] = unsafe {
            let v = rows.map(|r| std::mem::transmute::<[u32; 16], __m512i>(r));
            transpose16(v).map(|r| std::mem::transmute::<__m512i, [u32; 16]>(r))
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[i][j], rows[j][i]);
            }
        }
    }

    /// Single-thread GFLOP/s of the bf16 kernel and of f32 `gemm` at the convolutions' shapes:
    /// `cargo test --release --lib bf16_gemm::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        let Some(cpu) = Avx512Bf16::detect() else {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        };
        use crate::precision::Kernel;
        // (m, n, k, rhs transposed): forward tiles (chunked and phase), weight gradient.
        for &(m, n, k, t) in &[
            (128, 256, 384, false),
            (192, 256, 1152, false),
            (128, 256, 75, false),
            (128, 3200, 4096, true),
            (128, 1152, 4096, true),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let rs = if t { (k, 1) } else { (1, n) };
            let mut dst = vec![0f32; m * n];
            let reps = (2e9 / (2.0 * (m * n * k) as f64)).ceil() as usize;
            let mut time = |kernel: Kernel| {
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    unsafe {
                        crate::layers::cpu_conv::product(
                            kernel,
                            (m, n, k),
                            dst.as_mut_ptr(),
                            n,
                            true,
                            a.as_ptr(),
                            (1, k),
                            b.as_ptr(),
                            rs,
                        )
                    };
                }
                2.0 * (m * n * k * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9
            };
            let (f, h) = (time(Kernel::F32), time(Kernel::Bf16(cpu)));
            let (f2, h2) = (time(Kernel::F32), time(Kernel::Bf16(cpu)));
            println!("{m}x{n}x{k} transposed {t}: f32 {f:.0} {f2:.0}, bf16 {h:.0} {h2:.0} GFLOP/s");
        }
    }
}
