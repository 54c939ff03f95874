//! The conditional Gaussian entropy model of the latent (CompressAI's `GaussianConditional`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::bottleneck::{round_symbol, LIKELIHOOD_BOUND};
use super::cdf::{pmf_to_quantized_cdf, CdfTables, PRECISION};
use super::EntropyCoder;
use crate::tensor_util::{int_buffer, tensor_to_f32};
use crate::{Error, Result};

/// Smallest scale the model uses (`scale_bound` / `lower_bound_scale` in CompressAI).
pub const SCALE_BOUND: f32 = 0.11;
/// Tail mass left outside each table's coded range.
const TAIL_MASS: f64 = 1e-9;

/// CompressAI's default scale table: 64 scales log-spaced from 0.11 to 256.
pub fn default_scale_table() -> Vec<f32> {
    let (lo, hi, n) = (0.11f64.ln(), 256f64.ln(), 64);
    (0..n)
        .map(|i| (lo + (hi - lo) * i as f64 / (n - 1) as f64).exp() as f32)
        .collect()
}

/// A zero-mean (or mean-shifted) Gaussian, convolved with a unit uniform, per latent element;
/// its scale comes from the hyper-synthesis. For coding, each scale is mapped to the nearest
/// table of a fixed scale table ([`build_indexes`](Self::build_indexes)).
#[derive(Debug, Clone)]
pub struct GaussianConditional {
    scale_table: Vec<f32>,
    tables: CdfTables,
}

/// Standard normal CDF, `0.5 * erfc(-x / sqrt(2))`.
fn std_cumulative(x: f64) -> f64 {
    0.5 * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

/// Complementary error function (W. J. Cody's rational approximations are overkill here; this is
/// Numerical Recipes' erfcc, relative error < 1.2e-7, plenty for 16-bit tables).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// `-ndtri(q)` for the small tail probability used by CompressAI (`q = TAIL_MASS / 2`).
fn normal_quantile_upper(q: f64) -> f64 {
    // Bisection on the monotone CDF: exact enough and free of special-function tables.
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if std_cumulative(-mid) > q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

impl GaussianConditional {
    /// Loads the model from `scale_table` and the coding tables `_quantized_cdf`, `_offset`,
    /// `_cdf_length`; computes the tables from the scale table when the file has none.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let scale_table = if vb.contains_tensor("scale_table") {
            tensor_to_f32(&vb.get_unchecked("scale_table")?)?
        } else {
            default_scale_table()
        };
        if scale_table.is_empty()
            || scale_table.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || scale_table.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(Error::Model(
                "gaussian_conditional.scale_table must be positive and increasing".into(),
            ));
        }
        let tables = if vb.contains_tensor("_quantized_cdf") {
            let cdf = vb.get_unchecked("_quantized_cdf")?;
            let (rows, width) = cdf.dims2()?;
            CdfTables::from_padded(
                &int_buffer(&cdf)?,
                rows,
                width,
                &int_buffer(&vb.get_unchecked("_cdf_length")?)?,
                &int_buffer(&vb.get_unchecked("_offset")?)?,
            )?
        } else {
            Self::build_tables(&scale_table)?
        };
        if tables.len() != scale_table.len() {
            return Err(Error::Model(format!(
                "gaussian_conditional has {} CDF tables for {} scales",
                tables.len(),
                scale_table.len()
            )));
        }
        Ok(Self {
            scale_table,
            tables,
        })
    }

    /// A model with the given scale table and freshly computed tables.
    pub fn from_scale_table(scale_table: Vec<f32>) -> Result<Self> {
        let tables = Self::build_tables(&scale_table)?;
        Ok(Self {
            scale_table,
            tables,
        })
    }

    /// The scale table.
    pub fn scale_table(&self) -> &[f32] {
        &self.scale_table
    }

    /// The coding tables, one per scale.
    pub fn tables(&self) -> &CdfTables {
        &self.tables
    }

    /// CompressAI's `update()`: one discretised Gaussian CDF per scale of the table.
    fn build_tables(scale_table: &[f32]) -> Result<CdfTables> {
        let multiplier = normal_quantile_upper(TAIL_MASS / 2.0);
        let mut cdfs = Vec::with_capacity(scale_table.len());
        let mut offsets = Vec::with_capacity(scale_table.len());
        for &s in scale_table {
            let s = s as f64;
            let center = (s * multiplier).ceil() as i64;
            if center > 1 << 20 {
                return Err(Error::Model(format!("scale {s} is too large to tabulate")));
            }
            let mut prob: Vec<f32> = (0..2 * center + 1)
                .map(|k| {
                    let v = (k - center).abs() as f64;
                    (std_cumulative((0.5 - v) / s) - std_cumulative((-0.5 - v) / s)) as f32
                })
                .collect();
            prob.push((2.0 * std_cumulative((-0.5 - center as f64) / s)) as f32);
            cdfs.push(pmf_to_quantized_cdf(&prob, PRECISION)?);
            offsets.push(-(center as i32));
        }
        CdfTables::new(cdfs, offsets)
    }

    /// Table index for every scale: the smallest table scale `>=` it (CompressAI's
    /// `build_indexes`), after bounding scales below at 0.11.
    pub fn build_indexes(&self, scales: &Tensor) -> Result<Vec<i32>> {
        let last = self.scale_table.len() as i32 - 1;
        let thresholds = &self.scale_table[..self.scale_table.len() - 1];
        Ok(tensor_to_f32(scales)?
            .into_iter()
            .map(|s| {
                let s = s.max(SCALE_BOUND);
                // NaN scales (a broken model) map to the widest table instead of panicking.
                if s.is_nan() {
                    return last;
                }
                last - thresholds.iter().filter(|&&t| s <= t).count() as i32
            })
            .collect())
    }

    /// Likelihoods of `y_hat` under N(means, scales) convolved with U(-1/2, 1/2), lower-bounded
    /// at 1e-9; differentiable in all inputs (for training).
    pub fn likelihood(
        &self,
        y_hat: &Tensor,
        scales: &Tensor,
        means: Option<&Tensor>,
    ) -> Result<Tensor> {
        let values = match means {
            Some(m) => (y_hat - m)?,
            None => y_hat.clone(),
        }
        .abs()?;
        let scales = scales.maximum(SCALE_BOUND as f64)?;
        let cdf = |x: Tensor| -> candle_core::Result<Tensor> {
            // 0.5 * erfc(-x/sqrt2) = 0.5 * (1 + erf(x/sqrt2))
            ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5
        };
        let upper = cdf(((values.neg()? + 0.5)? / &scales)?)?;
        let lower = cdf(((values.neg()? - 0.5)? / &scales)?)?;
        Ok((upper - lower)?.maximum(LIKELIHOOD_BOUND)?)
    }

    /// Symbols `round(y - means)` (round half to even, as PyTorch).
    pub fn symbols(&self, y: &Tensor, means: Option<&Tensor>) -> Result<Vec<i32>> {
        let v = match means {
            Some(m) => (y - m)?,
            None => y.clone(),
        };
        Ok(tensor_to_f32(&v)?.into_iter().map(round_symbol).collect())
    }

    /// Entropy-codes `y` with the given table indexes (one string per batch item).
    pub fn compress(
        &self,
        y: &Tensor,
        indexes: &[i32],
        means: Option<&Tensor>,
        coder: &dyn EntropyCoder,
    ) -> Result<Vec<Vec<u8>>> {
        let b = y.dims4()?.0;
        let symbols = self.symbols(y, means)?;
        if indexes.len() != symbols.len() {
            return Err(Error::InvalidArgument(format!(
                "{} indexes for {} latent values",
                indexes.len(),
                symbols.len()
            )));
        }
        let per_item = symbols.len() / b.max(1);
        (0..b)
            .map(|i| {
                let r = i * per_item..(i + 1) * per_item;
                coder.encode_with_indexes(&symbols[r.clone()], &indexes[r], &self.tables)
            })
            .collect()
    }

    /// Decodes strings into `y_hat` of `shape` (`[B, C, H, W]`), given the table indexes.
    pub fn decompress(
        &self,
        strings: &[&[u8]],
        indexes: &[i32],
        shape: (usize, usize, usize, usize),
        means: Option<&Tensor>,
        coder: &dyn EntropyCoder,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let (b, c, h, w) = shape;
        let per_item = c * h * w;
        if strings.len() != b || indexes.len() != b * per_item {
            return Err(Error::InvalidArgument(format!(
                "{} strings and {} indexes for a latent of shape {:?}",
                strings.len(),
                indexes.len(),
                shape
            )));
        }
        let mut values = Vec::with_capacity(b * per_item);
        for (i, s) in strings.iter().enumerate() {
            let idx = &indexes[i * per_item..(i + 1) * per_item];
            values.extend(
                coder
                    .decode_with_indexes(s, idx, &self.tables)?
                    .into_iter()
                    .map(|v| v as f32),
            );
        }
        let y = Tensor::from_vec(values, shape, device)?;
        Ok(match means {
            Some(m) => (y + m)?,
            None => y,
        })
    }
}
