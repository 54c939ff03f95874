//! In-repo fuzzing (issue 17): a deterministic mutation harness, since cargo-fuzz needs a
//! nightly toolchain. Each target takes valid inputs, mutates them with a seeded generator (bit
//! flips, byte sets, truncations, extensions, splices, chunk deletions and duplications,
//! length-field edits, and for CRC-checked streams a recomputed CRC so that the mutation reaches
//! the parser behind the checksum) and feeds them to one entry point of psic:
//!
//! | test | entry point |
//! | --- | --- |
//! | `fuzz_container` | `Bitstream::from_bytes` (`src/bitstream.rs`) |
//! | `fuzz_rans` | `RansCoder::decode_with_indexes` with CompressAI's Gaussian tables |
//! | `fuzz_decode_latent` | `Codec::decode_latent` of a tiny model (N 8, M 12) |
//! | `fuzz_model_file` | `ModelFile::from_bytes` then `Codec::from_model_file` of a tiny model |
//!
//! Every call must return `Ok` or a typed `Err`: a panic fails the test after writing the input
//! to `target/fuzz-failures/` (the message names the file and the seed); inputs are bounded (at
//! most twice the seed input plus 64 bytes), and an allocation over 256 MiB anywhere in the
//! process fails the test too.
//!
//! The normal test run does 400 to 300,000 executions per target (a few seconds in all).
//! `PSIC_FUZZ_ITERS=N` runs `N` per target, `PSIC_FUZZ_SEED=S` changes the seed; each target
//! prints its executions per second. A long campaign:
//!
//! ```sh
//! PSIC_FUZZ_ITERS=5000000 nice cargo test --release --test fuzz fuzz_rans -- --nocapture
//! ```
//!
//! (the campaign behind the figures in docs/FORMAT.md, "Fuzzing", ran each target with its own
//! `PSIC_FUZZ_ITERS`; a panic there would have left its input in `target/fuzz-failures/`).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::Device;
use common::{test_image, tiny_codec, Rng};
use psic::backbone::ScaleHyperpriorConfig;
use psic::bitstream::{Bitstream, EntropyPath, StreamLevel};
use psic::entropy::{default_scale_table, EntropyCoder, GaussianConditional, RansCoder};
use psic::model::Architecture;
use psic::{Codec, ModelFile};

/// The system allocator, recording the largest single allocation.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// The most one allocation may ask for while fuzzing.
const ALLOCATION_LIMIT: usize = 256 << 20;

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Iterations for a target: `PSIC_FUZZ_ITERS`, or the target's short default.
fn iterations(default: u64) -> u64 {
    env_u64("PSIC_FUZZ_ITERS").unwrap_or(default)
}

fn base_seed() -> u64 {
    env_u64("PSIC_FUZZ_SEED").unwrap_or(0x5eed_0017)
}

/// Writes a failing input where it can be found again.
fn save_failure(target: &str, seed: u64, iter: u64, input: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{seed:x}-{iter}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

/// Interesting values for byte and length-field edits.
const BYTES: [u8; 8] = [0, 1, 0x7f, 0x80, 0xfe, 0xff, 0x10, 0x40];
const WORDS: [u32; 10] = [
    0,
    1,
    2,
    3,
    4,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x0001_0000,
];

/// One to four stacked mutations of `input` (its own bytes or a splice from `other`), at most
/// `max_len` bytes long.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(10) {
            // Bit flip.
            0 | 1 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            // Byte set.
            2 if len > 0 => {
                let i = rng.below(len);
                v[i] = if rng.below(2) == 0 {
                    BYTES[rng.below(BYTES.len())]
                } else {
                    rng.next() as u8
                };
            }
            // Truncation.
            3 => v.truncate(rng.below(len + 1)),
            // Extension with random or zero bytes.
            4 => {
                let n = 1 + rng.below(16);
                let zero = rng.below(2) == 0;
                v.extend((0..n).map(|_| if zero { 0 } else { rng.next() as u8 }));
            }
            // Splice: a chunk of `other` over or into a random place.
            5 if !other.is_empty() => {
                let a = rng.below(other.len());
                let n = 1 + rng.below((other.len() - a).min(64));
                let at = rng.below(len + 1);
                let chunk = &other[a..a + n];
                if rng.below(2) == 0 {
                    v.splice(at..at, chunk.iter().copied());
                } else {
                    let end = (at + n).min(len);
                    v.splice(at..end, chunk.iter().copied());
                }
            }
            // Delete a chunk.
            6 if len > 0 => {
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(32));
                v.drain(a..a + n);
            }
            // Duplicate a chunk.
            7 if len > 0 => {
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(32));
                let chunk: Vec<u8> = v[a..a + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            // Length-field edit: a little-endian u32 (interesting, or the old one nudged).
            8 | 9 if len >= 4 => {
                let i = rng.below(len - 3);
                let old = u32::from_le_bytes(v[i..i + 4].try_into().unwrap());
                let new = match rng.below(3) {
                    0 => WORDS[rng.below(WORDS.len())],
                    1 => old.wrapping_add(1 + rng.below(8) as u32),
                    _ => old.wrapping_sub(1 + rng.below(8) as u32),
                };
                v[i..i + 4].copy_from_slice(&new.to_le_bytes());
            }
            _ => {}
        }
    }
    v.truncate(max_len);
    v
}

/// Recomputes a psic stream's trailing CRC-32, so that mutations reach the checks behind it.
fn fix_crc(v: &mut [u8]) {
    if v.len() >= 8 {
        let n = v.len() - 4;
        let crc = crc32fast::hash(&v[..n]);
        v[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Outcome counts of a campaign.
#[derive(Default)]
struct Tally {
    ok: u64,
    err: u64,
}

/// Runs `iters` executions of `run` on mutations of `seeds`, failing on any panic or oversized
/// allocation; prints the executions per second.
fn campaign(
    target: &str,
    seeds: &[Vec<u8>],
    default_iters: u64,
    crc: bool,
    mut run: impl FnMut(&[u8]) -> bool,
) {
    let iters = iterations(default_iters);
    let seed = base_seed()
        ^ target
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64);
    let mut rng = Rng(seed | 1);
    let mut tally = Tally::default();
    // The unmutated seeds must decode.
    for s in seeds {
        assert!(run(s), "{target}: a valid seed input was refused");
    }
    let start = Instant::now();
    for iter in 0..iters {
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        let mut input = mutate(&mut rng, a, b, 2 * a.len() + 64);
        if crc && rng.below(4) != 0 {
            fix_crc(&mut input);
        }
        match catch_unwind(AssertUnwindSafe(|| run(&input))) {
            Ok(true) => tally.ok += 1,
            Ok(false) => tally.err += 1,
            Err(_) => {
                let path = save_failure(target, seed, iter, &input);
                panic!(
                    "{target}: panic on iteration {iter} (seed {seed:#x}); input saved to {}",
                    path.display()
                );
            }
        }
        let largest = LARGEST.load(Ordering::Relaxed);
        if largest > ALLOCATION_LIMIT {
            let path = save_failure(target, seed, iter, &input);
            panic!(
                "{target}: an allocation of {largest} bytes on iteration {iter} (seed {seed:#x}); \
                 input saved to {}",
                path.display()
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{target}: {iters} executions in {secs:.2} s, {:.0}/s ({} Ok, {} Err)",
        iters as f64 / secs.max(1e-9),
        tally.ok,
        tally.err
    );
}

#[test]
fn fuzz_container() {
    let mut seeds = Vec::new();
    let level = Some(StreamLevel {
        index: 2,
        check: [5; 8],
    });
    let kinds = [EntropyPath::Float, EntropyPath::Portable]
        .into_iter()
        .flat_map(|p| [(p, None), (p, level)]);
    for (i, (path, level)) in kinds.enumerate() {
        let s = Bitstream {
            fingerprint: [i as u8; 16],
            width: 100 + i as u32,
            height: 60,
            pad_right: 28,
            pad_bottom: 4,
            y_shape: [8, 4, 8],
            z_shape: [4, 1, 2],
            entropy_path: path,
            level,
            strings: vec![vec![1, 2, 3, 4, 5, 6, 7, 8], vec![9; 12], vec![]],
        };
        seeds.push(s.to_bytes().unwrap());
    }
    seeds.push(tiny_codec(1).encode(&test_image(64, 64)).unwrap());
    campaign("container", &seeds, 100_000, true, |b| {
        match Bitstream::from_bytes(b) {
            Ok(s) => {
                // What parses must serialise back to the same bytes.
                assert_eq!(s.to_bytes().unwrap(), b);
                true
            }
            Err(_) => false,
        }
    });
}

#[test]
fn fuzz_rans() {
    let gc = GaussianConditional::from_scale_table(default_scale_table()).unwrap();
    let tables = gc.tables();
    let mut rng = Rng(base_seed() | 1);
    // Seeds: strings of 64..320 symbols, mostly near zero, some escapes.
    let mut cases = Vec::new();
    for _ in 0..8 {
        let n = 64 + rng.below(256);
        let indexes: Vec<i32> = (0..n).map(|_| rng.below(tables.len()) as i32).collect();
        let symbols: Vec<i32> = (0..n)
            .map(|_| match rng.below(20) {
                0 => rng.below(1 << 20) as i32 - (1 << 19),
                _ => rng.below(9) as i32 - 4,
            })
            .collect();
        let data = RansCoder
            .encode_with_indexes(&symbols, &indexes, tables)
            .unwrap();
        assert_eq!(
            RansCoder
                .decode_with_indexes(&data, &indexes, tables)
                .unwrap(),
            symbols
        );
        cases.push((data, indexes));
    }
    // An input is a selector byte (which seed's indexes to decode with; one value past the
    // seeds selects indexes with two out of range) followed by the rANS string.
    let seeds: Vec<Vec<u8>> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| [&[i as u8][..], &c.0].concat())
        .collect();
    let mut bad_indexes = cases[0].1.clone();
    bad_indexes[7] = tables.len() as i32;
    bad_indexes[9] = -1;
    campaign("rans", &seeds, 300_000, false, |input| {
        let Some((&pick, b)) = input.split_first() else {
            return false;
        };
        let pick = pick as usize % (cases.len() + 1);
        let indexes = cases.get(pick).map_or(&bad_indexes, |c| &c.1);
        RansCoder.decode_with_indexes(b, indexes, tables).is_ok()
    });
}

/// A tiny codec that reads at most 128x128 images.
fn small_codec() -> Codec {
    tiny_codec(3).with_max_pixels(128 * 128)
}

#[test]
fn fuzz_decode_latent() {
    let codec = small_codec();
    let float = tiny_codec(3)
        .with_max_pixels(128 * 128)
        .with_entropy_path(EntropyPath::Float);
    let seeds = vec![
        codec.encode(&test_image(64, 64)).unwrap(),
        codec.encode(&test_image(100, 60)).unwrap(),
        float.encode(&test_image(64, 128)).unwrap(),
    ];
    campaign("decode_latent", &seeds, 20_000, true, |b| {
        codec.decode_latent(b).is_ok()
    });
}

#[test]
fn fuzz_model_file() {
    let arch = Architecture::ScaleHyperprior(ScaleHyperpriorConfig { n: 4, m: 6 });
    let model = ModelFile::initialize(arch, 5, &Device::Cpu).unwrap();
    let bytes = model.to_bytes().unwrap();
    let seeds = vec![bytes];
    campaign(
        "model_file",
        &seeds,
        400,
        false,
        |b| match ModelFile::from_bytes(b, &Device::Cpu) {
            Ok(m) => Codec::from_model_file(&m, &Device::Cpu).is_ok(),
            Err(_) => false,
        },
    );
}
