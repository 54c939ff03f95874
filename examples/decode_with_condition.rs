//! Decode one psic stream with an explicit condition β (the decoder's input that selects the
//! reconstruction; it is never part of the stream). For psic models β = 0 is the full decode and
//! β = 1 the shielded one; other values give images in between that no model is trained for.
//!
//! ```text
//! cargo run --release --example decode_with_condition -- [STREAM.psic] [BETA] [OUT.png]
//! ```
//! Without a stream it encodes `assets/kodim23.png` with the default model first; BETA defaults
//! to 0.5.

use std::path::PathBuf;

use psic::image_io::{load_image, read_limited, save_png};
use psic::shield::Condition;

fn main() -> psic::Result<()> {
    let mut args = std::env::args().skip(1);
    let codec = psic::zoo::default_codec()?;
    let (bytes, original) = match args.next() {
        // Never read more than the longest stream this codec accepts.
        Some(stream) => (read_limited(&stream, codec.max_stream_len())?, None),
        None => {
            let img =
                load_image(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/kodim23.png"))?;
            (codec.encode(&img)?, Some(img))
        }
    };
    let beta: f32 = match args.next() {
        Some(v) => v
            .parse()
            .map_err(|_| psic::Error::InvalidArgument(format!("BETA {v:?} is not a number")))?,
        None => 0.5,
    };
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("psic-beta-{beta}.png")));

    let img = codec.decode_full(&bytes, &Condition::new(beta))?;
    save_png(&out, &img)?;
    print!(
        "β = {beta}: {}x{} -> {}",
        img.width(),
        img.height(),
        out.display()
    );
    if let Some(original) = original {
        print!(
            " ({:.2} dB PSNR to the original)",
            psic::metrics::psnr(&original, &img)?
        );
    }
    println!();
    Ok(())
}
