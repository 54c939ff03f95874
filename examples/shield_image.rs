//! Shield one image with the default model embedded in psic: one bitstream, then its shielded
//! decode (for everyone) and its full decode (for holders of the condition).
//!
//! ```text
//! cargo run --release --example shield_image -- [IMAGE] [OUT_DIR]
//! ```
//! IMAGE defaults to the committed Kodak photo `assets/kodim23.png`, OUT_DIR to a `psic-examples`
//! folder in the system's temporary directory.

use std::path::PathBuf;

use psic::image_io::{load_image, save_png, write_atomic};

fn main() -> psic::Result<()> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/kodim23.png"));
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("psic-examples"));
    std::fs::create_dir_all(&out).map_err(|e| psic::Error::io(&out, e))?;

    let codec = psic::zoo::default_codec()?;
    let img = load_image(&input)?;
    let bytes = codec.encode(&img)?;
    // The default model is shielded: it knows its full and shielded conditions.
    let conditions = codec
        .conditions()
        .ok_or_else(|| psic::Error::InvalidArgument("the model has no shield".into()))?;
    let shielded = codec.decode_shielded(&bytes)?;
    let full = codec.decode_full(&bytes, &conditions.full)?;

    write_atomic(out.join("shield_image.psic"), &bytes)?;
    save_png(out.join("shield_image.shielded.png"), &shielded)?;
    save_png(out.join("shield_image.full.png"), &full)?;
    let bpp = bytes.len() as f64 * 8.0 / f64::from(img.width() * img.height());
    println!(
        "{}: {} bytes ({bpp:.3} bpp); shielded decode {:.2} dB, full decode {:.2} dB; files in {}",
        input.display(),
        bytes.len(),
        psic::metrics::psnr(&img, &shielded)?,
        psic::metrics::psnr(&img, &full)?,
        out.display()
    );
    Ok(())
}
