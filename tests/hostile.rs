//! Hostile model files and inputs (issue 17): wide scale tables that would make loading rebuild
//! tables for minutes, shielded models that lost their generator, inputs longer than anything
//! psic should read, and the safety of the atomic output writes.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{test_image, tiny_codec};
use psic::backbone::ScaleHyperpriorConfig;
use psic::entropy::{GaussianConditional, MAX_COMPUTED_TABLE_SYMBOLS, MAX_SCALE_TABLE_LEN};
use psic::image_io::{
    load_image_limited, read_limited, read_limited_from, write_atomic, write_atomic_with,
};
use psic::model::Architecture;
use psic::{Codec, Error, ModelFile};

fn tiny_model(seed: u64) -> ModelFile {
    let arch = Architecture::ScaleHyperprior(ScaleHyperpriorConfig { n: 8, m: 12 });
    ModelFile::initialize(arch, seed, &Device::Cpu).unwrap()
}

/// The model after a save/load round trip through bytes, as a hostile file would arrive.
fn reload(model: &ModelFile) -> ModelFile {
    ModelFile::from_bytes(&model.to_bytes().unwrap(), &Device::Cpu).unwrap()
}

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("psic-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn without_gaussian_tables(mut model: ModelFile, scales: Vec<f32>) -> ModelFile {
    for k in ["_quantized_cdf", "_cdf_length", "_offset"] {
        assert!(model
            .tensors
            .remove(&format!("gaussian_conditional.{k}"))
            .is_some());
    }
    let n = scales.len();
    model.tensors.insert(
        "gaussian_conditional.scale_table".into(),
        Tensor::from_vec(scales, n, &Device::Cpu).unwrap(),
    );
    model
}

/// Issue 17, item 1: 64 scales around 5300 and no stored tables made loading rebuild 64 tables
/// of 64,757 symbols with CompressAI's quadratic stealing pass (minutes). Now the rebuild is
/// refused before any table is computed.
/// A model file's bytes depend only on its content: `safetensors` writes metadata in a
/// `HashMap`'s order, which differs between maps and processes, so psic writes the keys sorted
/// and two exports of the same weights have the same checksum.
#[test]
fn model_files_are_byte_deterministic() {
    let model = tiny_model(3);
    let first = model.to_bytes().unwrap();
    for _ in 0..8 {
        assert!(model.to_bytes().unwrap() == first, "two writes differ");
    }
    let reloaded = reload(&model).to_bytes().unwrap();
    assert!(reloaded == first, "a reloaded model writes other bytes");
    let len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&first[8..8 + len]).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&first).unwrap();
    let mut keys: Vec<&String> = meta.metadata().as_ref().unwrap().keys().collect();
    assert!(keys.len() >= 4, "{keys:?}");
    keys.sort();
    let at: Vec<usize> = keys
        .iter()
        .map(|k| header.find(&format!("\"{k}\":")).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{keys:?} at {at:?}");
    assert_eq!((8 + len) % 8, 0, "the tensor data starts 8-byte aligned");
}

#[test]
fn wide_scale_table_without_tables_is_refused() {
    let scales: Vec<f32> = (0..64).map(|i| 5300.0 + i as f32).collect();
    let model = reload(&without_gaussian_tables(tiny_model(1), scales.clone()));
    let err = Codec::from_model_file(&model, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::Model(m) if m.contains(&MAX_COMPUTED_TABLE_SYMBOLS.to_string())),
        "{err}"
    );
    assert!(matches!(
        GaussianConditional::from_scale_table(scales),
        Err(Error::Model(_))
    ));
    // Too many scales, even small ones.
    let many: Vec<f32> = (0..=MAX_SCALE_TABLE_LEN).map(|i| 0.2 + i as f32).collect();
    let model = reload(&without_gaussian_tables(tiny_model(1), many));
    let err = Codec::from_model_file(&model, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::Model(m) if m.contains("scales")),
        "{err}"
    );
}

/// Within the budget, a wide table (64 scales log-spaced up to 2048: about 8 times the default
/// table's symbols) still loads, and codes.
#[test]
fn wide_scale_table_within_the_budget_loads() {
    let (lo, hi) = (0.11f64.ln(), 2048f64.ln());
    let scales: Vec<f32> = (0..64)
        .map(|i| (lo + (hi - lo) * i as f64 / 63.0).exp() as f32)
        .collect();
    let model = reload(&without_gaussian_tables(tiny_model(1), scales));
    let codec = Codec::from_model_file(&model, &Device::Cpu).unwrap();
    let bytes = codec.encode(&test_image(64, 48)).unwrap();
    assert_eq!(codec.decode(&bytes).unwrap().dimensions(), (64, 48));
}

/// Item 1, the factorized side: quantiles 60,000 symbols wide and no stored tables made
/// `convert` run CompressAI's quadratic stealing pass over ~60,000 zero-probability symbols
/// per channel; the linear pass gives the tables at once. Wider quantiles are refused.
#[test]
fn wide_bottleneck_quantiles_convert_quickly_or_are_refused() {
    let dir = scratch("quantiles");
    for (width, ok) in [(30_000.0f32, true), (40_000.0, false)] {
        let mut model = tiny_model(2);
        for k in ["_quantized_cdf", "_cdf_length", "_offset"] {
            model.tensors.remove(&format!("entropy_bottleneck.{k}"));
        }
        let q: Vec<f32> = (0..8).flat_map(|_| [-width, 0.0, width]).collect();
        model.tensors.insert(
            "entropy_bottleneck.quantiles".into(),
            Tensor::from_vec(q, (8, 1, 3), &Device::Cpu).unwrap(),
        );
        let path = dir.join("wide.safetensors");
        model.save(&path).unwrap();
        match ModelFile::import(&path, None, &Device::Cpu) {
            Ok(m) => {
                assert!(ok, "quantiles ±{width} accepted");
                let len = m.tensors["entropy_bottleneck._cdf_length"]
                    .to_vec1::<i32>()
                    .unwrap();
                assert!(len.iter().all(|&l| l == 2 * width as i32 + 3), "{len:?}");
            }
            Err(e) => {
                assert!(!ok, "quantiles ±{width}: {e}");
                assert!(matches!(e, Error::Model(_)), "{e}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Every tensor name of the generic trigger generator of a tiny wrapped model.
fn cltg_names(model: &ModelFile) -> Vec<String> {
    let mut names: Vec<String> = model
        .tensors
        .keys()
        .filter(|k| k.starts_with("cltg."))
        .cloned()
        .collect();
    names.sort();
    names
}

/// Issue 17, item 4: a shielded model missing `cltg.beta_mlp.fc1.weight` loaded as a plain
/// codec, whose default decode is the full image under the same fingerprint. A model that
/// declares a shield must now carry all of it.
#[test]
fn shielded_model_missing_any_generator_tensor_is_refused() {
    let shielded = tiny_model(3).with_new_cltg(4, &Device::Cpu).unwrap();
    let codec = Codec::from_model_file(&reload(&shielded), &Device::Cpu).unwrap();
    assert!(codec.conditions().is_some());
    let names = cltg_names(&shielded);
    assert_eq!(names.len(), 7, "{names:?}");
    for name in &names {
        let mut m = shielded.clone();
        m.tensors.remove(name);
        let err = Codec::from_model_file(&reload(&m), &Device::Cpu).unwrap_err();
        assert!(matches!(&err, Error::Model(_)), "{name}: {err}");
        assert!(err.to_string().contains("cltg."), "{name}: {err}");
    }
    // The conditions metadata without any generator.
    let mut m = shielded.clone();
    for name in &names {
        m.tensors.remove(name);
    }
    assert!(m.extra_metadata.contains_key("conditions"));
    let err = Codec::from_model_file(&reload(&m), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("conditions"), "{err}");
    // Generator tensors without the conditions metadata (and without fc1.weight).
    let mut m = shielded.clone();
    m.extra_metadata.remove("conditions");
    m.tensors.remove("cltg.beta_mlp.fc1.weight");
    assert!(Codec::from_model_file(&reload(&m), &Device::Cpu).is_err());
    // A stray extra generator tensor, or one of the wrong shape.
    let mut m = shielded.clone();
    m.tensors.insert(
        "cltg.proj.0.bias".into(),
        Tensor::zeros(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(Codec::from_model_file(&reload(&m), &Device::Cpu).is_err());
    let mut m = shielded.clone();
    m.tensors.insert(
        "cltg.beta_mlp.fc2.bias".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(Codec::from_model_file(&reload(&m), &Device::Cpu).is_err());
    // A plain model is still plain.
    let plain = Codec::from_model_file(&reload(&tiny_model(3)), &Device::Cpu).unwrap();
    assert!(plain.conditions().is_none());
}

/// A reader that never ends (like `/dev/zero`), counting what was read from it.
struct Endless(u64);

impl std::io::Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        buf.fill(0);
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
}

/// Issue 17, item 5: reads are bounded.
#[test]
fn reads_stop_at_their_limit() {
    let mut endless = Endless(0);
    let err = read_limited_from(&mut endless, 1000, 0, "endless").unwrap_err();
    assert!(
        matches!(err, Error::InputTooLarge { limit: 1000, .. }),
        "{err}"
    );
    assert!(endless.0 <= 1001 + 8192, "read {} bytes", endless.0);
    let exact = vec![7u8; 1000];
    assert_eq!(read_limited_from(&exact[..], 1000, 0, "x").unwrap(), exact);
    assert!(read_limited_from(&exact[..], 999, 0, "x").is_err());
    if Path::new("/dev/zero").exists() {
        let err = read_limited("/dev/zero", 1 << 20).unwrap_err();
        assert!(err.to_string().contains("/dev/zero"), "{err}");
    }
}

#[test]
fn streams_longer_than_the_pixel_limit_allows_are_refused() {
    let codec = tiny_codec(1);
    // 8 bytes per latent symbol of the largest image, plus 1 KiB (N 8, M 12, 2^24 pixels).
    let symbols = 12 * (1u64 << 24) / 256 + 8 * (1u64 << 24) / 4096;
    assert_eq!(codec.max_stream_len(), 8 * symbols + 1024);
    // The figure docs/FORMAT.md gives for the default model (N 64, M 96) and limit.
    #[cfg(feature = "default-model")]
    assert_eq!(
        psic::zoo::default_codec().unwrap().max_stream_len(),
        52_429_824
    );
    let small = tiny_codec(1).with_max_pixels(64 * 64);
    assert_eq!(small.max_stream_len(), 8 * (12 * 16 + 8) + 1024);
    let mut bytes = small.encode(&test_image(64, 64)).unwrap();
    assert_eq!(small.decode(&bytes).unwrap().dimensions(), (64, 64));
    bytes.resize(small.max_stream_len() as usize + 1, 0);
    let err = small.decode(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::Bitstream(m) if m.contains("max_stream_len")),
        "{err}"
    );
}

#[test]
fn images_are_read_within_the_pixel_limit() {
    let dir = scratch("images");
    let path = dir.join("a.png");
    test_image(40, 30).save(&path).unwrap();
    assert_eq!(
        load_image_limited(&path, 1200).unwrap().dimensions(),
        (40, 30)
    );
    let err = load_image_limited(&path, 1199).unwrap_err();
    assert!(
        matches!(&err, Error::Image(m) if m.contains("40x30")),
        "{err}"
    );
    // A header claiming 16384 x 16384 over a few bytes: refused before any pixel is decoded.
    let mut png = std::fs::read(&path).unwrap();
    // IHDR: length (4), "IHDR" (4), width, height, 5 more bytes, then its CRC.
    png[16..20].copy_from_slice(&16384u32.to_be_bytes());
    png[20..24].copy_from_slice(&16384u32.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&path, &png).unwrap();
    let err = psic::image_io::load_image(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Image(m) if m.contains("16384x16384")),
        "{err}"
    );
    // A file longer than 16 bytes a pixel plus 16 MiB (sparse: nothing is written).
    let long = dir.join("long.png");
    let f = std::fs::File::create(&long).unwrap();
    f.set_len(psic::image_io::image_file_limit(1) + 1).unwrap();
    let err = load_image_limited(&long, 1).unwrap_err();
    assert!(matches!(err, Error::InputTooLarge { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Files in `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    v.sort();
    v
}

/// Issue 17, item 2: a symbolic link planted at the old, predictable temporary name
/// (`.NAME.psic-tmp`) made a write overwrite the link's target.
#[cfg(unix)]
#[test]
fn atomic_write_does_not_follow_a_planted_link() {
    let dir = scratch("symlink");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let out = dir.join("out.png");
    std::os::unix::fs::symlink(&victim, dir.join(".out.png.psic-tmp")).unwrap();
    write_atomic(&out, b"new contents").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&out).unwrap(), b"new contents");
    assert!(!std::fs::symlink_metadata(&out)
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::remove_dir_all(&dir).ok();
}

/// Item 2: an overwritten output keeps its permissions (it went from 600 to 644).
#[cfg(unix)]
#[test]
fn atomic_write_keeps_the_permissions_of_the_file_it_replaces() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("mode");
    let out = dir.join("secret.psic");
    std::fs::write(&out, b"old").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600)).unwrap();
    write_atomic(&out, b"new").unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    assert_eq!(std::fs::read(&out).unwrap(), b"new");
    std::fs::remove_dir_all(&dir).ok();
}

/// Item 2: a failed write leaves no temporary file and the old output as it was.
#[test]
fn failed_atomic_write_leaves_no_temporary_file() {
    let dir = scratch("failed");
    let out = dir.join("out.bin");
    std::fs::write(&out, b"old").unwrap();
    let err = write_atomic_with(&out, |w| {
        w.write_all(&[1u8; 100_000]).unwrap();
        Err(Error::Image("encoder failed half-way".into()))
    })
    .unwrap_err();
    assert!(err.to_string().contains("half-way"));
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(others(&dir, &["out.bin"]), Vec::<String>::new());
    // A rename that fails (the output is a folder) cleans up too.
    let folder = dir.join("folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("inside"), b"x").unwrap();
    assert!(write_atomic(&folder, b"data").is_err());
    assert_eq!(
        others(&dir, &["out.bin"]),
        vec!["folder".to_string()],
        "temporary file left behind"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Item 2: two writers of one output collided on the shared temporary name (one failed, or the
/// output mixed both). Now every write succeeds and the output is one writer's whole file.
#[test]
fn concurrent_atomic_writes_of_one_output_all_succeed() {
    let dir = scratch("concurrent");
    let out = dir.join("out.bin");
    let payloads: Vec<Vec<u8>> = (0..4u8)
        .map(|t| vec![t; 300_000 + 1000 * t as usize])
        .collect();
    std::thread::scope(|s| {
        for p in &payloads {
            let out = &out;
            s.spawn(move || {
                for _ in 0..25 {
                    write_atomic(out, p).unwrap();
                }
            });
        }
    });
    let got = std::fs::read(&out).unwrap();
    assert!(payloads.contains(&got), "output is no writer's whole file");
    assert_eq!(others(&dir, &["out.bin"]), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).ok();
}
