//! Row strips: the analysis and synthesis transforms of a large image computed a band of rows
//! at a time, with the same result as one pass and memory bounded by the band, not the image.
//!
//! A strip is a run of whole latent rows (its *core*) plus `halo` latent rows of context on
//! each side (its *span*, clamped to the image). The transforms run on the span and keep the
//! core:
//!
//! - the analysis `g_a` reads the span's image rows, padded as the whole image is (edge pixels
//!   replicated to the aligned size), so its convolutions zero-pad only at the true edges of
//!   the padded image; each span starts on a latent row, i.e. a multiple of the total stride,
//!   so every strided layer samples the same positions as on the whole image;
//! - the synthesis `g_s` reads the span's latent rows and writes the core's image rows; its
//!   triggers are per-channel values, the same for every strip, except adaptive triggers'
//!   convolutions, whose reach adds [`Triggers::halo_rows`] to the halo.
//!
//! Where the halo covers the transform's receptive field (a backbone states it:
//! [`LicBackbone::analysis_halo`], [`LicBackbone::synthesis_halo`]), every core value is
//! computed from exactly the inputs the one-pass transform uses, by the same operations. An
//! image whose padded area fits in one strip's budget takes one pass, as before.

use std::ops::Range;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::backbone::{LicBackbone, Triggers};
use crate::image_io::tensor_to_image;
use crate::{Error, Result};

/// Default budget of image pixels (padding included) in one strip's core: 2^21 = 2,097,152.
/// A larger image is analysed and synthesised in strips of at most this many pixels plus
/// their halos; a smaller one in one pass. See `docs/FORMAT.md`, "Memory".
pub const DEFAULT_TILE_PIXELS: u64 = 1 << 21;

/// One band of latent rows: the rows it contributes and the rows it computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strip {
    /// The latent rows this strip contributes to the result.
    pub core: Range<usize>,
    /// The latent rows the transform runs on: the core and up to `halo` rows each side.
    pub span: Range<usize>,
}

impl Strip {
    /// Rows of the span before the core.
    pub fn offset(&self) -> usize {
        self.core.start - self.span.start
    }
}

/// The strips for a latent `rows` high of which each row covers `row_pixels` image pixels
/// (the latent stride times the padded width).
///
/// One strip spans everything when `halo` is `None` (a transform that cannot be cut), or the
/// whole image fits in `budget` pixels; otherwise the cores hold as many rows as `budget`
/// allows (at least one), evened out over the strips, and each span adds up to `halo` rows a
/// side.
pub fn plan_strips(rows: usize, row_pixels: u64, halo: Option<usize>, budget: u64) -> Vec<Strip> {
    let whole = vec![Strip {
        core: 0..rows,
        span: 0..rows,
    }];
    let Some(halo) = halo else { return whole };
    if rows == 0 || (rows as u64).saturating_mul(row_pixels) <= budget {
        return whole;
    }
    let most = (budget / row_pixels.max(1)).clamp(1, rows as u64) as usize;
    let count = rows.div_ceil(most);
    let per = rows.div_ceil(count);
    (0..count)
        .map(|i| i * per)
        .take_while(|&start| start < rows)
        .map(|start| {
            let core = start..(start + per).min(rows);
            let span = core.start.saturating_sub(halo)..(core.end + halo).min(rows);
            Strip { core, span }
        })
        .collect()
}

/// The most image pixels any strip of `strips` spans (what one pass of a transform holds).
pub fn largest_span_pixels(strips: &[Strip], row_pixels: u64) -> u64 {
    strips
        .iter()
        .map(|s| s.span.len() as u64 * row_pixels)
        .max()
        .unwrap_or(0)
}

/// Image rows `rows` of `img` padded on the right and bottom by edge replication to `width`
/// columns, as a `[1, 3, rows, width]` f32 tensor in `[0, 1]`: the values
/// [`image_to_tensor`](crate::image_io::image_to_tensor) and
/// [`pad_to_multiple`](crate::image_io::pad_to_multiple) give those rows.
pub fn padded_rows(
    img: &RgbImage,
    rows: Range<usize>,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 || width < w {
        return Err(Error::InvalidArgument(format!(
            "cannot pad a {w}x{h} image to {width} columns"
        )));
    }
    let (n, raw) = (rows.len(), img.as_raw());
    let mut planar = vec![0f32; 3 * n * width];
    for (i, y) in rows.enumerate() {
        let src = &raw[y.min(h - 1) * w * 3..][..w * 3];
        for c in 0..3 {
            let dst = &mut planar[(c * n + i) * width..][..width];
            let edge = src[(w - 1) * 3 + c] as f32 / 255.0;
            for (d, px) in dst.iter_mut().zip(src.chunks_exact(3)) {
                *d = px[c] as f32 / 255.0;
            }
            dst[w..].fill(edge);
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, n, width), device)?)
}

/// `y = g_a(x)` of `img` padded to `padded` (width, height; multiples of the backbone's
/// alignment), strip by strip within `budget` pixels a core.
pub fn analyse(
    b: &dyn LicBackbone,
    img: &RgbImage,
    padded: (usize, usize),
    budget: u64,
) -> Result<Tensor> {
    let (pw, ph) = padded;
    let stride = b.latent_stride();
    let row_pixels = (stride * pw) as u64;
    let strips = plan_strips(ph / stride, row_pixels, b.analysis_halo(), budget);
    let mut parts = Vec::with_capacity(strips.len());
    for s in &strips {
        let rows = s.span.start * stride..s.span.end * stride;
        let y = b.analysis(&padded_rows(img, rows, pw, b.device())?)?;
        if strips.len() == 1 {
            return Ok(y);
        }
        parts.push(y.narrow(2, s.offset(), s.core.len())?.contiguous()?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

/// Runs `g_s` on `y_hat` (with `triggers`) strip by strip within `budget` pixels a core, and
/// hands `sink` each strip's rows of the image cropped to `size` (width, height), top to
/// bottom, as `[1, 3, rows, width]` tensors (not clamped).
fn synthesise_with(
    b: &dyn LicBackbone,
    y_hat: &Tensor,
    triggers: Option<&Triggers>,
    size: (usize, usize),
    budget: u64,
    sink: &mut dyn FnMut(Tensor) -> Result<()>,
) -> Result<()> {
    let (w, h) = size;
    let stride = b.latent_stride();
    let (_, _, rows, cols) = y_hat.dims4()?;
    if rows * stride < h || cols * stride < w {
        return Err(Error::InvalidArgument(format!(
            "a {rows}x{cols} latent does not cover a {w}x{h} image"
        )));
    }
    let row_pixels = (stride * stride * cols) as u64;
    // Adaptive triggers convolve inside the synthesis: their reach widens the halo.
    let halo = b
        .synthesis_halo()
        .map(|h| h + triggers.map_or(0, Triggers::halo_rows));
    for s in plan_strips(rows, row_pixels, halo, budget) {
        let first = s.core.start * stride;
        let count = (s.core.end * stride).min(h).saturating_sub(first);
        if count == 0 {
            continue;
        }
        let x = b.synthesis(&y_hat.narrow(2, s.span.start, s.span.len())?, triggers)?;
        sink(x.narrow(2, s.offset() * stride, count)?.narrow(3, 0, w)?)?;
    }
    Ok(())
}

/// `g_s(y_hat)` (with `triggers`) cropped to `size` (width, height), `[1, 3, h, w]`, not
/// clamped: computed strip by strip within `budget` pixels a core.
pub fn synthesise_tensor(
    b: &dyn LicBackbone,
    y_hat: &Tensor,
    triggers: Option<&Triggers>,
    size: (usize, usize),
    budget: u64,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    synthesise_with(b, y_hat, triggers, size, budget, &mut |x| {
        parts.push(x);
        Ok(())
    })?;
    match parts.len() {
        1 => Ok(parts.remove(0)),
        _ => Ok(Tensor::cat(&parts, 2)?),
    }
}

/// The image of `g_s(y_hat)` (with `triggers`) cropped to `size` (width, height) and converted
/// as [`tensor_to_image`] does, strip by strip within `budget` pixels a core: no more than a
/// strip of the image is ever held in floats.
pub fn synthesise(
    b: &dyn LicBackbone,
    y_hat: &Tensor,
    triggers: Option<&Triggers>,
    size: (usize, usize),
    budget: u64,
) -> Result<RgbImage> {
    let (w, h) = size;
    let mut raw = Vec::with_capacity(3 * w * h);
    synthesise_with(b, y_hat, triggers, size, budget, &mut |x| {
        raw.extend_from_slice(tensor_to_image(&x)?.as_raw());
        Ok(())
    })?;
    RgbImage::from_raw(w as u32, h as u32, raw)
        .ok_or_else(|| Error::Image("internal: strips do not fill the image".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_images_take_one_pass() {
        let s = plan_strips(32, 16 * 768, Some(2), DEFAULT_TILE_PIXELS);
        assert_eq!(
            s,
            vec![Strip {
                core: 0..32,
                span: 0..32
            }]
        );
        let s = plan_strips(260, 16 * 4032, None, 1);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn strips_cover_every_row_once_with_their_halo() {
        for (rows, budget) in [(260, DEFAULT_TILE_PIXELS), (7, 1), (10, 16 * 64 * 3)] {
            let s = plan_strips(rows, 16 * 64, Some(2), budget);
            let mut next = 0;
            for strip in &s {
                assert_eq!(strip.core.start, next);
                assert!(!strip.core.is_empty());
                assert_eq!(strip.span.start, strip.core.start.saturating_sub(2));
                assert_eq!(strip.span.end, (strip.core.end + 2).min(rows));
                next = strip.core.end;
            }
            assert_eq!(next, rows);
        }
    }

    /// The memory bound: a 16.8 MP image (the default pixel limit) of any shape runs its
    /// transforms on at most 2^21 pixels plus halos at a time (4,032 x 4,160: 9 strips of 29
    /// latent rows, at most 33 rows = 2.13 MP with their halos; the widest image allowed,
    /// 32,768 x 512: 8 strips of 4 rows, 4.2 MP with halos), never the whole image. The
    /// measured peaks this bound gives are in `docs/FORMAT.md`, "Memory"; a plan that cuts
    /// coarser fails here.
    #[test]
    fn a_default_limit_image_is_cut_into_bounded_strips() {
        let (stride, halo) = (16u64, Some(2));
        // (padded width, padded height): the measured photo, a square, the widest, a tall one.
        for (pw, ph) in [(4032, 4160), (4096, 4096), (32768, 512), (512, 32768)] {
            let row_pixels = stride * pw;
            let s = plan_strips(
                (ph / stride) as usize,
                row_pixels,
                halo,
                DEFAULT_TILE_PIXELS,
            );
            let largest = largest_span_pixels(&s, row_pixels);
            let bound = DEFAULT_TILE_PIXELS.max(row_pixels) + 4 * row_pixels;
            assert!(largest <= bound, "{pw}x{ph}: {largest} > {bound}");
            assert!(largest <= 5 << 20, "{pw}x{ph}: a strip of {largest} pixels");
            let cores: u64 = s.iter().map(|t| t.core.len() as u64 * row_pixels).sum();
            assert_eq!(cores, pw * ph);
        }
        let photo = plan_strips(260, 16 * 4032, halo, DEFAULT_TILE_PIXELS);
        assert_eq!(photo.len(), 9);
        assert!(largest_span_pixels(&photo, 16 * 4032) <= 2_500_000);
    }

    #[test]
    fn padded_rows_replicate_the_edges() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(10 * x + y) as u8, 0, 255]));
        let t = padded_rows(&img, 1..4, 5, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let red: Vec<f32> = v[..15].iter().map(|x| (x * 255.0).round()).collect();
        // Rows 1, 2 and 3 are all the image's last row (1), widened by its last pixel.
        let row = [1.0, 11.0, 21.0, 21.0, 21.0];
        assert_eq!(red, [row, row, row].concat());
        assert!(v[30..].iter().all(|&b| b == 1.0));
    }
}
