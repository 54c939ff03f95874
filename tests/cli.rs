//! The `psic` command line (the binary of feature `cli`): its flags are a contract, usage errors
//! exit with code 2 (clap's message), failures with code 1 and one line `error: ...`, and it
//! never leaves a half-written output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::Device;
use psic::backbone::ScaleHyperpriorConfig;
use psic::model::Architecture;
use psic::ModelFile;

/// The `psic` binary (cargo builds it for this test).
fn psic_bin() -> Option<PathBuf> {
    Some(PathBuf::from(env!("CARGO_BIN_EXE_psic")))
}

fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("run psic")
}

/// Runs psic with its stdout closed from the start, as `psic ... | head -0` leaves it.
fn run_with_stdout_closed(bin: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psic");
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The architecture of the tests' tiny random models.
fn tiny_arch() -> Architecture {
    Architecture::ScaleHyperprior(ScaleHyperpriorConfig { n: 8, m: 12 })
}

/// Writes a tiny random model (`m.safetensors`, seed 5) and a 70x45 test image (`in.png`) into
/// `dir`.
fn tiny_model_and_image(dir: &Path) {
    ModelFile::initialize(tiny_arch(), 5, &Device::Cpu)
        .unwrap()
        .save(dir.join("m.safetensors"))
        .unwrap();
    let img = image::RgbImage::from_fn(70, 45, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
    img.save(dir.join("in.png")).unwrap();
}

#[test]
fn encode_decode_info_and_errors() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    tiny_model_and_image(&dir);
    ModelFile::initialize(tiny_arch(), 6, &Device::Cpu)
        .unwrap()
        .save(p("other.safetensors"))
        .unwrap();

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
                p("x.bmp"),
            ],
            "use .png, .jpg or .jpeg",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&bin, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.starts_with("error: ") && e.contains(needle),
            "{args:?}: {e}"
        );
        assert!(!e.contains("panicked"), "{args:?} panicked: {e}");
    }
    assert!(!Path::new(&p("x.png")).exists() && !Path::new(&p("x.psic")).exists());
    assert!(!Path::new(&p("x.bmp")).exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// The subcommands of this build.
fn subcommands() -> Vec<&'static str> {
    let mut all = vec![
        "shield", "encode", "decode", "info", "convert", "export", "bench", "train", "psnr",
        "classify", "rates",
    ];
    if cfg!(feature = "eval") {
        all.extend(["eval", "tradeoff", "rd", "curve"]);
    }
    all
}

#[test]
fn help_version_and_usage_errors() {
    let Some(bin) = psic_bin() else { return };
    let o = run(&bin, &["--version"]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("psic {}", env!("CARGO_PKG_VERSION"))
    );
    let o = run(&bin, &["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    for cmd in subcommands() {
        assert!(
            help.contains(&format!("  {cmd} ")),
            "{cmd} missing from --help:\n{help}"
        );
        let o = run(&bin, &[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: psic"));
    }
    // Usage errors: clap's message on stderr, exit code 2, nothing run.
    let usage_errors: [&[&str]; 6] = [
        &[],
        &["frobnicate"],
        &["encode", "--bogus"],
        &["decode", "-i", "a.psic"],
        &[
            "decode",
            "-i",
            "a.psic",
            "-o",
            "b.png",
            "--condition",
            "abc",
        ],
        &[
            "decode",
            "-i",
            "a.psic",
            "-o",
            "b.png",
            "--full",
            "--condition",
            "0.5",
        ],
    ];
    for args in usage_errors {
        let o = run(&bin, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with("error: ") || args.is_empty(),
            "{args:?}"
        );
        assert!(!stderr(&o).contains("panicked"));
    }
}

/// `-o x.jpg` writes a JPEG (it wrote PNG bytes), `-o x.png` a PNG, and `-` reads standard input
/// and writes standard output: an encode | decode pipe gives the same image as the files.
#[test]
fn jpeg_output_and_stdin_stdout_pipes() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    tiny_model_and_image(&dir);
    let model = p("m.safetensors");
    let o = run(
        &bin,
        &[
            "encode",
            "-m",
            &model,
            "-i",
            &p("in.png"),
            "-o",
            &p("s.psic"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for (name, magic) in [
        ("x.jpg", &[0xFF, 0xD8, 0xFF][..]),
        ("x.JPEG", &[0xFF, 0xD8, 0xFF][..]),
        ("x.png", &b"\x89PNG"[..]),
    ] {
        let o = run(
            &bin,
            &[
                "--quiet",
                "decode",
                "-m",
                &model,
                "-i",
                &p("s.psic"),
                "-o",
                &p(name),
            ],
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(
            o.stdout.is_empty() && o.stderr.is_empty(),
            "--quiet printed"
        );
        let bytes = std::fs::read(p(name)).unwrap();
        assert!(
            bytes.starts_with(magic),
            "{name} starts with {:02x?}",
            &bytes[..4]
        );
        assert_eq!(
            image::open(p(name)).unwrap().to_rgb8().dimensions(),
            (70, 45)
        );
    }
    // encode -i - -o - | decode -i - -o -
    let piped = |args: &[&str], input: Vec<u8>| -> Output {
        let mut child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psic");
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    };
    let o = piped(
        &["encode", "-m", &model, "-i", "-", "-o", "-"],
        std::fs::read(p("in.png")).unwrap(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, std::fs::read(p("s.psic")).unwrap());
    // Status lines go to stderr when stdout carries the stream.
    assert!(stderr(&o).contains("bpp"));
    let o = piped(&["decode", "-m", &model, "-i", "-", "-o", "-"], o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_pipe = image::load_from_memory(&o.stdout).unwrap().to_rgb8();
    assert_eq!(from_pipe, image::open(p("x.png")).unwrap().to_rgb8());
    let o = piped(&["info", "-i", "-"], std::fs::read(p("s.psic")).unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains("70x45"));
    // A reader that closes the pipe early (`psic info -m M | head -0`): a quiet success, no panic.
    let o = run_with_stdout_closed(&bin, &["info", "-m", &model]);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
    // Where the weights come from, as the file says.
    let o = run(&bin, &["info", "-m", &model]);
    let info = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        info.contains("source: psic initialisation, seed 5 (untrained)"),
        "{info}"
    );
    // Garbage on stdin: a one-line error, exit code 1.
    let o = piped(
        &["decode", "-m", &model, "-i", "-", "-o", "-"],
        vec![7; 100],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("error: ") && o.stdout.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_writes_checkpoint_log_and_model_and_resumes() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-train-{}", std::process::id()));
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..5u32 {
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, (i * 50) as u8])
        })
        .save(data.join(format!("{i}.png")))
        .unwrap();
    }
    let config = format!(
        "architecture = \"bmshj2018-hyperprior\"\nn = 8\nm = 12\ndata = {:?}\ncrop = 64\nbatch = 2\n\
         steps = 4\nlr = 1e-3\nlambda = 0.01\ncheckpoint_every = 2\n",
        data.to_string_lossy()
    );
    std::fs::write(dir.join("c.toml"), config).unwrap();
    let out = dir.join("run").to_string_lossy().into_owned();
    let o = run(
        &bin,
        &[
            "train",
            "--config",
            &dir.join("c.toml").to_string_lossy(),
            "--out",
            &out,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(dir.join("run/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    let model = dir.join("run/model.safetensors");
    assert!(psic::Codec::load(&model).is_ok());
    // Resuming a finished run does nothing more and keeps the log.
    let ckpt = dir
        .join("run/checkpoint.safetensors")
        .to_string_lossy()
        .into_owned();
    let o = run(&bin, &["train", "--resume", &ckpt, "--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(dir.join("run/log.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
    // A bad config is a one-line error.
    std::fs::write(dir.join("bad.toml"), "architecture = 3").unwrap();
    let o = run(
        &bin,
        &[
            "train",
            "--config",
            &dir.join("bad.toml").to_string_lossy(),
            "--out",
            &out,
        ],
    );
    assert!(!o.status.success() && stderr(&o).starts_with("error: "));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shield_with_the_default_model_writes_stream_and_both_decodes() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-shield-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = image::RgbImage::from_fn(100, 70, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
    });
    let input = dir.join("photo.png");
    img.save(&input).unwrap();
    let d = dir.to_string_lossy().into_owned();
    let o = run(
        &bin,
        &[
            "shield",
            &input.to_string_lossy(),
            "--out-dir",
            &d,
            "--full",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("bpp") && stdout.contains("shielded decode"),
        "{stdout}"
    );
    let shielded = image::open(dir.join("photo.shielded.png"))
        .unwrap()
        .to_rgb8();
    let full = image::open(dir.join("photo.full.png")).unwrap().to_rgb8();
    assert_eq!(shielded.dimensions(), (100, 70));
    assert_ne!(shielded, full);
    // The stream decodes with the default model (no -m) to the same two images.
    let stream = dir.join("photo.psic").to_string_lossy().into_owned();
    let o = run(
        &bin,
        &["decode", "-i", &stream, "-o", &format!("{d}/s.png")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::open(dir.join("s.png")).unwrap().to_rgb8(), shielded);
    let o = run(
        &bin,
        &[
            "decode",
            "-i",
            &stream,
            "-o",
            &format!("{d}/f.png"),
            "--full",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::open(dir.join("f.png")).unwrap().to_rgb8(), full);
    // Its status lines going nowhere (`psic shield ... | head -0`) do not cut the job short.
    let later = dir.join("later");
    std::fs::create_dir_all(&later).unwrap();
    let o = run_with_stdout_closed(
        &bin,
        &[
            "shield",
            &input.to_string_lossy(),
            "--full",
            "--out-dir",
            &later.to_string_lossy(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["photo.psic", "photo.shielded.png", "photo.full.png"] {
        assert!(later.join(name).exists(), "{name} missing");
    }
    assert_eq!(
        image::open(later.join("photo.full.png")).unwrap().to_rgb8(),
        full
    );
    // Missing input: one-line error, nothing written.
    let o = run(
        &bin,
        &["shield", &format!("{d}/missing.png"), "--out-dir", &d],
    );
    assert!(!o.status.success() && stderr(&o).starts_with("error: "));
    assert!(!dir.join("missing.psic").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 17, item 3: `decode -i a.psic -o a.psic` and `encode -i b.png -o b.png` destroyed
/// their input. Every command that reads one file and writes another refuses an output that is
/// the input (same path, another spelling of it, or a link to it), leaving the input untouched.
#[test]
fn output_that_is_the_input_is_refused() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-same-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    tiny_model_and_image(&dir);
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
    // Aliases of the input: a symbolic link, a hard link, a dotted spelling.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(p("in.png"), p("link.png")).unwrap();
        std::fs::hard_link(p("s.psic"), p("hard.psic")).unwrap();
    }
    // An image named .psic, shielded into its own folder, would be overwritten by IMAGE.psic.
    std::fs::copy(p("in.png"), p("photo.psic")).unwrap();
    let dotted = format!("{}/./in.png", dir.display());
    let model = p("m.safetensors");
    let mut cases: Vec<Vec<String>> = vec![
        vec![
            "decode",
            "-m",
            &model,
            "-i",
            &p("s.psic"),
            "-o",
            &p("s.psic"),
        ],
        vec![
            "decode",
            "-m",
            &model,
            "-i",
            &p("s.psic"),
            "-o",
            &p("s.psic"),
            "--full",
        ],
        vec![
            "encode",
            "-m",
            &model,
            "-i",
            &p("in.png"),
            "-o",
            &p("in.png"),
        ],
        vec!["encode", "-m", &model, "-i", &p("in.png"), "-o", &dotted],
        vec!["convert", "-i", &model, "-o", &model],
        vec!["export", "-i", &model, "-o", &model],
        vec![
            "shield",
            &p("photo.psic"),
            "--out-dir",
            &p(""),
            "-m",
            &model,
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    #[cfg(unix)]
    {
        cases.push(
            [
                "encode",
                "-m",
                &model,
                "-i",
                &p("in.png"),
                "-o",
                &p("link.png"),
            ]
            .map(String::from)
            .to_vec(),
        );
        cases.push(
            [
                "decode",
                "-m",
                &model,
                "-i",
                &p("s.psic"),
                "-o",
                &p("hard.psic"),
            ]
            .map(String::from)
            .to_vec(),
        );
    }
    let before: Vec<Vec<u8>> = ["in.png", "s.psic", "m.safetensors", "photo.psic"]
        .iter()
        .map(|f| std::fs::read(p(f)).unwrap())
        .collect();
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&bin, &args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(
            e.starts_with("error: ") && e.contains("is the input file"),
            "{args:?}: {e}"
        );
    }
    let after: Vec<Vec<u8>> = ["in.png", "s.psic", "m.safetensors", "photo.psic"]
        .iter()
        .map(|f| std::fs::read(p(f)).unwrap())
        .collect();
    assert!(before == after, "an input was changed");
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 17, items 2 and 5 through the CLI: a decode of `/dev/zero` stops at the stream limit
/// (it read until memory ran out), and an output write that fails (file size limit 0, with
/// SIGXFSZ ignored so the write returns EFBIG) leaves no temporary file behind.
#[cfg(unix)]
#[test]
fn endless_input_is_refused_and_failed_writes_leave_no_temporary_file() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-bounded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    tiny_model_and_image(&dir);
    if Path::new("/dev/zero").exists() {
        let (model, out) = (p("m.safetensors"), p("zero.png"));
        for cmd in ["decode", "info"] {
            let mut args = vec![cmd, "-i", "/dev/zero"];
            if cmd == "decode" {
                args.extend(["-m", &model, "-o", &out]);
            }
            let o = run(&bin, &args);
            assert!(!o.status.success());
            assert!(stderr(&o).contains("larger than"), "{}", stderr(&o));
        }
        assert!(!Path::new(&p("zero.png")).exists());
    }
    let o = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 0; exec \"$0\" \"$@\"")
        .arg(&bin)
        .args([
            "encode",
            "-m",
            &p("m.safetensors"),
            "-i",
            &p("in.png"),
            "-o",
            &p("s.psic"),
        ])
        .output()
        .expect("run sh");
    assert!(
        !o.status.success(),
        "a write over the file size limit succeeded"
    );
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["in.png", "m.safetensors"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rates_adds_levels_and_encode_q_picks_one() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-rates-{}", std::process::id()));
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    tiny_model_and_image(&dir);
    for i in 0..6u32 {
        image::RgbImage::from_fn(72, 70, |x, y| {
            image::Rgb([(x * 3 + i) as u8, y as u8 * 2, 77])
        })
        .save(data.join(format!("{i}.png")))
        .unwrap();
    }
    let data_arg = data.to_string_lossy().into_owned();
    let args = [
        "rates",
        "-m",
        &p("m.safetensors"),
        "--data",
        &data_arg,
        "-p",
        "0",
        "--lambdas",
        "0.001,0.1",
        "--steps",
        "1",
        "--batch",
        "1",
        "--crop",
        "64",
        "--default-level",
        "1",
        "--out",
        &p("lv.safetensors"),
    ];
    let o = run(&bin, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    // The model's levels and default, and a stream written without -q at the default.
    let o = run(&bin, &["info", "-m", &p("lv.safetensors")]);
    let info = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(info.contains("quality levels: 2 (default 1)"), "{info}");
    assert!(info.contains("level 1: lambda 0.1"), "{info}");
    let plain = ["encode", "-m", &p("lv.safetensors"), "-i", &p("in.png")];
    let o = run(&bin, &[&plain[..], &["-o", &p("d.psic")]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&bin, &["info", "-i", &p("d.psic")]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("v3, level 1"));
    // A refined encode is an ordinary stream of the level; a model without a λ is refused.
    let o = run(
        &bin,
        &[&plain[..], &["-o", &p("r.psic"), "--refine", "3"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&bin, &["info", "-i", &p("r.psic")]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("v3, level 1"));
    let dec = ["decode", "-m", &p("lv.safetensors"), "-i", &p("r.psic")];
    let o = run(&bin, &[&dec[..], &["-o", &p("r.png")]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let no_lambda = ["encode", "-m", &p("m.safetensors"), "-i", &p("in.png")];
    let o = run(
        &bin,
        &[&no_lambda[..], &["-o", &p("n.psic"), "--refine", "2"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("λ"), "{}", stderr(&o));
    assert!(!dir.join("n.psic").exists());
    // export --from-model moves the default; a level the model lacks is an error.
    let export = ["export", "--from-model", "-i", &p("lv.safetensors"), "-o"];
    let o = run(
        &bin,
        &[
            &export[..],
            &[&p("lv0.safetensors"), "--default-level", "0"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&bin, &["info", "-m", &p("lv0.safetensors")]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("(default 0)"));
    let o = run(
        &bin,
        &[
            &export[..],
            &[&p("lv5.safetensors"), "--default-level", "5"],
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!dir.join("lv5.safetensors").exists());
    // A level's measured figures come from an eval report of that model at that level.
    if cfg!(feature = "eval") {
        let export_to = |out: &str, flag: &str, value: &str| {
            run(&bin, &[&export[..], &[&p(out), flag, value]].concat())
        };
        let eval = [
            "eval",
            "-m",
            &p("lv.safetensors"),
            "--data",
            &data_arg,
            "-q",
            "1",
        ];
        let opts = ["--jpeg", "none", "--no-purify", "--out", &p("report")];
        let o = run(&bin, &[&eval[..], &opts[..]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let o = export_to(
            "lvr.safetensors",
            "--level-reports",
            &format!("1={}", p("report")),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let o = run(&bin, &["info", "-m", &p("lvr.safetensors")]);
        let info = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(info.contains("level 1: lambda 0.1, Kodak "), "{info}");
        let o = export_to(
            "lvx.safetensors",
            "--level-reports",
            &format!("0={}", p("report")),
        );
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("at level 1, not"), "{}", stderr(&o));
    }
    for q in ["0", "1"] {
        let out = p(&format!("q{q}.psic"));
        let enc = [
            "encode",
            "-m",
            &p("lv.safetensors"),
            "-q",
            q,
            "-i",
            &p("in.png"),
            "-o",
            &out,
        ];
        let o = run(&bin, &enc);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = run(&bin, &["info", "-i", &out]);
        let info = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(info.contains(&format!("v3, level {q}")), "{info}");
        let dec = [
            "decode",
            "-m",
            &p("lv.safetensors"),
            "-i",
            &out,
            "-o",
            &p("q.png"),
        ];
        assert!(run(&bin, &dec).status.success());
        // The model without levels refuses the stream, naming the level.
        let dec = [
            "decode",
            "-m",
            &p("m.safetensors"),
            "-i",
            &out,
            "-o",
            &p("x.png"),
        ];
        let o = run(&bin, &dec);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains(&format!("quality level {q}")),
            "{}",
            stderr(&o)
        );
    }
    let enc = [
        "encode",
        "-m",
        &p("lv.safetensors"),
        "-q",
        "2",
        "-i",
        &p("in.png"),
        "-o",
        &p("z"),
    ];
    let o = run(&bin, &enc);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("quality level 2"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(feature = "eval")]
#[test]
fn curve_charts_reports_by_step_and_refuses_a_name_that_is_not_a_step() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-curve-{}", std::process::id()));
    let report = |name: &str, bpp: f64, psnr: f64| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let json = format!(
            r#"{{"summary": {{"bpp": {bpp}, "psnr_full": {psnr}, "ms_ssim_full": 0.95,
            "jpeg": [[10, 0.2, 25.0], [20, 0.4, 28.0], [40, 0.8, 31.0]]}}}}"#
        );
        std::fs::write(d.join("report.json"), json).unwrap();
        d.display().to_string()
    };
    let (a, b) = (report("a", 0.4, 28.5), report("b", 0.3, 28.0));
    let out = dir.join("curve");
    let o = run(
        &bin,
        &[
            "curve",
            "--reports",
            &format!("0={a},500={b}"),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    // 0.3 bpp is halfway between JPEG's 25 and 28 dB: 28.0 is 1.5 dB above it.
    assert!(
        stdout.contains("step 500: 0.3000 bpp, full 28.00 dB (+1.50 dB vs JPEG)"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(out.join("curve.md")).unwrap();
    assert!(
        md.contains("| 0 | 0.4000 | 28.50 | 0.50 | 0.9500 |"),
        "{md}"
    );
    assert!(out.join("curve.png").is_file());
    let bad = dir.join("bad");
    let o = run(
        &bin,
        &[
            "curve",
            "--reports",
            &format!("first={a}"),
            "--out",
            bad.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("STEP a number"));
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn export_shield_from_grafts_a_generator_and_refuses_a_plain_donor() {
    let Some(bin) = psic_bin() else { return };
    let dir = std::env::temp_dir().join(format!("psic-cli-graft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    tiny_model_and_image(&dir);
    let donor = ModelFile::initialize(tiny_arch(), 6, &Device::Cpu)
        .unwrap()
        .with_new_cltg(7, &Device::Cpu)
        .unwrap();
    donor.save(p("donor.safetensors")).unwrap();
    let graft = |donor: &str, out: &str| {
        let args = ["export", "--from-model", "-i", &p("m.safetensors")];
        run(
            &bin,
            &[&args[..], &["--shield-from", &p(donor), "-o", &p(out)]].concat(),
        )
    };
    let o = graft("donor.safetensors", "g.safetensors");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = ModelFile::load(p("g.safetensors"), &Device::Cpu).unwrap();
    let plain = ModelFile::load(p("m.safetensors"), &Device::Cpu).unwrap();
    assert!(g.conditions().unwrap().is_some());
    assert_eq!(g.fingerprint().unwrap(), plain.fingerprint().unwrap());
    let from = &g.extra_metadata["generator_from"];
    let hex: String = donor
        .fingerprint()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(from.contains(&hex), "{from}");
    // A donor without a generator: an error, and no file.
    let o = graft("m.safetensors", "none.safetensors");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no generic"));
    assert!(!dir.join("none.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}
