//! `psic`, the command line of psic (cargo feature `cli`, on by default).
//!
//! ```text
//! cargo install --path .                      # or: cargo run --release --bin psic -- ...
//! psic shield photo.png --full                # stream + shielded decode (+ full decode)
//! psic encode -i photo.png -o photo.psic      # `-` reads stdin / writes stdout
//! psic decode -i photo.psic -o photo.jpg [--full | --condition BETA]
//! psic --help, psic <command> --help
//! ```
//!
//! Usage errors (unknown commands or options, bad values) exit with code 2 and clap's message;
//! a command that fails exits with code 1 and one line `error: ...` on stderr. Outputs are
//! written atomically (a failed command leaves no partial file) and never over the input.
//! Commands that need more of psic than the codec core appear with their cargo features:
//! `train`, `export`, `classify` and `rates` (`train`), `eval`, `tradeoff`, `rd` and `curve` (`eval`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use psic::bitstream::{fingerprint_hex, Bitstream};
use psic::candle_core::Device;
use psic::image::RgbImage;
use psic::image_io::{
    decode_image_limited, ensure_output_is_not_input, image_file_limit, load_image,
    load_image_limited, read_limited, read_limited_from, write_atomic,
};
use psic::shield::Condition;
use psic::{Codec, DeviceKind, Error, ModelFile, Result};

/// `println!` for the CLI's reports: a closed stdout (`psic info | head -1`) ends the process
/// quietly with success, as other command-line tools do, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            stdout_failed(e);
        }
    }};
}

// Large tensor buffers get transparent huge pages (psic::alloc::HugePages): fewer page faults.
#[global_allocator]
static ALLOC: psic::alloc::HugePages = psic::alloc::HugePages;

/// Privacy-shielded learned image compression: one bitstream, a shielded decode for everyone and
/// a full decode on condition.
#[derive(Debug, Parser)]
#[command(name = "psic", version, propagate_version = true)]
struct Cli {
    /// Print only errors and the results a command exists for (no progress, no status lines).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Shield(ShieldArgs),
    Encode(EncodeArgs),
    Decode(DecodeArgs),
    Info(InfoArgs),
    Convert(ConvertArgs),
    #[cfg(feature = "train")]
    Export(ExportArgs),
    Bench(BenchArgs),
    #[cfg(feature = "train")]
    Train(TrainArgs),
    #[cfg(feature = "eval")]
    Eval(EvalArgs),
    #[cfg(feature = "eval")]
    Tradeoff(TradeoffArgs),
    #[cfg(feature = "eval")]
    Rd(RdArgs),
    #[cfg(feature = "eval")]
    Curve(CurveArgs),
    Psnr(PsnrArgs),
    #[cfg(feature = "train")]
    Classify(ClassifyArgs),
    #[cfg(feature = "train")]
    Rates(RatesArgs),
}

/// The semantic targets the command line can load (`psic::targets::TargetKind`).
#[cfg(any(feature = "train", feature = "eval"))]
const TARGET_KINDS: [&str; 2] = ["efficientnet-lite", "clip"];

/// The quality level of the commands that encode.
#[derive(Debug, clap::Args)]
struct LevelOpt {
    /// The quality level, 0..L for a model with L levels (`psic rates` adds levels; a model
    /// without levels has level 0 only; default: the model's default level, `psic info -m`).
    /// The decoder reads it from the stream.
    #[arg(short = 'q', long = "level")]
    level: Option<usize>,
}

impl LevelOpt {
    /// The codec at the level asked for (unchanged, at its model's default, without one).
    fn apply(&self, codec: Codec) -> Result<Codec> {
        match self.level {
            Some(level) => codec.with_level(level),
            None => Ok(codec),
        }
    }
}

/// The device option of every command that runs a model.
#[derive(Debug, clap::Args)]
struct DeviceOpt {
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    device: DeviceKind,
}

/// Shield a photo: write its stream and its shielded (and full) decode.
///
/// Compresses IMAGE with the default shielded model (or MODEL): writes STEM.psic and
/// STEM.shielded.png (and STEM.full.png with --full) into the output folder, and prints the
/// bpp, PSNRs and timings.
#[derive(Debug, clap::Args)]
struct ShieldArgs {
    /// The photo (PNG or JPEG).
    image: PathBuf,
    /// Folder of the outputs.
    #[arg(short = 'd', long, default_value = ".")]
    out_dir: PathBuf,
    /// Also write the full decode (STEM.full.png).
    #[arg(long)]
    full: bool,
    /// A shielded psic model file instead of the embedded default model.
    #[arg(short, long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    level: LevelOpt,
    #[command(flatten)]
    strength: StrengthOpt,
    #[command(flatten)]
    device: DeviceOpt,
}

/// Compress an image into a psic stream (with the default model when no -m is given).
#[derive(Debug, clap::Args)]
struct EncodeArgs {
    /// A psic model file (default: the embedded default model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// The image (PNG or JPEG); `-` reads it from standard input.
    #[arg(short, long)]
    input: PathBuf,
    /// The stream; `-` writes it to standard output.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    level: LevelOpt,
    #[command(flatten)]
    device: DeviceOpt,
    #[command(flatten)]
    refine: RefineOpt,
}

/// An image encoder: the codec's own, or a refining one ([`RefineOpt::encoder`]).
type Encoder<'a> = Box<dyn Fn(&RgbImage) -> Result<Vec<u8>> + 'a>;

/// `--refine` of the commands that encode (an empty option set without feature `train`).
#[derive(Debug, clap::Args)]
struct RefineOpt {
    /// Refine each latent with N gradient steps against the decoder before coding it: a slower
    /// encoder (each step costs about a training step on the whole image) whose streams any
    /// psic decoder reads (`psic::train::refine`, docs/MODELS.md "Encoder effort").
    #[cfg(feature = "train")]
    #[arg(long, value_name = "N", default_value_t = 0)]
    refine: usize,
    /// Adam's learning rate of --refine.
    #[cfg(feature = "train")]
    #[arg(long, value_name = "LR", default_value_t = psic::train::refine::RefineConfig::default().lr)]
    refine_lr: f64,
}

impl RefineOpt {
    /// The encoder these options ask for: `codec.encode`, or the refining encoder of `model`
    /// (which `codec` was built from); `progress` sees each refinement's steps.
    fn encoder<'a>(
        &'a self,
        model: &'a ModelFile,
        codec: &'a Codec,
        progress: &'a dyn Fn(usize, usize, f64, f64),
    ) -> Encoder<'a> {
        #[cfg(feature = "train")]
        if self.refine > 0 {
            let cfg = psic::train::refine::RefineConfig {
                steps: self.refine,
                lr: self.refine_lr,
                ..Default::default()
            };
            return Box::new(move |img| {
                psic::train::refine::encode_refined(model, codec, img, &cfg, |i, st| {
                    progress(i, cfg.steps, st.loss, st.psnr)
                })
            });
        }
        let _ = (model, progress);
        Box::new(|img| codec.encode(img))
    }
}

/// Decompress a psic stream (shielded by default, --full for the full decode).
///
/// The shielded decode by default (for shielded models), the full one with --full, or any
/// condition with --condition.
#[derive(Debug, clap::Args)]
struct DecodeArgs {
    /// The psic model file that encoded the stream (default: the embedded default model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// The stream; `-` reads it from standard input.
    #[arg(short, long)]
    input: PathBuf,
    /// The image: `.png`, or `.jpg`/`.jpeg` for JPEG; `-` writes it to standard output (PNG
    /// unless --format says otherwise).
    #[arg(short, long)]
    output: PathBuf,
    /// The full decode (the model's full condition).
    #[arg(long, conflicts_with = "condition")]
    full: bool,
    /// Decode with this condition β instead (a number).
    #[arg(short, long, value_name = "BETA", allow_negative_numbers = true)]
    condition: Option<f32>,
    /// Image format of the output, instead of the one its extension names.
    #[arg(long, value_enum)]
    format: Option<ImageFormat>,
    /// JPEG quality (1-100).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    #[command(flatten)]
    strength: StrengthOpt,
    #[command(flatten)]
    device: DeviceOpt,
}

/// Print a stream's header, or what a model file holds.
///
/// With -i, the stream's header; with -m, or with neither, the model's architecture,
/// fingerprint, shield and quality levels (default: the embedded default model).
#[derive(Debug, clap::Args)]
struct InfoArgs {
    /// The stream; `-` reads it from standard input.
    #[arg(short, long, conflicts_with = "model")]
    input: Option<PathBuf>,
    /// A psic model file.
    #[arg(short, long)]
    model: Option<PathBuf>,
}

/// Import a CompressAI or official PSIC checkpoint as a psic model file.
///
/// Reads .safetensors, .pth and .pth.tar checkpoints; the architecture is inferred from the keys
/// unless --arch names it.
#[derive(Debug, clap::Args)]
struct ConvertArgs {
    /// The checkpoint.
    #[arg(short, long)]
    input: PathBuf,
    /// The psic model file to write (.safetensors).
    #[arg(short, long)]
    output: PathBuf,
    /// The architecture (bmshj2018-hyperprior, mbt2018-mean, psic-hy2018, or a registered
    /// backbone).
    #[arg(short, long)]
    arch: Option<String>,
}

/// Write the psic model file of a training checkpoint.
#[cfg(feature = "train")]
#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// The training checkpoint (DIR/checkpoint.safetensors of `psic train`), or a psic model
    /// file with --from-model.
    #[arg(short, long)]
    input: PathBuf,
    /// The model file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// INPUT is a psic model file (to change what --strength sets), not a checkpoint.
    #[arg(long)]
    from_model: bool,
    /// Record this shield strength as the model's default (1: the trained shield; weights,
    /// fingerprint and streams stay the same).
    #[arg(long, value_name = "S")]
    strength: Option<f32>,
    /// Record this quality level as the one the codec writes by default (the model must have
    /// it; weights, fingerprint and streams stay the same).
    #[arg(long, value_name = "N")]
    default_level: Option<usize>,
    /// Record each level's measured Kodak bits per pixel and full-decode PSNR from the report of
    /// `psic eval -q N` on ../shared/data/kodak: `N=REPORT_DIR,...` (the report must be of
    /// this model, fingerprint and level; `psic info -m` shows the figures).
    #[arg(long, value_name = "N=DIR,..")]
    level_reports: Option<String>,
    /// Give the model the trigger generator and conditions of this shielded model (same
    /// injection points; any generator of its own is replaced): the start of re-shielding a
    /// retrained backbone. The result's shield is the donor's triggers on this synthesis:
    /// measure it with `psic eval`.
    #[arg(long, value_name = "DONOR")]
    shield_from: Option<PathBuf>,
}

/// Time encode, decode and the rANS coder (median, min and max).
///
/// Defaults: the CompressAI fixture model and image in ../shared of the source tree.
#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// A psic model file.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// The image.
    #[arg(short, long)]
    input: Option<PathBuf>,
    /// Timed runs (after one warm-up).
    #[arg(short, long, default_value_t = 5)]
    runs: usize,
    #[command(flatten)]
    device: DeviceOpt,
}

/// Train a codec or a shield (stage 0, 1 or 2, as the config says).
///
/// See docs/TRAINING.md. Writes DIR/checkpoint.safetensors (resume), DIR/log.jsonl,
/// DIR/model.safetensors (a psic model file) and DIR/val-grid.png as it goes.
#[cfg(feature = "train")]
#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// The training configuration (TOML); not needed with --resume.
    #[arg(short, long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// The run's folder.
    #[arg(short, long)]
    out: PathBuf,
    /// Resume from this checkpoint (its configuration is inside).
    #[arg(short, long)]
    resume: Option<PathBuf>,
    /// Where to train: default the config's `device` (cpu when it has none or on resume).
    #[arg(short, long, value_enum)]
    device: Option<DeviceKind>,
    /// Change the total number of steps.
    #[arg(short, long)]
    steps: Option<u64>,
    /// Stop after this many minutes (saving first).
    #[arg(short = 't', long)]
    max_minutes: Option<f64>,
    /// The data folder of a resumed run, when it moved.
    #[arg(short = 'D', long)]
    data: Option<PathBuf>,
    /// The semantic target's weights of a resumed run, when they moved.
    #[arg(short = 'w', long)]
    target_weights: Option<PathBuf>,
}

/// Which images of a folder to evaluate.
#[cfg(feature = "eval")]
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SplitArg {
    /// The held-out part (--eval-percent of the images, as training splits them).
    Eval,
    /// Every image.
    All,
}

/// The JPEG baseline's flavour.
#[cfg(feature = "eval")]
#[derive(Debug, Clone, Copy, ValueEnum)]
enum JpegFlavorArg {
    /// libjpeg-equivalent baseline JPEG with 4:2:0 chroma (the field's baseline).
    #[value(name = "libjpeg420")]
    Libjpeg420,
    /// The `image` crate's encoder, 4:4:4.
    #[value(name = "image444")]
    Image444,
}

/// Evaluate a codec on a folder of photos (report, charts).
///
/// Evaluates MODEL (the default model without -m): writes report.json, report.md, grid.png
/// (original | full | shielded), rd.png and accuracy.png.
#[cfg(feature = "eval")]
#[derive(Debug, clap::Args)]
struct EvalArgs {
    /// A psic model file (default: the embedded default model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// The folder of photos.
    #[arg(short, long)]
    data: PathBuf,
    /// The report's folder.
    #[arg(short, long)]
    out: PathBuf,
    /// Which images.
    #[arg(short, long, value_enum, default_value_t = SplitArg::All)]
    split: SplitArg,
    /// The held-out share of --split eval, in percent.
    #[arg(short = 'p', long, default_value_t = 20)]
    eval_percent: u32,
    /// At most this many images.
    #[arg(short = 'n', long)]
    limit: Option<usize>,
    /// The semantic target (efficientnet-lite, clip); with --weights.
    #[arg(short, long, requires = "weights", value_parser = TARGET_KINDS)]
    target: Option<String>,
    /// The target's weights; with --target.
    #[arg(short, long, requires = "target")]
    weights: Option<PathBuf>,
    /// JPEG baseline qualities, `5,10,..`, or `none`.
    #[arg(short, long)]
    jpeg: Option<String>,
    /// Skip the purification attacks.
    #[arg(long)]
    no_purify: bool,
    /// The report's title.
    #[arg(short = 'T', long, default_value = "psic evaluation")]
    title: String,
    /// Probe models, KIND:WEIGHTS,.. (named by their weight files' stems).
    #[arg(short = 'P', long)]
    probes: Option<String>,
    /// The JPEG baseline's encoder.
    #[arg(short = 'J', long, value_enum, default_value_t = JpegFlavorArg::Libjpeg420)]
    jpeg_flavor: JpegFlavorArg,
    /// Resize every photo by this factor before coding it (triangle filter; in (0, 4]): the
    /// same photos at another size, e.g. 0.5 for Kodak at 384x256.
    #[arg(long)]
    scale: Option<f64>,
    #[command(flatten)]
    level: LevelOpt,
    #[command(flatten)]
    strength: StrengthOpt,
    #[command(flatten)]
    device: DeviceOpt,
    #[command(flatten)]
    refine: RefineOpt,
}

/// Chart the shield trade-off across evaluated runs.
///
/// Top-1 on the shielded decodes (target and probes) against shielded PSNR.
#[cfg(feature = "eval")]
#[derive(Debug, clap::Args)]
struct TradeoffArgs {
    /// NAME=REPORT_DIR,.. (folders of `psic eval`).
    #[arg(short, long)]
    reports: String,
    /// The chart (PNG).
    #[arg(short, long)]
    out: PathBuf,
}

/// Chart a model's rate-distortion curve across its quality levels.
///
/// From one `psic eval` report per level (`psic eval --level N`): PSNR and MS-SSIM against bpp
/// of the full and shielded decodes, the JPEG curve, CompressAI's published Kodak curves, and
/// each level's distance to JPEG (BD-PSNR over the levels' range). Writes rd.json, rd.md,
/// rd-psnr.png and rd-msssim.png into --out.
#[cfg(feature = "eval")]
#[derive(Debug, clap::Args)]
struct RdArgs {
    /// NAME=REPORT_DIR,.. in rate order (folders of `psic eval`).
    #[arg(short, long)]
    reports: String,
    /// The folder of the RD report.
    #[arg(short, long)]
    out: PathBuf,
    /// The report's title.
    #[arg(short = 'T', long, default_value = "psic rate-distortion")]
    title: String,
}

/// Chart a training run's curve: its model's distance to JPEG at equal bpp against steps.
///
/// From one `psic eval` report per step of the run (the same data, usually Kodak): a table of
/// bpp, full-decode PSNR, its distance to the report's JPEG curve at that bpp and MS-SSIM, and
/// a chart of the distance against steps. Writes curve.md and curve.png into --out.
#[cfg(feature = "eval")]
#[derive(Debug, clap::Args)]
struct CurveArgs {
    /// STEP=REPORT_DIR,.. (folders of `psic eval`), STEP the run's step count at the report.
    #[arg(short, long)]
    reports: String,
    /// The folder of the curve report.
    #[arg(short, long)]
    out: PathBuf,
    /// The report's title.
    #[arg(short = 'T', long, default_value = "psic training curve")]
    title: String,
}

/// PSNR (dB) between two images of the same size.
#[derive(Debug, clap::Args)]
struct PsnrArgs {
    /// The first image.
    #[arg(short = 'a', long = "a")]
    a: PathBuf,
    /// The second image.
    #[arg(short = 'b', long = "b")]
    b: PathBuf,
}

/// Add quality levels to a model: fit per-level channel gains on its latent.
///
/// Fits one gain per latent channel for each λ (CompressAI's `bpp + λ·255²·MSE`) on crops from
/// the training part of each --data folder, with the model itself frozen, and writes a copy of
/// MODEL with the levels (same fingerprint: its existing streams still decode). Level i is the
/// i-th λ; `encode -q i` then codes at it.
#[cfg(feature = "train")]
#[derive(Debug, clap::Args)]
struct RatesArgs {
    /// The model (default: the embedded default model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// An image folder (repeat for several); its training part is used (see --eval-percent).
    #[arg(short, long, required = true)]
    data: Vec<PathBuf>,
    /// The held-out share of each folder, in percent (as `train`'s eval_percent).
    #[arg(short = 'p', long, default_value_t = 20)]
    eval_percent: u32,
    /// The λ of each level, in level order (e.g. 0.002,0.0085,0.03).
    #[arg(short, long, value_delimiter = ',', required = true)]
    lambdas: Vec<f64>,
    /// The λ the model was trained for: levels start from gains sqrt(λ / it).
    #[arg(long)]
    reference_lambda: Option<f64>,
    /// Adam steps.
    #[arg(short, long, default_value_t = 300)]
    steps: usize,
    /// Crops per batch.
    #[arg(short, long, default_value_t = 4)]
    batch: usize,
    /// Crop side in pixels (a multiple of the model's alignment, 64).
    #[arg(short, long, default_value_t = 256)]
    crop: u32,
    /// Adam's learning rate on the log gains.
    #[arg(long, default_value_t = 0.02)]
    lr: f64,
    /// Seed of the crops and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The level the codec writes by default (e.g. the one at the model's own λ).
    #[arg(long, default_value_t = 0)]
    default_level: usize,
    /// The model file to write (with the levels).
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceOpt,
}

/// Top-5 predictions of a semantic target for a folder of photos.
///
/// For every PNG/JPEG in the folder. For clip, WEIGHTS is a Hugging Face CLIP folder with
/// captions.txt: one caption, i.e. class, per line.
#[cfg(feature = "train")]
#[derive(Debug, clap::Args)]
struct ClassifyArgs {
    /// The target: efficientnet-lite or clip.
    #[arg(short, long, value_parser = TARGET_KINDS)]
    target: String,
    /// Its weights.
    #[arg(short, long)]
    weights: PathBuf,
    /// The folder of photos.
    #[arg(short, long)]
    data: PathBuf,
    /// The predictions (JSON).
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceOpt,
}

/// An image file format psic writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ImageFormat {
    /// PNG (lossless).
    Png,
    /// Baseline JPEG.
    Jpeg,
}

/// How a command reports: status lines on stdout (stderr when stdout carries data), progress on
/// stderr, nothing of either with --quiet.
struct Ui {
    quiet: bool,
    stdout_is_data: bool,
}

impl Ui {
    fn status(&self, line: std::fmt::Arguments) {
        if self.quiet {
        } else if self.stdout_is_data {
            eprintln!("{line}");
        } else {
            // Progress, not a result: a reader gone from stdout must not end the job half done.
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    }

    #[cfg_attr(not(any(feature = "train", feature = "eval")), allow(dead_code))]
    fn progress(&self, label: &'static str) -> Progress {
        Progress {
            label,
            start: Instant::now(),
            last: None,
            quiet: self.quiet,
            tty: std::io::stderr().is_terminal(),
            open_line: false,
        }
    }
}

/// A progress report on stderr: a redrawn bar on a terminal, a plain line every 15 s (and at the
/// end) otherwise.
#[cfg_attr(not(any(feature = "train", feature = "eval")), allow(dead_code))]
struct Progress {
    label: &'static str,
    start: Instant,
    last: Option<Instant>,
    quiet: bool,
    tty: bool,
    open_line: bool,
}

#[cfg_attr(not(any(feature = "train", feature = "eval")), allow(dead_code))]
impl Progress {
    const EVERY: Duration = Duration::from_secs(15);

    fn update(&mut self, done: usize, total: usize, extra: &str) {
        if self.quiet {
            return;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 {
            elapsed / done as f64 * total.saturating_sub(done) as f64
        } else {
            0.0
        };
        if self.tty {
            let width = 30;
            let filled = (done * width)
                .checked_div(total)
                .unwrap_or(width)
                .min(width);
            eprint!(
                "\r{} [{}{}] {done}/{total}, {elapsed:.0} s elapsed, ~{eta:.0} s left{extra}",
                self.label,
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
            self.open_line = true;
        } else if done >= total || self.last.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            eprintln!(
                "{}: {done}/{total}, {elapsed:.0} s elapsed, ~{eta:.0} s left{extra}",
                self.label
            );
            self.last = Some(Instant::now());
        }
    }

    /// Ends the bar's line (before other output, and at the end).
    fn break_line(&mut self) {
        if self.open_line {
            eprintln!();
            self.open_line = false;
        }
    }
}

fn is_std(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// [`ensure_output_is_not_input`], unless either is standard input/output.
fn not_the_input(input: &Path, output: &Path) -> Result<()> {
    if is_std(input) || is_std(output) {
        return Ok(());
    }
    ensure_output_is_not_input(input, output)
}

/// Reads a file (or standard input for `-`), at most `limit` bytes.
fn read_input(path: &Path, limit: u64) -> Result<Vec<u8>> {
    if is_std(path) {
        read_limited_from(std::io::stdin().lock(), limit, 0, "<stdin>")
    } else {
        read_limited(path, limit)
    }
}

/// Refuses to write binary data to a terminal (`-o -` without a redirection).
fn check_binary_stdout(path: &Path) -> Result<()> {
    if is_std(path) && std::io::stdout().is_terminal() {
        return Err(Error::InvalidArgument(
            "standard output is a terminal: redirect it (`> file`) or give a file name to -o"
                .into(),
        ));
    }
    Ok(())
}

/// Writes `bytes` atomically to a file, or to standard output for `-`.
fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    if is_std(path) {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("<stdout>", e))
    } else {
        write_atomic(path, bytes)
    }
}

/// The format of an image output: `format` when given, else the extension's.
fn output_format(path: &Path, format: Option<ImageFormat>) -> Result<ImageFormat> {
    if let Some(f) = format {
        return Ok(f);
    }
    if is_std(path) {
        return Ok(ImageFormat::Png);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => Ok(ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(ImageFormat::Jpeg),
        _ => Err(Error::InvalidArgument(format!(
            "{}: cannot tell the image format from the extension: use .png, .jpg or .jpeg (or --format)",
            path.display()
        ))),
    }
}

/// `img` as a PNG or JPEG file's bytes.
fn encode_image(img: &RgbImage, format: ImageFormat, quality: u8) -> Result<Vec<u8>> {
    use psic::image::ImageEncoder;
    let mut out = Vec::new();
    let (w, h, rgb) = (
        img.width(),
        img.height(),
        psic::image::ExtendedColorType::Rgb8,
    );
    match format {
        ImageFormat::Png => {
            psic::image::codecs::png::PngEncoder::new(&mut out).write_image(img.as_raw(), w, h, rgb)
        }
        ImageFormat::Jpeg => psic::image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut out, quality,
        )
        .write_image(img.as_raw(), w, h, rgb),
    }
    .map_err(|e| Error::Image(e.to_string()))?;
    Ok(out)
}

fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    write_atomic(path, &encode_image(img, ImageFormat::Png, 100)?)
}

/// The model file at `model`, or the embedded default model when it is not given.
fn load_model_file(model: Option<&Path>, device: &Device) -> Result<ModelFile> {
    match model {
        Some(path) => ModelFile::load(path, device),
        None => default_model_file(device),
    }
}

/// The codec of `model`, or the embedded default model when it is not given.
fn load_codec(model: Option<&Path>, device: &Device) -> Result<Codec> {
    match model {
        Some(path) => Codec::load_on(path, device),
        None => default_codec(device),
    }
}

/// `--strength` of the commands that make shielded decodes.
#[derive(Debug, clap::Args)]
struct StrengthOpt {
    /// Shield strength of the shielded decode instead of the model's own (1: the trained
    /// shield, 0: the full decode; see docs/MODELS.md for what it trades).
    #[arg(long, value_name = "S")]
    strength: Option<f32>,
}

impl StrengthOpt {
    fn apply(&self, codec: Codec) -> Result<Codec> {
        match self.strength {
            Some(s) => codec.with_shield_strength(s),
            None => Ok(codec),
        }
    }
}

#[cfg(feature = "default-model")]
fn default_codec(device: &Device) -> Result<Codec> {
    Codec::from_model_file(&default_model_file(device)?, device)
}

#[cfg(feature = "default-model")]
fn default_model_file(device: &Device) -> Result<ModelFile> {
    psic::zoo::default_model(device)
}

#[cfg(not(feature = "default-model"))]
#[cfg_attr(not(feature = "train"), allow(dead_code))]
fn default_model_file(_device: &Device) -> Result<ModelFile> {
    Err(Error::InvalidArgument(
        "no -m MODEL given and this build has no embedded default model (feature `default-model`)"
            .into(),
    ))
}

#[cfg(not(feature = "default-model"))]
fn default_codec(_device: &Device) -> Result<Codec> {
    Err(Error::InvalidArgument(
        "no -m MODEL given and this build has no embedded default model (feature `default-model`)"
            .into(),
    ))
}

fn bpp(bytes: usize, w: u32, h: u32) -> f64 {
    bytes as f64 * 8.0 / (f64::from(w) * f64::from(h))
}

fn convert(a: ConvertArgs, ui: &Ui) -> Result<()> {
    ensure_output_is_not_input(&a.input, &a.output)?;
    let t = Instant::now();
    let model = ModelFile::import(&a.input, a.arch.as_deref(), &Device::Cpu)?;
    model.save(&a.output)?;
    for (k, v) in &model.extra_metadata {
        if k.ends_with(".tables") {
            ui.status(format_args!("note: {k}: {v} (the checkpoint had no usable CDF tables; streams will not be byte-identical to CompressAI's)"));
        }
    }
    ui.status(format_args!(
        "wrote {} ({} {}, fingerprint {}) in {:.2} s",
        a.output.display(),
        model.architecture.name(),
        model.architecture.config_json(),
        fingerprint_hex(&model.fingerprint()?),
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn shield(a: ShieldArgs, ui: &Ui) -> Result<()> {
    let input = &a.image;
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let dir = &a.out_dir;
    let stream = dir.join(format!("{stem}.psic"));
    let shielded_path = dir.join(format!("{stem}.shielded.png"));
    let full_path = dir.join(format!("{stem}.full.png"));
    for out in [&stream, &shielded_path, &full_path] {
        ensure_output_is_not_input(input, out)?;
    }
    let device = a.device.device.device()?;
    let t = Instant::now();
    let codec = a.level.apply(load_codec(a.model.as_deref(), &device)?)?;
    let load_s = t.elapsed().as_secs_f64();
    let conditions = codec.conditions().ok_or_else(|| {
        Error::InvalidArgument("this model has no shield (no trigger generator)".into())
    })?;
    let img = load_image_limited(input, codec.max_pixels())?;
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
    ui.status(format_args!(
        "{}: {}x{} -> {} ({} bytes, {:.4} bpp), encode {enc_s:.2} s",
        input.display(),
        img.width(),
        img.height(),
        stream.display(),
        bytes.len(),
        bpp(bytes.len(), img.width(), img.height())
    ));
    ui.status(format_args!(
        "shielded decode -> {} ({:.2} dB PSNR to the input), synthesis {sh_s:.2} s",
        shielded_path.display(),
        psic::metrics::psnr(&img, &shielded)?
    ));
    if a.full {
        let t = Instant::now();
        let full = psic::image_io::tensor_to_image(&codec.synthesize(&latent, &conditions.full)?)?;
        let full_s = t.elapsed().as_secs_f64();
        save_png(&full_path, &full)?;
        ui.status(format_args!(
            "full decode -> {} ({:.2} dB PSNR), synthesis {full_s:.2} s",
            full_path.display(),
            psic::metrics::psnr(&img, &full)?
        ));
    }
    ui.status(format_args!("model load {load_s:.2} s"));
    Ok(())
}

fn encode(a: EncodeArgs, ui: &Ui) -> Result<()> {
    not_the_input(&a.input, &a.output)?;
    check_binary_stdout(&a.output)?;
    let device = a.device.device.device()?;
    let t = Instant::now();
    let model = load_model_file(a.model.as_deref(), &device)?;
    let codec = a.level.apply(Codec::from_model_file(&model, &device)?)?;
    let load_s = t.elapsed().as_secs_f64();
    let img = if is_std(&a.input) {
        let limit = image_file_limit(codec.max_pixels());
        let bytes = read_input(&a.input, limit)?;
        decode_image_limited(&bytes, codec.max_pixels(), "<stdin>")?
    } else {
        load_image_limited(&a.input, codec.max_pixels())?
    };
    let t = Instant::now();
    let bar = std::cell::RefCell::new(ui.progress("refine"));
    let show = |i: usize, n: usize, loss: f64, psnr: f64| {
        bar.borrow_mut()
            .update(i, n, &format!(" | loss {loss:.4} psnr {psnr:.2}"))
    };
    let bytes = a.refine.encoder(&model, &codec, &show)(&img)?;
    bar.borrow_mut().break_line();
    let enc_s = t.elapsed().as_secs_f64();
    write_output(&a.output, &bytes)?;
    ui.status(format_args!(
        "{}x{} -> {} bytes, {:.4} bpp at level {} (of {}); model load {load_s:.2} s, encode {enc_s:.2} s",
        img.width(),
        img.height(),
        bytes.len(),
        bpp(bytes.len(), img.width(), img.height()),
        codec.level(),
        codec.levels()
    ));
    Ok(())
}

fn decode(a: DecodeArgs, ui: &Ui) -> Result<()> {
    not_the_input(&a.input, &a.output)?;
    let format = output_format(&a.output, a.format)?;
    check_binary_stdout(&a.output)?;
    let device = a.device.device.device()?;
    let t = Instant::now();
    let codec = a.strength.apply(load_codec(a.model.as_deref(), &device)?)?;
    let load_s = t.elapsed().as_secs_f64();
    // Never more than the longest stream of an image within the codec's pixel limit.
    let bytes = read_input(&a.input, codec.max_stream_len())?;
    let condition = match (a.condition, a.full) {
        (Some(beta), _) => Some(Condition::new(beta)),
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
    write_output(&a.output, &encode_image(&img, format, a.quality)?)?;
    ui.status(format_args!(
        "{} bytes -> {}x{} ({what}), {:.4} bpp; model load {load_s:.2} s, decode {dec_s:.2} s",
        bytes.len(),
        img.width(),
        img.height(),
        bpp(bytes.len(), img.width(), img.height())
    ));
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let Some(input) = &a.input else {
        let model = match &a.model {
            Some(path) => ModelFile::load(path, &Device::Cpu)?,
            None => default_model_file(&Device::Cpu)?,
        };
        return model_info(&model);
    };
    let bytes = read_input(input, psic::bitstream::MAX_STREAM_LEN)?;
    let s = Bitstream::from_bytes(&bytes)?;
    outln!(
        "psic stream v{}{}: {}x{} (+{}x{} padding), model {}, y {:?}, z {:?}, strings {:?} bytes, {:.4} bpp",
        s.version(),
        s.level
            .map(|l| format!(", level {}", l.index))
            .unwrap_or_default(),
        s.width,
        s.height,
        s.pad_right,
        s.pad_bottom,
        fingerprint_hex(&s.fingerprint),
        s.y_shape,
        s.z_shape,
        s.strings.iter().map(Vec::len).collect::<Vec<_>>(),
        bpp(bytes.len(), s.width, s.height)
    );
    Ok(())
}

/// `psic info -m MODEL`: architecture, fingerprint, shield and quality levels, one per line.
fn model_info(model: &ModelFile) -> Result<()> {
    outln!(
        "psic model: {} {}, fingerprint {}",
        model.architecture.name(),
        model.architecture.config_json(),
        fingerprint_hex(&model.fingerprint()?)
    );
    match model.conditions()? {
        Some(c) => outln!(
            "shield: full decode beta {}, shielded beta {}, strength {}",
            c.full.beta(),
            c.shielded.beta(),
            c.strength
        ),
        None => outln!("shield: none (a plain codec)"),
    }
    // Where the weights come from, as the writer recorded it (`psic train`, `convert`, ...):
    // text from the file, so control characters are escaped and the line is cut at 200.
    if let Some(source) = model.extra_metadata.get("source") {
        let shown: String = source.escape_debug().take(200).collect();
        outln!("source: {shown}");
    }
    let Some(levels) = model.rate_levels()? else {
        outln!("quality levels: 1 (no rate.gains)");
        return Ok(());
    };
    outln!(
        "quality levels: {} (default {})",
        levels.len(),
        levels.default_level()
    );
    for l in 0..levels.len() {
        let info = levels.info(l);
        let measured = info
            .and_then(|i| Some((i.kodak_bpp?, i.kodak_psnr?)))
            .map(|(b, p)| format!(", Kodak {b:.4} bpp {p:.2} dB"))
            .unwrap_or_default();
        outln!(
            "  level {l}: lambda {}{measured}",
            info.map_or("?".to_string(), |i| i.lambda.to_string())
        );
    }
    Ok(())
}

#[cfg(feature = "train")]
fn rates(a: RatesArgs, ui: &Ui) -> Result<()> {
    use psic::train::rates::{fit_rate_levels, training_crops, RateFitConfig};
    let device = a.device.device.device()?;
    let model = match &a.model {
        Some(path) => {
            ensure_output_is_not_input(path, &a.out)?;
            ModelFile::load(path, &device)?
        }
        None => default_model_file(&device)?,
    };
    if a.default_level >= a.lambdas.len() {
        return Err(psic::Error::UnknownLevel {
            level: a.default_level,
            levels: a.lambdas.len(),
        });
    }
    let mut sampler = training_crops(&a.data, a.eval_percent, a.crop, a.seed ^ 0x5eed)?;
    let cfg = RateFitConfig {
        lambdas: a.lambdas.clone(),
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        reference_lambda: a.reference_lambda,
    };
    let t = Instant::now();
    let mut bar = ui.progress("rates");
    let levels = fit_rate_levels(&model, &mut sampler, &cfg, &device, |step, stats| {
        let line: Vec<String> = stats
            .iter()
            .map(|l| {
                format!(
                    "{:.3} bpp {:.2} dB g {:.3}",
                    l.bpp,
                    l.psnr,
                    l.mean_log_gain.exp()
                )
            })
            .collect();
        bar.update(step + 1, cfg.steps, &format!("; {}", line.join(" | ")));
    })?;
    bar.break_line();
    let levels = levels.with_default_level(a.default_level)?;
    let out = model.with_rate_levels(Some(&levels))?;
    out.save(&a.out)?;
    for (i, lambda) in a.lambdas.iter().enumerate() {
        let g = levels.gains(i).unwrap_or_default();
        let (lo, hi) = g
            .iter()
            .fold((f32::MAX, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
        ui.status(format_args!(
            "level {i}: lambda {lambda}, gains {lo:.3}..{hi:.3} (geometric mean {:.3})",
            (g.iter().map(|v| f64::from(v.ln())).sum::<f64>() / g.len().max(1) as f64).exp()
        ));
    }
    ui.status(format_args!(
        "wrote {} ({} levels, fingerprint {}) in {:.1} s",
        a.out.display(),
        levels.len(),
        fingerprint_hex(&out.fingerprint()?),
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(feature = "train")]
fn classify(a: ClassifyArgs, ui: &Ui) -> Result<()> {
    let device = a.device.device.device()?;
    // Any target psic can load (a CLIP folder classifies against its captions.txt).
    let target = psic::targets::load_target(&a.target.as_str().into(), &a.weights, &device)?;
    let t = Instant::now();
    let mut bar = ui.progress("classify");
    let predictions =
        psic::targets::classify_folder(target.as_ref(), &a.data, 5, |done, total| {
            bar.update(done, total, "")
        })?;
    bar.break_line();
    let json = serde_json::json!({ "predictions": predictions });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialise predictions: {e}")))?;
    write_atomic(&a.out, text.as_bytes())?;
    ui.status(format_args!(
        "{} images classified in {:.1} s -> {}",
        predictions.len(),
        t.elapsed().as_secs_f64(),
        a.out.display()
    ));
    Ok(())
}

#[cfg(feature = "train")]
fn train(a: TrainArgs, ui: &Ui) -> Result<()> {
    use psic::train::{TrainConfig, Trainer};
    let out = a.out.as_path();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let steps = a.steps;
    let mut trainer = match &a.resume {
        Some(ckpt) => {
            // A resumed run goes where --device says (the CPU by default), wherever it ran
            // before: the device is not part of a run's state.
            let dev = a.device.unwrap_or(DeviceKind::Cpu).device()?;
            let kind = DeviceKind::of(&dev);
            let (data, weights) = (a.data.clone(), a.target_weights.clone());
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
                cfg.device = Some(kind);
            })?
        }
        None => {
            let path = a.config.as_deref().ok_or_else(|| {
                Error::InvalidArgument("give --config CONFIG.toml or --resume CHECKPOINT".into())
            })?;
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let mut cfg: TrainConfig = toml::from_str(&text)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
            if let Some(s) = steps {
                cfg.steps = s;
            }
            let kind = a.device.or(cfg.device).unwrap_or(DeviceKind::Cpu);
            let dev = kind.device()?;
            cfg.device = Some(DeviceKind::of(&dev));
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
    if !ui.quiet {
        eprintln!(
            "stage {} on {:?}: steps {}..{}",
            trainer.cfg.stage,
            trainer.device(),
            start_step,
            total
        );
    }
    let out_of_time = |t: &Instant| {
        a.max_minutes
            .is_some_and(|m| t.elapsed().as_secs_f64() > 60.0 * m)
    };
    let mut bar = ui.progress("train");
    while trainer.step_count() < total && !out_of_time(&t) {
        let s = trainer.step()?;
        let mut record = serde_json::to_value(&s).unwrap_or_default();
        record["elapsed_s"] = serde_json::json!(t.elapsed().as_secs_f64());
        writeln!(log, "{record}").map_err(|e| Error::io(&log_path, e))?;
        let mut extra = format!(" | loss {:.3} bpp {:.3} psnr {:.2}", s.loss, s.bpp, s.psnr);
        if let (Some(p), Some(acc)) = (s.psnr_shielded, s.shielded_top1) {
            extra += &format!(" shielded {p:.2} dB, top-1 {:.0}%", 100.0 * acc);
        }
        if let Some(k) = s.keep {
            extra += &format!(" keep {k:.3}");
        }
        bar.update(
            (s.step - start_step) as usize,
            (total - start_step) as usize,
            &extra,
        );
        let every = trainer.cfg.validate_every;
        if every > 0 && s.step % every == 0 {
            validate(&trainer, out, &mut log, &log_path, &mut bar)?;
        }
        if s.step % trainer.cfg.checkpoint_every == 0 || s.step == total {
            trainer.save_checkpoint(out.join("checkpoint.safetensors"))?;
            trainer.export()?.save(out.join("model.safetensors"))?;
        }
    }
    bar.break_line();
    // Stopped by the time limit: save where it stands.
    if trainer.step_count() % trainer.cfg.checkpoint_every != 0 && trainer.step_count() != total {
        trainer.save_checkpoint(out.join("checkpoint.safetensors"))?;
        trainer.export()?.save(out.join("model.safetensors"))?;
    }
    if trainer.cfg.validate_every > 0 && trainer.step_count() % trainer.cfg.validate_every != 0 {
        validate(&trainer, out, &mut log, &log_path, &mut bar)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let done = trainer.step_count() - start_step;
    ui.status(format_args!(
        "{done} steps in {secs:.0} s ({:.3} s/step); at step {} of {total}; checkpoint and model in {}",
        secs / done.max(1) as f64,
        trainer.step_count(),
        out.display()
    ));
    Ok(())
}

/// Runs validation, appends it to the log and writes `val-grid.png`.
#[cfg(feature = "train")]
fn validate(
    trainer: &psic::train::Trainer,
    out: &Path,
    log: &mut std::fs::File,
    log_path: &Path,
    bar: &mut Progress,
) -> Result<()> {
    if let Some((v, grid)) = trainer.validate()? {
        let record = serde_json::json!({ "step": v.step, "val": v });
        writeln!(log, "{record}").map_err(|e| Error::io(log_path, e))?;
        save_png(&out.join("val-grid.png"), &grid)?;
        if !bar.quiet {
            bar.break_line();
            eprintln!(
                "validation at step {}: {}",
                v.step,
                serde_json::to_string(&v).unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[cfg(feature = "train")]
fn export(a: ExportArgs, ui: &Ui) -> Result<()> {
    ensure_output_is_not_input(&a.input, &a.output)?;
    let (mut model, what) = if a.from_model {
        (ModelFile::load(&a.input, &Device::Cpu)?, String::new())
    } else {
        let trainer = psic::train::Trainer::resume(&a.input, &Device::Cpu, |_| {})?;
        let step = format!(" (step {})", trainer.step_count());
        (trainer.export()?, step)
    };
    if let Some(donor) = &a.shield_from {
        let donor_model = ModelFile::load(donor, &Device::Cpu)?;
        model = model.with_generator_from(&donor_model, &Device::Cpu)?;
        let fingerprint = fingerprint_hex(&donor_model.fingerprint()?);
        model
            .extra_metadata
            .insert("generator_from".into(), format!("model {fingerprint}"));
    }
    if let Some(s) = a.strength {
        model = model.with_shield_strength(s)?;
    }
    if let Some(level) = a.default_level {
        let levels = model
            .rate_levels()?
            .ok_or(psic::Error::UnknownLevel { level, levels: 1 })?;
        model = model.with_rate_levels(Some(&levels.with_default_level(level)?))?;
    }
    if let Some(spec) = &a.level_reports {
        model = with_level_reports(model, spec)?;
    }
    model.save(&a.output)?;
    let strength = model
        .conditions()?
        .map(|c| format!(", shield strength {}", c.strength));
    ui.status(format_args!(
        "{}{what} -> {}{}",
        a.input.display(),
        a.output.display(),
        strength.unwrap_or_default()
    ));
    Ok(())
}

/// `model` with each listed level's Kodak figures taken from its `eval` report, which must be of
/// this model (fingerprint) at that level.
#[cfg(feature = "train")]
fn with_level_reports(model: ModelFile, spec: &str) -> Result<ModelFile> {
    let mut levels = model.rate_levels()?.ok_or_else(|| {
        Error::InvalidArgument("--level-reports: the model has no quality levels".into())
    })?;
    let fingerprint = fingerprint_hex(&model.fingerprint()?);
    for (name, text) in read_reports(spec)? {
        let bad = |why: String| Error::InvalidArgument(format!("--level-reports {name}: {why}"));
        let level: usize = name
            .parse()
            .map_err(|_| bad("the name must be the level's index".into()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a report: {e}")))?;
        let s = &v["summary"];
        let same_model = s["model"].as_str() == Some(fingerprint.as_str());
        if !same_model || s["level"].as_u64() != Some(level as u64) {
            return Err(bad(format!(
                "the report is of model {} at level {}, not {fingerprint} at level {level}",
                s["model"], s["level"]
            )));
        }
        let (Some(bpp), Some(psnr)) = (s["bpp"].as_f64(), s["psnr_full"].as_f64()) else {
            return Err(bad("the report has no bpp or psnr_full".into()));
        };
        let lambda = levels
            .info(level)
            .map(|i| i.lambda)
            .ok_or_else(|| bad("the model has no such level, or it has no λ".into()))?;
        levels.set_info(
            level,
            psic::rate::LevelInfo {
                lambda,
                kodak_bpp: Some(bpp),
                kodak_psnr: Some(psnr),
            },
        );
    }
    model.with_rate_levels(Some(&levels))
}

/// The command line as run, for a report (`psic`, then the arguments, those with spaces
/// quoted).
#[cfg(feature = "eval")]
fn command_line() -> String {
    std::iter::once("psic".to_string())
        .chain(
            std::env::args()
                .skip(1)
                .map(|s| if s.contains(' ') { format!("{s:?}") } else { s }),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// `NAME=REPORT_DIR,..`: each report's name and the text of its `report.json`.
#[cfg(any(feature = "eval", feature = "train"))]
fn read_reports(spec: &str) -> Result<Vec<(String, String)>> {
    spec.split(',')
        .map(|item| {
            let (name, dir) = item.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!("--reports {item:?}: use NAME=REPORT_DIR"))
            })?;
            let path = Path::new(dir).join("report.json");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            Ok((name.to_string(), text))
        })
        .collect()
}

#[cfg(feature = "eval")]
fn curve(a: CurveArgs, ui: &Ui) -> Result<()> {
    use psic::eval::rd::{rd_point, rd_summary, write_curve_report};
    let mut points = Vec::new();
    let mut steps = Vec::new();
    for (name, text) in read_reports(&a.reports)? {
        steps.push(name.parse::<u64>().map_err(|_| {
            Error::InvalidArgument(format!(
                "--reports {name:?}: use STEP=REPORT_DIR, STEP a number"
            ))
        })?);
        points.push(rd_point(&name, &text)?);
    }
    let summary = rd_summary(points);
    write_curve_report(&steps, &summary, &a.out, &a.title, &command_line())?;
    for ((step, p), d) in steps
        .iter()
        .zip(&summary.points)
        .zip(&summary.full_minus_jpeg)
    {
        let d = d.map_or("—".into(), |v| format!("{v:+.2} dB"));
        outln!(
            "step {step}: {:.4} bpp, full {:.2} dB ({d} vs JPEG)",
            p.bpp,
            p.psnr_full
        );
    }
    ui.status(format_args!("curve in {}", a.out.display()));
    Ok(())
}

#[cfg(feature = "eval")]
fn rd(a: RdArgs, ui: &Ui) -> Result<()> {
    use psic::eval::rd::{rd_point, rd_summary, write_rd_report};
    let points = read_reports(&a.reports)?
        .iter()
        .map(|(name, text)| rd_point(name, text))
        .collect::<Result<Vec<_>>>()?;
    let summary = rd_summary(points);
    write_rd_report(&summary, &a.out, &a.title, &command_line())?;
    for (i, p) in summary.points.iter().enumerate() {
        let fmt = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:+.2} dB"));
        outln!(
            "{}: {:.4} bpp, full {:.2} dB ({} vs JPEG), shielded {} of full",
            p.name,
            p.bpp,
            p.psnr_full,
            fmt(summary.full_minus_jpeg[i]),
            fmt(summary.shielded_minus_full[i]),
        );
    }
    ui.status(format_args!(
        "BD-PSNR of the full decodes over JPEG: {}; report in {}",
        summary
            .bd_psnr_full_vs_jpeg
            .map_or("—".into(), |v| format!("{v:+.2} dB")),
        a.out.display()
    ));
    Ok(())
}

#[cfg(feature = "eval")]
fn tradeoff(a: TradeoffArgs, ui: &Ui) -> Result<()> {
    let points = read_reports(&a.reports)?
        .iter()
        .map(|(name, text)| psic::eval::tradeoff_point(name, text))
        .collect::<Result<Vec<_>>>()?;
    psic::eval::tradeoff_chart(&points, &a.out)?;
    for p in &points {
        outln!(
            "{}: shielded top-1 {:.1}% (probes {:?}), shielded PSNR {:.2} dB",
            p.name,
            p.shielded_top1,
            p.probe_top1,
            p.shielded_psnr
        );
    }
    ui.status(format_args!("chart in {}", a.out.display()));
    Ok(())
}

#[cfg(feature = "eval")]
fn eval(a: EvalArgs, ui: &Ui) -> Result<()> {
    use psic::eval::{load_images, EvalConfig};
    let device = a.device.device.device()?;
    let part = match a.split {
        SplitArg::All => None,
        SplitArg::Eval => Some((psic::data::Split::Eval, a.eval_percent)),
    };
    let model = load_model_file(a.model.as_deref(), &device)?;
    let codec = a
        .strength
        .apply(a.level.apply(Codec::from_model_file(&model, &device)?)?)?;
    let target = match (&a.target, &a.weights) {
        (Some(t), Some(w)) => Some(psic::targets::load_target(&t.as_str().into(), w, &device)?),
        _ => None,
    };
    // Probe models: KIND:WEIGHTS,... (evaluation only), named by their weight files' stems.
    let probes = a
        .probes
        .as_deref()
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
            Ok((
                name,
                psic::targets::load_target(&kind.into(), path, &device)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let probe_refs: Vec<psic::eval::Probe> = probes
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_ref()))
        .collect();
    let mut cfg = EvalConfig {
        purify: !a.no_purify,
        jpeg_flavor: match a.jpeg_flavor {
            JpegFlavorArg::Libjpeg420 => psic::baseline::JpegFlavor::Libjpeg420,
            JpegFlavorArg::Image444 => psic::baseline::JpegFlavor::Image444,
        },
        ..Default::default()
    };
    if let Some(q) = &a.jpeg {
        cfg.jpeg_qualities = if q.is_empty() || q == "none" {
            vec![]
        } else {
            q.split(',')
                .map(|v| {
                    v.trim().parse().map_err(|_| {
                        Error::InvalidArgument(format!("--jpeg needs numbers, got {v:?}"))
                    })
                })
                .collect::<Result<_>>()?
        };
    }
    let mut images = load_images(&a.data, part, a.limit)?;
    if let Some(f) = a.scale {
        images = psic::eval::rescale_images(images, f, codec.max_pixels())?;
    }
    let mut bar = ui.progress("eval");
    let quiet = |_: usize, _: usize, _: f64, _: f64| {};
    let encode = a.refine.encoder(&model, &codec, &quiet);
    let report = psic::eval::evaluate_with_encoder(
        &codec,
        encode.as_ref(),
        &images,
        target.as_deref(),
        &probe_refs,
        &cfg,
        |done, total| bar.update(done, total, ""),
    )?;
    bar.break_line();
    psic::eval::write_report(&report, &a.out, &a.title, &command_line())?;
    let s = &report.summary;
    outln!(
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
        a.out.display()
    );
    for (v, acc) in &s.top1 {
        outln!("top-1 {v}: {:.1}%", 100.0 * acc);
    }
    for (probe, accs) in &s.probe_top1 {
        for (v, acc) in accs {
            outln!("{probe} top-1 {v}: {:.1}%", 100.0 * acc);
        }
    }
    if let (Some(f), Some(sh)) = (s.periodic_full, s.periodic_shielded) {
        outln!("periodic share: full {f:.3}, shielded {sh:.3}");
    }
    Ok(())
}

fn psnr(a: PsnrArgs) -> Result<()> {
    let (x, y) = (load_image(&a.a)?, load_image(&a.b)?);
    outln!("{:.3} dB", psic::metrics::psnr(&x, &y)?);
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

fn bench(a: BenchArgs) -> Result<()> {
    use psic::entropy::{EntropyCoder, RansCoder};
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/compressai");
    let runs = a.runs.max(1);
    let device = a.device.device.device()?;
    let codec = match &a.model {
        Some(m) => Codec::load_on(m, &device)?,
        None => {
            let model = ModelFile::import(
                fixture.join("hyperprior_128_192.safetensors"),
                None,
                &device,
            )?;
            Codec::from_model_file(&model, &device)?
        }
    };
    let image_path = a.input.unwrap_or_else(|| fixture.join("test768x512.png"));
    let img = load_image(&image_path)?;
    let bytes = codec.encode(&img)?;
    outln!(
        "| {}x{} {} {} | median | min | max |",
        img.width(),
        img.height(),
        codec.backbone().architecture(),
        codec.backbone().config_json()
    );
    outln!("| --- | --- | --- | --- |");
    let row = |name: &str, (m, lo, hi): (f64, f64, f64), unit: &str, scale: f64| {
        outln!(
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
    outln!("| rANS encode ({n} y symbols) | {m:.0} M symbols/s | {lo:.0} | {hi:.0} |");
    let (m, lo, hi) = per_sym(dec);
    outln!("| rANS decode | {m:.0} M symbols/s | {lo:.0} | {hi:.0} |");
    outln!("(min/max of the rates come from the max/min of the times)");
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let stdout_is_data = match &cli.command {
        Command::Encode(a) => is_std(&a.output),
        Command::Decode(a) => is_std(&a.output),
        _ => false,
    };
    let ui = Ui {
        quiet: cli.quiet,
        stdout_is_data,
    };
    match cli.command {
        Command::Shield(a) => shield(a, &ui),
        Command::Encode(a) => encode(a, &ui),
        Command::Decode(a) => decode(a, &ui),
        Command::Info(a) => info(a),
        Command::Convert(a) => convert(a, &ui),
        #[cfg(feature = "train")]
        Command::Export(a) => export(a, &ui),
        Command::Bench(a) => bench(a),
        #[cfg(feature = "train")]
        Command::Train(a) => train(a, &ui),
        #[cfg(feature = "eval")]
        Command::Eval(a) => eval(a, &ui),
        #[cfg(feature = "eval")]
        Command::Tradeoff(a) => tradeoff(a, &ui),
        #[cfg(feature = "eval")]
        Command::Rd(a) => rd(a, &ui),
        #[cfg(feature = "eval")]
        Command::Curve(a) => curve(a, &ui),
        Command::Psnr(a) => psnr(a),
        #[cfg(feature = "train")]
        Command::Classify(a) => classify(a, &ui),
        #[cfg(feature = "train")]
        Command::Rates(a) => rates(a, &ui),
    }
}

/// A write to stdout failed: a closed pipe ends the process quietly (its reader has all it
/// wanted); any other failure is reported and ends it with an error.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to stdout: {e}");
    std::process::exit(1);
}

fn main() -> ExitCode {
    // Usage errors: clap prints them and exits with code 2 (--help and --version with 0).
    let cli = Cli::parse();
    if matches!(cli.command, Command::Bench(_)) || long_job(&cli.command) {
        // Long, allocation-heavy jobs: keep freed tensor buffers for reuse (psic::alloc).
        psic::alloc::reuse_freed_memory();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Training and evaluation (the other long jobs besides `bench`).
fn long_job(command: &Command) -> bool {
    match command {
        #[cfg(feature = "train")]
        Command::Train(_) | Command::Rates(_) => true,
        #[cfg(feature = "eval")]
        Command::Eval(_) => true,
        _ => false,
    }
}
