//! Import a CompressAI checkpoint (bmshj2018-hyperprior, as `.pth.tar` or `.safetensors`) and
//! shield it: wrap it with a fresh, untrained CLTG trigger generator. The encoder and its streams
//! stay exactly the same; until the generator is trained (`psic train`, stage 1) the full decode
//! equals the plain model's.
//!
//! ```text
//! cargo run --release --example wrap_compressai -- [CHECKPOINT] [OUT.safetensors]
//! ```
//! CHECKPOINT defaults to the CompressAI fixture in `../shared/fixtures/compressai` when present.

use std::path::PathBuf;

use psic::candle_core::Device;
use psic::{Codec, ModelFile};

fn main() -> psic::Result<()> {
    let mut args = std::env::args().skip(1);
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/compressai/hyperprior_128_192.safetensors");
    let checkpoint = match args.next() {
        Some(p) => PathBuf::from(p),
        None if fixture.exists() => fixture,
        None => {
            println!(
                "no checkpoint given and no fixture at {}.\n\
                 Download a CompressAI bmshj2018-hyperprior checkpoint (for instance \
                 bmshj2018-hyperprior-1-7eb97409.pth.tar from CompressAI's model zoo) and run\n  \
                 cargo run --release --example wrap_compressai -- CHECKPOINT.pth.tar",
                fixture.display()
            );
            return Ok(());
        }
    };
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("psic-wrapped.safetensors"));

    let device = Device::Cpu;
    // The architecture is inferred from the checkpoint's keys.
    let plain = ModelFile::import(&checkpoint, None, &device)?;
    let wrapped = plain.with_new_cltg(0, &device)?;
    wrapped.save(&out)?;

    let (plain, shielded) = (
        Codec::from_model_file(&plain, &device)?,
        Codec::from_model_file(&wrapped, &device)?,
    );
    let img = psic::image::RgbImage::from_fn(96, 64, |x, y| {
        psic::image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) * 2) as u8])
    });
    let stream = plain.encode(&img)?;
    let conditions = shielded
        .conditions()
        .ok_or_else(|| psic::Error::InvalidArgument("the wrapped model has no shield".into()))?;
    println!(
        "{} -> {} ({}); same stream from both encoders: {}; full decode equals the plain decode: {}",
        checkpoint.display(),
        out.display(),
        wrapped.architecture.name(),
        shielded.encode(&img)? == stream,
        shielded.decode_full(&stream, &conditions.full)? == plain.decode(&stream)?
    );
    Ok(())
}
