//! EfficientNet-Lite ImageNet classifiers as a [`SemanticTarget`] (tested on Lite0; Lite1–4
//! share the layout and load the same way, with their own `resolution` metadata).
//!
//! Weight names are those of the PyTorch `efficientnet_lite*` state dicts (`_conv_stem`, `_bn0`,
//! `_blocks.i._expand_conv` / `_bn0` / `_depthwise_conv` / `_bn1` / `_project_conv` / `_bn2`,
//! `_conv_head`, `_bn1`, `_fc`). The network, in evaluation mode:
//!
//! ```text
//! x ─stem 3x3/s2─BN─ReLU6─▶ MBConv × n ─head 1x1─BN─ReLU6─▶ mean over H,W = e [B,1280] ─_fc─▶ logits
//! MBConv: [1x1 expand─BN─ReLU6] ─kxk depthwise/s─BN─ReLU6─ 1x1 project─BN (+ x if s=1, in=out)
//! ```
//!
//! Every convolution uses TensorFlow "same" padding: the total padding along a side of length
//! `n` is `max((ceil(n/s) - 1)·s + k - n, 0)`, the smaller half before, the rest after (so
//! strided convolutions pad asymmetrically). Batch norms (eps `1e-3` by default) are folded into
//! the preceding convolution at construction; the model is a frozen target.
//!
//! Depthwise convolutions do not use candle's grouped `conv2d` (one convolution per channel,
//! hundreds per layer, slow on the CPU) but a custom op (see `depthwise.rs`); 1x1 convolutions
//! are matrix products.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};

use super::depthwise::{depthwise_conv, same_padding};
use super::{preprocess, SemanticTarget};
use crate::layers::ChannelProduct;
use crate::{Error, Precision, Result};

/// Shape of one MBConv block, as read from its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbConvBlockConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Channels after the 1x1 expansion; `None` when the block has no expansion convolution
    /// (expand ratio 1: the depthwise convolution works on the input channels).
    pub expand_channels: Option<usize>,
    /// Output channels of the 1x1 projection.
    pub out_channels: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
}

impl MbConvBlockConfig {
    /// Channels of the depthwise convolution.
    pub fn hidden_channels(&self) -> usize {
        self.expand_channels.unwrap_or(self.in_channels)
    }
}

/// Configuration of an EfficientNet-Lite model.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetLiteConfig {
    /// Input resolution `R` (the model sees `R`x`R` crops): 224 for Lite0.
    pub resolution: usize,
    /// Stride of each block's depthwise convolution (1 or 2), one per block.
    pub block_strides: Vec<usize>,
    /// Block shapes, in order.
    pub blocks: Vec<MbConvBlockConfig>,
    /// Output channels of the 3x3 stride-2 stem.
    pub stem_channels: usize,
    /// Output channels of the 1x1 head: the embedding width `D`.
    pub head_channels: usize,
    /// Number of classes `K`.
    pub num_classes: usize,
    /// Batch-norm epsilon (`1e-3` for the TensorFlow-trained models).
    pub bn_eps: f64,
}

/// EfficientNet-B0's stage strides; every B*/Lite* variant shares them (compound scaling changes
/// widths, depths and resolution only).
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// Infers the block strides from the block shapes.
///
/// A convolution's weights are the same at every stride, so strides cannot be read from the
/// weights alone, and "stride 2 wherever the width changes" is wrong (Lite0's blocks 0, 8 and 15
/// change width at stride 1). The rule used: blocks form stages, a stage starting at every block
/// whose output channels differ from its input channels (block 0 always starts one); there must
/// be the 7 stages of the EfficientNet layout, and the first block of stages 2, 3, 4 and 6 has
/// stride 2, every other block stride 1 (stage strides `[1, 2, 2, 2, 1, 2, 1]`). Checked against
/// the `block_strides` metadata of the Lite0 weights in the tests.
pub fn infer_block_strides(blocks: &[MbConvBlockConfig]) -> Result<Vec<usize>> {
    let mut strides = Vec::with_capacity(blocks.len());
    let mut stage = 0usize;
    for (i, b) in blocks.iter().enumerate() {
        let starts_stage = i == 0 || b.in_channels != b.out_channels;
        if starts_stage {
            stage += 1;
            if stage > STAGE_STRIDES.len() {
                break;
            }
            strides.push(STAGE_STRIDES[stage - 1]);
        } else {
            strides.push(1);
        }
    }
    if stage != STAGE_STRIDES.len() {
        return Err(Error::Model(format!(
            "cannot infer EfficientNet block strides: the {} blocks form {stage} stages, not 7; \
             give them in the `block_strides` metadata",
            blocks.len()
        )));
    }
    Ok(strides)
}

fn shape_of(tensors: &HashMap<String, Tensor>, name: &str) -> Result<Vec<usize>> {
    tensors
        .get(name)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| Error::Model(format!("EfficientNet-Lite weights lack tensor {name}")))
}

fn bad_shape(name: &str, shape: &[usize], want: &str) -> Error {
    Error::Model(format!(
        "tensor {name} has shape {shape:?}, expected {want}"
    ))
}

impl EfficientNetLiteConfig {
    /// EfficientNet-Lite0 (224x224, 16 blocks, 1280-d embeddings, 1000 classes).
    pub fn lite0() -> Self {
        // Per stage: (repeats, in, out, kernel, expand ratio).
        let spec: [(usize, usize, usize, usize, usize); 7] = [
            (1, 32, 16, 3, 1),
            (2, 16, 24, 3, 6),
            (2, 24, 40, 5, 6),
            (3, 40, 80, 3, 6),
            (3, 80, 112, 5, 6),
            (4, 112, 192, 5, 6),
            (1, 192, 320, 3, 6),
        ];
        let mut blocks = Vec::new();
        for (repeats, c_in, c_out, kernel, ratio) in spec {
            for r in 0..repeats {
                let in_channels = if r == 0 { c_in } else { c_out };
                blocks.push(MbConvBlockConfig {
                    in_channels,
                    expand_channels: (ratio != 1).then_some(in_channels * ratio),
                    out_channels: c_out,
                    kernel,
                });
            }
        }
        Self {
            resolution: 224,
            block_strides: vec![1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1],
            blocks,
            stem_channels: 32,
            head_channels: 1280,
            num_classes: 1000,
            bn_eps: 1e-3,
        }
    }

    /// Reads the configuration of a checkpoint: block structure from the weight shapes
    /// (expansion present or not, depthwise kernel size, widths), `resolution` and
    /// `block_strides` (a JSON list) from the safetensors metadata. Without `block_strides` the
    /// strides are inferred ([`infer_block_strides`]).
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        metadata: &HashMap<String, String>,
    ) -> Result<Self> {
        let stem = shape_of(tensors, "_conv_stem.weight")?;
        if stem.len() != 4 || stem[1] != 3 || stem[2] != 3 || stem[3] != 3 {
            return Err(bad_shape("_conv_stem.weight", &stem, "[C, 3, 3, 3]"));
        }
        let mut blocks = Vec::new();
        let mut c_in = stem[0];
        while tensors.contains_key(&format!("_blocks.{}._depthwise_conv.weight", blocks.len())) {
            let p = format!("_blocks.{}", blocks.len());
            let dw_name = format!("{p}._depthwise_conv.weight");
            let dw = shape_of(tensors, &dw_name)?;
            if dw.len() != 4 || dw[1] != 1 || dw[2] != dw[3] || dw[2] % 2 == 0 {
                return Err(bad_shape(&dw_name, &dw, "[C, 1, k, k] with odd k"));
            }
            let hidden = dw[0];
            let expand_name = format!("{p}._expand_conv.weight");
            let expand_channels = if tensors.contains_key(&expand_name) {
                let e = shape_of(tensors, &expand_name)?;
                if e != [hidden, c_in, 1, 1] {
                    return Err(bad_shape(
                        &expand_name,
                        &e,
                        &format!("[{hidden}, {c_in}, 1, 1]"),
                    ));
                }
                Some(hidden)
            } else if hidden != c_in {
                return Err(bad_shape(&dw_name, &dw, &format!("[{c_in}, 1, k, k]")));
            } else {
                None
            };
            let proj_name = format!("{p}._project_conv.weight");
            let proj = shape_of(tensors, &proj_name)?;
            if proj.len() != 4 || proj[1] != hidden || proj[2] != 1 || proj[3] != 1 {
                return Err(bad_shape(
                    &proj_name,
                    &proj,
                    &format!("[C, {hidden}, 1, 1]"),
                ));
            }
            blocks.push(MbConvBlockConfig {
                in_channels: c_in,
                expand_channels,
                out_channels: proj[0],
                kernel: dw[2],
            });
            c_in = proj[0];
        }
        if blocks.is_empty() {
            return Err(Error::Model(
                "EfficientNet-Lite weights lack tensor _blocks.0._depthwise_conv.weight".into(),
            ));
        }
        let head = shape_of(tensors, "_conv_head.weight")?;
        if head.len() != 4 || head[1] != c_in || head[2] != 1 || head[3] != 1 {
            return Err(bad_shape(
                "_conv_head.weight",
                &head,
                &format!("[D, {c_in}, 1, 1]"),
            ));
        }
        let fc = shape_of(tensors, "_fc.weight")?;
        if fc.len() != 2 || fc[1] != head[0] {
            return Err(bad_shape("_fc.weight", &fc, &format!("[K, {}]", head[0])));
        }
        let resolution = metadata
            .get("resolution")
            .ok_or_else(|| Error::Model("EfficientNet-Lite metadata lacks `resolution`".into()))?
            .trim()
            .parse::<usize>()
            .map_err(|e| Error::Model(format!("bad `resolution` metadata: {e}")))?;
        let block_strides = match metadata.get("block_strides") {
            Some(s) => serde_json::from_str::<Vec<usize>>(s)
                .map_err(|e| Error::Model(format!("bad `block_strides` metadata {s:?}: {e}")))?,
            None => infer_block_strides(&blocks)?,
        };
        let cfg = Self {
            resolution,
            block_strides,
            blocks,
            stem_channels: stem[0],
            head_channels: head[0],
            num_classes: fc[0],
            bn_eps: 1e-3,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the configuration is consistent (one stride of 1 or 2 per block, chained
    /// widths, odd kernels, a positive resolution).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| {
            Err(Error::Model(format!(
                "invalid EfficientNet-Lite config: {m}"
            )))
        };
        if self.blocks.is_empty() {
            return bad("no blocks".into());
        }
        if self.block_strides.len() != self.blocks.len() {
            return bad(format!(
                "{} block strides for {} blocks",
                self.block_strides.len(),
                self.blocks.len()
            ));
        }
        if let Some(s) = self.block_strides.iter().find(|&&s| s != 1 && s != 2) {
            return bad(format!("block stride {s} (only 1 and 2 exist)"));
        }
        let mut c = self.stem_channels;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.in_channels != c {
                return bad(format!(
                    "block {i} takes {} channels, gets {c}",
                    b.in_channels
                ));
            }
            if b.kernel % 2 == 0 || b.kernel == 0 {
                return bad(format!("block {i} has kernel {}", b.kernel));
            }
            c = b.out_channels;
        }
        if self.resolution == 0 || self.bn_eps <= 0.0 || self.num_classes == 0 {
            return bad("zero resolution, classes or eps".into());
        }
        Ok(())
    }

    /// Side the 256x256 evaluation images are resized to before the central crop:
    /// `round(R · 256 / 224)` (256 for Lite0, so no resize).
    pub fn resize_to(&self) -> usize {
        (self.resolution as f64 * 256.0 / 224.0).round() as usize
    }
}

/// A 1x1 convolution with its batch norm folded in, computed as a matmul: candle's in f32 (the
/// figures of the reports were made with it), psic's channel product at another precision.
#[derive(Debug, Clone)]
struct Pointwise {
    /// `[O, C]`.
    weight: Tensor,
    /// `[1, O, 1]`.
    bias: Tensor,
    /// The CPU op when the model runs at a precision other than f32.
    product: Option<ChannelProduct>,
}

impl Pointwise {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let o = self.weight.dim(0)?;
        let x = x.reshape((b, c, h * w))?;
        let y = match &self.product {
            Some(op) => op.forward(&x)?,
            None => self
                .weight
                .broadcast_matmul(&x)?
                .broadcast_add(&self.bias)?,
        };
        Ok(y.reshape((b, o, h, w))?)
    }

    /// Chooses the implementation for `precision` (f32, or weights off the CPU: candle's).
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let psic_op = precision != Precision::F32 && self.weight.device().is_cpu();
        self.product = psic_op
            .then(|| ChannelProduct::new(&self.weight, &self.bias, precision))
            .transpose()?;
        Ok(())
    }
}

/// A depthwise `k`x`k` convolution (TF "same" padding) with its batch norm folded in.
#[derive(Debug, Clone)]
struct Depthwise {
    /// `[C, k·k]`, taps row-major.
    weight: Tensor,
    /// `[1, C, 1, 1]`.
    bias: Tensor,
    kernel: usize,
    stride: usize,
}

impl Depthwise {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = depthwise_conv(x, &self.weight, self.kernel, self.stride)?;
        Ok(y.broadcast_add(&self.bias)?)
    }
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    skip: bool,
}

impl MbConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        if let Some(e) = &self.expand {
            h = relu6(&e.forward(&h)?)?;
        }
        h = relu6(&self.depthwise.forward(&h)?)?;
        h = self.project.forward(&h)?;
        if self.skip {
            h = (h + x)?;
        }
        Ok(h)
    }
}

fn relu6(x: &Tensor) -> Result<Tensor> {
    Ok(x.clamp(0f32, 6f32)?)
}

/// Fetches a tensor, turning a missing or misshapen one into [`Error::Model`].
fn get(vb: &VarBuilder, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
    vb.get_with_hints(shape, name, init).map_err(|e| {
        Error::Model(format!(
            "EfficientNet-Lite tensor {}.{name} ({shape:?}): {e}",
            vb.prefix()
        ))
    })
}

/// Loads convolution weight `conv.weight` (shape `shape`, output channels first) and batch norm
/// `bn`, and folds the norm into the convolution: `w·γ/√(σ²+ε)`, `β − μ·γ/√(σ²+ε)`.
fn conv_bn(
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
    shape: &[usize],
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    // Kaiming-normal for freshly created (random) models; depthwise fan-in is k².
    let fan_in = shape[1] * shape[2] * shape[3];
    let w = get(
        &vb.pp(conv),
        shape,
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_in.max(1) as f64).sqrt(),
        },
    )?;
    let c = shape[0];
    let vb = vb.pp(bn);
    let gamma = get(&vb, &[c], "weight", Init::Const(1.0))?;
    let beta = get(&vb, &[c], "bias", Init::Const(0.0))?;
    let mean = get(&vb, &[c], "running_mean", Init::Const(0.0))?;
    let var = get(&vb, &[c], "running_var", Init::Const(1.0))?;
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let w = w.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
    let b = (beta - (mean * &scale)?)?;
    Ok((w, b))
}

fn pointwise(
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
    c_in: usize,
    c_out: usize,
    eps: f64,
) -> Result<Pointwise> {
    let (w, b) = conv_bn(vb, conv, bn, &[c_out, c_in, 1, 1], eps)?;
    Ok(Pointwise {
        weight: w.reshape((c_out, c_in))?,
        bias: b.reshape((1, c_out, 1))?,
        product: None,
    })
}

/// An EfficientNet-Lite classifier (frozen, evaluation mode) as a [`SemanticTarget`].
///
/// - [`preprocess`](SemanticTarget::preprocess): shorter side to `round(R·256/224)` (bicubic,
///   [`preprocess::resize_bicubic`]; a no-op for Lite0 on 256x256 images), central `R`x`R`
///   crop, then `x·255` mapped by `(x − 127)/128`;
/// - [`embed_images`](SemanticTarget::embed_images): the pooled head features `[B, 1280]`;
/// - [`class_embeddings`](SemanticTarget::class_embeddings): the rows of `_fc.weight`;
/// - [`logits`](SemanticTarget::logits): `e · Wᵀ + b` (`logit_scale` is 1).
#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    cfg: EfficientNetLiteConfig,
    /// Folded stem `[C, 3, 3, 3]` and bias `[1, C, 1, 1]`.
    stem: (Tensor, Tensor),
    blocks: Vec<MbConv>,
    head: Pointwise,
    /// `[K, D]`.
    fc_weight: Tensor,
    /// `[K]`.
    fc_bias: Tensor,
    device: Device,
}

impl EfficientNetLite {
    /// Builds the model from `vb` (a checkpoint's tensors, or a `VarMap` builder for a randomly
    /// initialised model), checking every tensor's shape against `cfg`.
    pub fn new(vb: VarBuilder, cfg: &EfficientNetLiteConfig) -> Result<Self> {
        cfg.validate()?;
        let eps = cfg.bn_eps;
        let (sw, sb) = conv_bn(
            &vb,
            "_conv_stem",
            "_bn0",
            &[cfg.stem_channels, 3, 3, 3],
            eps,
        )?;
        let stem = (sw, sb.reshape((1, cfg.stem_channels, 1, 1))?);
        let mut blocks = Vec::with_capacity(cfg.blocks.len());
        for (i, (b, &stride)) in cfg.blocks.iter().zip(&cfg.block_strides).enumerate() {
            let vb = vb.pp(format!("_blocks.{i}"));
            let hidden = b.hidden_channels();
            let expand = match b.expand_channels {
                Some(e) => Some(pointwise(
                    &vb,
                    "_expand_conv",
                    "_bn0",
                    b.in_channels,
                    e,
                    eps,
                )?),
                None => None,
            };
            let k = b.kernel;
            let (dw, db) = conv_bn(&vb, "_depthwise_conv", "_bn1", &[hidden, 1, k, k], eps)?;
            let depthwise = Depthwise {
                weight: dw.reshape((hidden, k * k))?,
                bias: db.reshape((1, hidden, 1, 1))?,
                kernel: k,
                stride,
            };
            let project = pointwise(&vb, "_project_conv", "_bn2", hidden, b.out_channels, eps)?;
            blocks.push(MbConv {
                expand,
                depthwise,
                project,
                skip: stride == 1 && b.in_channels == b.out_channels,
            });
        }
        let last = cfg
            .blocks
            .last()
            .map(|b| b.out_channels)
            .unwrap_or(cfg.stem_channels);
        let head = pointwise(&vb, "_conv_head", "_bn1", last, cfg.head_channels, eps)?;
        let bound = 1.0 / (cfg.head_channels as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let fc = vb.pp("_fc");
        let fc_weight = get(&fc, &[cfg.num_classes, cfg.head_channels], "weight", init)?;
        let fc_bias = get(&fc, &[cfg.num_classes], "bias", init)?;
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            blocks,
            head,
            fc_weight,
            fc_bias,
            device: vb.device().clone(),
        })
    }

    /// Loads a safetensors checkpoint (PyTorch `efficientnet_lite*` names, metadata
    /// `resolution` and optionally `block_strides`; see
    /// [`EfficientNetLiteConfig::from_tensors`]).
    ///
    /// Errors: [`Error::Io`] when the file cannot be read, [`Error::Model`] (naming the file)
    /// when it is not safetensors, lacks a tensor or metadata, or has inconsistent shapes.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let named = |e: Error| match e {
            Error::Model(m) => Error::Model(format!("{}: {m}", path.display())),
            Error::Candle(e) => Error::Model(format!("{}: {e}", path.display())),
            e => e,
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::Model(format!("{}: not a safetensors file: {e}", path.display()))
        })?;
        let metadata: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| named(e.into()))?;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let cfg = EfficientNetLiteConfig::from_tensors(&tensors, &metadata).map_err(named)?;
        Self::new(VarBuilder::from_tensors(tensors, DType::F32, device), &cfg).map_err(named)
    }

    /// The configuration.
    pub fn config(&self) -> &EfficientNetLiteConfig {
        &self.cfg
    }

    /// The feature map `[B, D, R/32, R/32]` after the head (before pooling).
    pub fn features(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.features_and_taps(input, false)?.0)
    }

    /// The head's feature map and, when `taps` is set, the output of each stage that ends at
    /// strides 4, 8 and 16 (the block before each later stride-2 block), shallow to deep.
    pub fn features_and_taps(&self, input: &Tensor, taps: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let (_, c, h, w) = input.dims4()?;
        if c != 3 {
            return Err(Error::InvalidArgument(format!(
                "EfficientNet-Lite takes [B, 3, H, W] input, got {:?}",
                input.dims()
            )));
        }
        let (top, bottom) = same_padding(h, 3, 2);
        let (left, right) = same_padding(w, 3, 2);
        let x = input
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?
            .conv2d(&self.stem.0, 0, 2, 1, 1)?
            .broadcast_add(&self.stem.1)?;
        let mut x = relu6(&x)?;
        let mut maps = Vec::new();
        let mut stride = 2;
        for (b, &s) in self.blocks.iter().zip(&self.cfg.block_strides) {
            if taps && s == 2 && stride >= 4 {
                maps.push(x.clone());
            }
            stride *= s;
            x = b.forward(&x)?;
        }
        Ok((relu6(&self.head.forward(&x)?)?, maps))
    }
}

impl SemanticTarget for EfficientNetLite {
    fn device(&self) -> &Device {
        &self.device
    }

    /// The 1x1 convolutions (most of the model's arithmetic) run at `precision`: candle's f32
    /// matmul for [`Precision::F32`] (the default), psic's product kernels otherwise.
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.head.set_precision(precision)?;
        for block in &mut self.blocks {
            if let Some(e) = &mut block.expand {
                e.set_precision(precision)?;
            }
            block.project.set_precision(precision)?;
        }
        Ok(())
    }

    /// Shorter side to `round(R·256/224)` (antialiased bicubic, skipped when already that size),
    /// central `R`x`R` crop, then `(255·x − 127)/128`.
    fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        preprocess::check_rgb(images)?;
        let r = self.cfg.resolution;
        let x = images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let x = preprocess::resize_shorter_side(&x, self.cfg.resize_to())?;
        let x = preprocess::center_crop(&x, r, r)?;
        Ok(x.affine(255.0 / 128.0, -127.0 / 128.0)?)
    }

    fn embed_images(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.features(input)?.mean((2, 3))?)
    }

    /// Taps: the outputs of the stages ending at strides 4, 8 and 16
    /// ([`features_and_taps`](Self::features_and_taps)).
    fn embed_with_features(&self, input: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (f, maps) = self.features_and_taps(input, true)?;
        Ok((f.mean((2, 3))?, maps))
    }

    fn class_embeddings(&self) -> Result<Tensor> {
        Ok(self.fc_weight.clone())
    }

    /// 1: classifier logits are unscaled dot products plus the `_fc` bias.
    fn logit_scale(&self) -> f32 {
        1.0
    }

    fn logits_from_embeddings(&self, embeddings: &Tensor) -> Result<Tensor> {
        Ok(embeddings
            .matmul(&self.fc_weight.t()?)?
            .broadcast_add(&self.fc_bias)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite0_strides_are_inferred() {
        let cfg = EfficientNetLiteConfig::lite0();
        assert_eq!(cfg.blocks.len(), 16);
        cfg.validate().unwrap();
        assert_eq!(infer_block_strides(&cfg.blocks).unwrap(), cfg.block_strides);
        assert!(infer_block_strides(&cfg.blocks[..10]).is_err());
    }
}
