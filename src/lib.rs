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
//! - `train`: the three training stages, quality-level fitting and the refining encoder
//!   (`train::refine`: a slower encoder whose streams any decoder reads; cargo feature `train`);
//! - [`zoo`]: the default model that ships with psic;
//! - [`metrics`]: PSNR and MS-SSIM; `eval`, `baseline`, `plot` (cargo feature `eval`): the
//!   evaluation harness, the JPEG baseline and the charts of the evaluation.
//!
//! ## Cargo features
//!
//! | feature | what it adds | extra dependencies |
//! | --- | --- | --- |
//! | `default-model` | the embedded default model ([`zoo`], 8.6 MB in the binary) | – |
//! | `train` | `train`, `data`, the EfficientNet-Lite target | `toml` |
//! | `eval` | `eval`, `baseline`, `plot`, `data` | `jpeg-encoder` |
//! | `clip` | the CLIP target, its BPE tokenizer and text repair | `candle-transformers`, `regex`, `flate2`, `unicode-normalization-alignments` |
//! | `efficientnet-lite` | the EfficientNet-Lite target alone (part of `train`) | – |
//! | `cli` | the `psic` command-line binary (`cargo install --path .`) | `clap` |
//! | `cuda`, `metal` | candle's GPU back ends | |
//! | `ryg-rans` | the `rans` crate (ryg_rans in C) as a cross-check coder | `rans` (needs libclang) |
//!
//! On by default: `default-model`, `train`, `eval`, `clip` and `cli` (`efficientnet-lite`
//! through `train`). A program that only encodes and decodes compiles the codec core with
//! `default-features = false, features = ["default-model"]` (or without `default-model`,
//! reading its model files from disk).
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// The MSRV is 1.89 for the AVX-512 intrinsics of the bf16 kernel; the `x % n != 0` tests
// written for the older MSRV stay as they are (`is_multiple_of` is only 1.87+ style).
#![allow(clippy::manual_is_multiple_of)]

pub mod alloc;
pub mod backbone;
#[cfg(feature = "eval")]
pub mod baseline;
pub mod bitstream;
pub mod codec;
#[cfg(any(feature = "train", feature = "eval"))]
pub mod data;
pub mod device;
pub mod entropy;
pub mod error;
#[cfg(feature = "eval")]
pub mod eval;
pub mod image_io;
pub mod init;
pub mod layers;
pub mod metrics;
pub mod model;
#[cfg(feature = "eval")]
pub mod plot;
pub mod precision;
pub mod rate;
pub mod shield;
pub mod targets;
mod tensor_util;
pub mod tiles;
#[cfg(feature = "train")]
pub mod train;
pub mod zoo;

pub use backbone::LicBackbone;
/// The tensor library psic is built on (its `Tensor`, `Device` and `DType` appear in psic's API).
pub use candle_core;
/// candle's neural-network crate (its `VarBuilder` loads a backbone's weights, see
/// [`backbone::BackboneFactory`]).
pub use candle_nn;
pub use codec::Codec;
pub use device::DeviceKind;
pub use error::{Error, Result};
/// The image library of psic's API (`image::RgbImage` in and out of [`Codec`]).
pub use image;
pub use model::ModelFile;
pub use precision::Precision;

/// The README's Rust examples, compiled as doctests so they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
