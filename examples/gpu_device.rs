//! Run the codec on a GPU when one is there: CUDA (a build with `--features cuda`), else Metal
//! (`--features metal`), else the CPU. Encodes and decodes one image with the default model.
//!
//! ```text
//! cargo run --release --example gpu_device                    # CPU
//! cargo run --release --features cuda --example gpu_device    # NVIDIA GPU when available
//! ```
//! Streams are meant to be decoded on the kind of device that encoded them: the entropy model's
//! tables are computed in floating point, which can differ between back ends.

use std::time::Instant;

use psic::candle_core::Device;
use psic::{zoo, Codec};

/// The first CUDA GPU, else the first Metal GPU, else the CPU.
fn pick_device() -> Device {
    if let Ok(d) = Device::cuda_if_available(0) {
        if d.is_cuda() {
            return d;
        }
    }
    if let Ok(d) = Device::metal_if_available(0) {
        if d.is_metal() {
            return d;
        }
    }
    Device::Cpu
}

fn main() -> psic::Result<()> {
    let device = pick_device();
    println!("device: {device:?}");
    let codec = Codec::from_model_file(&zoo::default_model(&device)?, &device)?;
    let img = psic::image_io::load_image(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/kodim23.png"),
    )?;
    let t = Instant::now();
    let bytes = codec.encode(&img)?;
    let encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let shielded = codec.decode_shielded(&bytes)?;
    let decode_s = t.elapsed().as_secs_f64();
    println!(
        "{}x{}: {} bytes, encode {encode_s:.2} s, shielded decode {decode_s:.2} s ({:.2} dB)",
        img.width(),
        img.height(),
        bytes.len(),
        psic::metrics::psnr(&img, &shielded)?
    );
    Ok(())
}
