//! Differentiable MS-SSIM for training, and the choice of distortion term.
//!
//! The same definition as [`crate::metrics::ms_ssim`] (pytorch_msssim's convention: 11-tap
//! Gaussian window with sigma 1.5, 'valid' filtering, five scales, zero-padded 2x2 average
//! pooling between them), written with tensor operations so gradients reach the decoder. The
//! Gaussian filtering is two matrix products with banded matrices: fast in both directions on
//! every device, unlike a depthwise convolution's backward on candle's CPU.

use candle_core::{DType, Device, Tensor};

use crate::metrics::MS_SSIM_WEIGHTS;
use crate::{Error, Result};

/// Window size and width of the Gaussian filter.
const WIN: usize = 11;
const SIGMA: f64 = 1.5;
/// Stabilisers for a data range of 1 (the decoder's `[0, 1]` scale).
const C1: f64 = 0.01 * 0.01;
const C2: f64 = 0.03 * 0.03;
/// Lower clamp of the per-scale terms before the fractional powers. pytorch_msssim clamps at 0
/// (`relu`), whose power has an infinite derivative there; a tiny floor keeps gradients finite
/// and changes nothing for images that look alike.
const FLOOR: f64 = 1e-6;

/// The distortion term a training run minimises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distortion {
    /// `255²·MSE` (CompressAI's `λ·255²·MSE`, with λ around 0.0018-0.0483).
    #[default]
    Mse,
    /// `1 − MS-SSIM` (CompressAI's MS-SSIM models use λ around 2.4-220).
    MsSsim,
}

impl Distortion {
    /// The term for reconstructions `x_hat` of `x` (both `[B, 3, H, W]` in `[0, 1]`), averaged
    /// over the batch.
    pub fn term(self, x_hat: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self {
            Distortion::Mse => Ok(((x_hat - x)?.sqr()?.mean_all()? * (255.0 * 255.0))?),
            Distortion::MsSsim => Ok((1.0 - ms_ssim(x_hat, x)?)?),
        }
    }

    /// The config's spelling: `mse` or `ms-ssim`.
    pub fn name(self) -> &'static str {
        match self {
            Distortion::Mse => "mse",
            Distortion::MsSsim => "ms-ssim",
        }
    }

    /// Smallest square crop the term accepts (MS-SSIM's five scales need sides over 160).
    pub fn min_side(self) -> usize {
        match self {
            Distortion::Mse => 1,
            Distortion::MsSsim => crate::metrics::MS_SSIM_MIN_SIDE as usize + 1,
        }
    }
}

/// Banded `[n, n − WIN + 1]` matrix whose product with a row vector is 'valid' Gaussian
/// filtering.
fn gaussian_band(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let c = (WIN / 2) as f64;
    let g: Vec<f64> = (0..WIN)
        .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * SIGMA * SIGMA)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    let out = n + 1 - WIN;
    let mut m = vec![0f64; n * out];
    for j in 0..out {
        for (t, gt) in g.iter().enumerate() {
            m[(j + t) * out + j] = gt / sum;
        }
    }
    Ok(Tensor::from_vec(m, (n, out), device)?.to_dtype(dtype)?)
}

/// 'Valid' separable Gaussian filtering of `[N, H, W]` planes.
fn blur(x: &Tensor, rows: &Tensor, cols: &Tensor) -> Result<Tensor> {
    let (n, h, w) = x.dims3()?;
    let wo = cols.dim(1)?;
    let ho = rows.dim(1)?;
    let along_w = x.reshape((n * h, w))?.matmul(cols)?.reshape((n, h, wo))?;
    let along_h = along_w
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * wo, h))?
        .matmul(rows)?
        .reshape((n, wo, ho))?;
    Ok(along_h.transpose(1, 2)?.contiguous()?)
}

/// Mean SSIM and contrast-structure over the window positions, per plane: two `[N]` tensors.
fn ssim_cs(x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, h, w) = x.dims3()?;
    let rows = gaussian_band(h, x.dtype(), x.device())?;
    let cols = gaussian_band(w, x.dtype(), x.device())?;
    let f = |t: &Tensor| blur(t, &rows, &cols);
    let (mu1, mu2) = (f(x)?, f(y)?);
    let (mu11, mu22, mu12) = (mu1.sqr()?, mu2.sqr()?, (&mu1 * &mu2)?);
    let s11 = (f(&x.sqr()?)? - &mu11)?;
    let s22 = (f(&y.sqr()?)? - &mu22)?;
    let s12 = (f(&(x * y)?)? - &mu12)?;
    let cs = ((s12 * 2.0)? + C2)?.div(&((s11 + s22)? + C2)?)?;
    let luminance = ((mu12 * 2.0)? + C1)?.div(&((mu11 + mu22)? + C1)?)?;
    let ssim = (luminance * &cs)?.mean((1, 2))?;
    Ok((ssim, cs.mean((1, 2))?))
}

/// 2x2 average pooling with pytorch_msssim's padding, where an odd side gets one zero on each
/// end. The trailing zero is never read, so only the leading one is added: the side is then
/// exactly twice the output's, which candle's pooling backward needs (it upsamples the gradient
/// by the ratio of the sizes).
fn pool(x: &Tensor) -> Result<Tensor> {
    let (_, h, w) = x.dims3()?;
    let x = x.pad_with_zeros(1, h % 2, 0)?.pad_with_zeros(2, w % 2, 0)?;
    Ok(x.unsqueeze(1)?.avg_pool2d(2)?.squeeze(1)?)
}

/// MS-SSIM of `a` against `b` (`[B, 3, H, W]`, values on a `[0, 1]` scale, computed in their
/// float type), averaged over the images and channels; differentiable in both. Errors when a
/// side is not over 160 pixels.
pub fn ms_ssim(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = a.dims4()?;
    if b.dims() != a.dims() {
        return Err(Error::InvalidArgument(format!(
            "MS-SSIM of tensors of different shapes: {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let min_side = Distortion::MsSsim.min_side();
    if h.min(w) < min_side {
        return Err(Error::InvalidArgument(format!(
            "MS-SSIM needs sides of at least {min_side} pixels, got {w}x{h}"
        )));
    }
    let mut x = a.reshape((n * c, h, w))?;
    let mut y = b.to_dtype(a.dtype())?.reshape((n * c, h, w))?;
    let mut value: Option<Tensor> = None;
    for (i, &weight) in MS_SSIM_WEIGHTS.iter().enumerate() {
        let (ssim, cs) = ssim_cs(&x, &y)?;
        let last = i + 1 == MS_SSIM_WEIGHTS.len();
        let term = if last { ssim } else { cs }
            .clamp(FLOOR, f64::INFINITY)?
            .powf(weight)?;
        value = Some(match value {
            None => term,
            Some(v) => (v * term)?,
        });
        if !last {
            x = pool(&x)?;
            y = pool(&y)?;
        }
    }
    Ok(value.expect("five scales").mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, seed: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            let v = |c: u32| {
                let s = (x * 7 + y * 13 + c * 29 + seed)
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(7);
                ((x * 3 + y * 2 + c * 40) % 200) as u8 / 2 + (s % 60) as u8
            };
            image::Rgb([v(0), v(1), v(2)])
        })
    }

    fn tensor(img: &image::RgbImage) -> Tensor {
        crate::image_io::image_to_tensor(img, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_evaluation_metric() {
        // Odd sizes exercise the padded pooling.
        for (w, h) in [(192, 176), (201, 167)] {
            let (a, b) = (image(w, h, 1), image(w, h, 5));
            let want = crate::metrics::ms_ssim(&a, &b).unwrap();
            let got = ms_ssim(&tensor(&a), &tensor(&b))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            assert!((got - want).abs() < 1e-4, "{w}x{h}: {got} vs {want}");
        }
        let a = tensor(&image(176, 176, 3));
        let same = ms_ssim(&a, &a).unwrap().to_scalar::<f32>().unwrap();
        assert!((same - 1.0).abs() < 1e-5, "{same}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // In f64, so central differences resolve the small per-pixel changes.
        let f64_of = |seed| tensor(&image(168, 168, seed)).to_dtype(DType::F64).unwrap();
        let a = f64_of(2);
        let b = candle_core::Var::from_tensor(&f64_of(9)).unwrap();
        let loss = Distortion::MsSsim.term(b.as_tensor(), &a).unwrap();
        let grad = loss.backward().unwrap();
        let g: Vec<f64> = grad
            .get(b.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-4;
        for idx in [0usize, 5_000, 40_321, 84_000] {
            let value_at = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                let t = Tensor::from_vec(v, b.as_tensor().dims(), &Device::Cpu).unwrap();
                Distortion::MsSsim
                    .term(&t, &a)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (value_at(eps) - value_at(-eps)) / (2.0 * eps);
            assert!(
                (numeric - g[idx]).abs() < 1e-4 * numeric.abs().max(g[idx].abs()) + 1e-10,
                "pixel {idx}: analytic {} vs numeric {numeric}",
                g[idx]
            );
        }
    }

    #[test]
    fn small_inputs_are_rejected() {
        let a = Tensor::zeros((1, 3, 128, 200), DType::F32, &Device::Cpu).unwrap();
        let err = ms_ssim(&a, &a).unwrap_err().to_string();
        assert!(err.contains("161"), "{err}");
    }
}
