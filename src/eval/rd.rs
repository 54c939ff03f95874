//! Rate-distortion curves across a model's quality levels: one `psic eval` report per level,
//! charted against the libjpeg-equivalent JPEG curve and CompressAI's published Kodak curves.

use super::opt;
use crate::baseline::interpolate_psnr_at;
use crate::{Error, Result};

/// One operating point (a quality level) read from a `psic eval` report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RdPoint {
    /// The point's name (legend, table).
    pub name: String,
    /// Mean bits per pixel (real stream sizes).
    pub bpp: f64,
    /// Mean PSNR of the full decodes, dB.
    pub psnr_full: f64,
    /// Mean PSNR of the shielded decodes, dB.
    pub psnr_shielded: Option<f64>,
    /// Mean MS-SSIM of the full decodes.
    pub ms_ssim_full: Option<f64>,
    /// Mean MS-SSIM of the shielded decodes.
    pub ms_ssim_shielded: Option<f64>,
    /// The target's top-1 (or agreement) on the shielded decodes, %.
    pub shielded_top1: Option<f64>,
    /// The report's JPEG curve, `(quality, bpp, PSNR)`.
    #[serde(skip)]
    pub jpeg: Vec<(u8, f64, f64)>,
    /// The JPEG curve's encoder.
    #[serde(skip)]
    pub jpeg_flavor: String,
}

/// The RD point of a report written by [`super::write_report`] (its JSON text).
pub fn rd_point(name: &str, report_json: &str) -> Result<RdPoint> {
    let bad = |what: &str| Error::InvalidArgument(format!("{name}: report has no {what}"));
    let v: serde_json::Value = serde_json::from_str(report_json)
        .map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))?;
    let s = &v["summary"];
    let num = |k: &str| s[k].as_f64();
    let jpeg = s["jpeg"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let q = u8::try_from(p[0].as_u64()?).ok()?;
                    Some((q, p[1].as_f64()?, p[2].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(RdPoint {
        name: name.to_string(),
        bpp: num("bpp").ok_or_else(|| bad("bpp"))?,
        psnr_full: num("psnr_full").ok_or_else(|| bad("full-decode PSNR"))?,
        psnr_shielded: num("psnr_shielded"),
        ms_ssim_full: num("ms_ssim_full"),
        ms_ssim_shielded: num("ms_ssim_shielded"),
        shielded_top1: s["top1"]["shielded"].as_f64().map(|a| 100.0 * a),
        jpeg,
        jpeg_flavor: s["jpeg_flavor"].as_str().unwrap_or("JPEG").to_string(),
    })
}

/// A published rate-distortion curve: `(bpp, PSNR dB, MS-SSIM)` per point.
#[derive(Debug, Clone, Copy)]
pub struct PublishedCurve {
    /// The model's name.
    pub name: &'static str,
    /// Where the figures come from.
    pub source: &'static str,
    /// The points, by increasing rate.
    pub points: &'static [(f64, f64, f64)],
}

/// CompressAI's published Kodak results (24 images, RGB PSNR) of its pretrained MSE models at
/// qualities 1–6, from `results/image/kodak/compressai-*_mse_cuda.json` of
/// InterDigitalInc/CompressAI. Reference points only: psic trains its own weights.
pub const COMPRESSAI_KODAK: [PublishedCurve; 2] = [
    PublishedCurve {
        name: "CompressAI bmshj2018-hyperprior (published)",
        source: "compressai-bmshj2018-hyperprior_mse_cuda.json",
        points: &[
            (0.1313, 27.58, 0.9174),
            (0.2089, 29.20, 0.9421),
            (0.3199, 30.97, 0.9611),
            (0.4784, 32.84, 0.9749),
            (0.6687, 34.53, 0.9836),
            (0.9388, 36.74, 0.9893),
        ],
    },
    PublishedCurve {
        name: "CompressAI mbt2018-mean (published)",
        source: "compressai-mbt2018-mean_mse_cuda.json",
        points: &[
            (0.1239, 27.70, 0.9178),
            (0.1980, 29.36, 0.9431),
            (0.3072, 31.13, 0.9615),
            (0.4606, 32.95, 0.9752),
            (0.6617, 34.97, 0.9836),
            (0.9144, 36.91, 0.9893),
        ],
    },
];

/// Bjøntegaard-style mean PSNR difference of `test` over `anchor` (both `(bpp, PSNR)`), dB:
/// the mean of `test(r) − anchor(r)` over the log-rates both curves cover, each curve
/// interpolated piecewise-linearly in bpp ([`interpolate_psnr_at`]) and the mean taken over
/// 1,000 evenly spaced log-rates (psic's curves have three or four points, too few for the
/// cubic fit of the original metric). `None` when the curves share no rate range.
pub fn bd_psnr(test: &[(f64, f64)], anchor: &[(f64, f64)]) -> Option<f64> {
    let range = |c: &[(f64, f64)]| {
        let xs = c.iter().map(|p| p.0).filter(|x| x.is_finite() && *x > 0.0);
        let lo = xs.clone().fold(f64::INFINITY, f64::min);
        let hi = xs.fold(f64::NEG_INFINITY, f64::max);
        (lo <= hi).then_some((lo, hi))
    };
    let (a, b) = (range(test)?, range(anchor)?);
    let (lo, hi) = (a.0.max(b.0).ln(), a.1.min(b.1).ln());
    if lo > hi {
        return None;
    }
    const SAMPLES: usize = 1000;
    let mut sum = 0.0;
    for i in 0..SAMPLES {
        let t = if SAMPLES == 1 {
            0.0
        } else {
            i as f64 / (SAMPLES - 1) as f64
        };
        // Clamped into the shared range against rounding at its ends.
        let r = (lo + t * (hi - lo)).exp().clamp(a.0.max(b.0), a.1.min(b.1));
        sum += interpolate_psnr_at(test, r)? - interpolate_psnr_at(anchor, r)?;
    }
    Some(sum / SAMPLES as f64)
}

/// What [`write_rd_report`] measures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RdSummary {
    /// The points, in the order given.
    pub points: Vec<RdPoint>,
    /// Per point: full-decode PSNR minus the JPEG curve's at the same bpp (None outside it).
    pub full_minus_jpeg: Vec<Option<f64>>,
    /// BD-PSNR of the full decodes over the JPEG curve ([`bd_psnr`]).
    pub bd_psnr_full_vs_jpeg: Option<f64>,
    /// Per point: shielded-decode PSNR minus full-decode PSNR.
    pub shielded_minus_full: Vec<Option<f64>>,
    /// The JPEG curve used (the first report's), `(quality, bpp, PSNR)`.
    pub jpeg: Vec<(u8, f64, f64)>,
}

/// Summarises points (one per level) against the first report's JPEG curve.
pub fn rd_summary(points: Vec<RdPoint>) -> RdSummary {
    let jpeg = points.first().map(|p| p.jpeg.clone()).unwrap_or_default();
    let jpeg_curve: Vec<(f64, f64)> = jpeg.iter().map(|&(_, b, p)| (b, p)).collect();
    let full: Vec<(f64, f64)> = points.iter().map(|p| (p.bpp, p.psnr_full)).collect();
    RdSummary {
        full_minus_jpeg: points
            .iter()
            .map(|p| Some(p.psnr_full - interpolate_psnr_at(&jpeg_curve, p.bpp)?))
            .collect(),
        bd_psnr_full_vs_jpeg: bd_psnr(&full, &jpeg_curve),
        shielded_minus_full: points
            .iter()
            .map(|p| Some(p.psnr_shielded? - p.psnr_full))
            .collect(),
        points,
        jpeg,
    }
}

/// The Markdown table of an [`RdSummary`].
pub fn rd_markdown(s: &RdSummary, title: &str, command: &str) -> String {
    let flavor = s.points.first().map_or("JPEG", |p| p.jpeg_flavor.as_str());
    let mut md = format!("# {title}\n\nMade by:\n\n```sh\n{command}\n```\n\n");
    md += "| point | bpp | full PSNR | full − JPEG | shielded PSNR | shielded − full | full MS-SSIM | shielded MS-SSIM | target top-1, shielded |\n";
    md += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for (i, p) in s.points.iter().enumerate() {
        md += &format!(
            "| {} | {:.4} | {:.2} | {} | {} | {} | {} | {} | {} |\n",
            p.name,
            p.bpp,
            p.psnr_full,
            opt(s.full_minus_jpeg[i], 2),
            opt(p.psnr_shielded, 2),
            opt(s.shielded_minus_full[i], 2),
            opt(p.ms_ssim_full, 4),
            opt(p.ms_ssim_shielded, 4),
            p.shielded_top1.map_or("–".into(), |a| format!("{a:.1}%")),
        );
    }
    md += &format!(
        "\nJPEG: {flavor}, the first report's curve, interpolated linearly in bpp. BD-PSNR of the \
         full decodes over it (mean difference over the shared log-rate range, piecewise-linear \
         curves): {} dB.\n\nFor reference, CompressAI's published Kodak points (its own \
         pretrained weights, not psic's): ",
        opt(s.bd_psnr_full_vs_jpeg, 2)
    );
    let refs: Vec<String> = COMPRESSAI_KODAK
        .iter()
        .map(|c| {
            let pts: Vec<String> = c
                .points
                .iter()
                .map(|p| format!("{:.3}/{:.2}", p.0, p.1))
                .collect();
            format!("{} ({}): {} bpp/dB", c.name, c.source, pts.join(", "))
        })
        .collect();
    md += &refs.join("; ");
    md += ".\n";
    md
}

/// Writes `rd.json`, `rd.md`, `rd-psnr.png` (PSNR against bpp: full and shielded decodes, JPEG,
/// CompressAI's published curves) and `rd-msssim.png` (MS-SSIM against bpp) into `dir`.
pub fn write_rd_report(
    s: &RdSummary,
    dir: &std::path::Path,
    title: &str,
    command: &str,
) -> Result<()> {
    use crate::plot::{LineChart, Series, PALETTE};
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::json!({ "title": title, "command": command, "summary": s });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialise the RD report: {e}")))?;
    crate::image_io::write_atomic(dir.join("rd.json"), text.as_bytes())?;
    crate::image_io::write_atomic(dir.join("rd.md"), rd_markdown(s, title, command).as_bytes())?;
    let curve = |f: &dyn Fn(&RdPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .filter_map(|p| Some((p.bpp, f(p)?)))
            .collect()
    };
    let published = |k: usize| -> Vec<Series> {
        COMPRESSAI_KODAK
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pts = c
                    .points
                    .iter()
                    .map(|p| (p.0, if k == 1 { p.1 } else { p.2 }))
                    .collect();
                Series::new(c.name, pts, PALETTE[3 + i])
            })
            .collect()
    };
    let mut psnr = vec![
        Series::new("full decode", curve(&|p| Some(p.psnr_full)), PALETTE[0]),
        Series::new("shielded decode", curve(&|p| p.psnr_shielded), PALETTE[1]),
    ];
    let flavor = s
        .points
        .first()
        .map_or("JPEG".into(), |p| p.jpeg_flavor.clone());
    // The JPEG curve only as far as the codec's and the published points go (its high
    // qualities would squeeze them into the left of the chart), plus one point beyond.
    let reach = s
        .points
        .iter()
        .map(|p| p.bpp)
        .chain(
            COMPRESSAI_KODAK
                .iter()
                .flat_map(|c| c.points.iter().map(|p| p.0)),
        )
        .fold(0.0, f64::max);
    let mut jpeg: Vec<(f64, f64)> = s.jpeg.iter().map(|&(_, b, p)| (b, p)).collect();
    jpeg.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Some(past) = jpeg.iter().position(|p| p.0 > reach) {
        jpeg.truncate(past + 1);
    }
    psnr.push(Series::new(flavor, jpeg, PALETTE[2]));
    psnr.extend(published(1));
    psnr.retain(|series| !series.points.is_empty());
    LineChart {
        title: format!("{title}: PSNR"),
        x_label: "bits per pixel".into(),
        y_label: "PSNR (dB)".into(),
        series: psnr,
    }
    .save_png(dir.join("rd-psnr.png"), 900, 560)?;
    let mut ssim = vec![
        Series::new("full decode", curve(&|p| p.ms_ssim_full), PALETTE[0]),
        Series::new(
            "shielded decode",
            curve(&|p| p.ms_ssim_shielded),
            PALETTE[1],
        ),
    ];
    ssim.extend(published(2));
    ssim.retain(|series| !series.points.is_empty());
    LineChart {
        title: format!("{title}: MS-SSIM"),
        x_label: "bits per pixel".into(),
        y_label: "MS-SSIM".into(),
        series: ssim,
    }
    .save_png(dir.join("rd-msssim.png"), 900, 560)
}

/// The Markdown table of a training run's curve: `s` summarises one report per entry of
/// `steps` (the run's model after that many steps), in that order.
pub fn curve_markdown(steps: &[u64], s: &RdSummary, title: &str, command: &str) -> String {
    let flavor = s.points.first().map_or("JPEG", |p| p.jpeg_flavor.as_str());
    let mut md = format!("# {title}\n\nMade by:\n\n```sh\n{command}\n```\n\n");
    md += "| step | bpp | full PSNR | full − JPEG at equal bpp | full MS-SSIM |\n";
    md += "| --- | --- | --- | --- | --- |\n";
    for ((step, p), d) in steps.iter().zip(&s.points).zip(&s.full_minus_jpeg) {
        md += &format!(
            "| {step} | {:.4} | {:.2} | {} | {} |\n",
            p.bpp,
            p.psnr_full,
            opt(*d, 2),
            opt(p.ms_ssim_full, 4)
        );
    }
    md += &format!(
        "\nJPEG: {flavor}, the first report's curve, interpolated linearly in bpp (a fixed λ \
         lets the rate drift with training, so the distance to JPEG at the same rate is the \
         figure to compare across steps).\n"
    );
    md
}

/// Writes `curve.md` ([`curve_markdown`]) and `curve.png` (the full decode's distance to JPEG
/// at equal bpp against training steps, with the +1 dB line of the issue targets) into `dir`.
pub fn write_curve_report(
    steps: &[u64],
    s: &RdSummary,
    dir: &std::path::Path,
    title: &str,
    command: &str,
) -> Result<()> {
    use crate::plot::{LineChart, Series, PALETTE};
    if steps.len() != s.points.len() {
        return Err(Error::InvalidArgument(format!(
            "{} steps for {} reports",
            steps.len(),
            s.points.len()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let md = curve_markdown(steps, s, title, command);
    crate::image_io::write_atomic(dir.join("curve.md"), md.as_bytes())?;
    let curve: Vec<(f64, f64)> = steps
        .iter()
        .zip(&s.full_minus_jpeg)
        .filter_map(|(&step, d)| Some((step as f64, (*d)?)))
        .collect();
    let (lo, hi) = (steps.iter().min(), steps.iter().max());
    let target = lo
        .zip(hi)
        .map(|(&a, &b)| vec![(a as f64, 1.0), (b as f64, 1.0)])
        .unwrap_or_default();
    LineChart {
        title: format!("{title}: full decode against JPEG"),
        x_label: "training step".into(),
        y_label: "full - JPEG at equal bpp (dB)".into(),
        series: vec![
            Series::new("full decode - JPEG", curve, PALETTE[0]),
            Series::new("+1 dB (issue target)", target, PALETTE[2]),
        ],
    }
    .save_png(dir.join("curve.png"), 900, 560)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bd_psnr_of_a_shifted_curve_is_the_shift() {
        let anchor = [(0.2, 25.0), (0.4, 28.0), (0.8, 31.0)];
        let up: Vec<(f64, f64)> = anchor.iter().map(|&(b, p)| (b, p + 1.25)).collect();
        assert!((bd_psnr(&up, &anchor).unwrap() - 1.25).abs() < 1e-9);
        assert!((bd_psnr(&anchor, &up).unwrap() + 1.25).abs() < 1e-9);
        // Only the shared range counts: a test curve over (0.4, 0.8) sees the anchor there.
        let part = [(0.4, 29.0), (0.8, 32.0)];
        assert!((bd_psnr(&part, &anchor).unwrap() - 1.0).abs() < 1e-9);
        assert!(bd_psnr(&[(1.0, 30.0), (2.0, 33.0)], &anchor).is_none());
        assert!(bd_psnr(&[], &anchor).is_none());
    }

    #[test]
    fn rd_points_are_read_from_reports_and_summarised() {
        let report = |bpp: f64, full: f64, sh: f64| {
            serde_json::json!({"summary": {
                "bpp": bpp, "psnr_full": full, "psnr_shielded": sh,
                "ms_ssim_full": 0.95, "top1": {"shielded": 0.05},
                "jpeg": [[10, 0.2, 25.0], [20, 0.4, 28.0], [40, 0.8, 31.0]],
                "jpeg_flavor": "libjpeg 4:2:0"
            }})
            .to_string()
        };
        let pts = vec![
            rd_point("level 0", &report(0.2, 27.0, 25.5)).unwrap(),
            rd_point("level 1", &report(0.4, 30.0, 28.0)).unwrap(),
        ];
        assert_eq!(pts[0].shielded_top1, Some(5.0));
        assert_eq!(pts[1].jpeg.len(), 3);
        let s = rd_summary(pts);
        assert!((s.full_minus_jpeg[0].unwrap() - 2.0).abs() < 1e-9);
        assert!((s.full_minus_jpeg[1].unwrap() - 2.0).abs() < 1e-9);
        assert!((s.bd_psnr_full_vs_jpeg.unwrap() - 2.0).abs() < 1e-9);
        assert!((s.shielded_minus_full[1].unwrap() + 2.0).abs() < 1e-9);
        let md = rd_markdown(&s, "t", "psic rd");
        assert!(md.contains("| level 1 | 0.4000 | 30.00 | 2.00 |"), "{md}");
        let md = curve_markdown(&[4471, 5000], &s, "run", "psic curve");
        assert!(
            md.contains("| 5000 | 0.4000 | 30.00 | 2.00 | 0.9500 |"),
            "{md}"
        );
        let dir = std::env::temp_dir().join(format!("psic-curve-{}", std::process::id()));
        write_curve_report(&[4471, 5000], &s, &dir, "run", "psic curve").unwrap();
        assert!(dir.join("curve.png").is_file() && dir.join("curve.md").is_file());
        assert!(write_curve_report(&[1], &s, &dir, "run", "c").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        let err = rd_point("x", r#"{"summary": {}}"#).unwrap_err();
        assert!(err.to_string().contains("bpp"), "{err}");
    }
}
