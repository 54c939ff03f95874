//! The JPEG baseline that psic's rate-distortion results are compared with.
//!
//! JPEG here is the `image` crate's own encoder (0.25): baseline sequential JPEG with the
//! standard (Annex K) quantisation tables scaled by libjpeg's quality formula and the standard
//! Huffman tables (not optimised per image), and **no chroma subsampling**: all three YCbCr
//! components are written with sampling factors 1x1, i.e. 4:4:4, although the encoder's own
//! docs say 4:2:2. At equal quality its files are therefore larger than those of libjpeg or
//! PIL with their default 4:2:0 subsampling, so compare its curve only with JPEG curves made
//! the same way. Decoding goes through the crate's own decoder (zune-jpeg). The byte counts
//! include the headers (JFIF, tables: about 600 bytes), as file sizes do.

use image::RgbImage;

use crate::metrics::{ms_ssim, psnr, MS_SSIM_MIN_SIDE};
use crate::{Error, Result};

/// One image compressed and decompressed by JPEG.
#[derive(Debug, Clone)]
pub struct JpegResult {
    /// Size of the JPEG file in bytes, headers included.
    pub bytes: usize,
    /// Bits per pixel: `8 * bytes / (width * height)`.
    pub bpp: f64,
    /// The decoded image.
    pub decoded: RgbImage,
}

/// One point of a JPEG rate-distortion curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RdPoint {
    /// The JPEG quality setting (1-100).
    pub quality: u8,
    /// Bits per pixel.
    pub bpp: f64,
    /// PSNR of the decoded image in dB (see [`psnr`]).
    pub psnr: f64,
    /// MS-SSIM of the decoded image (see [`ms_ssim`]); `None` when the image's smaller side is
    /// not larger than [`MS_SSIM_MIN_SIDE`].
    pub ms_ssim: Option<f64>,
}

/// Encodes `img` as JPEG at `quality` (1-100, higher is better) and decodes it again.
/// Errors for a quality outside 1-100, an empty image or a side over 65,535 pixels (JPEG's
/// limit).
pub fn jpeg_roundtrip(img: &RgbImage, quality: u8) -> Result<JpegResult> {
    // The encoder would silently clamp 0 and 101+; a curve should not contain them.
    if !(1..=100).contains(&quality) {
        return Err(Error::InvalidArgument(format!(
            "JPEG quality must be 1-100, got {quality}"
        )));
    }
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Image(format!(
            "cannot encode an empty {w}x{h} image"
        )));
    }
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .map_err(|e| Error::Image(format!("JPEG encoding: {e}")))?;
    let decoded = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .map_err(|e| Error::Image(format!("JPEG decoding: {e}")))?
        .to_rgb8();
    Ok(JpegResult {
        bytes: buf.len(),
        bpp: 8.0 * buf.len() as f64 / (w as f64 * h as f64),
        decoded,
    })
}

/// JPEG rate-distortion points of `img`, one per quality, in the order given.
pub fn jpeg_curve(img: &RgbImage, qualities: &[u8]) -> Result<Vec<RdPoint>> {
    let with_ms_ssim = img.width().min(img.height()) > MS_SSIM_MIN_SIDE;
    qualities
        .iter()
        .map(|&quality| {
            let r = jpeg_roundtrip(img, quality)?;
            Ok(RdPoint {
                quality,
                bpp: r.bpp,
                psnr: psnr(img, &r.decoded)?,
                ms_ssim: if with_ms_ssim {
                    Some(ms_ssim(img, &r.decoded)?)
                } else {
                    None
                },
            })
        })
        .collect()
}

/// PSNR at `bpp` read off a curve of `(bpp, psnr)` points, piecewise-linear in bpp after
/// sorting by bpp ("JPEG's PSNR at equal rate"). `None` when `bpp` lies outside the curve's
/// range or there are no finite points; points with a non-finite coordinate are skipped.
/// Where several points share one bpp, the first in sorted order is used at that exact rate.
pub fn interpolate_psnr_at(points: &[(f64, f64)], bpp: f64) -> Option<f64> {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (first, last) = (pts.first()?, pts.last()?);
    if !(first.0..=last.0).contains(&bpp) {
        return None;
    }
    // The first segment whose right end reaches bpp; a single point means bpp equals it.
    let i = pts.iter().position(|p| p.0 >= bpp)?;
    if i == 0 || pts[i].0 == bpp {
        return Some(pts[i].1);
    }
    let ((x0, y0), (x1, y1)) = (pts[i - 1], pts[i]);
    Some(y0 + (y1 - y0) * (bpp - x0) / (x1 - x0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth, textured test image (JPEG needs some content to show a rate curve).
    fn test_image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let t = ((x * 7 + y * 13) % 23) as u8;
            image::Rgb([
                (x * 255 / w) as u8 / 2 + t,
                (y * 255 / h) as u8 / 2 + t,
                ((x + y) % 64) as u8 * 2 + t,
            ])
        })
    }

    #[test]
    fn roundtrip_reports_size_and_decodes() {
        let img = test_image(48, 40);
        let r = jpeg_roundtrip(&img, 90).unwrap();
        assert_eq!(r.decoded.dimensions(), (48, 40));
        assert!((r.bpp - 8.0 * r.bytes as f64 / (48.0 * 40.0)).abs() < 1e-12);
        assert!(psnr(&img, &r.decoded).unwrap() > 30.0);
        assert!(jpeg_roundtrip(&img, 0).is_err());
        assert!(jpeg_roundtrip(&img, 101).is_err());
        assert!(jpeg_roundtrip(&RgbImage::new(0, 5), 50).is_err());
    }

    #[test]
    fn encoder_does_not_subsample_chroma() {
        // A one-pixel red/blue chequerboard survives only without chroma subsampling: at 4:2:0
        // or 4:2:2 neighbouring pixels would share one chroma sample and turn purple.
        let img = RgbImage::from_fn(16, 16, |x, y| {
            if (x + y) % 2 == 0 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let r = jpeg_roundtrip(&img, 100).unwrap();
        let px = r.decoded.get_pixel(5, 5).0; // red square
        assert!(px[0] > 200 && px[2] < 60, "{px:?}");
        let px = r.decoded.get_pixel(6, 5).0; // blue square
        assert!(px[2] > 200 && px[0] < 60, "{px:?}");
    }

    #[test]
    fn curve_rate_and_quality_rise_together() {
        let small = test_image(64, 48);
        let curve = jpeg_curve(&small, &[10, 50, 95]).unwrap();
        assert_eq!(curve.len(), 3);
        assert!(curve.iter().all(|p| p.ms_ssim.is_none()));
        assert!(curve[0].bpp < curve[1].bpp && curve[1].bpp < curve[2].bpp);
        assert!(curve[0].psnr < curve[1].psnr && curve[1].psnr < curve[2].psnr);
        assert_eq!(curve[1].quality, 50);

        let big = test_image(176, 168);
        let curve = jpeg_curve(&big, &[20, 80]).unwrap();
        let (lo, hi) = (curve[0].ms_ssim.unwrap(), curve[1].ms_ssim.unwrap());
        assert!(0.0 < lo && lo < hi && hi < 1.0);
        assert!(jpeg_curve(&big, &[50, 0]).is_err());
    }

    #[test]
    fn interpolation_is_piecewise_linear_in_bpp() {
        // Unsorted on purpose; the NaN point is skipped.
        let pts = [(1.0, 34.0), (0.25, 28.0), (0.5, 30.0), (f64::NAN, 99.0)];
        assert_eq!(interpolate_psnr_at(&pts, 0.25), Some(28.0));
        assert_eq!(interpolate_psnr_at(&pts, 0.375), Some(29.0));
        assert_eq!(interpolate_psnr_at(&pts, 0.5), Some(30.0));
        assert_eq!(interpolate_psnr_at(&pts, 0.75), Some(32.0));
        assert_eq!(interpolate_psnr_at(&pts, 1.0), Some(34.0));
        assert_eq!(interpolate_psnr_at(&pts, 0.2), None);
        assert_eq!(interpolate_psnr_at(&pts, 1.01), None);
        assert_eq!(interpolate_psnr_at(&pts, f64::NAN), None);
        assert_eq!(interpolate_psnr_at(&[], 0.5), None);
        assert_eq!(interpolate_psnr_at(&[(0.5, 31.0)], 0.5), Some(31.0));
        assert_eq!(interpolate_psnr_at(&[(0.5, 31.0)], 0.6), None);
        // Duplicate rates do not divide by zero.
        let dup = [(0.5, 30.0), (0.5, 31.0), (1.0, 35.0)];
        assert!(interpolate_psnr_at(&dup, 0.75).unwrap().is_finite());
    }
}
