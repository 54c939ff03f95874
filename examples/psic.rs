//! The psic command line.
//!
//! ```text
//! cargo run --release --example psic -- convert -i CHECKPOINT -o MODEL.safetensors [--arch ARCH]
//! cargo run --release --example psic -- encode -m MODEL -i IN.png -o OUT.psic
//! cargo run --release --example psic -- decode -m MODEL -i IN.psic -o OUT.png [--full | --condition BETA]
//! cargo run --release --example psic -- info -i IN.psic
//! ```
//! Errors are one line on stderr and a non-zero exit code.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use psic::bitstream::{fingerprint_hex, Bitstream};
use psic::image_io::{
    ensure_output_is_not_input, load_image, load_image_limited, read_limited, save_png,
    write_atomic,
};
use psic::shield::Condition;
use psic::{Codec, Error, ModelFile, Result};

// Large tensor buffers get transparent huge pages (psic::alloc::HugePages): fewer page faults.
#[global_allocator]
static ALLOC: psic::alloc::HugePages = psic::alloc::HugePages;

const USAGE: &str = "usage: psic <command> [options]
commands:
  convert -i CHECKPOINT -o MODEL.safetensors [--arch ARCH]
          import a CompressAI or official PSIC checkpoint (.safetensors, .pth, .pth.tar)
          as a psic model file; ARCH (bmshj2018-hyperprior, psic-hy2018) is inferred
  shield  IMAGE [--out-dir DIR] [--full] [-m MODEL]
          compress IMAGE with the default shielded model (or MODEL): writes IMAGE.psic and
          IMAGE.shielded.png (and IMAGE.full.png with --full) into DIR (default .)
  encode  [-m MODEL] -i IN.png -o OUT.psic    compress an image (default model without -m)
  decode  [-m MODEL] -i IN.psic -o OUT.png [--full | --condition BETA]
          decompress a stream: the shielded decode by default (for shielded models),
          the full one with --full, or any condition with --condition
  info    -i IN.psic                          print a stream's header
  bench   [-m MODEL] [-i IMAGE] [--runs N]
          time encode, decode and the rANS coder; prints median, min and max
          (defaults: the CompressAI fixture model and image in ../shared, 5 runs)
  train   --config CONFIG.toml --out DIR [--resume CHECKPOINT] [--device cpu|cuda]
          [--steps N] [--max-minutes M] [--data DIR] [--target-weights W]
          training, stage 0, 1 or 2 as the config says (docs/TRAINING.md); writes
          DIR/checkpoint.safetensors (resume), DIR/log.jsonl, DIR/model.safetensors (a psic
          model file) and DIR/val-grid.png as it goes; --steps changes the total,
          --max-minutes stops early (saving first), --data and --target-weights move a
          resumed run's data folder and target weights
  export  -i CHECKPOINT -o MODEL.safetensors    the model file of a training checkpoint
  eval    [-m MODEL] --data DIR --out REPORT_DIR [--split eval|all] [--eval-percent 20]
          [--limit N] [--target efficientnet-lite --weights W] [--jpeg 5,10,..|none]
          [--no-purify] [--title TEXT] [--probes KIND:WEIGHTS,..]
          [--jpeg-flavor libjpeg420|image444]
          evaluate a codec (default model without -m) on a folder: writes report.json,
          report.md, grid.png (original | full | shielded), rd.png and accuracy.png
  tradeoff --reports NAME=REPORT_DIR,.. --out CHART.png
          the shield trade-off chart across evaluated runs: top-1 on the shielded
          decodes (target and probes) against shielded PSNR
  psnr    -a A.png -b B.png                   PSNR (dB) between two images of the same size
  classify --target efficientnet-lite|clip --weights W --data DIR --out PRED.json
          top-5 predictions of a semantic target for every PNG/JPEG in DIR (for clip, W is a
          Hugging Face CLIP folder with captions.txt: one caption, i.e. class, per line)";

/// Parsed `--flag value` pairs and value-less switches; `-x` and `--long` names both accepted.
struct Args {
    values: HashMap<String, String>,
    switches: Vec<String>,
}

impl Args {
    fn parse(args: &[String], known: &[(&str, &str)]) -> Result<Self> {
        Self::parse_with_switches(args, known, &[])
    }

    fn parse_with_switches(
        args: &[String],
        known: &[(&str, &str)],
        switch_names: &[&str],
    ) -> Result<Self> {
        let mut values = HashMap::new();
        let mut switches = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if switch_names.contains(&a.as_str()) {
                switches.push(a.clone());
                continue;
            }
            let Some(&(_, long)) = known.iter().find(|(s, l)| a == s || a == l) else {
                return Err(Error::InvalidArgument(format!(
                    "unknown option {a}\n{USAGE}"
                )));
            };
            let v = it
                .next()
                .ok_or_else(|| Error::InvalidArgument(format!("{a} needs a value")))?;
            values.insert(long.to_string(), v.clone());
        }
        Ok(Self { values, switches })
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    fn get(&self, long: &str) -> Result<&str> {
        self.values
            .get(long)
            .map(String::as_str)
            .ok_or_else(|| Error::InvalidArgument(format!("missing {long}\n{USAGE}")))
    }

    fn opt(&self, long: &str) -> Option<&str> {
        self.values.get(long).map(String::as_str)
    }
}

fn convert(args: &[String]) -> Result<()> {
    let a = Args::parse(
        args,
        &[("-i", "--input"), ("-o", "--output"), ("-a", "--arch")],
    )?;
    ensure_output_is_not_input(a.get("--input")?, a.get("--output")?)?;
    let t = Instant::now();
    let model = ModelFile::import(a.get("--input")?, a.opt("--arch"), &Device::Cpu)?;
    model.save(a.get("--output")?)?;
    for (k, v) in &model.extra_metadata {
        if k.ends_with(".tables") {
            println!("note: {k}: {v} (the checkpoint had no usable CDF tables; streams will not be byte-identical to CompressAI's)");
        }
    }
    println!(
        "wrote {} ({} {}, fingerprint {}) in {:.2} s",
        a.get("--output")?,
        model.architecture.name(),
        model.architecture.config_json(),
        fingerprint_hex(&model.fingerprint()?),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The codec of `--model`, or the embedded default model when it is not given.
fn load_codec(a: &Args) -> Result<Codec> {
    match a.opt("--model") {
        Some(path) => Codec::load(path),
        None => default_codec(),
    }
}

#[cfg(feature = "default-model")]
fn default_codec() -> Result<Codec> {
    psic::zoo::default_codec()
}

#[cfg(not(feature = "default-model"))]
fn default_codec() -> Result<Codec> {
    Err(Error::InvalidArgument(
        "no -m MODEL given and this build has no embedded default model (feature `default-model`)"
            .into(),
    ))
}

/// `shield IMAGE [--out-dir DIR] [--full] [-m MODEL]`: encode with the (default) shielded model,
/// write the bitstream and the shielded decode, and with `--full` the full decode too.
fn shield(args: &[String]) -> Result<()> {
    let (input, rest) = match args.split_first() {
        Some((first, rest)) if !first.starts_with('-') => (first.clone(), rest),
        _ => {
            return Err(Error::InvalidArgument(format!(
                "shield needs an image\n{USAGE}"
            )))
        }
    };
    let a =
        Args::parse_with_switches(rest, &[("-m", "--model"), ("-d", "--out-dir")], &["--full"])?;
    let stem = Path::new(&input)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let dir = Path::new(a.opt("--out-dir").unwrap_or("."));
    let stream = dir.join(format!("{stem}.psic"));
    let shielded_path = dir.join(format!("{stem}.shielded.png"));
    let full_path = dir.join(format!("{stem}.full.png"));
    for out in [&stream, &shielded_path, &full_path] {
        ensure_output_is_not_input(&input, out)?;
    }
    let t = Instant::now();
    let codec = load_codec(&a)?;
    let load_s = t.elapsed().as_secs_f64();
    let conditions = codec.conditions().ok_or_else(|| {
        Error::InvalidArgument("this model has no shield (no trigger generator)".into())
    })?;
    let img = load_image_limited(&input, codec.max_pixels())?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let t = Instant::now();
    let bytes = codec.encode(&img)?;
    let enc_s = t.elapsed().as_secs_f64();
    write_atomic(&stream, &bytes)?;
    let latent = codec.decode_latent(&bytes)?;
    let t = Instant::now();
    let shielded =
        psic::image_io::tensor_to_image(&codec.synthesize(&latent, &conditions.shielded)?)?;
    let sh_s = t.elapsed().as_secs_f64();
    save_png(&shielded_path, &shielded)?;
    let bpp = bytes.len() as f64 * 8.0 / (img.width() as f64 * img.height() as f64);
    println!(
        "{input}: {}x{} -> {} ({} bytes, {bpp:.4} bpp), encode {enc_s:.2} s",
        img.width(),
        img.height(),
        stream.display(),
        bytes.len()
    );
    println!(
        "shielded decode -> {} ({:.2} dB PSNR to the input), synthesis {sh_s:.2} s",
        shielded_path.display(),
        psic::metrics::psnr(&img, &shielded)?
    );
    if a.switch("--full") {
        let t = Instant::now();
        let full = psic::image_io::tensor_to_image(&codec.synthesize(&latent, &conditions.full)?)?;
        let full_s = t.elapsed().as_secs_f64();
        save_png(&full_path, &full)?;
        println!(
            "full decode -> {} ({:.2} dB PSNR), synthesis {full_s:.2} s",
            full_path.display(),
            psic::metrics::psnr(&img, &full)?
        );
    }
    println!("model load {load_s:.2} s");
    Ok(())
}

fn encode(args: &[String]) -> Result<()> {
    let a = Args::parse(
        args,
        &[("-m", "--model"), ("-i", "--input"), ("-o", "--output")],
    )?;
    ensure_output_is_not_input(a.get("--input")?, a.get("--output")?)?;
    let t = Instant::now();
    let codec = load_codec(&a)?;
    let load_s = t.elapsed().as_secs_f64();
    let img = load_image_limited(a.get("--input")?, codec.max_pixels())?;
    let t = Instant::now();
    let bytes = codec.encode(&img)?;
    let enc_s = t.elapsed().as_secs_f64();
    write_atomic(a.get("--output")?, &bytes)?;
    let bpp = bytes.len() as f64 * 8.0 / (img.width() as f64 * img.height() as f64);
    println!(
        "{}x{} -> {} bytes, {bpp:.4} bpp; model load {load_s:.2} s, encode {enc_s:.2} s",
        img.width(),
        img.height(),
        bytes.len()
    );
    Ok(())
}

fn decode(args: &[String]) -> Result<()> {
    let a = Args::parse_with_switches(
        args,
        &[
            ("-m", "--model"),
            ("-i", "--input"),
            ("-o", "--output"),
            ("-c", "--condition"),
        ],
        &["--full"],
    )?;
    let input = a.get("--input")?;
    ensure_output_is_not_input(input, a.get("--output")?)?;
    let t = Instant::now();
    let codec = load_codec(&a)?;
    let load_s = t.elapsed().as_secs_f64();
    // Never more than the longest stream of an image within the codec's pixel limit.
    let bytes = read_limited(input, codec.max_stream_len())?;
    let condition = match (a.opt("--condition"), a.switch("--full")) {
        (Some(_), true) => {
            return Err(Error::InvalidArgument(
                "give either --full or --condition, not both".into(),
            ))
        }
        (Some(v), false) => Some(Condition::new(v.parse::<f32>().map_err(|_| {
            Error::InvalidArgument(format!("--condition {v:?} is not a number"))
        })?)),
        (None, true) => Some(
            codec
                .conditions()
                .map(|c| c.full)
                .unwrap_or(Condition::FULL),
        ),
        (None, false) => None,
    };
    let t = Instant::now();
    let (img, what) = match (&condition, codec.conditions()) {
        (Some(c), _) => (
            codec.decode_full(&bytes, c)?,
            format!("condition {}", c.beta()),
        ),
        (None, Some(_)) => (codec.decode_shielded(&bytes)?, "shielded".to_string()),
        (None, None) => (codec.decode(&bytes)?, "plain model".to_string()),
    };
    let dec_s = t.elapsed().as_secs_f64();
    save_png(a.get("--output")?, &img)?;
    let bpp = bytes.len() as f64 * 8.0 / (img.width() as f64 * img.height() as f64);
    println!(
        "{} bytes -> {}x{} ({what}), {bpp:.4} bpp; model load {load_s:.2} s, decode {dec_s:.2} s",
        bytes.len(),
        img.width(),
        img.height()
    );
    Ok(())
}

fn info(args: &[String]) -> Result<()> {
    let a = Args::parse(args, &[("-i", "--input")])?;
    let input = a.get("--input")?;
    let bytes = read_limited(input, psic::bitstream::MAX_STREAM_LEN)?;
    let s = Bitstream::from_bytes(&bytes)?;
    println!(
        "psic stream v{}: {}x{} (+{}x{} padding), model {}, y {:?}, z {:?}, strings {:?} bytes, {:.4} bpp",
        psic::bitstream::VERSION,
        s.width,
        s.height,
        s.pad_right,
        s.pad_bottom,
        fingerprint_hex(&s.fingerprint),
        s.y_shape,
        s.z_shape,
        s.strings.iter().map(Vec::len).collect::<Vec<_>>(),
        bytes.len() as f64 * 8.0 / (s.width as f64 * s.height as f64)
    );
    Ok(())
}

fn classify(args: &[String]) -> Result<()> {
    let a = Args::parse(
        args,
        &[
            ("-t", "--target"),
            ("-w", "--weights"),
            ("-d", "--data"),
            ("-o", "--out"),
        ],
    )?;
    // Any target psic can load (a CLIP folder classifies against its captions.txt).
    let target = psic::train::load_target(
        a.get("--target")?,
        Path::new(a.get("--weights")?),
        &Device::Cpu,
    )?;
    let t = Instant::now();
    let predictions = psic::targets::classify_folder(
        target.as_ref(),
        Path::new(a.get("--data")?),
        5,
        |done, total| progress("classify", done, total, t),
    )?;
    eprintln!();
    let json = serde_json::json!({ "predictions": predictions });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialise predictions: {e}")))?;
    write_atomic(a.get("--out")?, text.as_bytes())?;
    println!(
        "{} images classified in {:.1} s -> {}",
        predictions.len(),
        t.elapsed().as_secs_f64(),
        a.get("--out")?
    );
    Ok(())
}

/// `cpu` or `cuda` (the latter needs a build with `--features cuda`).
fn device_named(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot use CUDA ({e}); build with `--features cuda` on a machine with an NVIDIA driver"
            ))
        }),
        other => Err(Error::InvalidArgument(format!(
            "unknown device {other:?} (cpu, cuda)"
        ))),
    }
}

fn train(args: &[String]) -> Result<()> {
    use psic::train::{TrainConfig, Trainer};
    use std::io::Write;
    let a = Args::parse(
        args,
        &[
            ("-c", "--config"),
            ("-o", "--out"),
            ("-r", "--resume"),
            ("-d", "--device"),
            ("-s", "--steps"),
            ("-t", "--max-minutes"),
            ("-D", "--data"),
            ("-w", "--target-weights"),
        ],
    )?;
    let out = Path::new(a.get("--out")?);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let steps: Option<u64> = a
        .opt("--steps")
        .map(|v| parse_num(v, "--steps"))
        .transpose()?;
    let max_minutes: Option<f64> = a
        .opt("--max-minutes")
        .map(|v| parse_num(v, "--max-minutes"))
        .transpose()?;
    let device_override = a.opt("--device").map(str::to_string);
    let mut trainer = match a.opt("--resume") {
        Some(ckpt) => {
            // A resumed run goes where --device says (the CPU by default), wherever it ran
            // before: the device is not part of a run's state.
            let device_name = device_override.clone().unwrap_or_else(|| "cpu".into());
            let dev = device_named(&device_name)?;
            let data = a.opt("--data").map(std::path::PathBuf::from);
            let weights = a.opt("--target-weights").map(std::path::PathBuf::from);
            Trainer::resume(ckpt, &dev, |cfg| {
                if let Some(s) = steps {
                    cfg.steps = s;
                }
                // Where the data and the target live may differ between machines.
                if let Some(d) = data {
                    cfg.data = d;
                }
                if let (Some(w), Some(s)) = (weights, cfg.shield.as_mut()) {
                    s.weights = w;
                }
                cfg.device = Some(device_name);
            })?
        }
        None => {
            let path = a.get("--config")?;
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let mut cfg: TrainConfig = toml::from_str(&text)
                .map_err(|e| Error::InvalidArgument(format!("{path}: {e}")))?;
            if let Some(s) = steps {
                cfg.steps = s;
            }
            if let Some(d) = &device_override {
                cfg.device = Some(d.clone());
            }
            let dev = device_named(cfg.device.as_deref().unwrap_or("cpu"))?;
            Trainer::new(cfg, &dev)?
        }
    };
    let log_path = out.join("log.jsonl");
    // On resume, drop log lines of steps after the checkpoint (they will be redone).
    if let Ok(text) = std::fs::read_to_string(&log_path) {
        let done = trainer.step_count();
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= done)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&log_path, kept.as_bytes())?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let total = trainer.cfg.steps;
    let start_step = trainer.step_count();
    let t = Instant::now();
    eprintln!(
        "stage {} on {:?}: steps {}..{}",
        trainer.cfg.stage,
        trainer.device(),
        start_step,
        total
    );
    let out_of_time =
        |t: &Instant| max_minutes.is_some_and(|m| t.elapsed().as_secs_f64() > 60.0 * m);
    while trainer.step_count() < total && !out_of_time(&t) {
        let s = trainer.step()?;
        let mut record = serde_json::to_value(&s).unwrap_or_default();
        record["elapsed_s"] = serde_json::json!(t.elapsed().as_secs_f64());
        writeln!(log, "{record}").map_err(|e| Error::io(&log_path, e))?;
        let done = (s.step - start_step) as usize;
        progress("train", done, (total - start_step) as usize, t);
        eprint!(" | loss {:.3} bpp {:.3} psnr {:.2}", s.loss, s.bpp, s.psnr);
        if let (Some(p), Some(a)) = (s.psnr_shielded, s.shielded_top1) {
            eprint!(" shielded {p:.2} dB, top-1 {:.0}%", 100.0 * a);
        }
        if let Some(k) = s.keep {
            eprint!(" keep {k:.3}");
        }
        let every = trainer.cfg.validate_every;
        if every > 0 && s.step % every == 0 {
            validate(&trainer, out, &mut log, &log_path)?;
        }
        if s.step % trainer.cfg.checkpoint_every == 0 || s.step == total {
            trainer.save_checkpoint(out.join("checkpoint.safetensors"))?;
            trainer.export()?.save(out.join("model.safetensors"))?;
        }
    }
    eprintln!();
    // Stopped by the time limit: save where it stands.
    if trainer.step_count() % trainer.cfg.checkpoint_every != 0 && trainer.step_count() != total {
        trainer.save_checkpoint(out.join("checkpoint.safetensors"))?;
        trainer.export()?.save(out.join("model.safetensors"))?;
    }
    if trainer.cfg.validate_every > 0 && trainer.step_count() % trainer.cfg.validate_every != 0 {
        validate(&trainer, out, &mut log, &log_path)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let done = trainer.step_count() - start_step;
    println!(
        "{done} steps in {secs:.0} s ({:.3} s/step); at step {} of {total}; checkpoint and model in {}",
        secs / done.max(1) as f64,
        trainer.step_count(),
        out.display()
    );
    Ok(())
}

/// Runs validation, appends it to the log and writes `val-grid.png`.
fn validate(
    trainer: &psic::train::Trainer,
    out: &Path,
    log: &mut std::fs::File,
    log_path: &Path,
) -> Result<()> {
    use std::io::Write;
    if let Some((v, grid)) = trainer.validate()? {
        let record = serde_json::json!({ "step": v.step, "val": v });
        writeln!(log, "{record}").map_err(|e| Error::io(log_path, e))?;
        save_png(out.join("val-grid.png"), &grid)?;
        eprintln!();
        eprintln!(
            "validation at step {}: {}",
            v.step,
            serde_json::to_string(&v).unwrap_or_default()
        );
    }
    Ok(())
}

fn parse_num<T: std::str::FromStr>(v: &str, flag: &str) -> Result<T> {
    v.parse()
        .map_err(|_| Error::InvalidArgument(format!("{flag} needs a number, got {v:?}")))
}

/// `export -i CHECKPOINT -o MODEL`: the model file of a training checkpoint.
fn export(args: &[String]) -> Result<()> {
    let a = Args::parse(args, &[("-i", "--input"), ("-o", "--output")])?;
    ensure_output_is_not_input(a.get("--input")?, a.get("--output")?)?;
    let trainer = psic::train::Trainer::resume(a.get("--input")?, &Device::Cpu, |_| {})?;
    trainer.export()?.save(a.get("--output")?)?;
    println!(
        "{} (step {}) -> {}",
        a.get("--input")?,
        trainer.step_count(),
        a.get("--output")?
    );
    Ok(())
}

/// `tradeoff --reports NAME=DIR,.. --out CHART.png`: one point per evaluated run.
fn tradeoff(args: &[String]) -> Result<()> {
    let a = Args::parse_with_switches(args, &[("-r", "--reports"), ("-o", "--out")], &[])?;
    let points = a
        .get("--reports")?
        .split(',')
        .map(|item| {
            let (name, dir) = item.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!("--reports {item:?}: use NAME=REPORT_DIR"))
            })?;
            let path = Path::new(dir).join("report.json");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            psic::eval::tradeoff_point(name, &text)
        })
        .collect::<Result<Vec<_>>>()?;
    let out = Path::new(a.get("--out")?);
    psic::eval::tradeoff_chart(&points, out)?;
    for p in &points {
        println!(
            "{}: shielded top-1 {:.1}% (probes {:?}), shielded PSNR {:.2} dB",
            p.name, p.shielded_top1, p.probe_top1, p.shielded_psnr
        );
    }
    println!("chart in {}", out.display());
    Ok(())
}

/// `eval [-m MODEL] --data DIR [--split eval|all] [--eval-percent P] [--limit N]
/// [--target T --weights W] [--jpeg Q1,Q2,..] [--no-purify] --out REPORT_DIR`.
fn eval(args: &[String]) -> Result<()> {
    use psic::eval::{load_images, EvalConfig};
    let a = Args::parse_with_switches(
        args,
        &[
            ("-m", "--model"),
            ("-d", "--data"),
            ("-s", "--split"),
            ("-p", "--eval-percent"),
            ("-n", "--limit"),
            ("-t", "--target"),
            ("-w", "--weights"),
            ("-j", "--jpeg"),
            ("-o", "--out"),
            ("-T", "--title"),
            ("-P", "--probes"),
            ("-J", "--jpeg-flavor"),
        ],
        &["--no-purify"],
    )?;
    let out = Path::new(a.get("--out")?);
    let data = Path::new(a.get("--data")?);
    let percent: u32 = a
        .opt("--eval-percent")
        .map(|v| parse_num(v, "--eval-percent"))
        .transpose()?
        .unwrap_or(20);
    let part = match a.opt("--split").unwrap_or("all") {
        "all" => None,
        "eval" => Some((psic::data::Split::Eval, percent)),
        other => {
            return Err(Error::InvalidArgument(format!(
                "--split {other:?}: use eval (the held-out part) or all"
            )))
        }
    };
    let limit = a
        .opt("--limit")
        .map(|v| parse_num(v, "--limit"))
        .transpose()?;
    let codec = load_codec(&a)?;
    let target = match (a.opt("--target"), a.opt("--weights")) {
        (Some(t), Some(w)) => Some(psic::train::load_target(t, Path::new(w), &Device::Cpu)?),
        (None, None) => None,
        _ => {
            return Err(Error::InvalidArgument(
                "--target and --weights go together".into(),
            ))
        }
    };
    // Probe models: KIND:WEIGHTS,... (evaluation only), named by their weight files' stems.
    let probes = a
        .opt("--probes")
        .unwrap_or("")
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (kind, weights) = p.split_once(':').ok_or_else(|| {
                Error::InvalidArgument(format!("--probes {p:?}: use KIND:WEIGHTS"))
            })?;
            let path = Path::new(weights);
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| weights.to_string());
            Ok((name, psic::train::load_target(kind, path, &Device::Cpu)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let probe_refs: Vec<psic::eval::Probe> = probes
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_ref()))
        .collect();
    let jpeg_flavor = match a.opt("--jpeg-flavor").unwrap_or("libjpeg420") {
        "libjpeg420" => psic::baseline::JpegFlavor::Libjpeg420,
        "image444" => psic::baseline::JpegFlavor::Image444,
        other => {
            return Err(Error::InvalidArgument(format!(
                "--jpeg-flavor {other:?}: use libjpeg420 (the field's baseline) or image444"
            )))
        }
    };
    let mut cfg = EvalConfig {
        purify: !a.switch("--no-purify"),
        jpeg_flavor,
        ..Default::default()
    };
    if let Some(q) = a.opt("--jpeg") {
        cfg.jpeg_qualities = if q.is_empty() || q == "none" {
            vec![]
        } else {
            q.split(',')
                .map(|v| parse_num(v.trim(), "--jpeg"))
                .collect::<Result<_>>()?
        };
    }
    let images = load_images(data, part, limit)?;
    let t = Instant::now();
    let report = psic::eval::evaluate_with_probes(
        &codec,
        &images,
        target.as_deref(),
        &probe_refs,
        &cfg,
        |done, total| progress("eval", done, total, t),
    )?;
    eprintln!();
    let command = std::iter::once("cargo run --release --example psic -- eval".to_string())
        .chain(args.iter().map(|s| {
            if s.contains(' ') {
                format!("{s:?}")
            } else {
                s.clone()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ");
    let title = a.opt("--title").unwrap_or("psic evaluation");
    psic::eval::write_report(&report, out, title, &command)?;
    let s = &report.summary;
    println!(
        "{} images: {:.4} bpp, full {:.2} dB{}{}; report in {}",
        s.images,
        s.bpp,
        s.psnr_full,
        s.psnr_shielded
            .map(|p| format!(", shielded {p:.2} dB"))
            .unwrap_or_default(),
        s.jpeg_psnr_at_codec_bpp
            .map(|j| format!(", JPEG at that bpp {j:.2} dB"))
            .unwrap_or_default(),
        out.display()
    );
    for (v, acc) in &s.top1 {
        println!("top-1 {v}: {:.1}%", 100.0 * acc);
    }
    for (probe, accs) in &s.probe_top1 {
        for (v, acc) in accs {
            println!("{probe} top-1 {v}: {:.1}%", 100.0 * acc);
        }
    }
    if let (Some(f), Some(sh)) = (s.periodic_full, s.periodic_shielded) {
        println!("periodic share: full {f:.3}, shielded {sh:.3}");
    }
    Ok(())
}

fn psnr(args: &[String]) -> Result<()> {
    let a = Args::parse(args, &[("-a", "--a"), ("-b", "--b")])?;
    let (x, y) = (load_image(a.get("--a")?)?, load_image(a.get("--b")?)?);
    println!("{:.3} dB", psic::metrics::psnr(&x, &y)?);
    Ok(())
}

/// Median, minimum and maximum of `runs` timings of `f` (after one warm-up), in seconds.
fn time_runs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    f()?;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok((t[t.len() / 2], t[0], t[t.len() - 1]))
}

fn bench(args: &[String]) -> Result<()> {
    use psic::entropy::{EntropyCoder, RansCoder};
    let a = Args::parse(
        args,
        &[("-m", "--model"), ("-i", "--input"), ("-r", "--runs")],
    )?;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/compressai");
    let runs: usize = a
        .opt("--runs")
        .unwrap_or("5")
        .parse()
        .map_err(|_| Error::InvalidArgument("--runs needs a positive integer".into()))?;
    let runs = runs.max(1);
    let codec = match a.opt("--model") {
        Some(m) => Codec::load(m)?,
        None => {
            let model = ModelFile::import(
                fixture.join("hyperprior_128_192.safetensors"),
                None,
                &Device::Cpu,
            )?;
            Codec::from_model_file(&model, &Device::Cpu)?
        }
    };
    let image_path = a
        .opt("--input")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| fixture.join("test768x512.png"));
    let img = load_image(&image_path)?;
    let bytes = codec.encode(&img)?;
    println!(
        "| {}x{} {} {} | median | min | max |",
        img.width(),
        img.height(),
        codec.backbone().architecture(),
        codec.backbone().config_json()
    );
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, (m, lo, hi): (f64, f64, f64), unit: &str, scale: f64| {
        println!(
            "| {name} | {:.3} {unit} | {:.3} | {:.3} |",
            m * scale,
            lo * scale,
            hi * scale
        )
    };
    row(
        "encode",
        time_runs(runs, || codec.encode(&img).map(|_| ()))?,
        "s",
        1.0,
    );
    row(
        "decode",
        time_runs(runs, || codec.decode(&bytes).map(|_| ()))?,
        "s",
        1.0,
    );
    // The coder alone on this image's y symbols and tables.
    let latent = codec.decode_latent(&bytes)?;
    let gc = codec.backbone().gaussian_conditional();
    let indexes = &latent.y_indexes;
    let symbols = gc.symbols(&latent.y_hat, None)?;
    let y_string = &latent.stream.strings[0];
    let n = symbols.len() as f64;
    let per_sym = |(m, lo, hi): (f64, f64, f64)| (n / m / 1e6, n / hi / 1e6, n / lo / 1e6);
    let enc = time_runs(runs * 20, || {
        RansCoder
            .encode_with_indexes(&symbols, indexes, gc.tables())
            .map(|_| ())
    })?;
    let dec = time_runs(runs * 20, || {
        RansCoder
            .decode_with_indexes(y_string, indexes, gc.tables())
            .map(|_| ())
    })?;
    let (m, lo, hi) = per_sym(enc);
    println!("| rANS encode ({n} y symbols) | {m:.0} M symbols/s | {lo:.0} | {hi:.0} |");
    let (m, lo, hi) = per_sym(dec);
    println!("| rANS decode | {m:.0} M symbols/s | {lo:.0} | {hi:.0} |");
    println!("(min/max of the rates come from the max/min of the times)");
    Ok(())
}

/// A one-line progress bar on stderr: `label [#####     ] done/total, elapsed, ETA`.
fn progress(label: &str, done: usize, total: usize, start: Instant) {
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    let elapsed = start.elapsed().as_secs_f64();
    let eta = if done > 0 {
        elapsed / done as f64 * (total - done) as f64
    } else {
        0.0
    };
    eprint!(
        "\r{label} [{}{}] {done}/{total}, {elapsed:.0} s elapsed, ~{eta:.0} s left",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(
        args.first().map(String::as_str),
        Some("bench" | "train" | "eval")
    ) {
        // Long, allocation-heavy jobs: keep freed tensor buffers for reuse (psic::alloc).
        psic::alloc::reuse_freed_memory();
    }
    let result = match args.first().map(String::as_str) {
        Some("convert") => convert(&args[1..]),
        Some("encode") => encode(&args[1..]),
        Some("decode") => decode(&args[1..]),
        Some("info") => info(&args[1..]),
        Some("classify") => classify(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("train") => train(&args[1..]),
        Some("shield") => shield(&args[1..]),
        Some("eval") => eval(&args[1..]),
        Some("tradeoff") => tradeoff(&args[1..]),
        Some("export") => export(&args[1..]),
        Some("psnr") => psnr(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(Error::InvalidArgument(USAGE.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
