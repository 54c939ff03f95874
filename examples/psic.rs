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
use psic::image_io::{load_image, save_png, write_atomic};
use psic::shield::Condition;
use psic::{Codec, Error, ModelFile, Result};

const USAGE: &str = "usage: psic <command> [options]
commands:
  convert -i CHECKPOINT -o MODEL.safetensors [--arch ARCH]
          import a CompressAI or official PSIC checkpoint (.safetensors, .pth, .pth.tar)
          as a psic model file; ARCH (bmshj2018-hyperprior, psic-hy2018) is inferred
  encode  -m MODEL -i IN.png -o OUT.psic      compress an image
  decode  -m MODEL -i IN.psic -o OUT.png [--full | --condition BETA]
          decompress a stream: the shielded decode by default (for shielded models),
          the full one with --full, or any condition with --condition
  info    -i IN.psic                          print a stream's header
  classify --target efficientnet-lite --weights W --data DIR --out PRED.json
          top-5 predictions of a semantic target for every PNG/JPEG in DIR";

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

fn encode(args: &[String]) -> Result<()> {
    let a = Args::parse(
        args,
        &[("-m", "--model"), ("-i", "--input"), ("-o", "--output")],
    )?;
    let t = Instant::now();
    let codec = Codec::load(a.get("--model")?)?;
    let load_s = t.elapsed().as_secs_f64();
    let img = load_image(a.get("--input")?)?;
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
    let t = Instant::now();
    let codec = Codec::load(a.get("--model")?)?;
    let load_s = t.elapsed().as_secs_f64();
    let input = a.get("--input")?;
    let bytes = std::fs::read(input).map_err(|e| Error::io(input, e))?;
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
    let bytes = std::fs::read(input).map_err(|e| Error::io(input, e))?;
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
    let target = match a.get("--target")? {
        "efficientnet-lite" => {
            psic::targets::EfficientNetLite::load(a.get("--weights")?, &Device::Cpu)?
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown target {other:?} (known: efficientnet-lite)"
            )))
        }
    };
    let t = Instant::now();
    let predictions =
        psic::targets::classify_folder(&target, Path::new(a.get("--data")?), 5, |done, total| {
            progress("classify", done, total, t)
        })?;
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
    let result = match args.first().map(String::as_str) {
        Some("convert") => convert(&args[1..]),
        Some("encode") => encode(&args[1..]),
        Some("decode") => decode(&args[1..]),
        Some("info") => info(&args[1..]),
        Some("classify") => classify(&args[1..]),
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
