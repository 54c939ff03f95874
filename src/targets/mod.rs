//! Semantic targets: the models a shield is trained and evaluated against.
//!
//! PSIC pushes the embedding of a shielded decode away from the embedding of its true meaning.
//! With CLIP, meanings are caption embeddings; with an ImageNet classifier they are the rows of
//! the final linear layer (one per class), which score the penultimate features exactly as CLIP's
//! text embeddings score an image embedding. [`SemanticTarget`] gives both kinds one interface:
//!
//! ```text
//! decoder output [B,3,H,W] in [0,1] ─preprocess─▶ input ─embed_images─▶ e [B,D]
//!                                                        logits = f(e, class_embeddings [K,D])
//! ```
//!
//! Everything from the decoder's pixels to the logits is built from candle tensor ops, so a loss
//! on a target's output backpropagates into the codec's synthesis transform.
//!
//! - `EfficientNetLite`: EfficientNet-Lite ImageNet classifiers (TF "same" padding, ReLU6;
//!   cargo feature `efficientnet-lite`, part of `train`).
//! - `Clip`: CLIP (Hugging Face `CLIPModel` folders) scored against a caption set, with
//!   OpenAI's BPE tokenizer (`ClipTokenizer`) and the text repair it applies (`ftfy`); cargo
//!   feature `clip`.
//! - [`preprocess`]: differentiable bicubic resize and centre crop.
//! - [`classify_folder`]: top-k classes for every image of a folder (the CLI's `classify`).

#[cfg(feature = "clip")]
mod clip;
#[cfg(feature = "clip")]
pub mod clip_tokenizer;
#[cfg(feature = "efficientnet-lite")]
mod depthwise;
#[cfg(feature = "efficientnet-lite")]
mod efficientnet_lite;
#[cfg(feature = "clip")]
pub mod ftfy;
mod kind;
#[cfg(feature = "clip")]
#[rustfmt::skip]
mod ftfy_tables;
pub mod preprocess;

pub use kind::{load_target, TargetKind};

#[cfg(feature = "clip")]
pub use clip::{
    Clip, ClipConfig, ClipEncoderConfig, ClipTextConfig, ClipVisionConfig, CLIP_MEAN, CLIP_STD,
};
#[cfg(feature = "clip")]
pub use clip_tokenizer::{clean_text, ClipTokenizer};
#[cfg(feature = "efficientnet-lite")]
pub use efficientnet_lite::{
    infer_block_strides, EfficientNetLite, EfficientNetLiteConfig, MbConvBlockConfig,
};

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A model a shield is trained or evaluated against (an image classifier, CLIP, ...).
///
/// Inputs of [`embed_images`](Self::embed_images) and [`logits`](Self::logits) are what
/// [`preprocess`](Self::preprocess) returns; every method is differentiable with respect to the
/// images (the target's own weights are frozen).
pub trait SemanticTarget: Send + Sync + std::fmt::Debug {
    /// Device the model's weights live on (images are moved there by the helpers).
    fn device(&self) -> &Device;

    /// Turns decoder output `[B, 3, H, W]` with values in `[0, 1]` into the model's input
    /// (resizing, cropping, normalisation), with tensor ops only so gradients flow.
    fn preprocess(&self, images: &Tensor) -> Result<Tensor>;

    /// Image embeddings `[B, D]` of preprocessed input: the features the class (or caption)
    /// embeddings are scored against.
    fn embed_images(&self, input: &Tensor) -> Result<Tensor>;

    /// One embedding per class ("caption"), `[K, D]`, as the model holds them (not
    /// normalised: cosine-based losses normalise both sides themselves).
    fn class_embeddings(&self) -> Result<Tensor>;

    /// Scale the model applies to its similarity scores: CLIP's learned temperature, or `1.0` for
    /// a classifier, whose logits are plain dot products `e · w_k` plus the class bias (the bias
    /// is applied inside [`logits`](Self::logits), not represented here).
    fn logit_scale(&self) -> f32;

    /// Class scores `[B, K]` of image embeddings `[B, D]` (from
    /// [`embed_images`](Self::embed_images)): lets a loss use both without running the model
    /// twice.
    fn logits_from_embeddings(&self, embeddings: &Tensor) -> Result<Tensor>;

    /// Embeddings `[N, D]` of free-text captions, for targets that read text (CLIP); `None`
    /// (the default) for classifiers, whose only "captions" are their classes.
    fn embed_captions(&self, _captions: &[&str]) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Scores `[B, N]` of image embeddings against caption embeddings from
    /// [`embed_captions`](Self::embed_captions): `logit_scale · cos`, as CLIP scores them.
    fn caption_logits(&self, embeddings: &Tensor, captions: &Tensor) -> Result<Tensor> {
        Ok((cosine_matrix(embeddings, captions)? * self.logit_scale() as f64)?)
    }

    /// Image embeddings `[B, D]` of preprocessed input together with some of the model's
    /// intermediate feature maps (`[B, C_i, H_i, W_i]`, shallow to deep), from one forward pass.
    /// Shields trained on intermediate features as well as the final embedding carry over
    /// better to models they were not trained against, whose last layers differ but whose
    /// early and middle features look alike. The default gives no intermediate maps.
    fn embed_with_features(&self, input: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        Ok((self.embed_images(input)?, Vec::new()))
    }

    /// Runs the model's own matrix products at `precision` where it can (a training run's
    /// `precision`; evaluation keeps f32). The default ignores it.
    fn set_precision(&mut self, _precision: crate::Precision) -> Result<()> {
        Ok(())
    }

    /// Class scores `[B, K]` of preprocessed input.
    fn logits(&self, input: &Tensor) -> Result<Tensor> {
        self.logits_from_embeddings(&self.embed_images(input)?)
    }

    /// Indices of the `k` best classes per image, best first (ties: lower index first), for
    /// images `[B, 3, H, W]` in `[0, 1]` (preprocessing included).
    fn classify(&self, images01: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
        let images = images01.to_device(self.device())?;
        let logits = self.logits(&self.preprocess(&images)?)?;
        top_k(&logits, k)
    }
}

/// Cosine similarities `[N, M]` between the rows of `a` `[N, D]` and of `b` `[M, D]` (each row
/// divided by its L2 norm, with 1e-12 under the root so zero rows give zero, not NaN).
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let norm = |t: &Tensor| -> Result<Tensor> {
        let n = (t.sqr()?.sum_keepdim(candle_core::D::Minus1)? + 1e-12)?.sqrt()?;
        Ok(t.broadcast_div(&n)?)
    };
    Ok(norm(a)?.matmul(&norm(b)?.t()?)?)
}

/// Indices of the `k` largest entries of every row of `[B, K]` scores, largest first; ties keep
/// the lower index first, NaN ranks last.
pub fn top_k(scores: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let (_, classes) = scores.dims2()?;
    if k == 0 || k > classes {
        return Err(Error::InvalidArgument(format!(
            "top-k needs 1 <= k <= {classes} (the number of classes), got k = {k}"
        )));
    }
    let rows = scores
        .to_dtype(candle_core::DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let key = |i: usize| {
                if row[i].is_nan() {
                    f32::NEG_INFINITY
                } else {
                    row[i]
                }
            };
            let mut idx: Vec<usize> = (0..classes).collect();
            // Stable sort: equal scores keep ascending index order.
            idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
            idx.truncate(k);
            idx
        })
        .collect())
}

/// Images per forward pass in [`classify_folder`].
const FOLDER_BATCH: usize = 16;

/// Whether a path names a PNG or JPEG file by its extension (case-insensitive).
fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

/// Classifies every PNG and JPEG file directly inside `dir` (by extension `.png`, `.jpg`,
/// `.jpeg`, any case; sub-folders are not entered) and returns file name -> top-`k` class
/// indices, best first.
///
/// Files are processed in name order; each is preprocessed on its own (so sizes may differ)
/// and the model runs on batches of up to 16. `progress(done, total)` is called once before
/// the first image (`done = 0`) and after every batch.
///
/// Errors: a missing or unreadable folder is [`Error::Io`] naming it; an image that cannot be
/// read or decoded is [`Error::Io`] / [`Error::Image`] naming the file; `k` outside
/// `1..=classes` is [`Error::InvalidArgument`].
pub fn classify_folder(
    target: &dyn SemanticTarget,
    dir: &Path,
    k: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.is_file() && is_image_file(&path) {
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push((name, path));
        }
    }
    files.sort();
    let total = files.len();
    progress(0, total);
    let mut out = BTreeMap::new();
    for (done, chunk) in files.chunks(FOLDER_BATCH).enumerate() {
        let mut inputs = Vec::with_capacity(chunk.len());
        for (_, path) in chunk {
            let img = crate::image_io::load_image(path)?;
            let x = crate::image_io::image_to_tensor(&img, target.device())?;
            inputs.push(target.preprocess(&x).map_err(|e| match e {
                Error::Candle(e) => Error::Image(format!("{}: {e}", path.display())),
                e => e,
            })?);
        }
        let logits = target.logits(&Tensor::cat(&inputs, 0)?)?;
        for ((name, _), best) in chunk.iter().zip(top_k(&logits, k)?) {
            out.insert(name.clone(), best);
        }
        progress((done * FOLDER_BATCH + chunk.len()).min(total), total);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let s = Tensor::new(
            &[
                [0.5f32, 2.0, 2.0, -1.0, f32::NAN],
                [3.0, 1.0, 2.0, 0.0, 5.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(top_k(&s, 3).unwrap(), vec![vec![1, 2, 0], vec![4, 0, 2]]);
        assert_eq!(top_k(&s, 5).unwrap()[0], vec![1, 2, 0, 3, 4]);
        assert!(top_k(&s, 0).is_err());
        assert!(top_k(&s, 6).is_err());
    }

    #[test]
    fn image_extensions() {
        for (p, ok) in [
            ("a.png", true),
            ("b.JPG", true),
            ("c.jpeg", true),
            ("d.gif", false),
            ("e", false),
            ("f.png.txt", false),
        ] {
            assert_eq!(is_image_file(Path::new(p)), ok, "{p}");
        }
    }
}
