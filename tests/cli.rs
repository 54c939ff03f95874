//! The `psic` command-line example: its flags are a contract, its errors one line and a non-zero
//! exit code, and it never leaves a half-written output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use psic::backbone::ScaleHyperpriorConfig;
use psic::model::Architecture;
use psic::ModelFile;

/// The example binary built next to this test (cargo builds examples for `cargo test`).
fn psic_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("examples").join("psic");
    if bin.exists() {
        Some(bin)
    } else {
        eprintln!("skipped: example binary not found at {}", bin.display());
        None
    }
}

fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("run psic")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn encode_decode_info_and_errors() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let arch = Architecture::ScaleHyperprior(ScaleHyperpriorConfig { n: 8, m: 12 });
    ModelFile::initialize(arch.clone(), 5, &Device::Cpu)
        .unwrap()
        .save(p("m.safetensors"))
        .unwrap();
    ModelFile::initialize(arch, 6, &Device::Cpu)
        .unwrap()
        .save(p("other.safetensors"))
        .unwrap();
    let img = image::RgbImage::from_fn(70, 45, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
    img.save(p("in.png")).unwrap();

    let o = run(
        &bin,
        &[
            "encode",
            "-m",
            &p("m.safetensors"),
            "-i",
            &p("in.png"),
            "-o",
            &p("s.psic"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("bpp"));
    let o = run(
        &bin,
        &[
            "decode",
            "-m",
            &p("m.safetensors"),
            "-i",
            &p("s.psic"),
            "-o",
            &p("out.png"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        image::open(p("out.png")).unwrap().to_rgb8().dimensions(),
        (70, 45)
    );
    let o = run(&bin, &["info", "-i", &p("s.psic")]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("70x45"));

    // Failures: one line on stderr, non-zero exit, no output file.
    let mut corrupt = std::fs::read(p("s.psic")).unwrap();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    std::fs::write(p("bad.psic"), &corrupt).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "decode".into(),
                "-m".into(),
                p("m.safetensors"),
                "-i".into(),
                p("bad.psic"),
                "-o".into(),
                p("x.png"),
            ],
            "corrupted",
        ),
        (
            vec![
                "decode".into(),
                "-m".into(),
                p("other.safetensors"),
                "-i".into(),
                p("s.psic"),
                "-o".into(),
                p("x.png"),
            ],
            "load the model that encoded it",
        ),
        (
            vec![
                "decode".into(),
                "-m".into(),
                p("m.safetensors"),
                "-i".into(),
                p("missing.psic"),
                "-o".into(),
                p("x.png"),
            ],
            "missing.psic",
        ),
        (
            vec![
                "encode".into(),
                "-m".into(),
                p("m.safetensors"),
                "-i".into(),
                p("s.psic"),
                "-o".into(),
                p("x.psic"),
            ],
            "image",
        ),
        (
            vec![
                "encode".into(),
                "-m".into(),
                p("in.png"),
                "-i".into(),
                p("in.png"),
                "-o".into(),
                p("x.psic"),
            ],
            "model",
        ),
        (
            vec![
                "decode".into(),
                "-m".into(),
                p("m.safetensors"),
                "-i".into(),
                p("s.psic"),
                "-o".into(),
                p("x.png"),
                "--condition".into(),
                "abc".into(),
            ],
            "not a number",
        ),
        (vec!["frobnicate".into()], "usage"),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&bin, &args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(
            e.starts_with("error: ") && e.contains(needle),
            "{args:?}: {e}"
        );
        assert!(!e.contains("panicked"), "{args:?} panicked: {e}");
    }
    assert!(!Path::new(&p("x.png")).exists() && !Path::new(&p("x.psic")).exists());
    std::fs::remove_dir_all(&dir).ok();
}
