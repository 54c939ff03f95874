//! CLIP (Radford et al., 2021) as a [`SemanticTarget`]: images are scored against the text
//! embeddings of a caption set, `logit_scale · cos(image, caption)`.
//!
//! The text tower is candle-transformers' CLIP text transformer
//! ([`candle_transformers::models::clip`]): a causal transformer whose output after
//! `final_layer_norm` is read at the end-of-text token. The vision tower is psic's own ViT with
//! the same weights and the same function (patch embedding, class token, learned positions,
//! `pre_layrnorm`, pre-norm encoder layers, `post_layernorm` of the class token): candle's
//! version runs its layer norms through candle-nn's fused layer-norm kernel, which has no
//! backward pass, so gradients would never reach the pixels. Here every layer norm is built from
//! tensor ops and the patch embedding is a patch reshape plus a matrix product (the stride-`p`
//! convolution, computed without im2col). Models load from a Hugging Face `CLIPModel` folder
//! (`config.json` + `model.safetensors`, HF weight names); nothing is downloaded.
//!
//! Checked against Hugging Face `transformers` on a tiny random model (see `tests/clip.rs`):
//! embeddings agree to about 1e-6. Two further points are handled here rather than left to
//! candle:
//!
//! - text pooling: candle pools at `argmax(ids)`, which on some devices need not pick the first
//!   of several maxima; here the position is the **first** occurrence of the largest id (OpenAI's
//!   `argmax`, and HF's "first EOT" for CLIP ids, where EOT 49407 is the largest id), found on
//!   the host;
//! - configuration: candle hard-codes `quick_gelu` and a layer-norm epsilon of `1e-5`, so other
//!   values in `config.json` are rejected instead of silently computing something else.
//!
//! Preprocessing is OpenAI's evaluation transform made differentiable: bicubic resize of the
//! shorter side to the model's image size with PIL's antialiased kernel, each pass clipped to
//! `[0, 1]` as PIL clips to 8 bits (PIL's rounding to whole levels is the one step left out, so
//! results differ from PIL's by under one 8-bit level), centre crop, `(x − mean) / std` with
//! CLIP's mean and std.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, Linear, Module, VarBuilder};
use candle_transformers::models::clip as cc;
use serde_json::Value;

use super::clip_tokenizer::ClipTokenizer;
use super::{preprocess, SemanticTarget};
use crate::{Error, Result};

/// CLIP's image normalisation mean (RGB), as in OpenAI's and HF's preprocessing.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's image normalisation standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Captions embedded per forward pass of the text tower in [`Clip::set_captions`].
const TEXT_BATCH: usize = 64;

/// Settings one CLIP tower shares with the other (HF `CLIPTextConfig` / `CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipEncoderConfig {
    /// Width of the transformer (`hidden_size`).
    pub hidden_size: usize,
    /// Width of the MLP (`intermediate_size`).
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Layer-norm epsilon (only `1e-5` is supported).
    pub layer_norm_eps: f64,
    /// Activation of the MLP (only `quick_gelu` is supported).
    pub hidden_act: String,
}

/// The text tower's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// Transformer settings.
    pub encoder: ClipEncoderConfig,
    /// Vocabulary size (49,408 for OpenAI's BPE).
    pub vocab_size: usize,
    /// Positions, i.e. the context length (77).
    pub max_position_embeddings: usize,
}

/// The vision tower's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Transformer settings.
    pub encoder: ClipEncoderConfig,
    /// Input resolution: the model sees `image_size`x`image_size` crops.
    pub image_size: usize,
    /// Patch size of the patch embedding (a stride-`patch_size` convolution).
    pub patch_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
}

/// Configuration of a CLIP model, as read from a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// The text tower.
    pub text: ClipTextConfig,
    /// The vision tower.
    pub vision: ClipVisionConfig,
    /// Width of the joint embedding space (both projections map to it).
    pub projection_dim: usize,
    /// Initial (log) logit scale, used only when a model is built without weights for it.
    pub logit_scale_init_value: f32,
}

fn field_usize(obj: &Value, key: &str, default: usize) -> Result<usize> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::Model(format!("config field {key} is not an integer: {v}"))),
    }
}

fn field_f64(obj: &Value, key: &str, default: f64) -> Result<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| Error::Model(format!("config field {key} is not a number: {v}"))),
    }
}

fn field_str(obj: &Value, key: &str, default: &str) -> Result<String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(v) => v
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Model(format!("config field {key} is not a string: {v}"))),
    }
}

impl ClipEncoderConfig {
    fn from_json(
        obj: &Value,
        hidden: usize,
        mlp: usize,
        layers: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Self {
            hidden_size: field_usize(obj, "hidden_size", hidden)?,
            intermediate_size: field_usize(obj, "intermediate_size", mlp)?,
            num_hidden_layers: field_usize(obj, "num_hidden_layers", layers)?,
            num_attention_heads: field_usize(obj, "num_attention_heads", heads)?,
            layer_norm_eps: field_f64(obj, "layer_norm_eps", 1e-5)?,
            hidden_act: field_str(obj, "hidden_act", "quick_gelu")?,
        })
    }

    fn check(&self, tower: &str) -> Result<()> {
        if self.hidden_act != "quick_gelu" {
            return Err(Error::Model(format!(
                "{tower} hidden_act {:?} is not supported (only quick_gelu, OpenAI's CLIP)",
                self.hidden_act
            )));
        }
        if (self.layer_norm_eps - 1e-5).abs() > 1e-12 {
            return Err(Error::Model(format!(
                "{tower} layer_norm_eps {} is not supported (only 1e-5)",
                self.layer_norm_eps
            )));
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || self.hidden_size % self.num_attention_heads != 0
        {
            return Err(Error::Model(format!(
                "{tower} hidden_size {} is not a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

impl ClipConfig {
    /// OpenAI's ViT-B/32 (`openai/clip-vit-base-patch32`).
    pub fn vit_base_patch32() -> Self {
        Self::from_hf_json("{}").expect("HF defaults are valid")
    }

    /// Reads a Hugging Face `CLIPConfig` (`config.json`): `text_config` and `vision_config` (or
    /// the older `text_config_dict` / `vision_config_dict`), `projection_dim` and
    /// `logit_scale_init_value`. Missing fields take HF's defaults (ViT-B/32). The towers'
    /// own `projection_dim` fields are ignored: the top-level one is what the projections use.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(json)
            .map_err(|e| Error::Model(format!("CLIP config is not valid JSON: {e}")))?;
        let sub = |a: &str, b: &str| -> Value {
            [a, b]
                .iter()
                .find_map(|k| root.get(*k).filter(|v| v.is_object()))
                .cloned()
                .unwrap_or_else(|| Value::Object(Default::default()))
        };
        let t = sub("text_config", "text_config_dict");
        let v = sub("vision_config", "vision_config_dict");
        let cfg = Self {
            text: ClipTextConfig {
                encoder: ClipEncoderConfig::from_json(&t, 512, 2048, 12, 8)?,
                vocab_size: field_usize(&t, "vocab_size", 49408)?,
                max_position_embeddings: field_usize(&t, "max_position_embeddings", 77)?,
            },
            vision: ClipVisionConfig {
                encoder: ClipEncoderConfig::from_json(&v, 768, 3072, 12, 12)?,
                image_size: field_usize(&v, "image_size", 224)?,
                patch_size: field_usize(&v, "patch_size", 32)?,
                num_channels: field_usize(&v, "num_channels", 3)?,
            },
            projection_dim: field_usize(&root, "projection_dim", 512)?,
            logit_scale_init_value: field_f64(&root, "logit_scale_init_value", 2.6592)? as f32,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks the configuration is one this implementation computes exactly.
    pub fn check(&self) -> Result<()> {
        self.text.encoder.check("text")?;
        self.vision.encoder.check("vision")?;
        let v = &self.vision;
        if v.patch_size == 0 || v.image_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(Error::Model(format!(
                "image_size {} is not a positive multiple of patch_size {}",
                v.image_size, v.patch_size
            )));
        }
        if v.num_channels != 3 {
            return Err(Error::Model(format!(
                "num_channels {} is not supported (RGB only)",
                v.num_channels
            )));
        }
        if self.text.vocab_size == 0 || self.text.max_position_embeddings < 2 {
            return Err(Error::Model(format!(
                "text vocab_size {} / max_position_embeddings {} are unusable",
                self.text.vocab_size, self.text.max_position_embeddings
            )));
        }
        if self.projection_dim == 0 {
            return Err(Error::Model("projection_dim is 0".into()));
        }
        Ok(())
    }

    fn candle_text(&self) -> cc::text_model::ClipTextConfig {
        let e = &self.text.encoder;
        cc::text_model::ClipTextConfig {
            vocab_size: self.text.vocab_size,
            embed_dim: e.hidden_size,
            activation: cc::text_model::Activation::QuickGelu,
            intermediate_size: e.intermediate_size,
            max_position_embeddings: self.text.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: e.num_hidden_layers,
            num_attention_heads: e.num_attention_heads,
            projection_dim: self.projection_dim,
        }
    }
}

/// Layer norm over the last dimension from tensor ops (differentiable, unlike candle-nn's fused
/// kernel): `(x − mean) / sqrt(var + eps) · weight + bias`, biased variance.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// `x · sigmoid(1.702 x)`, CLIP's activation.
fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// One pre-norm transformer layer of the vision tower (HF `CLIPEncoderLayer`, no mask).
struct VisionLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl VisionLayer {
    fn new(vb: VarBuilder, e: &ClipEncoderConfig) -> Result<Self> {
        let w = e.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), w, e.layer_norm_eps)?,
            q_proj: candle_nn::linear(w, w, attn.pp("q_proj"))?,
            k_proj: candle_nn::linear(w, w, attn.pp("k_proj"))?,
            v_proj: candle_nn::linear(w, w, attn.pp("v_proj"))?,
            out_proj: candle_nn::linear(w, w, attn.pp("out_proj"))?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), w, e.layer_norm_eps)?,
            fc1: candle_nn::linear(w, e.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(e.intermediate_size, w, vb.pp("mlp").pp("fc2"))?,
            heads: e.num_attention_heads,
        })
    }

    /// `[B, T, W]` -> `[B, T, W]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, w) = x.dims3()?;
        let head_dim = w / self.heads;
        let h = self.layer_norm1.forward(x)?;
        // [B, T, W] -> [B, heads, T, head_dim]
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((self.q_proj.forward(&h)? * (head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        let attn = candle_nn::ops::softmax(&q.matmul(&k.t()?.contiguous()?)?, D::Minus1)?;
        let o = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, w))?;
        let x = (x + self.out_proj.forward(&o)?)?;
        let h = self.fc2.forward(&quick_gelu(
            &self.fc1.forward(&self.layer_norm2.forward(&x)?)?,
        )?)?;
        Ok((x + h)?)
    }
}

/// The vision tower (HF `CLIPVisionTransformer`), differentiable with respect to its input.
struct VisionTower {
    /// Patch embedding as a `[W, 3·p·p]` matrix (the convolution weight, flattened).
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
    patch: usize,
}

impl VisionTower {
    fn new(vb: VarBuilder, v: &ClipVisionConfig) -> Result<Self> {
        let e = &v.encoder;
        let (w, p, c) = (e.hidden_size, v.patch_size, v.num_channels);
        let positions = (v.image_size / p).pow(2) + 1;
        let emb = vb.pp("embeddings");
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let patch_weight = emb
            .get_with_hints((w, c, p, p), "patch_embedding.weight", init)?
            .reshape((w, c * p * p))?;
        let layers = (0..e.num_hidden_layers)
            .map(|i| VisionLayer::new(vb.pp("encoder").pp("layers").pp(i), e))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            class_embedding: emb.get_with_hints(w, "class_embedding", init)?,
            position_embedding: emb.get_with_hints(
                (positions, w),
                "position_embedding.weight",
                init,
            )?,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), w, e.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), w, e.layer_norm_eps)?,
            patch: p,
        })
    }

    /// Pooled output `[B, W]` of `[B, C, S, S]` input.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        // Patches in row-major grid order, each flattened as (channel, row, column): the
        // stride-p convolution as one matrix product.
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        let tokens = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let width = tokens.dim(2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let mut x = Tensor::cat(&[&cls.contiguous()?, &tokens], 1)?
            .broadcast_add(&self.position_embedding)?;
        x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// The caption set images are scored against.
struct Captions {
    texts: Vec<String>,
    /// Projected text embeddings `[K, P]`.
    embeddings: Tensor,
    /// The same, L2-normalised.
    unit: Tensor,
}

/// A CLIP model with a caption set (see the module docs).
pub struct Clip {
    config: ClipConfig,
    vision: VisionTower,
    text: cc::text_model::ClipTextTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    /// The raw (log) scale.
    logit_scale: f32,
    mean: Tensor,
    std: Tensor,
    tokenizer: Option<ClipTokenizer>,
    captions: Option<Captions>,
    device: Device,
}

impl std::fmt::Debug for Clip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clip")
            .field("config", &self.config)
            .field("logit_scale", &self.logit_scale)
            .field("tokenizer", &self.tokenizer)
            .field(
                "captions",
                &self.captions.as_ref().map_or(0, |c| c.texts.len()),
            )
            .finish()
    }
}

/// Row-wise L2 normalisation (a `1e-24` guard under the square root keeps zero rows finite).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-24)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

impl Clip {
    /// Builds the model from weights with Hugging Face `CLIPModel` names (`text_model.*`,
    /// `vision_model.*`, `visual_projection.weight`, `text_projection.weight`, `logit_scale`).
    /// With a `VarMap`-backed builder (training from scratch, tests) missing weights are
    /// created, `logit_scale` at `logit_scale_init_value`.
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        config.check()?;
        let device = vb.device().clone();
        let text =
            cc::text_model::ClipTextTransformer::new(vb.pp("text_model"), &config.candle_text())?;
        let vision = VisionTower::new(vb.pp("vision_model"), &config.vision)?;
        let visual_projection = candle_nn::linear_no_bias(
            config.vision.encoder.hidden_size,
            config.projection_dim,
            vb.pp("visual_projection"),
        )?;
        let text_projection = candle_nn::linear_no_bias(
            config.text.encoder.hidden_size,
            config.projection_dim,
            vb.pp("text_projection"),
        )?;
        // HF stores a 0-d tensor; accept any single-element shape.
        let scale = if vb.contains_tensor("logit_scale") {
            vb.get_unchecked("logit_scale")?
        } else {
            vb.get_with_hints(
                (),
                "logit_scale",
                Init::Const(f64::from(config.logit_scale_init_value)),
            )?
        };
        if scale.elem_count() != 1 {
            return Err(Error::Model(format!(
                "logit_scale has shape {:?}, expected a single value",
                scale.dims()
            )));
        }
        let logit_scale = scale
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?[0];
        let stats = |v: [f32; 3]| -> Result<Tensor> {
            Ok(Tensor::from_vec(v.to_vec(), (1, 3, 1, 1), &device)?)
        };
        Ok(Self {
            config: config.clone(),
            vision,
            text,
            visual_projection,
            text_projection,
            logit_scale,
            mean: stats(CLIP_MEAN)?,
            std: stats(CLIP_STD)?,
            tokenizer: None,
            captions: None,
            device,
        })
    }

    /// Loads a Hugging Face CLIP folder: `config.json` and `model.safetensors` (any float
    /// dtype, computed in f32 on `device`). When the folder also holds a merges file
    /// (`bpe_simple_vocab_16e6.txt.gz` or `merges.txt`), it becomes the tokenizer; when it holds
    /// `captions.txt` (one caption per non-empty line), those become the caption set.
    ///
    /// Errors: a missing file is [`Error::Io`] naming it; an unusable configuration or missing
    /// or misshapen weights are [`Error::Model`] naming the file.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = ClipConfig::from_hf_json(&json).map_err(|e| match e {
            Error::Model(m) => Error::Model(format!("{}: {m}", config_path.display())),
            e => e,
        })?;
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
        let named = |e: Error| match e {
            Error::Model(m) => Error::Model(format!("{}: {m}", weights.display())),
            Error::Candle(e) => Error::Model(format!("{}: {e}", weights.display())),
            e => e,
        };
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| named(e.into()))?;
        drop(bytes);
        if !tensors.contains_key("logit_scale") {
            return Err(named(Error::Model("weights lack logit_scale".into())));
        }
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let mut clip = Self::new(
            VarBuilder::from_tensors(tensors, DType::F32, device),
            &config,
        )
        .map_err(named)?;
        for name in ["bpe_simple_vocab_16e6.txt.gz", "merges.txt"] {
            let path = dir.join(name);
            if path.is_file() {
                clip.tokenizer = Some(ClipTokenizer::from_file(&path)?);
                break;
            }
        }
        let captions_path = dir.join("captions.txt");
        if captions_path.is_file() {
            let text = std::fs::read_to_string(&captions_path)
                .map_err(|e| Error::io(&captions_path, e))?;
            let captions: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            clip.set_captions(&captions).map_err(|e| match e {
                Error::InvalidArgument(m) => {
                    Error::InvalidArgument(format!("{}: {m}", captions_path.display()))
                }
                e => e,
            })?;
        }
        Ok(clip)
    }

    /// The configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The tokenizer captions are tokenised with, if one was loaded or set.
    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        self.tokenizer.as_ref()
    }

    /// Sets the tokenizer used by [`set_captions`](Self::set_captions).
    pub fn set_tokenizer(&mut self, tokenizer: ClipTokenizer) {
        self.tokenizer = Some(tokenizer);
    }

    /// [`set_tokenizer`](Self::set_tokenizer), builder style.
    pub fn with_tokenizer(mut self, tokenizer: ClipTokenizer) -> Self {
        self.set_tokenizer(tokenizer);
        self
    }

    /// Sets the caption set: tokenises the captions (context length = the model's
    /// `max_position_embeddings`, truncating like `clip.tokenize(truncate=True)`) and embeds them
    /// once; [`class_embeddings`](SemanticTarget::class_embeddings) and the logits use them
    /// until the next call. Errors without a tokenizer or with no captions.
    pub fn set_captions(&mut self, captions: &[&str]) -> Result<()> {
        if captions.is_empty() {
            return Err(Error::InvalidArgument("the caption set is empty".into()));
        }
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "no tokenizer: put bpe_simple_vocab_16e6.txt.gz (or merges.txt) in the model \
                 folder, or call set_tokenizer"
                    .into(),
            )
        })?;
        let context = self.config.text.max_position_embeddings;
        let mut chunks = Vec::new();
        for batch in captions.chunks(TEXT_BATCH) {
            let ids = tokenizer.tokenize_batch(batch, context, &self.device)?;
            chunks.push(self.embed_text_ids(&ids)?.detach());
        }
        let embeddings = Tensor::cat(&chunks, 0)?;
        self.captions = Some(Captions {
            texts: captions.iter().map(|s| s.to_string()).collect(),
            unit: l2_normalize(&embeddings)?,
            embeddings,
        });
        Ok(())
    }

    /// [`set_captions`](Self::set_captions), builder style.
    pub fn with_captions(mut self, captions: &[&str]) -> Result<Self> {
        self.set_captions(captions)?;
        Ok(self)
    }

    /// The current caption set (empty before [`set_captions`](Self::set_captions)).
    pub fn captions(&self) -> &[String] {
        self.captions.as_ref().map_or(&[], |c| &c.texts)
    }

    /// The vision tower's pooled output `[B, W]` (class token after `post_layernorm`, before the
    /// projection; HF's `vision_model(...).pooler_output`) of preprocessed input.
    pub fn pooled_image_features(&self, input: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = input.dims4()?;
        let s = self.config.vision.image_size;
        if c != 3 || h != s || w != s {
            return Err(Error::InvalidArgument(format!(
                "CLIP takes preprocessed [B, 3, {s}, {s}] input, got {:?}",
                input.dims()
            )));
        }
        self.vision.forward(&input.to_dtype(DType::F32)?)
    }

    /// The text tower's output `[N, L, W]` after `final_layer_norm` (HF's
    /// `text_model(...).last_hidden_state`) for token ids `[N, L]` (any integer dtype).
    pub fn text_hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = self.checked_ids(ids)?.0;
        Ok(self.text.forward_with_mask(&ids, usize::MAX)?)
    }

    /// The text tower's pooled output `[N, W]`: the hidden state at the first occurrence of the
    /// largest id of each row (the end-of-text token for CLIP ids), before the projection.
    pub fn pooled_text_features(&self, ids: &Tensor) -> Result<Tensor> {
        let (ids, positions) = self.checked_ids(ids)?;
        let (n, l) = ids.dims2()?;
        let hidden = self.text.forward_with_mask(&ids, usize::MAX)?;
        let width = hidden.dim(2)?;
        let flat: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &p)| (row * l + p) as u32)
            .collect();
        let index = Tensor::from_vec(flat, n, &self.device)?;
        Ok(hidden.reshape((n * l, width))?.index_select(&index, 0)?)
    }

    /// Projected text embeddings `[N, P]` (not normalised) of token ids `[N, L]`.
    pub fn embed_text_ids(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self
            .text_projection
            .forward(&self.pooled_text_features(ids)?)?)
    }

    /// Projected text embeddings `[N, P]` (not normalised) of texts, tokenised with the
    /// model's tokenizer.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("no tokenizer set".into()))?;
        let ids = tokenizer.tokenize_batch(
            texts,
            self.config.text.max_position_embeddings,
            &self.device,
        )?;
        self.embed_text_ids(&ids)
    }

    /// Ids as `u32` on the model's device after range checks, and each row's pooling position.
    fn checked_ids(&self, ids: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let (n, l) = ids.dims2()?;
        let max_l = self.config.text.max_position_embeddings;
        if n == 0 || l == 0 || l > max_l {
            return Err(Error::InvalidArgument(format!(
                "token ids must be [N, L] with N >= 1 and 1 <= L <= {max_l}, got {:?}",
                ids.dims()
            )));
        }
        let rows = ids
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec2::<i64>()?;
        let vocab = self.config.text.vocab_size as i64;
        let mut positions = Vec::with_capacity(n);
        for row in &rows {
            if let Some(bad) = row.iter().find(|&&t| t < 0 || t >= vocab) {
                return Err(Error::InvalidArgument(format!(
                    "token id {bad} outside the vocabulary (size {vocab})"
                )));
            }
            let mut best = 0;
            for (i, &t) in row.iter().enumerate() {
                if t > row[best] {
                    best = i;
                }
            }
            positions.push(best);
        }
        let flat: Vec<u32> = rows.into_iter().flatten().map(|t| t as u32).collect();
        Ok((Tensor::from_vec(flat, (n, l), &self.device)?, positions))
    }

    fn caption_set(&self) -> Result<&Captions> {
        self.captions.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "CLIP has no captions: call set_captions (or put captions.txt in the model folder)"
                    .into(),
            )
        })
    }
}

impl SemanticTarget for Clip {
    fn device(&self) -> &Device {
        &self.device
    }

    /// Shorter side to `image_size` (antialiased bicubic, width pass then height pass, each
    /// clipped to `[0, 1]` as PIL clips to 8 bits; skipped when already that size), central
    /// `image_size`² crop, then `(x − mean) / std` with CLIP's statistics.
    fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        preprocess::check_rgb(images)?;
        let s = self.config.vision.image_size;
        let mut x = images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = preprocess::shorter_side_size(h, w, s);
        if ow != w {
            x = preprocess::resize_bicubic(&x, h, ow)?.clamp(0f32, 1f32)?;
        }
        if oh != h {
            x = preprocess::resize_bicubic(&x, oh, ow)?.clamp(0f32, 1f32)?;
        }
        let x = preprocess::center_crop(&x, s, s)?;
        Ok(x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?)
    }

    /// Projected image embeddings `[B, P]`, not normalised (HF's `get_image_features`).
    fn embed_images(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self
            .visual_projection
            .forward(&self.pooled_image_features(input)?)?)
    }

    /// Projected text embeddings `[N, P]` of free-text captions, not normalised.
    fn embed_captions(&self, captions: &[&str]) -> Result<Option<Tensor>> {
        Ok(Some(self.embed_texts(captions)?))
    }

    /// Projected text embeddings `[K, P]` of the caption set, not normalised.
    fn class_embeddings(&self) -> Result<Tensor> {
        Ok(self.caption_set()?.embeddings.clone())
    }

    /// `exp(logit_scale)`, CLIP's learned temperature (about 100 for OpenAI's models).
    fn logit_scale(&self) -> f32 {
        self.logit_scale.exp()
    }

    /// `exp(logit_scale) · cos(e, caption)` for every caption (HF's `logits_per_image`).
    fn logits_from_embeddings(&self, embeddings: &Tensor) -> Result<Tensor> {
        let captions = self.caption_set()?;
        let e = l2_normalize(&embeddings.to_dtype(DType::F32)?)?;
        Ok((e.matmul(&captions.unit.t()?)? * f64::from(self.logit_scale()))?)
    }
}
