//! The evaluation harness: how well a codec compresses, and how well it shields.
//!
//! [`evaluate`] runs every image of a set through the real codec (bitstream sizes, not
//! likelihood estimates), measures PSNR and MS-SSIM of the full and the shielded decode, asks a
//! semantic target for its top-5 on the original, the full decode, the shielded decode and on
//! "purified" versions of the shielded decode (what a curious attacker would try: JPEG at
//! quality 75, a Gaussian blur with sigma 1, a 2x down-and-up resize), and compresses the same
//! images with JPEG at a range of qualities for the baseline curve. [`Report`] holds per-image
//! and aggregate figures; `write_report` (in the CLI) turns it into JSON, Markdown and PNGs.

use std::time::Instant;

use image::RgbImage;

use crate::baseline::{interpolate_psnr_at, jpeg_roundtrip};
use crate::metrics::{ms_ssim, psnr};
use crate::shield::Condition;
use crate::targets::SemanticTarget;
use crate::{Codec, Result};

pub mod rd;

/// One image to evaluate.
#[derive(Debug, Clone)]
pub struct EvalImage {
    /// File name.
    pub name: String,
    /// The pixels.
    pub image: RgbImage,
    /// Class label, when known.
    pub label: Option<usize>,
    /// Caption, when known (with a text-reading target, the set is evaluated as image-text
    /// retrieval).
    pub caption: Option<String>,
}

/// Settings of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// JPEG qualities of the baseline curve (empty: no baseline).
    pub jpeg_qualities: Vec<u8>,
    /// Also classify purified shielded decodes (JPEG 75, blur, resize).
    pub purify: bool,
    /// Keep the decoded images of the first this many images (for the grid).
    pub keep_images: usize,
    /// The JPEG baseline's encoder.
    pub jpeg_flavor: crate::baseline::JpegFlavor,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            jpeg_qualities: vec![2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 75, 90],
            purify: true,
            keep_images: 4,
            jpeg_flavor: crate::baseline::JpegFlavor::default(),
        }
    }
}

/// Figures of one image.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImageResult {
    /// File name.
    pub name: String,
    /// Width and height.
    pub size: (u32, u32),
    /// Bitstream size, bytes.
    pub bytes: usize,
    /// Bits per pixel of the bitstream.
    pub bpp: f64,
    /// PSNR of the full decode, dB.
    pub psnr_full: f64,
    /// PSNR of the shielded decode, dB (shielded models).
    pub psnr_shielded: Option<f64>,
    /// MS-SSIM of the full decode (images of at least 161 pixels on both sides).
    pub ms_ssim_full: Option<f64>,
    /// MS-SSIM of the shielded decode.
    pub ms_ssim_shielded: Option<f64>,
    /// Seconds to encode.
    pub encode_s: f64,
    /// Seconds to decode (entropy decoding and one synthesis).
    pub decode_s: f64,
    /// Class label (or, for unlabelled data, the target's top-1 on the original).
    pub label: Option<usize>,
    /// Target top-5 per version: `original`, `full`, `shielded`, `shielded+jpeg75`,
    /// `shielded+blur1`, `shielded+resize2x`.
    pub top5: std::collections::BTreeMap<String, Vec<usize>>,
    /// JPEG baseline: `(quality, bpp, psnr)`.
    pub jpeg: Vec<(u8, f64, f64)>,
    /// Periodic-artefact share of the full decode's luma error
    /// ([`crate::metrics::periodic_share`], period [`crate::metrics::SYNTHESIS_PERIOD`]).
    pub periodic_full: Option<f64>,
    /// The same for the shielded decode.
    pub periodic_shielded: Option<f64>,
    /// Probe models (evaluation only): per probe, top-5 per version, as in `top5`.
    pub probes: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<usize>>>,
    /// Per probe, its label for this image: the class label, or the probe's top-1 on the
    /// original for unlabelled data.
    pub probe_labels: std::collections::BTreeMap<String, usize>,
}

/// Aggregates over the set.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Images evaluated.
    pub images: usize,
    /// Whether labels were given (otherwise accuracies are agreement with the target's reading
    /// of the originals).
    pub labelled: bool,
    /// Mean bits per pixel.
    pub bpp: f64,
    /// Mean PSNR of the full decodes.
    pub psnr_full: f64,
    /// Mean PSNR of the shielded decodes.
    pub psnr_shielded: Option<f64>,
    /// Mean MS-SSIM of the full decodes (over the images large enough).
    pub ms_ssim_full: Option<f64>,
    /// Mean MS-SSIM of the shielded decodes.
    pub ms_ssim_shielded: Option<f64>,
    /// Top-1 accuracy per version (see [`ImageResult::top5`]).
    pub top1: std::collections::BTreeMap<String, f64>,
    /// Top-5 accuracy per version.
    pub top5: std::collections::BTreeMap<String, f64>,
    /// Of the images the target gets right on the full decode, the share it gets wrong on the
    /// shielded one (the paper's attack success rate).
    pub attack_success_rate: Option<f64>,
    /// Image-text retrieval mode (captioned images and a text-reading target such as CLIP):
    /// then `top1`/`top5` are image-to-text R@1/R@5 over the set's captions, and this holds
    /// text-to-image `(R@1, R@5)` per version.
    pub text_to_image: std::collections::BTreeMap<String, (f64, f64)>,
    /// Mean JPEG curve: `(quality, mean bpp, mean psnr)`.
    pub jpeg: Vec<(u8, f64, f64)>,
    /// PSNR of the mean JPEG curve, interpolated at the codec's mean bpp (None outside it).
    pub jpeg_psnr_at_codec_bpp: Option<f64>,
    /// Mean seconds to encode / decode an image.
    pub encode_s: f64,
    /// See `encode_s`.
    pub decode_s: f64,
    /// The JPEG baseline's encoder (see [`crate::baseline::JpegFlavor`]).
    pub jpeg_flavor: String,
    /// Mean periodic-artefact share of the full decodes.
    pub periodic_full: Option<f64>,
    /// Mean periodic-artefact share of the shielded decodes.
    pub periodic_shielded: Option<f64>,
    /// Per probe model, top-1 per version (labels, or the probe's reading of the originals).
    pub probe_top1: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    /// The evaluated model's fingerprint (hex).
    pub model: String,
    /// The quality level the images were coded at.
    pub level: usize,
    /// The shield strength of the shielded decodes (`None` for a plain codec).
    pub shield_strength: Option<f32>,
}

/// A finished evaluation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Aggregates.
    pub summary: Summary,
    /// Per image.
    pub images: Vec<ImageResult>,
    /// Decodes kept for the grid: `(original, full, shielded)`.
    #[serde(skip)]
    pub kept: Vec<(RgbImage, RgbImage, Option<RgbImage>)>,
}

/// The versions of an image the target is asked about, in report order.
pub const VERSIONS: [&str; 11] = [
    "original",
    "full",
    "shielded",
    "shielded+jpeg75",
    "shielded+jpeg50",
    "shielded+blur1",
    "shielded+blur1.5",
    "shielded+resize2x",
    "shielded+resize1.33x",
    "shielded+noise3+jpeg90",
    "shielded+noise5+jpeg90",
];

/// What a curious person does to a published image, at two strengths each: JPEG re-encoding
/// (libjpeg-equivalent 4:2:0, [`jpeg_roundtrip`]) at quality 75 and 50; Gaussian blur of
/// σ 1 and 1.5 pixels (`image::imageops::blur`); down-and-up resizing (triangle filter) by 1/2
/// and 3/4; Gaussian noise of σ 3/255 and 5/255 (seeded, so reports repeat) followed by JPEG
/// quality 90. Returns `(version name, purified image)` in [`VERSIONS`] order.
pub fn purifications(img: &RgbImage) -> Result<Vec<(&'static str, RgbImage)>> {
    Ok(vec![
        ("shielded+jpeg75", jpeg_roundtrip(img, 75)?.decoded),
        ("shielded+jpeg50", jpeg_roundtrip(img, 50)?.decoded),
        ("shielded+blur1", image::imageops::blur(img, 1.0)),
        ("shielded+blur1.5", image::imageops::blur(img, 1.5)),
        ("shielded+resize2x", down_up(img, 0.5)),
        ("shielded+resize1.33x", down_up(img, 0.75)),
        (
            "shielded+noise3+jpeg90",
            jpeg_roundtrip(&with_noise(img, 3.0, 3), 90)?.decoded,
        ),
        (
            "shielded+noise5+jpeg90",
            jpeg_roundtrip(&with_noise(img, 5.0, 5), 90)?.decoded,
        ),
    ])
}

/// Resizes by `scale` and back (triangle filter both ways).
fn down_up(img: &RgbImage, scale: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    let small = image::imageops::resize(
        img,
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
        image::imageops::FilterType::Triangle,
    );
    image::imageops::resize(&small, w, h, image::imageops::FilterType::Triangle)
}

/// Gaussian noise of standard deviation `sigma` (in 0–255 steps) from a seeded generator,
/// rounded and clamped.
fn with_noise(img: &RgbImage, sigma: f64, seed: u64) -> RgbImage {
    let mut rng = crate::init::SplitMix64::new(seed);
    let mut out = img.clone();
    for v in out.iter_mut() {
        *v = (*v as f64 + sigma * rng.next_normal())
            .round()
            .clamp(0.0, 255.0) as u8;
    }
    out
}

/// What the target is asked: its classes, or (retrieval mode) the set's captions.
enum Reading<'a> {
    Classes,
    Captions(&'a candle_core::Tensor),
}

/// Top-5 of an image and, in retrieval mode, its scores against every caption.
fn read(
    target: &dyn SemanticTarget,
    reading: &Reading,
    img: &RgbImage,
) -> Result<(Vec<usize>, Option<Vec<f32>>)> {
    let x = crate::image_io::image_to_tensor(img, target.device())?;
    match reading {
        Reading::Classes => Ok((target.classify(&x, 5)?.remove(0), None)),
        Reading::Captions(captions) => {
            let e = target.embed_images(&target.preprocess(&x)?)?;
            let scores = target.caption_logits(&e, captions)?;
            let k = scores.dim(1)?.min(5);
            let top = crate::targets::top_k(&scores, k)?.remove(0);
            let row = scores
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            Ok((top, Some(row)))
        }
    }
}

/// Text-to-image `(R@1, R@5)` from image-by-caption scores (`scores[i][j]`, image `i`'s own
/// caption is `j = i`).
pub fn text_to_image_recall(scores: &[Vec<f32>]) -> (f64, f64) {
    let n = scores.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let (mut r1, mut r5) = (0usize, 0usize);
    for (j, row) in scores.iter().enumerate() {
        let own = row[j];
        // Rank of the own image among all images for caption j (ties count against it).
        let better = (0..n).filter(|&i| i != j && scores[i][j] >= own).count();
        r1 += usize::from(better == 0);
        r5 += usize::from(better < 5);
    }
    (r1 as f64 / n as f64, r5 as f64 / n as f64)
}

/// Evaluates `codec` on `images`; `target` adds the semantic figures. `progress(done, total)`
/// is called before the first image and after each.
pub fn evaluate(
    codec: &Codec,
    images: &[EvalImage],
    target: Option<&dyn SemanticTarget>,
    cfg: &EvalConfig,
    progress: impl FnMut(usize, usize),
) -> Result<Report> {
    evaluate_with_probes(codec, images, target, &[], cfg, progress)
}

/// A model asked about every version of every image beside the target, for evaluation only
/// (e.g. a classifier the shield was never trained against, to measure transfer).
pub type Probe<'a> = (&'a str, &'a dyn SemanticTarget);

/// [`evaluate`] with probe models: each probe classifies the same versions as the target
/// (classes only; no retrieval mode), reported per probe.
pub fn evaluate_with_probes(
    codec: &Codec,
    images: &[EvalImage],
    target: Option<&dyn SemanticTarget>,
    probes: &[Probe],
    cfg: &EvalConfig,
    progress: impl FnMut(usize, usize),
) -> Result<Report> {
    let encode = |img: &RgbImage| codec.encode(img);
    evaluate_with_encoder(codec, &encode, images, target, probes, cfg, progress)
}

/// [`evaluate_with_probes`] with the streams made by `encode` instead of [`Codec::encode`]
/// (e.g. a refining encoder, `psic::train::refine`): any encoder of streams `codec` decodes.
pub fn evaluate_with_encoder(
    codec: &Codec,
    encode: &dyn Fn(&RgbImage) -> Result<Vec<u8>>,
    images: &[EvalImage],
    target: Option<&dyn SemanticTarget>,
    probes: &[Probe],
    cfg: &EvalConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Report> {
    let conditions = codec.conditions();
    let mut report = Report::default();
    // Retrieval mode when every image has a caption and the target reads text.
    let all_captions: Option<Vec<&str>> = images.iter().map(|i| i.caption.as_deref()).collect();
    let caption_embeddings = match (target, &all_captions) {
        (Some(t), Some(c)) => t.embed_captions(c)?,
        _ => None,
    };
    let reading = match &caption_embeddings {
        Some(c) => Reading::Captions(c),
        None => Reading::Classes,
    };
    let mut rows: std::collections::BTreeMap<String, Vec<Vec<f32>>> = Default::default();
    progress(0, images.len());
    for (i, item) in images.iter().enumerate() {
        let img = &item.image;
        let t = Instant::now();
        let bytes = encode(img)?;
        let encode_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let latent = codec.decode_latent(&bytes)?;
        let full_condition = conditions.map(|c| c.full).unwrap_or(Condition::FULL);
        let full = crate::image_io::tensor_to_image(&codec.synthesize(&latent, &full_condition)?)?;
        let decode_s = t.elapsed().as_secs_f64();
        let shielded = match conditions {
            Some(c) => Some(crate::image_io::tensor_to_image(
                &codec.synthesize(&latent, &c.shielded)?,
            )?),
            None => None,
        };
        let (w, h) = img.dimensions();
        let mut r = ImageResult {
            name: item.name.clone(),
            size: (w, h),
            bytes: bytes.len(),
            bpp: bytes.len() as f64 * 8.0 / (w as f64 * h as f64),
            psnr_full: psnr(img, &full)?,
            psnr_shielded: shielded.as_ref().map(|s| psnr(img, s)).transpose()?,
            ms_ssim_full: ms_ssim(img, &full).ok(),
            ms_ssim_shielded: shielded.as_ref().and_then(|s| ms_ssim(img, s).ok()),
            encode_s,
            decode_s,
            label: item.label,
            ..Default::default()
        };
        let period = crate::metrics::SYNTHESIS_PERIOD;
        r.periodic_full = crate::metrics::periodic_share(img, &full, period).ok();
        r.periodic_shielded = shielded
            .as_ref()
            .and_then(|s| crate::metrics::periodic_share(img, s, period).ok());
        let versions = if target.is_some() || !probes.is_empty() {
            versions_of(img, &full, shielded.as_ref(), cfg.purify)?
        } else {
            Vec::new()
        };
        for (probe, model) in probes {
            let mut tops = std::collections::BTreeMap::new();
            for (name, v) in &versions {
                let x = crate::image_io::image_to_tensor(v, model.device())?;
                tops.insert(name.clone(), model.classify(&x, 5)?.remove(0));
            }
            let label = item.label.unwrap_or(tops["original"][0]);
            r.probe_labels.insert(probe.to_string(), label);
            r.probes.insert(probe.to_string(), tops);
        }
        if let Some(target) = target {
            for (name, v) in versions {
                let (top5, row) = read(target, &reading, &v)?;
                if let Some(row) = row {
                    rows.entry(name.clone()).or_default().push(row);
                }
                r.top5.insert(name, top5);
            }
            r.label = match reading {
                Reading::Captions(_) => Some(i),
                Reading::Classes => item.label.or(Some(r.top5["original"][0])),
            };
        }
        for &q in &cfg.jpeg_qualities {
            let j = cfg.jpeg_flavor.roundtrip(img, q)?;
            r.jpeg.push((q, j.bpp, psnr(img, &j.decoded)?));
        }
        if i < cfg.keep_images {
            report.kept.push((img.clone(), full, shielded));
        }
        report.images.push(r);
        progress(i + 1, images.len());
    }
    let labelled = images.iter().all(|i| i.label.is_some()) || !rows.is_empty();
    report.summary = Summary {
        jpeg_flavor: cfg.jpeg_flavor.name().to_string(),
        model: crate::bitstream::fingerprint_hex(codec.fingerprint()),
        level: codec.level(),
        shield_strength: conditions.map(|c| c.strength),
        ..summarize(&report.images, labelled)
    };
    for (version, scores) in rows {
        report
            .summary
            .text_to_image
            .insert(version, text_to_image_recall(&scores));
    }
    Ok(report)
}

/// The versions the models are asked about: original, full, shielded and, with `purify`, the
/// purified shielded decodes.
fn versions_of(
    img: &RgbImage,
    full: &RgbImage,
    shielded: Option<&RgbImage>,
    purify: bool,
) -> Result<Vec<(String, RgbImage)>> {
    let mut versions: Vec<(String, RgbImage)> = vec![
        ("original".into(), img.clone()),
        ("full".into(), full.clone()),
    ];
    if let Some(s) = shielded {
        versions.push(("shielded".into(), s.clone()));
        if purify {
            for (name, p) in purifications(s)? {
                versions.push((name.into(), p));
            }
        }
    }
    Ok(versions)
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// The aggregates of per-image results.
pub fn summarize(images: &[ImageResult], labelled: bool) -> Summary {
    let mut s = Summary {
        images: images.len(),
        labelled,
        bpp: mean(images.iter().map(|r| r.bpp)).unwrap_or(0.0),
        psnr_full: mean(images.iter().map(|r| r.psnr_full)).unwrap_or(0.0),
        psnr_shielded: mean(images.iter().filter_map(|r| r.psnr_shielded)),
        ms_ssim_full: mean(images.iter().filter_map(|r| r.ms_ssim_full)),
        ms_ssim_shielded: mean(images.iter().filter_map(|r| r.ms_ssim_shielded)),
        encode_s: mean(images.iter().map(|r| r.encode_s)).unwrap_or(0.0),
        decode_s: mean(images.iter().map(|r| r.decode_s)).unwrap_or(0.0),
        ..Default::default()
    };
    let versions: std::collections::BTreeSet<&String> =
        images.iter().flat_map(|r| r.top5.keys()).collect();
    for v in versions {
        let rows: Vec<(&Vec<usize>, usize)> = images
            .iter()
            .filter_map(|r| Some((r.top5.get(v)?, r.label?)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let n = rows.len() as f64;
        let top1 = rows.iter().filter(|(p, l)| p.first() == Some(l)).count() as f64 / n;
        let top5 = rows.iter().filter(|(p, l)| p.contains(l)).count() as f64 / n;
        s.top1.insert(v.clone(), top1);
        s.top5.insert(v.clone(), top5);
    }
    let right = |r: &ImageResult, v: &str| -> Option<bool> {
        Some(r.top5.get(v)?.first() == Some(&r.label?))
    };
    let full_right: Vec<&ImageResult> = images
        .iter()
        .filter(|r| right(r, "full") == Some(true) && right(r, "shielded").is_some())
        .collect();
    if !full_right.is_empty() {
        let flipped = full_right
            .iter()
            .filter(|r| right(r, "shielded") == Some(false))
            .count();
        s.attack_success_rate = Some(flipped as f64 / full_right.len() as f64);
    }
    // Mean JPEG curve over the images, per quality.
    if let Some(first) = images.first() {
        for (k, &(q, _, _)) in first.jpeg.iter().enumerate() {
            let pts: Vec<(f64, f64)> = images
                .iter()
                .filter_map(|r| r.jpeg.get(k).map(|&(_, b, p)| (b, p)))
                .collect();
            let n = pts.len() as f64;
            s.jpeg.push((
                q,
                pts.iter().map(|p| p.0).sum::<f64>() / n,
                pts.iter().map(|p| p.1).sum::<f64>() / n,
            ));
        }
    }
    let curve: Vec<(f64, f64)> = s.jpeg.iter().map(|&(_, b, p)| (b, p)).collect();
    s.jpeg_psnr_at_codec_bpp = interpolate_psnr_at(&curve, s.bpp);
    s.periodic_full = mean(images.iter().filter_map(|r| r.periodic_full));
    s.periodic_shielded = mean(images.iter().filter_map(|r| r.periodic_shielded));
    s.probe_top1 = probe_accuracies(images);
    s
}

/// Top-1 per probe and version, against each probe's label of each image.
fn probe_accuracies(
    images: &[ImageResult],
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>> {
    let mut out: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>> =
        Default::default();
    let mut counts: std::collections::BTreeMap<(String, String), (usize, usize)> =
        Default::default();
    for r in images {
        for (probe, tops) in &r.probes {
            let Some(&label) = r.probe_labels.get(probe) else {
                continue;
            };
            for (version, top) in tops {
                let c = counts.entry((probe.clone(), version.clone())).or_default();
                c.0 += usize::from(top.first() == Some(&label));
                c.1 += 1;
            }
        }
    }
    for ((probe, version), (hits, n)) in counts {
        out.entry(probe)
            .or_default()
            .insert(version, hits as f64 / n.max(1) as f64);
    }
    out
}

/// Loads the images of a folder for evaluation (`part` of the name-hash split, or every image
/// when `None`), with labels from its `labels.json`; at most `limit` images.
pub fn load_images(
    dir: &std::path::Path,
    part: Option<(crate::data::Split, u32)>,
    limit: Option<usize>,
) -> Result<Vec<EvalImage>> {
    let folder = crate::data::ImageFolder::open(dir)?;
    let files = match part {
        Some((split, pct)) => folder.part(split, pct),
        None => folder.files.clone(),
    };
    files
        .iter()
        .take(limit.unwrap_or(usize::MAX))
        .map(|f| {
            Ok(EvalImage {
                name: f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                image: crate::image_io::load_image(f)?,
                label: folder.label(f),
                caption: folder.caption(f),
            })
        })
        .collect()
}

/// The photos resized by `factor` (triangle filter, each side rounded and at least 1 pixel):
/// evaluates the same photos at another size, e.g. Kodak at half size, where a classifier sees
/// them without the downsizing its preprocessing applies to full-size photos. `factor` must be
/// in (0, 4], and no resized photo may exceed `max_pixels` (the codec's limit,
/// [`Codec::max_pixels`]): that is checked before anything is resized.
pub fn rescale_images(
    images: Vec<EvalImage>,
    factor: f64,
    max_pixels: u64,
) -> Result<Vec<EvalImage>> {
    if !(factor > 0.0 && factor <= 4.0) {
        return Err(crate::Error::InvalidArgument(format!(
            "the scale factor must be in (0, 4], got {factor}"
        )));
    }
    let side = |v: u32| ((v as f64 * factor).round() as u32).max(1);
    for im in &images {
        let (w, h) = (side(im.image.width()), side(im.image.height()));
        crate::codec::check_pixel_limit(w.into(), h.into(), max_pixels).map_err(|e| match e {
            crate::Error::Image(m) => {
                crate::Error::Image(format!("{} resized by {factor}: {m}", im.name))
            }
            e => e,
        })?;
    }
    Ok(images
        .into_iter()
        .map(|im| {
            let (w, h) = im.image.dimensions();
            let image = image::imageops::resize(
                &im.image,
                side(w),
                side(h),
                image::imageops::FilterType::Triangle,
            );
            EvalImage { image, ..im }
        })
        .collect())
}

/// Side by side, per kept image: original | full | shielded, each scaled to `tile` pixels wide,
/// 4 white pixels between tiles.
pub fn comparison_grid(kept: &[(RgbImage, RgbImage, Option<RgbImage>)], tile: u32) -> RgbImage {
    let gap = 4;
    let scale = |img: &RgbImage| {
        let (w, h) = img.dimensions();
        let th = ((h as u64 * tile as u64) / w.max(1) as u64).max(1) as u32;
        image::imageops::resize(img, tile, th, image::imageops::FilterType::Triangle)
    };
    let rows: Vec<Vec<RgbImage>> = kept
        .iter()
        .map(|(o, f, s)| {
            let mut row = vec![scale(o), scale(f)];
            if let Some(s) = s {
                row.push(scale(s));
            }
            row
        })
        .collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let height: u32 = rows.iter().map(|r| r[0].height() + gap).sum::<u32>();
    let mut canvas = RgbImage::from_pixel(
        (cols * (tile + gap)).saturating_sub(gap).max(1),
        height.saturating_sub(gap).max(1),
        image::Rgb([255, 255, 255]),
    );
    let mut y = 0;
    for row in &rows {
        for (c, t) in row.iter().enumerate() {
            image::imageops::replace(&mut canvas, t, (c as u32 * (tile + gap)) as i64, y as i64);
        }
        y += row[0].height() + gap;
    }
    canvas
}

/// `v` with `digits` decimals, or a dash when absent (report tables).
fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

/// The report as Markdown: what was measured, the aggregate table, the accuracy table.
pub fn markdown(report: &Report, title: &str, command: &str) -> String {
    let s = &report.summary;
    let mut md = format!(
        "# {title}\n\nMade by:\n\n```sh\n{command}\n```\n\n{} images. Bits per pixel from the real \
         bitstream sizes; PSNR over RGB (peak 255), MS-SSIM 5-scale (images of at least 161 px a \
         side).\n\n",
        s.images
    );
    if !s.model.is_empty() {
        let strength = s
            .shield_strength
            .map(|v| format!(", shield strength {v}"))
            .unwrap_or_default();
        md += &format!(
            "Model {}, quality level {}{strength}.\n\n",
            s.model, s.level
        );
    }
    md += "| | bpp | PSNR (dB) | MS-SSIM | encode (s) | decode (s) |\n| --- | --- | --- | --- | --- | --- |\n";
    md += &format!(
        "| full decode | {:.4} | {:.2} | {} | {:.2} | {:.2} |\n",
        s.bpp,
        s.psnr_full,
        opt(s.ms_ssim_full, 4),
        s.encode_s,
        s.decode_s
    );
    if let Some(p) = s.psnr_shielded {
        md += &format!(
            "| shielded decode | {:.4} | {p:.2} | {} | | |\n",
            s.bpp,
            opt(s.ms_ssim_shielded, 4)
        );
    }
    if !s.jpeg.is_empty() {
        md += &format!(
            "\n{} at the codec's bpp, interpolated on the mean \
             curve: {} dB, so the full decode is {} dB {}.\n\n| JPEG quality | bpp | PSNR (dB) |\n| --- | --- | --- |\n",
            s.jpeg_flavor,
            opt(s.jpeg_psnr_at_codec_bpp, 2),
            opt(s.jpeg_psnr_at_codec_bpp.map(|j| (s.psnr_full - j).abs()), 2),
            match s.jpeg_psnr_at_codec_bpp {
                Some(j) if s.psnr_full >= j => "above JPEG",
                Some(_) => "below JPEG",
                None => "from it (outside the curve)",
            }
        );
        for (q, b, p) in &s.jpeg {
            md += &format!("| {q} | {b:.4} | {p:.2} |\n");
        }
    }
    if s.periodic_full.is_some() || s.periodic_shielded.is_some() {
        md += &format!(
            "\nPeriodic-artefact share of the luma error (energy on the harmonics of the \
             {}-pixel synthesis period over the total; noise-like errors give about 16/H + 16/W): \
             full decode {}, shielded decode {}.\n",
            crate::metrics::SYNTHESIS_PERIOD,
            opt(s.periodic_full, 3),
            opt(s.periodic_shielded, 3)
        );
    }
    if !s.top1.is_empty() {
        md += &format!(
            "\nTarget accuracy ({}):\n\n| version | top-1 | top-5 |\n| --- | --- | --- |\n",
            if !s.text_to_image.is_empty() {
                "image-to-text retrieval"
            } else if s.labelled {
                "against the labels"
            } else {
                "agreement with the target's top-1 on the originals"
            }
        );
        for v in VERSIONS.iter().filter(|v| s.top1.contains_key(**v)) {
            let a = s.top1[*v];
            md += &format!(
                "| {v} | {:.1}% | {:.1}% |\n",
                100.0 * a,
                100.0 * s.top5.get(*v).copied().unwrap_or(0.0)
            );
        }
        if !s.text_to_image.is_empty() {
            md += &format!(
                "\nImage-text retrieval over the set's {} captions: the table above is \
                 image-to-text R@1 / R@5; text-to-image:\n\n| version | R@1 | R@5 |\n| --- | --- | --- |\n",
                s.images
            );
            for (v, (r1, r5)) in &s.text_to_image {
                md += &format!("| {v} | {:.1}% | {:.1}% |\n", 100.0 * r1, 100.0 * r5);
            }
        }
        md += &probe_table(s);
        if let Some(r) = s.attack_success_rate {
            md += &format!(
                "\nAttack success rate (of the images right on the full decode, the share wrong on \
                 the shielded one): {:.1}%.\n",
                100.0 * r
            );
        }
    }
    md
}

/// Top-1 of every probe model per version, as Markdown (empty without probes).
fn probe_table(s: &Summary) -> String {
    if s.probe_top1.is_empty() {
        return String::new();
    }
    let names: Vec<&String> = s.probe_top1.keys().collect();
    let mut md = format!(
        "\nProbe models (never used in training; top-1 {}):\n\n| version | {} |\n| --- |{}\n",
        if s.labelled {
            "against the labels"
        } else {
            "agreement with each probe's reading of the originals"
        },
        names
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        " --- |".repeat(names.len())
    );
    for v in VERSIONS {
        let cells: Vec<String> = names
            .iter()
            .map(|n| match s.probe_top1[*n].get(v) {
                Some(a) => format!("{:.1}%", 100.0 * a),
                None => "–".into(),
            })
            .collect();
        if cells.iter().all(|c| c == "–") {
            continue;
        }
        md += &format!("| {v} | {} |\n", cells.join(" | "));
    }
    md
}

/// Writes `report.json`, `report.md`, `grid.png` (original | full | shielded of the kept
/// images), `rd.png` (PSNR against bpp: the codec's decodes and the JPEG curve) and, with a
/// target, `accuracy.png` (top-1 per version) into `dir`.
pub fn write_report(
    report: &Report,
    dir: &std::path::Path,
    title: &str,
    command: &str,
) -> Result<()> {
    use crate::plot::{BarChart, LineChart, Series, PALETTE};
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let json = serde_json::json!({
        "title": title,
        "command": command,
        "summary": report.summary,
        "images": report.images,
    });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| crate::Error::InvalidArgument(format!("cannot serialise the report: {e}")))?;
    crate::image_io::write_atomic(dir.join("report.json"), text.as_bytes())?;
    crate::image_io::write_atomic(
        dir.join("report.md"),
        markdown(report, title, command).as_bytes(),
    )?;
    if !report.kept.is_empty() {
        crate::image_io::save_png(dir.join("grid.png"), &comparison_grid(&report.kept, 256))?;
    }
    let s = &report.summary;
    let mut series = vec![Series::new(
        "full decode",
        vec![(s.bpp, s.psnr_full)],
        PALETTE[0],
    )];
    if let Some(p) = s.psnr_shielded {
        series.push(Series::new("shielded decode", vec![(s.bpp, p)], PALETTE[1]));
    }
    if !s.jpeg.is_empty() {
        series.push(Series::new(
            s.jpeg_flavor.clone(),
            s.jpeg.iter().map(|&(_, b, p)| (b, p)).collect(),
            PALETTE[2],
        ));
    }
    LineChart {
        title: format!("{title}: rate-distortion"),
        x_label: "bits per pixel".into(),
        y_label: "PSNR (dB)".into(),
        series,
    }
    .save_png(dir.join("rd.png"), 800, 500)?;
    if !s.top1.is_empty() {
        let groups = VERSIONS
            .iter()
            .filter_map(|v| {
                let t1 = *s.top1.get(*v)?;
                let t5 = s.top5.get(*v).copied().unwrap_or(0.0);
                let mut bars = vec![
                    ("target top-1".to_string(), 100.0 * t1),
                    ("target top-5".to_string(), 100.0 * t5),
                ];
                for (probe, acc) in &s.probe_top1 {
                    if let Some(a) = acc.get(*v) {
                        bars.push((format!("{probe} top-1"), 100.0 * a));
                    }
                }
                Some((v.replace("shielded+", "+"), bars))
            })
            .collect();
        BarChart {
            title: format!("{title}: target accuracy"),
            y_label: "%".into(),
            groups,
        }
        .save_png(dir.join("accuracy.png"), 1800, 560)?;
    }
    Ok(())
}

/// One run's point on the shield trade-off chart, read from its `report.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct TradeoffPoint {
    /// The run's name (legend).
    pub name: String,
    /// The target's top-1 on the shielded decodes, %.
    pub shielded_top1: f64,
    /// Each probe's top-1 on the shielded decodes, %.
    pub probe_top1: Vec<(String, f64)>,
    /// Mean PSNR of the shielded decodes, dB.
    pub shielded_psnr: f64,
}

/// The trade-off point of a report written by [`write_report`] (its JSON text).
pub fn tradeoff_point(name: &str, report_json: &str) -> Result<TradeoffPoint> {
    let bad = |what: &str| crate::Error::InvalidArgument(format!("{name}: report has no {what}"));
    let v: serde_json::Value = serde_json::from_str(report_json)
        .map_err(|e| crate::Error::InvalidArgument(format!("{name}: {e}")))?;
    let s = &v["summary"];
    let shielded_top1 = s["top1"]["shielded"]
        .as_f64()
        .ok_or_else(|| bad("target top-1 on shielded decodes"))?;
    let shielded_psnr = s["psnr_shielded"]
        .as_f64()
        .ok_or_else(|| bad("shielded PSNR"))?;
    let probe_top1 = s["probe_top1"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(p, acc)| Some((p.clone(), 100.0 * acc["shielded"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    Ok(TradeoffPoint {
        name: name.to_string(),
        shielded_top1: 100.0 * shielded_top1,
        probe_top1,
        shielded_psnr,
    })
}

/// The shield trade-off chart across runs: x the top-1 on the shielded decodes (%), y the
/// shielded PSNR (dB); one colour per run, the target's reading a filled marker and each
/// probe's an outlined one at the run's PSNR (a second probe: a second black legend entry, same
/// outline).
pub fn tradeoff_chart(points: &[TradeoffPoint], path: &std::path::Path) -> Result<()> {
    use crate::plot::{LineChart, Series, PALETTE};
    let colour = |i: usize| PALETTE[i % PALETTE.len()];
    let mut series: Vec<Series> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Series::markers(
                p.name.clone(),
                vec![(p.shielded_top1, p.shielded_psnr)],
                colour(i),
            )
        })
        .collect();
    let probes: std::collections::BTreeSet<&String> = points
        .iter()
        .flat_map(|p| p.probe_top1.iter().map(|(n, _)| n))
        .collect();
    if !series.is_empty() {
        series.push(Series::markers(
            "training target (filled)",
            Vec::new(),
            KIND,
        ));
    }
    for probe in probes {
        series
            .push(Series::markers(format!("{probe} (probe, outlined)"), Vec::new(), KIND).hollow());
        for (i, p) in points.iter().enumerate() {
            if let Some((_, a)) = p.probe_top1.iter().find(|(n, _)| n == probe) {
                let pts = vec![(*a, p.shielded_psnr)];
                series.push(
                    Series::markers(probe.clone(), pts, colour(i))
                        .hollow()
                        .unlisted(),
                );
            }
        }
    }
    LineChart {
        title: "shield trade-off: strength against image quality".into(),
        x_label: "top-1 on shielded decodes (%), lower is stronger".into(),
        y_label: "shielded PSNR (dB)".into(),
        series,
    }
    .save_png(path, 900, 560)
}

/// The legend colour of the marker kinds that every run's colour shares (black: not in
/// [`crate::plot::PALETTE`]).
const KIND: image::Rgb<u8> = image::Rgb([0, 0, 0]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescaling_resizes_each_photo_and_keeps_its_label() {
        let im = |w, h| EvalImage {
            name: "a.png".into(),
            image: RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7])),
            label: Some(3),
            caption: None,
        };
        let out = rescale_images(vec![im(768, 512), im(3, 1)], 0.5, 1 << 24).unwrap();
        assert_eq!(out[0].image.dimensions(), (384, 256));
        assert_eq!(out[1].image.dimensions(), (2, 1));
        assert_eq!((out[0].label, out[0].name.as_str()), (Some(3), "a.png"));
        // A flat colour stays that colour.
        assert_eq!(out[0].image.get_pixel(10, 10)[2], 7);
        for bad in [0.0, -1.0, 4.5, f64::NAN] {
            assert!(
                rescale_images(vec![im(8, 8)], bad, 1 << 24).is_err(),
                "{bad}"
            );
        }
        // Over the pixel limit: refused before resizing, naming the photo.
        let err = rescale_images(vec![im(100, 100)], 4.0, 100 * 100).unwrap_err();
        assert!(err.to_string().contains("a.png"), "{err}");
        assert_eq!(
            rescale_images(vec![im(100, 100)], 1.0, 100 * 100)
                .unwrap()
                .len(),
            1
        );
    }

    fn result(label: usize, full: usize, shielded: usize, bpp: f64) -> ImageResult {
        ImageResult {
            bpp,
            psnr_full: 30.0,
            psnr_shielded: Some(28.0),
            label: Some(label),
            top5: [
                ("original".to_string(), vec![label, 1, 2, 3, 4]),
                ("full".to_string(), vec![full, 9, 8, 7, label]),
                ("shielded".to_string(), vec![shielded, 11, 12, 13, 14]),
            ]
            .into_iter()
            .collect(),
            jpeg: vec![(10, 0.2, 25.0), (50, 1.0, 33.0)],
            ..Default::default()
        }
    }

    #[test]
    fn tradeoff_points_are_read_from_reports() {
        let json = r#"{"summary": {"top1": {"shielded": 0.05}, "psnr_shielded": 26.5,
            "probe_top1": {"lite1": {"shielded": 0.12, "full": 0.8}}}}"#;
        let p = tradeoff_point("run", json).unwrap();
        assert!((p.shielded_top1 - 5.0).abs() < 1e-9);
        assert_eq!(p.probe_top1.len(), 1);
        assert!((p.probe_top1[0].1 - 12.0).abs() < 1e-9);
        assert!(tradeoff_point("bad", r#"{"summary": {}}"#).is_err());
        let dir = std::env::temp_dir().join(format!("psic-tradeoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("t.png");
        tradeoff_chart(
            &[
                p.clone(),
                TradeoffPoint {
                    name: "b".into(),
                    ..p
                },
            ],
            &png,
        )
        .unwrap();
        assert!(image::open(&png).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn summary_accuracies_and_attack_success_rate() {
        // Labels 5, 6, 7, 8. Full decode right on 5, 6, 7; shielded right on 7 only.
        let images = vec![
            result(5, 5, 0, 0.4),
            result(6, 6, 0, 0.6),
            result(7, 7, 7, 0.4),
            result(8, 0, 8, 0.6),
        ];
        let s = summarize(&images, true);
        assert_eq!(s.top1["original"], 1.0);
        assert_eq!(s.top1["full"], 0.75);
        assert_eq!(s.top1["shielded"], 0.5);
        // The label is 5th in every full top-5 list.
        assert_eq!(s.top5["full"], 1.0);
        // Of the 3 right on the full decode, 2 are wrong on the shielded one.
        assert!((s.attack_success_rate.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.bpp - 0.5).abs() < 1e-12);
        // JPEG mean curve (0.2, 25) - (1.0, 33): at 0.5 bpp, 25 + 8 * 0.3 / 0.8 = 28.
        assert!((s.jpeg_psnr_at_codec_bpp.unwrap() - 28.0).abs() < 1e-9);
        let md = markdown(
            &Report {
                summary: s,
                ..Default::default()
            },
            "t",
            "cmd",
        );
        assert!(md.contains("| full | 75.0% | 100.0% |"), "{md}");
        assert!(md.contains("66.7%"), "{md}");
    }

    #[test]
    fn text_to_image_recall_by_hand() {
        // Caption 0: image 0 scores highest -> rank 1. Caption 1: image 0 beats image 1 -> rank 2.
        // Caption 2: a tie with image 0 counts against it -> rank 2.
        let scores = vec![
            vec![0.9, 0.8, 0.5],
            vec![0.1, 0.7, 0.2],
            vec![0.3, 0.2, 0.5],
        ];
        let (r1, r5) = text_to_image_recall(&scores);
        assert!((r1 - 1.0 / 3.0).abs() < 1e-12 && r5 == 1.0);
    }

    /// Reads the mean colour of an image; captions "red", "green", "blue" are the axes.
    #[derive(Debug)]
    struct ColourTarget(candle_core::Device);

    impl SemanticTarget for ColourTarget {
        fn device(&self) -> &candle_core::Device {
            &self.0
        }
        fn preprocess(&self, images: &candle_core::Tensor) -> Result<candle_core::Tensor> {
            Ok(images.clone())
        }
        fn embed_images(&self, input: &candle_core::Tensor) -> Result<candle_core::Tensor> {
            Ok(input.mean((2, 3))?)
        }
        fn class_embeddings(&self) -> Result<candle_core::Tensor> {
            Ok(candle_core::Tensor::eye(
                3,
                candle_core::DType::F32,
                &self.0,
            )?)
        }
        fn logit_scale(&self) -> f32 {
            10.0
        }
        fn logits_from_embeddings(&self, e: &candle_core::Tensor) -> Result<candle_core::Tensor> {
            Ok(e.matmul(&self.class_embeddings()?.t()?)?)
        }
        fn embed_captions(&self, captions: &[&str]) -> Result<Option<candle_core::Tensor>> {
            let rows: Vec<f32> = captions
                .iter()
                .flat_map(|c| match *c {
                    "red" => [1.0, 0.0, 0.0],
                    "green" => [0.0, 1.0, 0.0],
                    _ => [0.0, 0.0, 1.0],
                })
                .collect();
            Ok(Some(candle_core::Tensor::from_vec(
                rows,
                (captions.len(), 3),
                &self.0,
            )?))
        }
    }

    #[test]
    fn captioned_images_are_evaluated_as_retrieval() {
        let arch =
            crate::model::Architecture::ScaleHyperprior(crate::backbone::ScaleHyperpriorConfig {
                n: 8,
                m: 12,
            });
        let model = crate::ModelFile::initialize(arch, 1, &candle_core::Device::Cpu).unwrap();
        let codec = Codec::from_model_file(&model, &candle_core::Device::Cpu).unwrap();
        let colours = [
            ("red", [230, 20, 20]),
            ("green", [20, 230, 20]),
            ("blue", [20, 20, 230]),
        ];
        let images: Vec<EvalImage> = colours
            .iter()
            .map(|(c, rgb)| EvalImage {
                name: format!("{c}.png"),
                image: RgbImage::from_pixel(64, 64, image::Rgb(*rgb)),
                label: None,
                caption: Some(c.to_string()),
            })
            .collect();
        let cfg = EvalConfig {
            jpeg_qualities: vec![],
            ..Default::default()
        };
        let target = ColourTarget(candle_core::Device::Cpu);
        let r = evaluate(&codec, &images, Some(&target), &cfg, |_, _| {}).unwrap();
        // Originals: every image retrieves its own caption and vice versa.
        assert_eq!(r.summary.top1["original"], 1.0);
        assert_eq!(r.summary.text_to_image["original"], (1.0, 1.0));
        assert_eq!(r.images[1].label, Some(1));
        assert!(markdown(&r, "t", "c").contains("text-to-image"));
    }

    #[test]
    fn grid_and_purifications_keep_sizes() {
        let img = RgbImage::from_fn(64, 40, |x, y| image::Rgb([x as u8 * 4, y as u8 * 6, 7]));
        let kept = vec![(img.clone(), img.clone(), Some(img.clone())); 2];
        let g = comparison_grid(&kept, 32);
        // 3 tiles of 32 + 2 gaps; 2 rows of 20 + 1 gap.
        assert_eq!(g.dimensions(), (3 * 32 + 8, 2 * 20 + 4));
        for (name, p) in purifications(&img).unwrap() {
            assert_eq!(p.dimensions(), img.dimensions(), "{name}");
        }
    }

    #[test]
    fn evaluates_a_tiny_codec_end_to_end() {
        let arch =
            crate::model::Architecture::ScaleHyperprior(crate::backbone::ScaleHyperpriorConfig {
                n: 8,
                m: 12,
            });
        let model = crate::ModelFile::initialize(arch, 1, &candle_core::Device::Cpu)
            .unwrap()
            .with_new_cltg(2, &candle_core::Device::Cpu)
            .unwrap();
        let codec = Codec::from_model_file(&model, &candle_core::Device::Cpu).unwrap();
        let images: Vec<EvalImage> = (0..2)
            .map(|i| EvalImage {
                name: format!("{i}.png"),
                image: RgbImage::from_fn(70, 50, |x, y| image::Rgb([x as u8, y as u8, i * 80])),
                label: None,
                caption: None,
            })
            .collect();
        let cfg = EvalConfig {
            jpeg_qualities: vec![20, 80],
            ..Default::default()
        };
        let mut calls = vec![];
        let r = evaluate(&codec, &images, None, &cfg, |d, t| calls.push((d, t))).unwrap();
        assert_eq!(calls, vec![(0, 2), (1, 2), (2, 2)]);
        assert_eq!(r.images.len(), 2);
        let first = &r.images[0];
        // bpp from the real stream size.
        assert!((first.bpp - first.bytes as f64 * 8.0 / 3500.0).abs() < 1e-12);
        assert!(first.psnr_shielded.is_some() && first.ms_ssim_full.is_none());
        assert_eq!(r.summary.jpeg.len(), 2);
        assert_eq!(r.kept.len(), 2);
        let dir = std::env::temp_dir().join(format!("psic-eval-{}", std::process::id()));
        write_report(&r, &dir, "tiny", "cmd").unwrap();
        for f in ["report.json", "report.md", "grid.png", "rd.png"] {
            assert!(dir.join(f).exists(), "{f}");
        }
        assert!(!dir.join("accuracy.png").exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
