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

#[cfg(test)]
mod tests {
    use super::*;

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
