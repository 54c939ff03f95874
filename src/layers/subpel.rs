//! Sub-pixel convolution: a convolution to `out * r^2` channels followed by a pixel shuffle.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::Conv2d;
use crate::Result;

/// `conv kxk (in -> out * r^2)` then `PixelShuffle(r)`: CompressAI's `subpel_conv3x3`. Loads the
/// convolution from `<prefix>.0.*` as PyTorch's `nn.Sequential(conv, PixelShuffle)` names it.
#[derive(Debug, Clone)]
pub struct SubpelConv2d {
    conv: Conv2d,
    upscale: usize,
}

impl SubpelConv2d {
    /// Loads a sub-pixel convolution whose convolution lives at `vb` + `.0`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        upscale: usize,
    ) -> Result<Self> {
        let conv = Conv2d::new(
            vb.pp("0"),
            in_channels,
            out_channels * upscale * upscale,
            kernel,
            1,
        )?;
        Ok(Self { conv, upscale })
    }

    /// Sets the precision of the convolution's CPU products ([`Conv2d::set_precision`]).
    pub fn set_precision(&mut self, precision: crate::Precision) -> Result<()> {
        self.conv.set_precision(precision)
    }
}

impl Module for SubpelConv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::pixel_shuffle(&self.conv.forward(x)?, self.upscale)
    }
}
