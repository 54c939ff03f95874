//! Image <-> tensor conversion, padding, and safe file I/O.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{ImageEncoder, RgbImage};

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

/// Most bytes of an image file [`load_image_limited`] reads for an image of at most `max_pixels`
/// pixels: 16 bytes a pixel (twice a 16-bit RGBA PNG stored uncompressed) plus 16 MiB, so
/// 272 MiB at the default limit of 2^24 pixels. A longer file is refused unread.
pub fn image_file_limit(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(16).saturating_add(16 << 20)
}

/// Reads a PNG or JPEG (or any format the `image` crate was built with) as 8-bit RGB, within the
/// codec's default pixel limit ([`DEFAULT_MAX_PIXELS`](crate::codec::DEFAULT_MAX_PIXELS)): see
/// [`load_image_limited`].
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    load_image_limited(path, crate::codec::DEFAULT_MAX_PIXELS)
}

/// Reads an image of at most `max_pixels` pixels (and at most
/// [`MAX_SIDE`](crate::bitstream::MAX_SIDE) a side) as 8-bit RGB.
///
/// Bounded on hostile files: the file is read up to [`image_file_limit`] bytes
/// ([`Error::InputTooLarge`] beyond), the header's size is checked before any pixel is decoded,
/// and the decoder runs under the `image` crate's [`Limits`](image::Limits) (sides, and
/// allocations of at most 12 bytes a pixel plus 64 MiB). Anything else wrong is [`Error::Image`].
pub fn load_image_limited(path: impl AsRef<Path>, max_pixels: u64) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = read_limited(path, image_file_limit(max_pixels))?;
    decode_image_limited(&bytes, max_pixels, path)
}

/// [`load_image_limited`] on an image file already in memory (read from standard input, say,
/// with [`read_limited_from`] up to [`image_file_limit`] bytes): the same checks, with `path`
/// naming the source in errors.
pub fn decode_image_limited(
    bytes: &[u8],
    max_pixels: u64,
    path: impl AsRef<Path>,
) -> Result<RgbImage> {
    let path = path.as_ref();
    let bad = |e: &dyn std::fmt::Display| Error::Image(format!("{}: {e}", path.display()));
    let reader = || {
        let mut r = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(&e))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(crate::bitstream::MAX_SIDE);
        limits.max_image_height = Some(crate::bitstream::MAX_SIDE);
        limits.max_alloc = Some(max_pixels.saturating_mul(12).saturating_add(64 << 20));
        r.limits(limits);
        Ok::<_, Error>(r)
    };
    let (w, h) = reader()?.into_dimensions().map_err(|e| bad(&e))?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(Error::Image(format!(
            "{}: {w}x{h} is over the limit of {max_pixels} pixels",
            path.display()
        )));
    }
    Ok(reader()?.decode().map_err(|e| bad(&e))?.to_rgb8())
}

/// Reads the file at `path` whole, but at most `limit` bytes: a longer file (or an endless one,
/// such as `/dev/zero`) is [`Error::InputTooLarge`] after reading `limit + 1` bytes.
pub fn read_limited(path: impl AsRef<Path>, limit: u64) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Size the buffer from the metadata when it is a regular file within the limit.
    let hint = file.metadata().map(|m| m.len()).unwrap_or(0).min(limit);
    read_limited_from(file, limit, hint as usize, path)
}

/// [`read_limited`] on any reader: reads at most `limit + 1` bytes of `reader` and fails with
/// [`Error::InputTooLarge`] (naming `path`) if there are more than `limit`. `capacity` sizes the
/// initial buffer.
pub fn read_limited_from(
    reader: impl Read,
    limit: u64,
    capacity: usize,
    path: impl AsRef<Path>,
) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let mut out = Vec::with_capacity(capacity);
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| Error::io(path, e))?;
    if out.len() as u64 > limit {
        return Err(Error::InputTooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(out)
}

/// Refuses to write `output` when it is the file `input` (the same path, or another name for the
/// same file: a hard link, a symbolic link, `./a` for `a`): writing would destroy the input. An
/// `output` that does not exist yet is never the input. Returns [`Error::OutputIsInput`].
pub fn ensure_output_is_not_input(input: impl AsRef<Path>, output: impl AsRef<Path>) -> Result<()> {
    let (input, output) = (input.as_ref(), output.as_ref());
    let (Ok(a), Ok(b)) = (std::fs::metadata(input), std::fs::metadata(output)) else {
        return Ok(());
    };
    #[cfg(unix)]
    let same = {
        use std::os::unix::fs::MetadataExt;
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    };
    #[cfg(not(unix))]
    let same = {
        let _ = (a, b);
        matches!(
            (input.canonicalize(), output.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        )
    };
    if same {
        return Err(Error::OutputIsInput {
            input: input.to_path_buf(),
            output: output.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically; see [`write_atomic_with`].
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    write_atomic_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Writes a file atomically: `write` fills a new temporary file in `path`'s folder, which then
/// replaces `path` in one rename, so readers see the old file or the new one, never a part.
///
/// - The temporary file has a random name (`.NAME.<16 hex digits>.psic-tmp`) and is created with
///   `O_CREAT | O_EXCL` (a new name is tried if it exists), so a file or symbolic link planted
///   there is never followed or overwritten, and concurrent writers of one `path` each write
///   their own file (the last rename wins, the result is one writer's complete output).
/// - The data is flushed to disk (`fsync`) before the rename, and the folder after it (where the
///   platform allows).
/// - An existing `path` keeps its permissions (a `600` file stays `600`); a new one gets the
///   default mode (`666` less the umask).
/// - On any failure (`write` returning an error, a full disk, a failed rename) the temporary file
///   is removed and `path` is left as it was.
pub fn write_atomic_with(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Permissions of the file being replaced (of a symbolic link's target: the rename replaces
    // the link itself with a regular file).
    let keep = std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.permissions());
    let (file, tmp) = create_temp(dir, &name.to_string_lossy())?;
    let written = (|| {
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?;
        if let Some(perm) = keep {
            file.set_permissions(perm).map_err(|e| Error::io(path, e))?;
        }
        file.sync_all().map_err(|e| Error::io(path, e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Make the rename itself durable; not every platform or file system can sync a folder.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates a new temporary file `.NAME.<random>.psic-tmp` in `dir` with `create_new` (never
/// opening an existing file or following a link), trying new names on a collision.
fn create_temp(dir: &Path, name: &str) -> Result<(std::fs::File, PathBuf)> {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Keep the name well within NAME_MAX (255 bytes) whatever the output is called.
    let stem: String = name.chars().take(64).collect();
    let mut last = None;
    for _ in 0..100 {
        // std's RandomState is seeded from the OS per process; mix in the time, the process
        // and a counter so every call draws a fresh name.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        let tmp = dir.join(format!(".{stem}.{:016x}.psic-tmp", h.finish()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    }
    let (tmp, e) = last.expect("at least one attempt");
    Err(Error::io(tmp, e))
}

/// Encodes an image as PNG and writes it atomically ([`write_atomic_with`]).
pub fn save_png(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    write_atomic_with(path, |w| {
        image::codecs::png::PngEncoder::new(w)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| Error::Image(e.to_string()))
    })
}
