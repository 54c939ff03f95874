//! # psic — privacy-shielded learned image compression
//!
//! One bitstream, two decodes: [`Codec::encode`] compresses an image with a learned image codec;
//! [`Codec::decode_shielded`] (the default) reconstructs an image that looks right to people but that
//! semantic models misread; [`Codec::decode_full`] with the right condition gives the full-semantics
//! reconstruction.
#![warn(missing_docs)]

pub mod entropy;
pub mod error;

pub use error::{Error, Result};
