//! The checkpoint importer: CompressAI safetensors and PyTorch pickles, CDF tables recomputed
//! when a checkpoint lacks them.

mod common;

use std::process::Command;

use candle_core::Device;
use common::*;
use psic::ModelFile;

/// Writes a PyTorch-format `.pth.tar` with `scripts/write_pth.py` (no torch needed).
fn write_pth(src: &std::path::Path, dst: &std::path::Path, int_buffers: bool) -> bool {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/write_pth.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(src).arg(dst);
    if int_buffers {
        cmd.arg("--int-buffers");
    }
    match cmd.status() {
        Ok(s) if s.success() => true,
        _ => {
            eprintln!("skipped: python3 could not write a .pth checkpoint");
            false
        }
    }
}

#[test]
fn pytorch_checkpoint_imports_like_safetensors() {
    let Some(dir) = fixture_dir("compressai") else {
        return;
    };
    let src = dir.join("hyperprior_128_192.safetensors");
    let tmp = std::env::temp_dir().join(format!("psic-import-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let reference = ModelFile::import(&src, None, &Device::Cpu).unwrap();
    for int_buffers in [false, true] {
        let pth = tmp.join(format!("hp-{int_buffers}.pth.tar"));
        if !write_pth(&src, &pth, int_buffers) {
            return;
        }
        let imported = ModelFile::import(&pth, None, &Device::Cpu).unwrap();
        assert_eq!(imported.architecture, reference.architecture);
        for (name, t) in &reference.tensors {
            let got = &imported.tensors[name];
            if name.contains("_quantized_cdf")
                || name.ends_with("_offset")
                || name.ends_with("_cdf_length")
            {
                continue;
            }
            assert_eq!(f32s(got), f32s(t), "{name} differs");
        }
        // candle's pickle reader skips IntStorage buffers, so the tables are recomputed from the
        // learned densities: they must be close to CompressAI's own.
        for prefix in ["entropy_bottleneck", "gaussian_conditional"] {
            let key = format!("{prefix}._quantized_cdf");
            let (a, b) = (
                i32s(&imported.tensors[&key]),
                i32s(&reference.tensors[&key]),
            );
            assert_eq!(a.len(), b.len(), "{key} shape");
            let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).max().unwrap();
            eprintln!(
                "{key}: {differing} of {} entries differ, by at most {max}",
                a.len()
            );
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn missing_or_foreign_files_are_clear_errors() {
    let err = ModelFile::import("/nonexistent/model.pth", None, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.pth"), "{err}");
    let tmp = std::env::temp_dir().join(format!("psic-garbage-{}.pth", std::process::id()));
    std::fs::write(&tmp, b"definitely not a checkpoint").unwrap();
    let err = ModelFile::import(&tmp, None, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("neither safetensors nor"), "{err}");
    let err = psic::Codec::load(&tmp).unwrap_err();
    assert!(matches!(err, psic::Error::Model(_)), "{err}");
    std::fs::remove_file(&tmp).ok();
}
