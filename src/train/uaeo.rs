//! The uncertainty-aware encryption-oriented (UAEO) shielding loss of PSIC.
//!
//! The target model first scores the ORIGINAL images against the "captions" (for a classifier:
//! the rows of its last layer, one per class). Evidential deep learning turns those scores into
//! Dirichlet parameters, which split the batch:
//!
//! - **clean** samples, which the target confidently understands (the largest evidence is on the
//!   sample's own caption): their shielded decodes are pushed away from that caption,
//!   `L_clean = mean(1 + cos(e_sh, t_own))`;
//! - **noisy** samples (the target is wrong or uncertain): their shielded decodes are pulled
//!   toward the caption with the LEAST evidence, an InfoNCE term in both directions over the
//!   target's own scores of the shielded decodes, `L_noisy = ½(CE_img→txt + CE_txt→img)`.
//!
//! Evidence follows the reference: scores `s = κ·cos(e_img, t)` (κ = 100/7), symmetrised when the
//! captions are the batch's own, `E = exp(tanh(s)/τ)`, `α = E + 1`.
//!
//! Deviations from the reference code, each deliberate:
//! - both terms are averaged over their own sub-batch only (the reference indexes a sub-batch but
//!   averages the loss over the whole batch);
//! - `L_clean` is `1 + cos`, so it stays in `[0, 2]`: the adaptive weights of
//!   [`AdaptiveWeighting`](super::AdaptiveWeighting) are then always well defined (the reference
//!   uses a raw cosine, which can be negative);
//! - the least-likely caption is a hard label and is named so (the reference calls it soft);
//! - with a classifier the captions are all `K` classes, not the batch, and the img→txt term uses
//!   the classifier's real logits (a cosine over 1000 classes with scale 1 carries no signal).

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Settings of the UAEO loss.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UaeoConfig {
    /// Evidence temperature τ in `E = exp(tanh(s)/τ)` (reference: 0.1).
    #[serde(default = "default_tau")]
    pub tau: f64,
    /// Scale κ of the cosine scores the evidence is computed from (reference: 100/7).
    #[serde(default = "default_score_scale")]
    pub score_scale: f64,
}

fn default_tau() -> f64 {
    0.1
}
fn default_score_scale() -> f64 {
    100.0 / 7.0
}

impl Default for UaeoConfig {
    fn default() -> Self {
        Self {
            tau: default_tau(),
            score_scale: default_score_scale(),
        }
    }
}

/// The evidential view of a batch: Dirichlet parameters and the clean/noisy split.
#[derive(Debug, Clone, PartialEq)]
pub struct EvidentialSplit {
    /// Dirichlet parameters `α = E + 1`, one row per sample.
    pub alpha: Vec<Vec<f32>>,
    /// Evidential uncertainty `K / Σα` per sample (1 = no evidence at all).
    pub uncertainty: Vec<f32>,
    /// Samples whose largest evidence is on their own caption.
    pub clean: Vec<usize>,
    /// The other samples.
    pub noisy: Vec<usize>,
    /// For each entry of `noisy`, the caption with the least evidence (first on ties).
    pub least_likely: Vec<usize>,
}

/// Cosine similarities `[B, K]` between the rows of `a` `[B, D]` and `b` `[K, D]` (defined in
/// the codec core, beside the [`SemanticTarget`](crate::targets::SemanticTarget) that scores
/// captions with it).
pub use crate::targets::cosine_matrix;

/// Splits a batch by the evidence of the target's scores of the original images.
///
/// `scores` is `[B, K]` (`κ·cos(e_img, t)`); `own[i]` is the caption of sample `i`. With
/// `symmetric` (captions are the batch's own, `K = B`), the scores are first averaged with their
/// transpose, as the reference does for image-caption pairs.
pub fn evidential_split(
    scores: &Tensor,
    own: &[usize],
    symmetric: bool,
    tau: f64,
) -> Result<EvidentialSplit> {
    let (b, k) = scores.dims2()?;
    if own.len() != b || own.iter().any(|&o| o >= k) {
        return Err(Error::InvalidArgument(format!(
            "evidential split: {b} samples and {k} captions, but own captions {own:?}"
        )));
    }
    if symmetric && b != k {
        return Err(Error::InvalidArgument(format!(
            "symmetric scores need a square matrix, got {b}x{k}"
        )));
    }
    let mut s = scores
        .detach()
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    if symmetric {
        let t = s.clone();
        for (i, row) in s.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = 0.5 * (t[i][j] + t[j][i]);
            }
        }
    }
    let mut out = EvidentialSplit {
        alpha: Vec::with_capacity(b),
        uncertainty: Vec::with_capacity(b),
        clean: vec![],
        noisy: vec![],
        least_likely: vec![],
    };
    for (i, row) in s.iter().enumerate() {
        let alpha: Vec<f32> = row
            .iter()
            .map(|&v| ((v as f64).tanh() / tau).exp() as f32 + 1.0)
            .collect();
        let total: f64 = alpha.iter().map(|&a| a as f64).sum();
        out.uncertainty.push((k as f64 / total) as f32);
        // First index of the maximum / minimum, so ties resolve the same way everywhere.
        let argmax = (0..k).fold(0, |m, j| if alpha[j] > alpha[m] { j } else { m });
        let argmin = (0..k).fold(0, |m, j| if alpha[j] < alpha[m] { j } else { m });
        if argmax == own[i] {
            out.clean.push(i);
        } else {
            out.noisy.push(i);
            out.least_likely.push(argmin);
        }
        out.alpha.push(alpha);
    }
    Ok(out)
}

/// The two UAEO terms of one batch (`None` when their sub-batch is empty).
#[derive(Debug, Clone)]
pub struct UaeoTerms {
    /// `mean(1 + cos(e_sh, t_own))` over the clean samples, in `[0, 2]`.
    pub clean: Option<Tensor>,
    /// `½(CE_img→txt + CE_txt→img)` toward the least likely captions, over the noisy samples.
    pub noisy: Option<Tensor>,
    /// The split the terms were computed on.
    pub split: EvidentialSplit,
}

/// Computes the UAEO terms.
///
/// - `scores_orig` `[B, K]`: `κ·cos(e_img, t)` of the original images (no gradient needed);
/// - `emb_shielded` `[B, D]`: the target's embeddings of the shielded decodes;
/// - `captions` `[K, D]`: caption (class) embeddings;
/// - `logits_shielded` `[B, K]`: the target's scores of the shielded decodes against the same
///   captions (a classifier's logits; `logit_scale·cos` for CLIP);
/// - `own`: each sample's caption; `symmetric`: captions are the batch's own (`K = B`).
pub fn uaeo_terms(
    scores_orig: &Tensor,
    emb_shielded: &Tensor,
    captions: &Tensor,
    logits_shielded: &Tensor,
    own: &[usize],
    symmetric: bool,
    cfg: &UaeoConfig,
) -> Result<UaeoTerms> {
    let split = evidential_split(scores_orig, own, symmetric, cfg.tau)?;
    let dev = emb_shielded.device();
    let index = |v: &[usize]| Tensor::from_vec(v.iter().map(|&i| i as u32).collect(), v.len(), dev);
    let clean = if split.clean.is_empty() {
        None
    } else {
        let rows = index(&split.clean)?;
        let own_clean: Vec<usize> = split.clean.iter().map(|&i| own[i]).collect();
        let e = emb_shielded.index_select(&rows, 0)?;
        let t = captions.index_select(&index(&own_clean)?, 0)?;
        // Row-wise cosine: the diagonal of the clean x clean cosine matrix.
        let cos =
            (cosine_matrix(&e, &t)? * Tensor::eye(own_clean.len(), DType::F32, dev)?)?.sum(1)?;
        Some((cos + 1.0)?.mean_all()?)
    };
    let noisy = if split.noisy.is_empty() {
        None
    } else {
        let rows = index(&split.noisy)?;
        let targets = index(&split.least_likely)?;
        // Image -> caption: each noisy decode should score its least likely caption highest.
        let i2t =
            candle_nn::loss::cross_entropy(&logits_shielded.index_select(&rows, 0)?, &targets)?;
        // Caption -> image: each such caption should pick its decode among the batch's.
        let columns = logits_shielded
            .t()?
            .contiguous()?
            .index_select(&targets, 0)?; // [n, B]
        let t2i = candle_nn::loss::cross_entropy(&columns, &rows)?;
        Some(((i2t + t2i)? * 0.5)?)
    };
    Ok(UaeoTerms {
        clean,
        noisy,
        split,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(v: &[&[f32]]) -> Tensor {
        let rows = v.len();
        let flat: Vec<f32> = v.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows, v[0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn split_on_a_constructed_batch() {
        // Sample 0 scores its own caption (0) highest: clean. Sample 1's own caption is 1 but it
        // scores caption 2 highest and caption 0 lowest: noisy, least likely 0. Sample 2 ties
        // captions 1 and 2 at the top and its own is 2: the first maximum (1) wins -> noisy, and
        // its minimum is caption 0.
        let s = t2(&[&[2.0, 0.1, -1.0], &[-0.5, 0.2, 0.9], &[-2.0, 0.7, 0.7]]);
        let split = evidential_split(&s, &[0, 1, 2], false, 0.1).unwrap();
        assert_eq!(split.clean, vec![0]);
        assert_eq!(split.noisy, vec![1, 2]);
        assert_eq!(split.least_likely, vec![0, 0]);
        // alpha = exp(tanh(s)/0.1) + 1, by hand for sample 0.
        let a0: Vec<f64> = [2.0f64, 0.1, -1.0]
            .iter()
            .map(|v| (v.tanh() / 0.1).exp() + 1.0)
            .collect();
        for (got, want) in split.alpha[0].iter().zip(&a0) {
            assert!((*got as f64 - want).abs() / want < 1e-5, "{got} vs {want}");
        }
        let u0 = 3.0 / a0.iter().sum::<f64>();
        assert!((split.uncertainty[0] as f64 - u0).abs() < 1e-6);
        // No evidence at all (very negative scores) gives uncertainty close to 1.
        let none = evidential_split(&t2(&[&[-50.0, -50.0]]), &[0], false, 0.1).unwrap();
        assert!(none.uncertainty[0] > 0.999);
        assert!(evidential_split(&s, &[0, 3, 1], false, 0.1).is_err());
    }

    #[test]
    fn symmetric_scores_are_averaged_first() {
        // Row 1 prefers caption 0 (0.9 > 0.5); symmetrised, s[1][0] = (0.9 + (-0.9))/2 = 0, so
        // sample 1's own caption (0.5) wins and it becomes clean.
        let s = t2(&[&[1.0, -0.9], &[0.9, 0.5]]);
        let plain = evidential_split(&s, &[0, 1], false, 0.1).unwrap();
        assert_eq!(plain.noisy, vec![1]);
        let sym = evidential_split(&s, &[0, 1], true, 0.1).unwrap();
        assert_eq!(sym.clean, vec![0, 1]);
        assert!(evidential_split(&t2(&[&[1.0, 2.0, 3.0]]), &[0], true, 0.1).is_err());
    }

    #[test]
    fn terms_match_hand_computed_values() {
        // Two classes in 2-D; captions e_x and e_y.
        let captions = t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        // Originals: sample 0 clearly class 0 (clean, own 0); sample 1 own 0 but looks like
        // class 1 (noisy; least likely = caption 0).
        let scores = t2(&[&[1.0, -1.0], &[-1.0, 1.0]]);
        // Shielded embeddings: sample 0 at 45 degrees -> cos with e_x = 1/sqrt2.
        let emb = t2(&[&[1.0, 1.0], &[0.0, 2.0]]);
        let logits = t2(&[&[0.5, 0.0], &[1.0, 3.0]]);
        let terms = uaeo_terms(
            &scores,
            &emb,
            &captions,
            &logits,
            &[0, 0],
            false,
            &UaeoConfig::default(),
        )
        .unwrap();
        assert_eq!(terms.split.clean, vec![0]);
        assert_eq!(terms.split.noisy, vec![1]);
        let clean = terms.clean.unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((clean - (1.0 + 0.5f64.sqrt())).abs() < 1e-6, "{clean}");
        // img->txt: CE of row [1, 3] at class 0 = ln(e^1 + e^3) - 1.
        let i2t = (1f64.exp() + 3f64.exp()).ln() - 1.0;
        // txt->img: column 0 over the batch = [0.5, 1.0], target sample 1.
        let t2i = (0.5f64.exp() + 1f64.exp()).ln() - 1.0;
        let noisy = terms.noisy.unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((noisy - 0.5 * (i2t + t2i)).abs() < 1e-5, "{noisy}");
    }

    #[test]
    fn empty_sub_batches_give_no_term_and_gradients_reach_the_embeddings() {
        let captions = t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let scores = t2(&[&[1.0, -1.0]]);
        let emb = candle_core::Var::from_tensor(&t2(&[&[1.0, 1.0]])).unwrap();
        let logits = emb.matmul(&captions.t().unwrap()).unwrap();
        let terms = uaeo_terms(
            &scores,
            emb.as_tensor(),
            &captions,
            &logits,
            &[0],
            false,
            &UaeoConfig::default(),
        )
        .unwrap();
        assert!(terms.noisy.is_none());
        let clean = terms.clean.unwrap();
        let g = clean.backward().unwrap();
        let grad = g.get(emb.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/de (e·t/|e|) at e = (1,1), t = e_x: (t - cos·e/|e|)/|e| = (1/4, -1/4)·sqrt2.
        let want = [0.5f32.sqrt() * 0.5, -(0.5f32.sqrt()) * 0.5];
        assert!((grad[0][0] - want[0]).abs() < 1e-5 && (grad[0][1] - want[1]).abs() < 1e-5);
    }
}
