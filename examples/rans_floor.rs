//! How close psic's rANS decoder is to the floor of its stream format, in CPU cycles per symbol.
//!
//! `cargo run --release --example rans_floor`
//!
//! CompressAI's strings carry one rANS state, so decoding is one serial chain per symbol: mask the
//! state, load the lookup bucket, multiply, add. No decoder of this format can beat that chain's
//! latency. This prints, in cycles per symbol (the clock is estimated from a chain of dependent
//! 64-bit multiplies, 3 cycles each on current x86-64 cores):
//!
//! 1. the chain alone: psic's fast-path loop over one 64-bucket table that stays in L1, with no
//!    searches and no escapes (the best case of this format on this machine);
//! 2. `RansCoder` decoding the fixture image's y symbols (the figure `cargo bench` and
//!    `psic bench` report);
//! 3. CompressAI's C++ core on its image-latent runs, from the fixture's `results.json`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use psic::entropy::{EntropyCoder, RansCoder};
use psic::{Codec, ModelFile};

/// Fastest of `rounds` timings of `f`, in seconds.
fn best_of(rounds: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Clock estimate in GHz from a chain of dependent 64-bit `imul`s (3-cycle latency).
#[cfg(target_arch = "x86_64")]
fn clock_ghz() -> Option<f64> {
    const N: u64 = 50_000_000;
    let secs = best_of(5, || {
        let (mut v, k) = (1u64, std::hint::black_box(0x9E37_79B9_7F4A_7C15u64));
        for _ in 0..N {
            // SAFETY: a register-only multiply.
            unsafe {
                std::arch::asm!("imul {0}, {1}", inout(reg) v, in(reg) k,
                    options(pure, nomem, nostack))
            };
        }
        std::hint::black_box(v);
    });
    Some(3.0 * N as f64 / secs / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn clock_ghz() -> Option<f64> {
    None
}

/// One lookup bucket, laid out as psic's (frequency, start, value).
#[derive(Clone, Copy)]
struct Bucket {
    freq: u16,
    start: u16,
    value: i32,
}

/// Seconds per symbol of the bare decode chain: psic's fast path over one table of 64 buckets,
/// each one symbol of frequency 1024 (6 bits a symbol, a renormalisation every ~5 symbols).
fn chain_alone() -> f64 {
    let lut: Vec<Bucket> = (0..64u16)
        .map(|b| Bucket {
            freq: 1024,
            start: b * 1024,
            value: i32::from(b),
        })
        .collect();
    let n = 1 << 20;
    let words: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let mut out = vec![0i32; n];
    let secs = best_of(7, || {
        let (mut x, mut pos) = (0x1234_5678_9abcu64, 0usize);
        for o in out.iter_mut() {
            let cum = (x & 0xFFFF) as u32;
            let b = lut[(cum >> 10) as usize];
            x = u64::from(b.freq) * (x >> 16) + u64::from(cum - u32::from(b.start));
            if x < 1 << 31 {
                x = (x << 32) | u64::from(words[pos % n]);
                pos += 1;
            }
            *o = b.value;
        }
        std::hint::black_box(&out);
    });
    secs / n as f64
}

/// CompressAI's C++ decode rates (M symbols/s) on image latents, from the fixture's results.
fn compressai_rates(dir: &std::path::Path) -> Vec<(u64, f64)> {
    let Ok(text) = std::fs::read_to_string(dir.join("results.json")) else {
        return Vec::new();
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    json["rans"]["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["symbols"] == "image_latents_tiled")
        .filter_map(|r| {
            Some((
                r["n_symbols"].as_u64()?,
                r["cpp_core_no_python"]["decode_Msym_per_s"].as_f64()?,
            ))
        })
        .collect()
}

fn main() -> psic::Result<()> {
    let ghz = clock_ghz();
    let cycles = |secs_per_symbol: f64| match ghz {
        Some(g) => format!("{:.1} cycles/symbol", secs_per_symbol * g * 1e9),
        None => "cycles unknown (no clock estimate on this architecture)".into(),
    };
    match ghz {
        Some(g) => println!("clock estimate: {g:.2} GHz"),
        None => println!("clock estimate: none (not x86-64)"),
    }
    let chain = chain_alone();
    println!(
        "decode chain alone (one L1 table): {:.0} M symbols/s, {}",
        1e-6 / chain,
        cycles(chain)
    );

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/compressai");
    if !dir.is_dir() {
        println!("skipped the fixture image: {} not found", dir.display());
        return Ok(());
    }
    let model = ModelFile::import(
        dir.join("hyperprior_128_192.safetensors"),
        None,
        &Device::Cpu,
    )?;
    let codec = Codec::from_model_file(&model, &Device::Cpu)?;
    let img = psic::image_io::load_image(dir.join("test768x512.png"))?;
    let bytes = codec.encode(&img)?;
    let latent = codec.decode_latent(&bytes)?;
    let gc = codec.backbone().gaussian_conditional();
    let (indexes, y_string) = (&latent.y_indexes, &latent.stream.strings[0]);
    let mut result = Ok(Vec::new());
    let secs = best_of(50, || {
        result = RansCoder.decode_with_indexes(y_string, indexes, gc.tables());
    }) / indexes.len() as f64;
    result?;
    let bits = 8.0 * y_string.len() as f64 / indexes.len() as f64;
    let mut used = vec![false; gc.tables().len()];
    for &i in indexes {
        used[i as usize] = true;
    }
    println!(
        "RansCoder on the fixture image's {} y symbols ({bits:.2} bits each, so a 32-bit \
         renormalisation every {:.0} symbols; {} of {} tables used): {:.0} M symbols/s, {}",
        indexes.len(),
        32.0 / bits,
        used.iter().filter(|&&u| u).count(),
        used.len(),
        1e-6 / secs,
        cycles(secs)
    );
    for (n, rate) in compressai_rates(&dir) {
        println!(
            "CompressAI C++ core, {n} image-latent symbols (fixture results.json): {rate:.0} M \
             symbols/s; 3x that is {:.0}",
            3.0 * rate
        );
    }
    Ok(())
}
