//! Convolution and transposed convolution, padded the way CompressAI's `conv`/`deconv` helpers do.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::Result;

/// A 2-D convolution with "same"-style padding `kernel / 2` (PyTorch `nn.Conv2d` semantics).
///
/// Weights: `weight` `[out, in, k, k]`, `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
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
        let fan_in = (in_channels * kernel * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vb.get_with_hints(
            (out_channels, in_channels, kernel, kernel),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = vb.get_with_hints(
            out_channels,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding: kernel / 2,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// A 2-D transposed convolution that exactly inverts the size change of a strided [`Conv2d`]:
/// padding `kernel / 2`, output padding `stride - 1` (CompressAI's `deconv`).
///
/// Weights: `weight` `[in, out, k, k]` (PyTorch layout), `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    output_padding: usize,
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
        let fan_in = (out_channels * kernel * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vb.get_with_hints(
            (in_channels, out_channels, kernel, kernel),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = vb.get_with_hints(
            out_channels,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding: kernel / 2,
            output_padding: stride - 1,
        })
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
