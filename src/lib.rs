//! # psic — privacy-shielded learned image compression
//!
//! One bitstream, two decodes: [`Codec::encode`] compresses an image with a learned image codec;
//! the shielded decode (the default) reconstructs an image that looks right to people but that
//! semantic models misread; the full decode, given the right condition, gives the
//! full-semantics reconstruction.
//!
//! Where things live:
//! - [`backbone`]: the [`LicBackbone`] trait and the learned codecs (Ballé scale hyperprior);
//! - [`layers`]: convolutions, GDN, sub-pixel convolution with PyTorch/CompressAI semantics;
//! - [`entropy`]: the rANS [`EntropyCoder`](entropy::EntropyCoder), CDF tables, and the
//!   entropy models;
//! - [`bitstream`]: the container format (`docs/FORMAT.md`);
//! - [`model`]: self-describing model files and the CompressAI checkpoint importer;
//! - [`codec`]: [`Codec`], which ties them together;
//! - [`shield`]: conditions and the CLTG trigger generator;
//! - [`targets`]: the semantic models a shield is trained and measured against;
//! - [`train`]: the three training stages;
//! - [`zoo`]: the default model that ships with psic;
//! - [`metrics`], [`baseline`], [`plot`]: PSNR and MS-SSIM, the JPEG baseline, and the charts
//!   of the evaluation.
#![warn(missing_docs)]

pub mod alloc;
pub mod backbone;
pub mod baseline;
pub mod bitstream;
pub mod codec;
pub mod data;
pub mod entropy;
pub mod error;
pub mod eval;
pub mod image_io;
pub mod init;
pub mod layers;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod shield;
pub mod targets;
mod tensor_util;
pub mod train;
pub mod zoo;

pub use backbone::LicBackbone;
pub use codec::Codec;
pub use error::{Error, Result};
pub use model::ModelFile;
