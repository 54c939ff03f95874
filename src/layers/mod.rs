//! Neural-network layers with PyTorch/CompressAI semantics, so CompressAI checkpoints load unchanged.
//!
//! Every layer loads its weights by name through a [`candle_nn::VarBuilder`] (`weight`, `bias`,
//! `beta`, `gamma`, ...), exactly as the matching PyTorch module names them in a state dict, and
//! creates trainable variables when the builder is backed by a `VarMap`.

mod bf16_emul;
#[cfg(target_arch = "x86_64")]
mod bf16_gemm;
#[cfg(feature = "efficientnet-lite")]
mod channel_product;
mod conv;
mod cpu_conv;
mod gdn;
mod gdn_op;
mod im2col;
mod subpel;
mod train_conv;

#[cfg(feature = "efficientnet-lite")]
pub(crate) use channel_product::ChannelProduct;
pub use conv::{Conv2d, ConvTranspose2d};
pub use gdn::Gdn;
pub use subpel::SubpelConv2d;
