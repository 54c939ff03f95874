//! Image <-> tensor conversion, padding, and safe file I/O.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// Converts an RGB image to a `[1, 3, H, W]` f32 tensor with values in `[0, 1]`.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let raw = img.as_raw();
    let mut planar = vec![0f32; 3 * w * h];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            planar[c * w * h + i] = px[c] as f32 / 255.0;
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), device)?)
}

/// Converts a `[1, 3, H, W]` tensor (any float dtype) to an RGB image: clamps to `[0, 1]`,
/// scales by 255 and rounds.
pub fn tensor_to_image(t: &Tensor) -> Result<RgbImage> {
    let (b, c, h, w) = t.dims4()?;
    if b != 1 || c != 3 {
        return Err(Error::InvalidArgument(format!(
            "expected a [1, 3, H, W] image tensor, got {:?}",
            t.dims()
        )));
    }
    let v = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let plane = w * h;
    let mut raw = vec![0u8; 3 * plane];
    for i in 0..plane {
        for ch in 0..3 {
            let x = v[ch * plane + i];
            // NaN maps to 0 rather than poisoning the image.
            let x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
            raw[3 * i + ch] = (x * 255.0).round() as u8;
        }
    }
    RgbImage::from_raw(w as u32, h as u32, raw)
        .ok_or_else(|| Error::Image("internal: buffer size mismatch".into()))
}

/// Pads `[B, C, H, W]` on the right and bottom to multiples of `align`, replicating the edge
/// pixels (fewer bits than zero padding: no artificial edge to code). Returns the padding.
pub fn pad_to_multiple(x: &Tensor, align: usize) -> Result<(Tensor, usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    let pad_h = (align - h % align) % align;
    let pad_w = (align - w % align) % align;
    let x = x.pad_with_same(2, 0, pad_h)?.pad_with_same(3, 0, pad_w)?;
    Ok((x, pad_w, pad_h))
}

/// Reads a PNG or JPEG (or any format the `image` crate was built with) as 8-bit RGB.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    Ok(img.to_rgb8())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename, so
/// a failure never leaves a half-written output.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.psic-tmp", name.to_string_lossy()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Encodes an image as PNG and writes it atomically.
pub fn save_png(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::Image(e.to_string()))?;
    write_atomic(path, &buf.into_inner())
}
