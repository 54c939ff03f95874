//! Entropy coding: the rANS coder ([`coder`]), quantised CDF tables ([`cdf`]) and the two entropy
//! models of CompressAI — the factorized [`EntropyBottleneck`] for the hyper-latent and the
//! [`GaussianConditional`] for the latent.

mod bottleneck;
pub mod cdf;
pub mod coder;
mod gaussian;

pub use bottleneck::EntropyBottleneck;
pub use cdf::{pmf_to_quantized_cdf, CdfTables};
#[cfg(feature = "ryg-rans")]
pub use coder::RygRansCoder;
pub use coder::{EntropyCoder, RansCoder};
pub use gaussian::{
    default_scale_table, GaussianConditional, LatentLevel, MAX_COMPUTED_TABLE_SYMBOLS,
    MAX_SCALE_TABLE_LEN, SCALE_BOUND,
};
