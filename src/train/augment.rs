//! Differentiable purifications the shielded decode goes through during training, so the shield
//! learns to survive them: a Gaussian blur here (the random down-scaling is the target's own
//! resize, in the trainer).

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// `[n, n]` matrix whose product with a row vector is Gaussian filtering with standard deviation
/// `sigma`, the same size as its input: taps past an edge repeat the edge sample (as
/// `image::imageops::blur` and most image tools do), so flat images stay flat.
fn gaussian_matrix(n: usize, sigma: f64, device: &Device) -> Result<Tensor> {
    let radius = (3.0 * sigma).ceil() as isize;
    let g: Vec<f64> = (-radius..=radius)
        .map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    let mut m = vec![0f32; n * n];
    for j in 0..n as isize {
        for (t, gt) in g.iter().enumerate() {
            let i = (j + t as isize - radius).clamp(0, n as isize - 1);
            // Column j of the output takes input i with this weight.
            m[i as usize * n + j as usize] += (gt / sum) as f32;
        }
    }
    Ok(Tensor::from_vec(m, (n, n), device)?)
}

/// Gaussian blur of a `[B, C, H, W]` batch with standard deviation `sigma` pixels (`sigma > 0`),
/// as two matrix products (gradients flow to `x` on every device).
pub fn gaussian_blur(x: &Tensor, sigma: f64) -> Result<Tensor> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "blur sigma must be a positive number, got {sigma}"
        )));
    }
    let (b, c, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let cols = gaussian_matrix(w, sigma, x.device())?.to_dtype(dtype)?;
    let rows = gaussian_matrix(h, sigma, x.device())?.to_dtype(dtype)?;
    let along_w = x.reshape((b * c * h, w))?.matmul(&cols)?;
    let along_h = along_w
        .reshape((b * c, h, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * c * w, h))?
        .matmul(&rows)?;
    Ok(along_h
        .reshape((b * c, w, h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, h, w))?
        .to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn ramp(h: usize, w: usize) -> Tensor {
        let v: Vec<f32> = (0..h * w)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn flat_images_stay_flat_and_mass_is_kept() {
        let flat = (Tensor::ones((2, 3, 9, 13), DType::F32, &Device::Cpu).unwrap() * 0.25).unwrap();
        let out = gaussian_blur(&flat, 1.3).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (x - 0.25).abs() < 1e-6));
        // Away from the edges, a blur keeps the sum of an impulse and spreads it by sigma^2.
        let mut d = vec![0f32; 41 * 41];
        d[20 * 41 + 20] = 1.0;
        let delta = Tensor::from_vec(d, (1, 1, 41, 41), &Device::Cpu).unwrap();
        let out: Vec<f32> = gaussian_blur(&delta, 2.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let sum: f32 = out.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "sum {sum}");
        let var: f32 = out
            .iter()
            .enumerate()
            .map(|(i, v)| v * ((i % 41) as f32 - 20.0).powi(2))
            .sum();
        assert!((var - 4.0).abs() < 0.05, "variance along x {var}");
    }

    #[test]
    fn matches_a_direct_convolution_inside_and_clamps_at_edges() {
        let x = ramp(7, 11);
        let sigma = 0.8;
        let out: Vec<f32> = gaussian_blur(&x, sigma)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let r = (3.0 * sigma).ceil() as isize;
        let g: Vec<f64> = (-r..=r)
            .map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp())
            .collect();
        let s: f64 = g.iter().sum();
        for y in 0..7isize {
            for xx in 0..11isize {
                let mut acc = 0f64;
                for (a, ga) in g.iter().enumerate() {
                    for (b, gb) in g.iter().enumerate() {
                        let yy = (y + a as isize - r).clamp(0, 6) as usize;
                        let xq = (xx + b as isize - r).clamp(0, 10) as usize;
                        acc += ga * gb / (s * s) * xs[yy * 11 + xq] as f64;
                    }
                }
                let got = out[(y * 11 + xx) as usize] as f64;
                assert!((got - acc).abs() < 1e-5, "({y}, {xx}): {got} vs {acc}");
            }
        }
    }

    #[test]
    fn gradients_flow_and_bad_sigmas_are_refused() {
        let v = candle_core::Var::from_tensor(&ramp(5, 6)).unwrap();
        let loss = gaussian_blur(v.as_tensor(), 1.0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let grad = g.get(v.as_tensor()).expect("gradient");
        assert_eq!(grad.dims(), &[1, 1, 5, 6]);
        for bad in [0.0, -1.0, f64::NAN] {
            assert!(gaussian_blur(v.as_tensor(), bad).is_err());
        }
    }
}
