//! Image-quality metrics.

use image::RgbImage;

use crate::{Error, Result};

/// PSNR in dB between two 8-bit RGB images of the same size (peak 255, mean over all channels);
/// infinite for identical images.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    if a.dimensions() != b.dimensions() {
        return Err(Error::InvalidArgument(format!(
            "cannot compare a {:?} image with a {:?} one",
            a.dimensions(),
            b.dimensions()
        )));
    }
    let n = a.as_raw().len() as f64;
    let sse: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    Ok(if sse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / (sse / n)).log10()
    })
}

/// Parameters of an SSIM evaluation; the public functions use [`SsimParams::STANDARD`], the
/// tests also a tiny variant that a direct reference implementation can check.
#[derive(Debug, Clone, Copy)]
struct SsimParams<'w> {
    /// Side of the Gaussian window (odd).
    win: usize,
    /// Standard deviation of the Gaussian window.
    sigma: f64,
    /// One weight per scale; the number of scales is their count.
    weights: &'w [f64],
}

impl SsimParams<'static> {
    const STANDARD: SsimParams<'static> = SsimParams {
        win: 11,
        sigma: 1.5,
        weights: &MS_SSIM_WEIGHTS,
    };
}

/// Per-scale exponents of MS-SSIM (Wang, Simoncelli & Bovik 2003), finest scale first.
pub const MS_SSIM_WEIGHTS: [f64; 5] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333];

/// The side that [`ms_ssim`] needs the smaller image dimension to exceed:
/// `(11 - 1) * 2^4 = 160`, as pytorch_msssim asserts (the 11x11 window must still fit after
/// four halvings).
pub const MS_SSIM_MIN_SIDE: u32 = 160;

const DATA_RANGE: f64 = 255.0;
const C1: f64 = (0.01 * DATA_RANGE) * (0.01 * DATA_RANGE);
const C2: f64 = (0.03 * DATA_RANGE) * (0.03 * DATA_RANGE);

/// One channel of an image as f64 values in `[0, 255]`, row-major.
#[derive(Clone)]
struct Plane {
    w: usize,
    h: usize,
    v: Vec<f64>,
}

/// Splits an RGB image into its three channel planes.
fn planes(img: &RgbImage) -> [Plane; 3] {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out: [Plane; 3] = std::array::from_fn(|_| Plane {
        w,
        h,
        v: Vec::with_capacity(w * h),
    });
    for px in img.as_raw().chunks_exact(3) {
        for (plane, &x) in out.iter_mut().zip(px) {
            plane.v.push(x as f64);
        }
    }
    out
}

/// Normalised 1-D Gaussian, centred on `win / 2` (pytorch_msssim's `_fspecial_gauss_1d`).
fn gaussian_1d(win: usize, sigma: f64) -> Vec<f64> {
    let c = (win / 2) as f64;
    let g: Vec<f64> = (0..win)
        .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|x| x / s).collect()
}

/// 'Valid' separable filtering: the output is `(w - k + 1) x (h - k + 1)`, no padding, so
/// border windows never see made-up pixels.
fn filter_valid(p: &Plane, k: &[f64]) -> Plane {
    let n = k.len();
    let (ow, oh) = (p.w + 1 - n, p.h + 1 - n);
    let mut rows = vec![0.0; ow * p.h];
    for y in 0..p.h {
        let src = &p.v[y * p.w..(y + 1) * p.w];
        for x in 0..ow {
            rows[y * ow + x] = src[x..x + n].iter().zip(k).map(|(a, b)| a * b).sum();
        }
    }
    let mut v = vec![0.0; ow * oh];
    for y in 0..oh {
        for (j, &kj) in k.iter().enumerate() {
            let src = &rows[(y + j) * ow..(y + j + 1) * ow];
            for (o, &s) in v[y * ow..(y + 1) * ow].iter_mut().zip(src) {
                *o += kj * s;
            }
        }
    }
    Plane { w: ow, h: oh, v }
}

/// Mean SSIM and mean contrast-structure over the 'valid' window positions of one channel
/// (pytorch_msssim's `_ssim`).
fn ssim_cs(x: &Plane, y: &Plane, k: &[f64]) -> (f64, f64) {
    let prod = |f: fn(f64, f64) -> f64| Plane {
        w: x.w,
        h: x.h,
        v: x.v.iter().zip(&y.v).map(|(&a, &b)| f(a, b)).collect(),
    };
    let mu1 = filter_valid(x, k);
    let mu2 = filter_valid(y, k);
    let xx = filter_valid(&prod(|a, _| a * a), k);
    let yy = filter_valid(&prod(|_, b| b * b), k);
    let xy = filter_valid(&prod(|a, b| a * b), k);
    let (mut ssim_sum, mut cs_sum) = (0.0, 0.0);
    for i in 0..mu1.v.len() {
        let (m1, m2) = (mu1.v[i], mu2.v[i]);
        let s11 = xx.v[i] - m1 * m1;
        let s22 = yy.v[i] - m2 * m2;
        let s12 = xy.v[i] - m1 * m2;
        let cs = (2.0 * s12 + C2) / (s11 + s22 + C2);
        cs_sum += cs;
        ssim_sum += (2.0 * m1 * m2 + C1) / (m1 * m1 + m2 * m2 + C1) * cs;
    }
    let n = mu1.v.len() as f64;
    (ssim_sum / n, cs_sum / n)
}

/// 2x2 average pooling as `F.avg_pool2d(x, 2, padding=[h % 2, w % 2])`: an odd side is
/// zero-padded by one on both ends and the padding counts in the mean (`count_include_pad`),
/// so the output side is `ceil(side / 2)`.
fn avg_pool2(p: &Plane) -> Plane {
    let (pw, ph) = (p.w % 2, p.h % 2);
    let (ow, oh) = (p.w / 2 + pw, p.h / 2 + ph);
    let at = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= p.w as isize || y >= p.h as isize {
            0.0
        } else {
            p.v[y as usize * p.w + x as usize]
        }
    };
    let mut v = Vec::with_capacity(ow * oh);
    for oy in 0..oh {
        let y0 = (2 * oy) as isize - ph as isize;
        for ox in 0..ow {
            let x0 = (2 * ox) as isize - pw as isize;
            v.push((at(x0, y0) + at(x0 + 1, y0) + at(x0, y0 + 1) + at(x0 + 1, y0 + 1)) / 4.0);
        }
    }
    Plane { w: ow, h: oh, v }
}

fn check_same_size(a: &RgbImage, b: &RgbImage) -> Result<()> {
    if a.dimensions() != b.dimensions() {
        return Err(Error::InvalidArgument(format!(
            "cannot compare a {:?} image with a {:?} one",
            a.dimensions(),
            b.dimensions()
        )));
    }
    Ok(())
}

/// MS-SSIM of one channel pair: cs at every scale but the last, full SSIM at the last, each
/// clamped at 0 (so the fractional powers stay real) and raised to its weight.
fn ms_ssim_plane(mut x: Plane, mut y: Plane, p: SsimParams) -> f64 {
    let k = gaussian_1d(p.win, p.sigma);
    let mut value = 1.0;
    for (i, &w) in p.weights.iter().enumerate() {
        let (ssim, cs) = ssim_cs(&x, &y, &k);
        if i + 1 < p.weights.len() {
            value *= cs.max(0.0).powf(w);
            x = avg_pool2(&x);
            y = avg_pool2(&y);
        } else {
            value *= ssim.max(0.0).powf(w);
        }
    }
    value
}

fn ms_ssim_with(a: &RgbImage, b: &RgbImage, p: SsimParams) -> Result<f64> {
    check_same_size(a, b)?;
    let min_side = (p.win - 1) << (p.weights.len() - 1);
    let smaller = a.width().min(a.height()) as usize;
    if smaller <= min_side {
        return Err(Error::InvalidArgument(format!(
            "MS-SSIM needs both sides larger than {min_side} pixels ({} scales of a {}x{} \
             window), got a {}x{} image",
            p.weights.len(),
            p.win,
            p.win,
            a.width(),
            a.height()
        )));
    }
    let (pa, pb) = (planes(a), planes(b));
    let sum: f64 = pa
        .into_iter()
        .zip(pb)
        .map(|(x, y)| ms_ssim_plane(x, y, p))
        .sum();
    Ok(sum / 3.0)
}

/// Single-scale SSIM between two 8-bit RGB images of the same size: 11x11 Gaussian window
/// (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 255, 'valid' windows only, mean over window
/// positions per channel, then over R, G, B. This is pytorch_msssim's
/// `ssim(X, Y, data_range=255)` (which matches `tf.image.ssim` and skimage with
/// `gaussian_weights=True, use_sample_covariance=False`). Can be negative; 1 for identical
/// images. Errors for different sizes or a side under 11 pixels.
pub fn ssim(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    check_same_size(a, b)?;
    let win = SsimParams::STANDARD.win;
    if (a.width().min(a.height()) as usize) < win {
        return Err(Error::InvalidArgument(format!(
            "SSIM needs both sides of at least {win} pixels, got a {}x{} image",
            a.width(),
            a.height()
        )));
    }
    let k = gaussian_1d(win, SsimParams::STANDARD.sigma);
    let sum: f64 = planes(a)
        .iter()
        .zip(&planes(b))
        .map(|(x, y)| ssim_cs(x, y, &k).0)
        .sum();
    Ok(sum / 3.0)
}

/// Five-scale MS-SSIM (Wang, Simoncelli & Bovik 2003) between two 8-bit RGB images of the
/// same size, in `[0, 1]` (1 for identical images).
///
/// Follows pytorch_msssim 1.0's `ms_ssim(X, Y, data_range=255)` exactly (computed here in
/// f64, pytorch_msssim in f32, so expect agreement to about 1e-6), the implementation most
/// learned-image-compression results are reported with (CompressAI's evaluation uses it):
/// - data range 255, K1 = 0.01, K2 = 0.03, 11x11 Gaussian window with sigma 1.5,
///   'valid' filtering (no padding);
/// - per RGB channel: the mean contrast-structure term at scales 1-4 and the mean full SSIM
///   (luminance too) at scale 5, each clamped at 0 (pytorch_msssim's `relu`) and raised to
///   [`MS_SSIM_WEIGHTS`], multiplied; then the mean over the three channels;
/// - between scales, 2x2 average pooling; an odd side is zero-padded by one pixel on both
///   ends with the zeros counted in the mean (`F.avg_pool2d(x, 2, padding=side % 2)`).
///   `tf.image.ssim_multiscale` differs only there (it repeats the last row or column
///   instead), so the two agree on images whose sides are multiples of 16.
///
/// Errors for different sizes and when the smaller side is not larger than
/// [`MS_SSIM_MIN_SIDE`] (160), as pytorch_msssim asserts.
pub fn ms_ssim(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    ms_ssim_with(a, b, SsimParams::STANDARD)
}

/// MS-SSIM on a decibel scale, `-10 log10(1 - v)`, as rate-distortion plots usually show it
/// (spreads out values close to 1); infinite for `v = 1`.
pub fn ms_ssim_db(v: f64) -> f64 {
    -10.0 * (1.0 - v).log10()
}

/// The period, in pixels, of the synthesis transforms' upsampling (four stride-2 layers): where
/// a shield made of per-channel trigger biases shows up as a grid.
pub const SYNTHESIS_PERIOD: u32 = 16;

/// Share of the energy of the luma error `Y(decoded) − Y(original)` (BT.601 luma) that lies on
/// the harmonics of a `period`-pixel grid: with `E` the 2-D DFT of the error over the image's
/// top-left `H×W` region (`H`, `W` the sides rounded down to multiples of `period`), the energy
/// on the rows `u` that are multiples of `H/period` and the columns `v` that are multiples of
/// `W/period` (DC included), over the total energy. Noise-like errors give about
/// `period/H + period/W` (0.125 on 256x256, 0.052 on 768x512); a regular grid gives far more.
/// Computed exactly, without an FFT, as the energy of the error's projection on signals periodic
/// with `period` down the columns or along the rows (Parseval). 0 for identical images.
pub fn periodic_share(original: &RgbImage, decoded: &RgbImage, period: u32) -> Result<f64> {
    check_same_size(original, decoded)?;
    let (h, w) = (
        (original.height() / period.max(1) * period) as usize,
        (original.width() / period.max(1) * period) as usize,
    );
    if period == 0 || h == 0 || w == 0 {
        return Err(Error::InvalidArgument(format!(
            "periodic share: a {}x{} image has no full {period}-pixel period",
            original.width(),
            original.height()
        )));
    }
    let luma = |p: &image::Rgb<u8>| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
    let mut e = vec![0f64; h * w];
    for (y, row) in e.chunks_mut(w).enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            let (x32, y32) = (x as u32, y as u32);
            *v = luma(decoded.get_pixel(x32, y32)) - luma(original.get_pixel(x32, y32));
        }
    }
    let total: f64 = e.iter().map(|v| v * v).sum();
    if total == 0.0 {
        return Ok(0.0);
    }
    Ok(periodic_part_energy(&e, h, w, period as usize) / total)
}

/// Energy of the projection of `e` (`h×w`, row-major, sides multiples of `p`) on the signals
/// that repeat every `p` rows or every `p` columns: `‖P_v e‖² + ‖P_h e‖² − ‖P_v P_h e‖²`.
fn periodic_part_energy(e: &[f64], h: usize, w: usize, p: usize) -> f64 {
    let (rh, rw) = (h / p, w / p);
    let mut pv = vec![0f64; p * w];
    let mut ph = vec![0f64; h * p];
    for y in 0..h {
        for x in 0..w {
            pv[(y % p) * w + x] += e[y * w + x] / rh as f64;
            ph[y * p + x % p] += e[y * w + x] / rw as f64;
        }
    }
    let mut pvh = vec![0f64; p * p];
    for y in 0..p {
        for x in 0..w {
            pvh[y * p + x % p] += pv[y * w + x] / rw as f64;
        }
    }
    let sq = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
    sq(&pv) * rh as f64 + sq(&ph) * rw as f64 - sq(&pvh) * (rh * rw) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_share_separates_a_grid_from_noise() {
        let (w, h) = (96u32, 64u32);
        let orig = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 90]));
        let mut s = 12345u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 59) as i32 - 16
        };
        let noisy = RgbImage::from_fn(w, h, |x, y| {
            let p = orig.get_pixel(x, y);
            let d = next();
            image::Rgb(p.0.map(|c| (c as i32 + d).clamp(0, 255) as u8))
        });
        let grid = RgbImage::from_fn(w, h, |x, y| {
            let p = orig.get_pixel(x, y);
            let d = if x % 16 == 3 || y % 16 == 7 { 12 } else { 0 };
            image::Rgb(p.0.map(|c| (c as i32 + d).clamp(0, 255) as u8))
        });
        let noise_share = periodic_share(&orig, &noisy, 16).unwrap();
        let expected = 16.0 / 64.0 + 16.0 / 96.0 - 256.0 / (64.0 * 96.0);
        assert!(
            (noise_share - expected).abs() < 0.06,
            "{noise_share} vs ~{expected}"
        );
        assert!(periodic_share(&orig, &grid, 16).unwrap() > 0.99);
        assert_eq!(periodic_share(&orig, &orig, 16).unwrap(), 0.0);
        assert!(periodic_share(&orig, &RgbImage::new(8, 8), 16).is_err());
    }

    #[test]
    fn periodic_part_matches_a_direct_dft() {
        let (h, w, p) = (32usize, 48usize, 16usize);
        let e: Vec<f64> = (0..h * w)
            .map(|i| ((i * 7919) % 113) as f64 / 50.0 - 1.1)
            .collect();
        let mut energy = 0f64;
        for u in 0..h {
            for v in 0..w {
                if u % (h / p) != 0 && v % (w / p) != 0 {
                    continue;
                }
                let (mut re, mut im) = (0f64, 0f64);
                for y in 0..h {
                    for x in 0..w {
                        let a = -2.0
                            * std::f64::consts::PI
                            * ((u * y) as f64 / h as f64 + (v * x) as f64 / w as f64);
                        re += e[y * w + x] * a.cos();
                        im += e[y * w + x] * a.sin();
                    }
                }
                energy += re * re + im * im;
            }
        }
        let want = energy / (h * w) as f64;
        let got = periodic_part_energy(&e, h, w, p);
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
    }

    /// The synthetic test pair also generated by the numpy reference (integer-only, so both
    /// languages make the same pixels): a ramp with wrap-around edges, a checkerboard and
    /// hashed texture; `b` adds hashed noise uniform in `[-noise, noise]`.
    fn test_pair(w: u32, h: u32, noise: u32) -> (RgbImage, RgbImage) {
        fn hash(x: u32, y: u32, c: u32) -> u32 {
            let mut h =
                x.wrapping_mul(73856093) ^ y.wrapping_mul(19349663) ^ c.wrapping_mul(83492791);
            h ^= h >> 13;
            h = h.wrapping_mul(0x5bd1e995);
            h ^ (h >> 15)
        }
        let mut a = RgbImage::new(w, h);
        let mut b = RgbImage::new(w, h);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let base = ((x * 3 + y * 2 + c * 60) % 200) as i64
                        + 20
                        + ((x / 23 + y / 17) % 2) as i64 * 40;
                    let va = (base + (hash(x, y, c) % 31) as i64 - 15).clamp(0, 255);
                    let n = (hash(x + 1000, y, c) % (2 * noise + 1)) as i64 - noise as i64;
                    a.get_pixel_mut(x, y).0[c as usize] = va as u8;
                    b.get_pixel_mut(x, y).0[c as usize] = (va + n).clamp(0, 255) as u8;
                }
            }
        }
        (a, b)
    }

    /// A direct MS-SSIM written independently of the separable one: a 2-D window, variances
    /// as weighted squared deviations, pooling over an explicitly zero-padded copy.
    fn naive_ms_ssim(a: &RgbImage, b: &RgbImage, win: usize, sigma: f64, weights: &[f64]) -> f64 {
        type Img = Vec<Vec<f64>>;
        let r = (win / 2) as f64;
        let mut w2 = vec![vec![0.0; win]; win];
        for (i, row) in w2.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                let (di, dj) = (i as f64 - r, j as f64 - r);
                *v = (-(di * di + dj * dj) / (2.0 * sigma * sigma)).exp();
            }
        }
        let total: f64 = w2.iter().flatten().sum();
        w2.iter_mut().flatten().for_each(|v| *v /= total);
        let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
        let ssim_cs = |x: &Img, y: &Img| {
            let (h, w) = (x.len(), x[0].len());
            let (mut s_sum, mut cs_sum, mut n) = (0.0, 0.0, 0.0);
            for oy in 0..=h - win {
                for ox in 0..=w - win {
                    let (mut m1, mut m2) = (0.0, 0.0);
                    for i in 0..win {
                        for j in 0..win {
                            m1 += w2[i][j] * x[oy + i][ox + j];
                            m2 += w2[i][j] * y[oy + i][ox + j];
                        }
                    }
                    let (mut v1, mut v2, mut cov) = (0.0, 0.0, 0.0);
                    for i in 0..win {
                        for j in 0..win {
                            let (dx, dy) = (x[oy + i][ox + j] - m1, y[oy + i][ox + j] - m2);
                            v1 += w2[i][j] * dx * dx;
                            v2 += w2[i][j] * dy * dy;
                            cov += w2[i][j] * dx * dy;
                        }
                    }
                    let cs = (2.0 * cov + c2) / (v1 + v2 + c2);
                    cs_sum += cs;
                    s_sum += (2.0 * m1 * m2 + c1) / (m1 * m1 + m2 * m2 + c1) * cs;
                    n += 1.0;
                }
            }
            (s_sum / n, cs_sum / n)
        };
        let pool = |x: &Img| -> Img {
            let (h, w) = (x.len(), x[0].len());
            let (ph, pw) = (h % 2, w % 2);
            let mut padded = vec![vec![0.0; w + 2 * pw]; h + 2 * ph];
            for (yy, row) in x.iter().enumerate() {
                padded[yy + ph][pw..pw + w].copy_from_slice(row);
            }
            (0..padded.len() / 2)
                .map(|i| {
                    (0..padded[0].len() / 2)
                        .map(|j| {
                            (padded[2 * i][2 * j]
                                + padded[2 * i][2 * j + 1]
                                + padded[2 * i + 1][2 * j]
                                + padded[2 * i + 1][2 * j + 1])
                                / 4.0
                        })
                        .collect()
                })
                .collect()
        };
        let channel = |img: &RgbImage, c: usize| -> Img {
            (0..img.height())
                .map(|y| {
                    (0..img.width())
                        .map(|x| img.get_pixel(x, y).0[c] as f64)
                        .collect()
                })
                .collect()
        };
        let mut total = 0.0;
        for c in 0..3 {
            let (mut x, mut y) = (channel(a, c), channel(b, c));
            let mut v = 1.0;
            for (i, &wt) in weights.iter().enumerate() {
                let (s, cs) = ssim_cs(&x, &y);
                if i + 1 < weights.len() {
                    v *= f64::max(cs, 0.0).powf(wt);
                    x = pool(&x);
                    y = pool(&y);
                } else {
                    v *= f64::max(s, 0.0).powf(wt);
                }
            }
            total += v;
        }
        total / 3.0
    }

    const TINY: SsimParams<'static> = SsimParams {
        win: 3,
        sigma: 1.0,
        weights: &[0.2, 0.3, 0.5],
    };

    #[test]
    fn identical_images_score_one() {
        let (a, _) = test_pair(181, 167, 0);
        assert!((ms_ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
        assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(ms_ssim_db(1.0), f64::INFINITY);
        assert!((ms_ssim_db(0.99) - 20.0).abs() < 1e-9);
    }

    /// Values of a float64 numpy port of pytorch_msssim 1.0's `ssim` / `ms_ssim`
    /// (`data_range=255`) on the same synthetic pairs; its single-scale SSIM equals
    /// skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    /// use_sample_covariance=False, data_range=255)` to all printed digits.
    #[test]
    fn matches_the_pytorch_msssim_convention() {
        let cases = [
            (181, 167, 10, 0.993025989834, 0.928231060884),
            (181, 167, 40, 0.925211285072, 0.517691753762),
            (192, 176, 10, 0.992895147115, 0.928913932288),
            (192, 176, 40, 0.924291074339, 0.519514145716),
        ];
        for (w, h, noise, ms, ss) in cases {
            let (a, b) = test_pair(w, h, noise);
            let got_ms = ms_ssim(&a, &b).unwrap();
            let got_ss = ssim(&a, &b).unwrap();
            assert!(
                (got_ms - ms).abs() < 1e-9,
                "{w}x{h} noise {noise}: {got_ms} vs {ms}"
            );
            assert!(
                (got_ss - ss).abs() < 1e-9,
                "{w}x{h} noise {noise}: {got_ss} vs {ss}"
            );
        }
        let (a, b) = test_pair(13, 11, 30);
        let tiny = ms_ssim_with(&a, &b, TINY).unwrap();
        assert!((tiny - 0.793248495301).abs() < 1e-9, "{tiny}");
    }

    #[test]
    fn separable_implementation_matches_a_direct_one() {
        // Odd sides exercise the zero-padded pooling at every scale.
        let (a, b) = test_pair(13, 11, 30);
        let direct = naive_ms_ssim(&a, &b, TINY.win, TINY.sigma, TINY.weights);
        assert!((ms_ssim_with(&a, &b, TINY).unwrap() - direct).abs() < 1e-12);
        let (a, b) = test_pair(181, 167, 25);
        let direct = naive_ms_ssim(&a, &b, 11, 1.5, &MS_SSIM_WEIGHTS);
        assert!((ms_ssim(&a, &b).unwrap() - direct).abs() < 1e-12);
    }

    #[test]
    fn constant_shift_gives_the_luminance_term() {
        // Flat images: every contrast-structure term is (0 + C2) / (0 + C2) = 1, and with sides
        // that are multiples of 16 pooling keeps the means, so MS-SSIM is the luminance term
        // raised to the last weight and SSIM is the luminance term itself.
        let (m1, m2) = (100.0f64, 110.0f64);
        let a = RgbImage::from_pixel(192, 176, image::Rgb([m1 as u8; 3]));
        let b = RgbImage::from_pixel(192, 176, image::Rgb([m2 as u8; 3]));
        let l = (2.0 * m1 * m2 + C1) / (m1 * m1 + m2 * m2 + C1);
        assert!((ssim(&a, &b).unwrap() - l).abs() < 1e-12);
        assert!((ms_ssim(&a, &b).unwrap() - l.powf(MS_SSIM_WEIGHTS[4])).abs() < 1e-12);
    }

    #[test]
    fn symmetric_and_decreasing_with_noise() {
        let mut last = 1.0;
        for noise in [3, 10, 30, 80] {
            let (a, b) = test_pair(170, 165, noise);
            let v = ms_ssim(&a, &b).unwrap();
            assert!((v - ms_ssim(&b, &a).unwrap()).abs() < 1e-12);
            assert!(v < last && v > 0.0, "noise {noise}: {v} after {last}");
            last = v;
        }
    }

    #[test]
    fn rejects_mismatched_or_small_images() {
        let a = RgbImage::new(200, 200);
        assert!(ms_ssim(&a, &RgbImage::new(200, 199)).is_err());
        assert!(ssim(&a, &RgbImage::new(199, 200)).is_err());
        // pytorch_msssim's bound: the smaller side must exceed 160.
        let small = RgbImage::new(300, 160);
        assert!(ms_ssim(&small, &small).is_err());
        let ok = RgbImage::new(161, 161);
        assert!((ms_ssim(&ok, &ok).unwrap() - 1.0).abs() < 1e-12);
        let tiny = RgbImage::new(10, 40);
        assert!(ssim(&tiny, &tiny).is_err());
        assert!(
            (ssim(&RgbImage::new(11, 11), &RgbImage::new(11, 11)).unwrap() - 1.0).abs() < 1e-12
        );
    }

    #[test]
    fn psnr_of_a_known_error() {
        let a = RgbImage::from_pixel(4, 4, image::Rgb([100, 100, 100]));
        let mut b = a.clone();
        assert_eq!(psnr(&a, &b).unwrap(), f64::INFINITY);
        // Every value off by 5: MSE 25, PSNR = 10 log10(65025 / 25) = 34.151 dB.
        b.pixels_mut().for_each(|p| p.0 = [105, 95, 105]);
        assert!((psnr(&a, &b).unwrap() - 34.1514).abs() < 1e-3);
        assert!(psnr(&a, &RgbImage::new(2, 2)).is_err());
    }
}
