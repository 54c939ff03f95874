//! Convolution and transposed convolution, padded the way CompressAI's `conv`/`deconv` helpers do.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::cpu_conv::{self, CpuConv};
use super::train_conv::TrainConv;
use super::Gdn;
use crate::precision::{Kernel, Precision};
use crate::Result;

/// Whether `w` is a frozen (inference) weight on the CPU, where [`CpuConv`] applies.
fn frozen_on_cpu(w: &Tensor) -> bool {
    !w.is_variable() && w.device().is_cpu()
}

/// Loads (or creates with PyTorch's default init, uniform in ±1/sqrt(fan_in)) a kernel of
/// `shape` and a bias of `out_channels` entries.
fn weight_and_bias(
    vb: &VarBuilder,
    shape: (usize, usize, usize, usize),
    fan_in: usize,
    out_channels: usize,
) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    Ok((
        vb.get_with_hints(shape, "weight", init)?,
        vb.get_with_hints(out_channels, "bias", init)?,
    ))
}

/// A 2-D convolution with "same"-style padding `kernel / 2` (PyTorch `nn.Conv2d` semantics).
///
/// Weights: `weight` `[out, in, k, k]`, `bias` `[out]`. With frozen weights (not trainable
/// variables) on the CPU, f32 inputs take an inference-only op that passes no gradient back to
/// the input.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    /// The tiled im2col + gemm form for frozen CPU weights (inference: it passes no gradient
    /// back to its input).
    cpu: Option<CpuConv>,
    /// Product kernel of the CPU ops (inference and training); f32 until
    /// [`set_precision`](Self::set_precision) says otherwise.
    kernel: Kernel,
    /// Whether training computes the kernel's and bias' gradients (see
    /// [`freeze_kernel`](Self::freeze_kernel)).
    kernel_grads: bool,
}

impl Conv2d {
    /// Loads (or, for a `VarMap`-backed builder, creates) a `kernel`x`kernel` convolution with the
    /// given stride and padding `kernel / 2`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        let (weight, bias) = weight_and_bias(
            &vb,
            (out_channels, in_channels, kernel, kernel),
            in_channels * kernel * kernel,
            out_channels,
        )?;
        let cpu = frozen_on_cpu(&weight)
            .then(|| CpuConv::conv(&weight, &bias, stride, kernel / 2, Kernel::F32))
            .transpose()?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding: kernel / 2,
            cpu,
            kernel: Kernel::F32,
            kernel_grads: true,
        })
    }

    /// A stride-`stride` convolution with padding `kernel / 2` from given weights (`[out, in,
    /// k, k]`, `k` odd) and an optional bias (`[out]`; zeros when `None`), e.g. the bias-free
    /// convolutions of content-adaptive triggers. Like [`new`](Self::new), frozen CPU weights
    /// get the tiled inference op and trainable ones the training op, decided here once.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, stride: usize) -> Result<Self> {
        let (out, _, k, k2) = weight.dims4()?;
        if k != k2 || k % 2 == 0 || stride == 0 {
            return Err(crate::Error::InvalidArgument(format!(
                "convolution kernel {:?} with stride {stride}: expected a square odd kernel",
                weight.dims()
            )));
        }
        let bias = match bias {
            Some(b) if b.dims() == [out] => b,
            Some(b) => {
                return Err(crate::Error::InvalidArgument(format!(
                    "convolution bias {:?} for {out} output channels",
                    b.dims()
                )))
            }
            None => Tensor::zeros(out, weight.dtype(), weight.device())?,
        };
        let cpu = frozen_on_cpu(&weight)
            .then(|| CpuConv::conv(&weight, &bias, stride, k / 2, Kernel::F32))
            .transpose()?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding: k / 2,
            cpu,
            kernel: Kernel::F32,
            kernel_grads: true,
        })
    }

    /// The kernel, `[out, in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The stride.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The padding on each side (`k / 2`).
    pub fn padding(&self) -> usize {
        self.padding
    }

    /// Sets the precision of this layer's CPU products (inference and training); bf16 falls
    /// back to f32 on CPUs without AVX512-BF16. Rebuilds the inference plan of frozen weights.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.kernel = Kernel::new(precision);
        if self.cpu.is_some() {
            let (s, p) = (self.stride, self.padding);
            self.cpu = Some(CpuConv::conv(&self.weight, &self.bias, s, p, self.kernel)?);
        }
        Ok(())
    }

    /// The precision this layer's CPU products use (after any fallback).
    pub fn precision(&self) -> Precision {
        self.kernel.precision()
    }

    /// Training with trainable weights on the CPU: the backward pass computes no gradient for
    /// this layer's kernel and bias (for weights no optimiser steps, e.g. a frozen synthesis
    /// feeding a trained trigger generator); the input gradient still flows.
    pub fn freeze_kernel(&mut self) {
        self.kernel_grads = false;
    }

    /// Whether the weights are trainable variables.
    pub fn is_trainable(&self) -> bool {
        self.weight.is_variable()
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `gdn(self(x))`, fused into one pass over each output tile for frozen CPU layers.
    pub fn forward_gdn(&self, x: &Tensor, gdn: &Gdn) -> candle_core::Result<Tensor> {
        if let (Some(conv), Some(g)) = (&self.cpu, gdn.cpu()) {
            if let Some(y) = cpu_conv::apply(conv, Some(g), x)? {
                return Ok(y);
            }
        }
        gdn.forward(&self.forward(x)?)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(conv) = &self.cpu {
            if let Some(y) = cpu_conv::apply(conv, None, x)? {
                return Ok(y);
            }
        }
        let train = self.weight.is_variable();
        // The op's input gradient is the transposed convolution in phase form, which needs an
        // odd kernel (padding k / 2 on both sides).
        if train && self.weight.dims()[2] % 2 == 1 {
            let op = TrainConv::Conv {
                stride: self.stride,
                padding: self.padding,
                kernel: self.kernel,
                kernel_grads: self.kernel_grads,
            };
            if let Some(y) = train_on_cpu(op, x, &self.weight, &self.bias)? {
                return Ok(y);
            }
        }
        let y = conv2d_auto(x, &self.weight, self.padding, self.stride, train)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// The training op for trainable f32 weights on the CPU ([`TrainConv`]); `None` elsewhere.
fn train_on_cpu(
    op: TrainConv,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(x) && f32_cpu(weight) && f32_cpu(bias)) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(weight, bias, op)?))
}

/// candle's `conv2d` where psic's CPU ops do not apply (other devices, other dtypes); when
/// training on the CPU with what [`TrainConv`] declines (even kernels, non-f32 tensors),
/// [`conv2d_gemm`], whose backward pass is two matrix products instead of candle's
/// transposed-convolution loop.
fn conv2d_auto(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    train: bool,
) -> candle_core::Result<Tensor> {
    if train && x.device().is_cpu() {
        conv2d_gemm(x, w, padding, stride)
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

/// A convolution as explicit im2col and one matrix product: the same result as
/// `conv2d(w, padding, stride)`, with a backward pass made of two matrix products and a col2im.
/// On the CPU (f32) im2col is a custom op; elsewhere it is built from stride-phase views of the
/// padded input, one per kernel tap.
pub fn conv2d_gemm(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, c_w, k, _) = w.dims4()?;
    if c != c_w {
        candle_core::bail!("conv2d_gemm: input has {c} channels, kernel expects {c_w}");
    }
    let ho = (h + 2 * padding - k) / stride + 1;
    let wo = (wd + 2 * padding - k) / stride + 1;
    let cols = match super::im2col::im2col(x, k, stride, padding)? {
        Some(cols) => cols,
        None => im2col_views(x, k, stride, padding)?,
    };
    let y = w.reshape((o, c * k * k))?.matmul(&cols)?; // [O, B·Ho·Wo]
    y.reshape((o, b, ho, wo))?
        .permute((1, 0, 2, 3))?
        .contiguous()
}

/// im2col from stride-phase views of the padded input, one per kernel tap: tensor ops only,
/// any device, `[C·k², B·Ho·Wo]`.
fn im2col_views(x: &Tensor, k: usize, s: usize, padding: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let ho = (h + 2 * padding - k) / s + 1;
    let wo = (wd + 2 * padding - k) / s + 1;
    // Pad to a multiple of s (the extra zeros are never read) and view as s x s phases.
    let hp = (h + 2 * padding).div_ceil(s);
    let wp = (wd + 2 * padding).div_ceil(s);
    let xp = x
        .pad_with_zeros(2, padding, hp * s - h - padding)?
        .pad_with_zeros(3, padding, wp * s - wd - padding)?
        .reshape((b, c, hp, s, wp, s))?;
    let mut taps = Vec::with_capacity(k * k);
    for ky in 0..k {
        let row = xp.narrow(3, ky % s, 1)?.squeeze(3)?.narrow(2, ky / s, ho)?;
        for kx in 0..k {
            taps.push(
                row.narrow(4, kx % s, 1)?
                    .squeeze(4)?
                    .narrow(3, kx / s, wo)?,
            );
        }
    }
    // [B, C, k², Ho, Wo] -> [C·k², B·Ho·Wo]
    Tensor::stack(&taps, 2)?
        .permute((1, 2, 0, 3, 4))?
        .reshape((c * k * k, b * ho * wo))
}

/// A 2-D transposed convolution that exactly inverts the size change of a strided [`Conv2d`]:
/// padding `kernel / 2`, output padding `stride - 1` (CompressAI's `deconv`).
///
/// Weights: `weight` `[in, out, k, k]` (PyTorch layout), `bias` `[out]`. Frozen CPU weights
/// take an inference-only op, as for [`Conv2d`].
///
/// candle's CPU `conv_transpose2d` is a loop of dot products (several times slower than a
/// convolution of the same size), so this layer computes the same result as *stride phases*:
/// output pixel `(s·Y + ry, s·X + rx)` only meets the kernel taps `ky ≡ ry + p (mod s)`, so the
/// `s²` phases are one ordinary stride-1 convolution to `out · s²` channels followed by a pixel
/// shuffle. The phase kernel is rearranged from `weight` with differentiable ops (so training
/// works) and cached when the weight is not a trainable variable.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    output_padding: usize,
    /// Phase kernel `[out·s², in, K, K]`, its (left, right) padding; cached for frozen weights.
    phase: Option<(Tensor, usize, usize)>,
    /// Per-phase im2col + gemm form for frozen CPU weights (inference: it passes no gradient
    /// back to its input).
    cpu: Option<CpuConv>,
    /// Product kernel of the CPU ops, as for [`Conv2d`].
    kernel: Kernel,
    /// As for [`Conv2d`].
    kernel_grads: bool,
}

impl ConvTranspose2d {
    /// Loads (or creates) a transposed convolution up-sampling by `stride`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        let (weight, bias) = weight_and_bias(
            &vb,
            (in_channels, out_channels, kernel, kernel),
            out_channels * kernel * kernel,
            out_channels,
        )?;
        let mut layer = Self {
            weight,
            bias,
            stride,
            padding: kernel / 2,
            output_padding: stride - 1,
            phase: None,
            cpu: None,
            kernel: Kernel::F32,
            kernel_grads: true,
        };
        if !layer.weight.is_variable() {
            layer.phase = Some(layer.phase_kernel()?);
            if layer.phase_form() && frozen_on_cpu(&layer.weight) {
                layer.cpu = Some(CpuConv::transposed(
                    &layer.weight,
                    &layer.bias,
                    stride,
                    layer.padding,
                    Kernel::F32,
                )?);
            }
        }
        Ok(layer)
    }

    /// Sets the precision of this layer's CPU products, as [`Conv2d::set_precision`].
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.kernel = Kernel::new(precision);
        if self.cpu.is_some() {
            let (s, p) = (self.stride, self.padding);
            self.cpu = Some(CpuConv::transposed(
                &self.weight,
                &self.bias,
                s,
                p,
                self.kernel,
            )?);
        }
        Ok(())
    }

    /// The precision this layer's CPU products use (after any fallback).
    pub fn precision(&self) -> Precision {
        self.kernel.precision()
    }

    /// Training with trainable weights on the CPU: the backward pass computes no gradient for
    /// this layer's kernel and bias (for weights no optimiser steps, e.g. a frozen synthesis
    /// feeding a trained trigger generator); the input gradient still flows.
    pub fn freeze_kernel(&mut self) {
        self.kernel_grads = false;
    }

    /// Tap offsets `d` (input row `Y + d` feeds phase row `Y`) span `d_min..=d_max`, where
    /// `ky = r + p - s·d` must lie in `0..k` for some phase `r`.
    fn tap_range(&self) -> (isize, isize) {
        let (k, s, p) = (
            self.weight.dims()[2] as isize,
            self.stride as isize,
            self.padding as isize,
        );
        let d_min = (p - (k - 1)).div_euclid(s);
        let d_max = (s - 1 + p).div_euclid(s);
        (d_min, d_max)
    }

    /// Rearranges `weight` into the phase kernel (see the type docs).
    fn phase_kernel(&self) -> candle_core::Result<(Tensor, usize, usize)> {
        let (c_in, c_out, k, _) = self.weight.dims4()?;
        let s = self.stride as isize;
        let p = self.padding as isize;
        let (d_min, d_max) = self.tap_range();
        let taps = (d_max - d_min + 1) as usize;
        let zeros = Tensor::zeros(
            (c_in, c_out, 1, 1),
            self.weight.dtype(),
            self.weight.device(),
        )?;
        let tap = |r: isize, j: usize| -> Option<usize> {
            let ky = r + p - s * (d_min + j as isize);
            (0..k as isize).contains(&ky).then_some(ky as usize)
        };
        let mut phases = Vec::with_capacity((s * s) as usize);
        for ry in 0..s {
            for rx in 0..s {
                let mut rows = Vec::with_capacity(taps);
                for jy in 0..taps {
                    let mut row = Vec::with_capacity(taps);
                    for jx in 0..taps {
                        row.push(match (tap(ry, jy), tap(rx, jx)) {
                            (Some(ky), Some(kx)) => {
                                self.weight.narrow(2, ky, 1)?.narrow(3, kx, 1)?
                            }
                            _ => zeros.clone(),
                        });
                    }
                    rows.push(Tensor::cat(&row, 3)?);
                }
                // [in, out, K, K] -> [out, in, K, K]
                phases.push(Tensor::cat(&rows, 2)?.transpose(0, 1)?);
            }
        }
        // Output channel o·s² + ry·s + rx, as pixel_shuffle expects.
        let kernel =
            Tensor::stack(&phases, 1)?.reshape((c_out * (s * s) as usize, c_in, taps, taps))?;
        Ok((kernel.contiguous()?, (-d_min) as usize, d_max as usize))
    }

    /// `gdn(self(x))`, fused into one pass over each output tile for frozen CPU layers.
    pub fn forward_gdn(&self, x: &Tensor, gdn: &Gdn) -> candle_core::Result<Tensor> {
        if let (Some(conv), Some(g)) = (&self.cpu, gdn.cpu()) {
            if let Some(y) = cpu_conv::apply(conv, Some(g), x)? {
                return Ok(y);
            }
        }
        gdn.forward(&self.forward(x)?)
    }

    /// The phase form needs output = stride x input, which CompressAI's deconv always gives.
    fn phase_form(&self) -> bool {
        self.output_padding + self.weight.dims()[2] == self.stride + 2 * self.padding
    }

    /// The reference path: candle's own `conv_transpose2d` (slow on CPU; used in tests).
    pub fn forward_reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv_transpose2d(
            &self.weight,
            self.padding,
            self.output_padding,
            self.stride,
            1,
        )?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.phase_form() {
            return self.forward_reference(x);
        }
        if let Some(conv) = &self.cpu {
            if let Some(y) = cpu_conv::apply(conv, None, x)? {
                return Ok(y);
            }
        }
        let train = self.weight.is_variable();
        if train {
            let op = TrainConv::Transposed {
                stride: self.stride,
                padding: self.padding,
                kernel: self.kernel,
                kernel_grads: self.kernel_grads,
            };
            if let Some(y) = train_on_cpu(op, x, &self.weight, &self.bias)? {
                return Ok(y);
            }
        }
        let (kernel, left, right) = match &self.phase {
            Some((w, l, r)) => (w.clone(), *l, *r),
            None => self.phase_kernel()?,
        };
        let y = if left == right {
            conv2d_auto(x, &kernel, left, 1, train)?
        } else {
            let xp = x
                .pad_with_zeros(2, left, right)?
                .pad_with_zeros(3, left, right)?;
            conv2d_auto(&xp, &kernel, 0, 1, train)?
        };
        let y = candle_nn::ops::pixel_shuffle(&y, self.stride)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn gemm_convolution_matches_candle_forward_and_backward() {
        // Even sizes at stride 2: candle's own conv2d backward mis-sizes the input gradient of
        // odd inputs (it omits the output padding), so it cannot serve as the reference there.
        let dev = candle_core::Device::Cpu;
        for &(k, stride, pad, h, w) in &[
            (5, 2, 2, 12, 10),
            (3, 1, 1, 9, 7),
            (5, 1, 2, 8, 8),
            (1, 1, 0, 5, 6),
            (3, 2, 1, 6, 8),
        ] {
            let x = candle_core::Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap(),
            )
            .unwrap();
            let wt = candle_core::Var::from_tensor(
                &Tensor::randn(0f32, 0.3, (4, 3, k, k), &dev).unwrap(),
            )
            .unwrap();
            let reference = x
                .as_tensor()
                .conv2d(wt.as_tensor(), pad, stride, 1, 1)
                .unwrap();
            let ours = conv2d_gemm(x.as_tensor(), wt.as_tensor(), pad, stride).unwrap();
            assert_eq!(reference.dims(), ours.dims());
            // The tensor-op im2col (used off the CPU) gives the same columns as the custom op.
            let via_views = im2col_views(x.as_tensor(), k, stride, pad).unwrap();
            let via_op = crate::layers::im2col::im2col(x.as_tensor(), k, stride, pad)
                .unwrap()
                .unwrap();
            let d_cols = (via_views - via_op)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(
                d_cols.to_scalar::<f32>().unwrap(),
                0.0,
                "im2col k{k} s{stride}"
            );
            let diff = (&reference - &ours)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-4,
                "forward k{k} s{stride}"
            );
            let r = Tensor::randn(0f32, 1.0, reference.dims(), &dev).unwrap();
            let g_ref = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_our = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [x.as_tensor(), wt.as_tensor()] {
                let a = g_ref.get(v).unwrap();
                let b = g_our.get(v).unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    d.to_scalar::<f32>().unwrap() < 1e-3,
                    "gradient k{k} s{stride}"
                );
            }
        }
    }
    use candle_core::{DType, Device};

    /// A builder over frozen copies of `varmap`'s tensors (what a loaded model file gives).
    fn frozen(varmap: &candle_nn::VarMap) -> VarBuilder<'static> {
        let t: std::collections::HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)
    }

    fn layer(c_in: usize, c_out: usize, k: usize, s: usize, trainable: bool) -> ConvTranspose2d {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 7, DType::F32, &dev);
        let l = ConvTranspose2d::new(vb.clone(), c_in, c_out, k, s).unwrap();
        if trainable {
            return l;
        }
        ConvTranspose2d::new(frozen(&varmap), c_in, c_out, k, s).unwrap()
    }

    /// Largest absolute difference between two tensors (also used by sibling layers' tests).
    pub(in crate::layers) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn cpu_convolution_equals_candle() {
        // Frozen weights take the tiled im2col + gemm path; sizes include odd ones and images
        // of several tiles.
        let dev = Device::Cpu;
        for &(k, s, h, w) in &[
            (5, 2, 13, 11),
            (3, 1, 9, 7),
            (1, 1, 5, 6),
            (5, 2, 70, 50),
            (3, 1, 41, 37),
        ] {
            let wt = Tensor::randn(0f32, 0.3, (4, 3, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
            let tensors = std::collections::HashMap::from([
                ("weight".to_string(), wt.clone()),
                ("bias".to_string(), bias.clone()),
            ]);
            let conv = Conv2d::new(
                VarBuilder::from_tensors(tensors, DType::F32, &dev),
                3,
                4,
                k,
                s,
            )
            .unwrap();
            assert!(conv.cpu.is_some());
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
            let ours = conv.forward(&x).unwrap();
            let reference = x
                .conv2d(&wt, k / 2, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "k={k} s={s}");
            assert!(max_diff(&ours, &reference) < 1e-5, "k={k} s={s}");
        }
    }

    #[test]
    fn bias_free_convolution_from_weights() {
        // Frozen weights: the CPU inference op; trainable ones: the training op, whose weight
        // gradient must match candle's. A missing bias is zero; even kernels are refused.
        let dev = Device::Cpu;
        let wt = Tensor::randn(0f32, 0.3, (6, 6, 3, 3), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 6, 11, 9), &dev).unwrap();
        let reference = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
        let frozen = Conv2d::from_weights(wt.clone(), None, 1).unwrap();
        assert!(frozen.cpu.is_some() && frozen.padding() == 1 && frozen.stride() == 1);
        assert!(max_diff(&frozen.forward(&x).unwrap(), &reference) < 1e-5);
        let var = candle_core::Var::from_tensor(&wt).unwrap();
        let trained = Conv2d::from_weights(var.as_tensor().clone(), None, 1).unwrap();
        assert!(trained.cpu.is_none() && trained.is_trainable());
        let y = trained.forward(&x).unwrap();
        assert!(max_diff(&y, &reference) < 1e-5);
        let ours = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let rv = candle_core::Var::from_tensor(&wt).unwrap();
        let r = x.conv2d(rv.as_tensor(), 1, 1, 1, 1).unwrap();
        let theirs = r.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (g, rg) = (ours.get(&var).unwrap(), theirs.get(&rv).unwrap());
        assert!(max_diff(g, rg) < 1e-3 * (1.0 + max_diff(rg, &rg.zeros_like().unwrap())));
        let even = Tensor::zeros((2, 2, 2, 2), DType::F32, &dev).unwrap();
        assert!(Conv2d::from_weights(even, None, 1).is_err());
        let bad_bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert!(Conv2d::from_weights(wt, Some(bad_bias), 1).is_err());
    }

    #[test]
    fn wide_convolution_in_tap_chunks_equals_candle() {
        // 64 input channels: the frozen CPU op builds its columns a few taps at a time
        // (CHUNK_BYTES) and accumulates the products; stride 2, an odd size, two images.
        let dev = Device::Cpu;
        let wt = Tensor::randn(0f32, 0.05, (8, 64, 5, 5), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let tensors = std::collections::HashMap::from([
            ("weight".to_string(), wt.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let conv = Conv2d::new(
            VarBuilder::from_tensors(tensors, DType::F32, &dev),
            64,
            8,
            5,
            2,
        )
        .unwrap();
        assert!(conv.cpu.is_some());
        let x = Tensor::randn(0f32, 1.0, (2, 64, 41, 38), &dev).unwrap();
        let reference = x
            .conv2d(&wt, 2, 2, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let ours = conv.forward(&x).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        assert!(
            max_diff(&ours, &reference) < 1e-4,
            "{}",
            max_diff(&ours, &reference)
        );
    }

    #[test]
    fn fused_gdn_equals_convolution_then_gdn() {
        // Frozen layers on the CPU fuse the (I)GDN into the convolution's output tiles; the
        // reference is the unfused convolution followed by the GDN's own tensor ops.
        let dev = Device::Cpu;
        for inverse in [false, true] {
            let varmap = candle_nn::VarMap::new();
            let vb = crate::init::seeded_var_builder(&varmap, 5, DType::F32, &dev);
            Conv2d::new(vb.pp("c"), 3, 6, 5, 2).unwrap();
            ConvTranspose2d::new(vb.pp("t"), 6, 6, 5, 2).unwrap();
            Gdn::new(vb.pp("g"), 6, inverse).unwrap();
            // Non-trivial gamma off-diagonals and beta.
            for (name, v) in varmap.data().lock().unwrap().iter() {
                if name.starts_with("g.") {
                    let r = Tensor::rand(0.2f32, 1.0, v.dims(), &dev).unwrap();
                    v.set(&r).unwrap();
                }
            }
            let vb = frozen(&varmap);
            let conv = Conv2d::new(vb.pp("c"), 3, 6, 5, 2).unwrap();
            let deconv = ConvTranspose2d::new(vb.pp("t"), 6, 6, 5, 2).unwrap();
            let gdn = Gdn::new(vb.pp("g"), 6, inverse).unwrap();
            assert!(gdn.cpu().is_some());
            let x = Tensor::randn(0f32, 1.0, (2, 3, 45, 37), &dev).unwrap();
            let a = conv.forward_gdn(&x, &gdn).unwrap();
            let b = gdn.forward(&conv.forward(&x).unwrap()).unwrap();
            assert!(max_diff(&a, &b) < 1e-5, "conv + gdn: {}", max_diff(&a, &b));
            let a = deconv.forward_gdn(&a, &gdn).unwrap();
            let b = gdn.forward(&deconv.forward(&b).unwrap()).unwrap();
            assert_eq!(a.dims(), &[2, 6, 46, 38]);
            assert!(
                max_diff(&a, &b) < 1e-4,
                "deconv + gdn: {}",
                max_diff(&a, &b)
            );
        }
    }

    #[test]
    fn phase_form_equals_transposed_convolution() {
        for (k, s, h, w) in [
            (5, 2, 7, 9),
            (3, 2, 7, 9),
            (4, 2, 7, 9),
            (5, 4, 7, 9),
            (3, 1, 7, 9),
            (5, 2, 30, 41),
        ] {
            for trainable in [false, true] {
                let l = layer(6, 5, k, s, trainable);
                assert_eq!(l.cpu.is_some(), !trainable && l.phase_form(), "k={k} s={s}");
                let x = Tensor::randn(0f32, 1.0, (2, 6, h, w), &Device::Cpu).unwrap();
                let a = l.forward(&x).unwrap();
                let b = l.forward_reference(&x).unwrap();
                assert_eq!(a.dims(), b.dims(), "k={k} s={s}");
                assert!(max_diff(&a, &b) < 1e-5, "k={k} s={s}: {}", max_diff(&a, &b));
            }
        }
    }

    #[test]
    fn phase_form_gradients_equal_the_reference() {
        let l = layer(4, 3, 5, 2, true);
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (1, 4, 5, 6), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let target = Tensor::randn(0f32, 1.0, (1, 3, 10, 12), &Device::Cpu).unwrap();
        let loss = |y: Tensor| (y * &target).unwrap().sum_all().unwrap();
        let g1 = loss(l.forward(x.as_tensor()).unwrap()).backward().unwrap();
        let g2 = loss(l.forward_reference(x.as_tensor()).unwrap())
            .backward()
            .unwrap();
        for t in [x.as_tensor(), &l.weight, &l.bias] {
            let (a, b) = (g1.get(t).unwrap(), g2.get(t).unwrap());
            assert!(
                max_diff(a, b) < 1e-4,
                "gradient differs by {}",
                max_diff(a, b)
            );
        }
    }
}
