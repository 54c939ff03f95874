//! The conditional Gaussian entropy model of the latent (CompressAI's `GaussianConditional`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::bottleneck::{round_symbol, LIKELIHOOD_BOUND};
use super::cdf::{pmf_to_quantized_cdf, CdfTables, PRECISION};
use super::EntropyCoder;
use crate::rate::ChannelGains;
use crate::tensor_util::{cpu_view, int_buffer, tensor_to_f32};
use crate::{Error, Result};

/// Smallest scale the model uses (`scale_bound` / `lower_bound_scale` in CompressAI).
pub const SCALE_BOUND: f32 = 0.11;
/// Tail mass left outside each table's coded range.
const TAIL_MASS: f64 = 1e-9;

/// Most entries a scale table may have (CompressAI's default has 64). A longer
/// `gaussian_conditional.scale_table` is refused with [`Error::Model`].
pub const MAX_SCALE_TABLE_LEN: usize = 1024;

/// Most coded symbols (the sum over the scale table of `2 * ceil(scale * 6.1094) + 1`) of the
/// tables psic computes from a scale table, when a model file stores none: 2^18, almost ten
/// times CompressAI's default table (64 scales from 0.11 to 256: 27,128 symbols). Computing a
/// table costs two `erfc` evaluations per symbol, so this bounds the time a hostile model file
/// can make loading take; a scale table over the budget is refused with [`Error::Model`]
/// (models with stored tables are not limited by it).
pub const MAX_COMPUTED_TABLE_SYMBOLS: usize = 1 << 18;

/// CompressAI's default scale table: 64 scales log-spaced from 0.11 to 256.
pub fn default_scale_table() -> Vec<f32> {
    let (lo, hi, n) = (0.11f64.ln(), 256f64.ln(), 64);
    (0..n)
        .map(|i| (lo + (hi - lo) * i as f64 / (n - 1) as f64).exp() as f32)
        .collect()
}

/// What a decoder adds to and divides the decoded symbols by: the means (mean-scale models) and
/// the channel gains of the stream's quality level (`None`: all 1).
#[derive(Debug, Clone, Copy, Default)]
pub struct LatentLevel<'a> {
    /// Means of `y`, shape of `y`.
    pub means: Option<&'a Tensor>,
    /// One gain per channel of `y`.
    pub gains: Option<&'a [f32]>,
}

/// A zero-mean (or mean-shifted) Gaussian, convolved with a unit uniform, per latent element;
/// its scale comes from the hyper-synthesis. For coding, each scale is mapped to the nearest
/// table of a fixed scale table ([`build_indexes`](Self::build_indexes)).
#[derive(Debug, Clone)]
pub struct GaussianConditional {
    scale_table: Vec<f32>,
    tables: CdfTables,
}

/// erfc in double precision (series below 2, continued fraction above), to about 1e-15
/// relative: precise enough that rounding it to f32 reproduces PyTorch's f32 `erfc`.
fn erfc64(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc64(-x);
    }
    let frac_2_sqrt_pi = std::f64::consts::FRAC_2_SQRT_PI;
    if x < 2.0 {
        // erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)); all terms positive.
        let x2 = x * x;
        let mut term = x;
        let mut sum = x;
        let mut n = 0.0;
        while term > sum * 1e-18 {
            n += 1.0;
            term *= 2.0 * x2 / (2.0 * n + 1.0);
            sum += term;
        }
        1.0 - frac_2_sqrt_pi * (-x2).exp() * sum
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))).
        let mut t = x;
        for n in (1..=120).rev() {
            t = x + f64::from(n) / 2.0 / t;
        }
        0.5 * frac_2_sqrt_pi * (-x * x).exp() / t
    }
}

/// The standard normal quantile, by Newton's method on [`erfc64`].
fn ndtri64(p: f64) -> f64 {
    let mut x = -6.0;
    for _ in 0..100 {
        let cdf = 0.5 * erfc64(-x / std::f64::consts::SQRT_2);
        let pdf = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let step = (cdf - p) / pdf;
        x -= step;
        if step.abs() < 1e-15 * x.abs() {
            break;
        }
    }
    x
}

/// Half-width of the table of `scale`: its symbols are `-center ..= center` (and the escape).
fn table_center(scale: f32) -> Result<i32> {
    let multiplier = -ndtri64(TAIL_MASS / 2.0) as f32;
    let center = (scale * multiplier).ceil();
    if !(0.0..=(1 << 20) as f32).contains(&center) {
        return Err(Error::Model(format!("scale {scale} cannot be tabulated")));
    }
    Ok(center as i32)
}

/// CompressAI's `GaussianConditional.update()` for one scale, in f32 exactly as PyTorch computes
/// it (erfc evaluated in f64 and rounded to f32): returns (cdf, offset). Reproduces the stored
/// tables of both reference fixtures entry for entry.
fn gaussian_cdf(scale: f32) -> Result<(Vec<u32>, i32)> {
    let center = table_center(scale)?;
    let phi = |v: f32| 0.5f32 * (erfc64(f64::from(-(2f32.powf(-0.5)) * v)) as f32);
    let length = 2 * center + 1;
    let mut pmf = Vec::with_capacity(length as usize + 1);
    let mut tail = 0.0f32;
    for j in 0..length {
        let sample = (j - center).abs() as f32;
        let upper = phi((0.5 - sample) / scale);
        let lower = phi((-0.5 - sample) / scale);
        if j == 0 {
            tail = 2.0 * lower;
        }
        pmf.push(upper - lower);
    }
    pmf.push(tail);
    Ok((pmf_to_quantized_cdf(&pmf, PRECISION)?, -center))
}

/// A scale table must be non-empty, positive, finite, strictly increasing and at most
/// [`MAX_SCALE_TABLE_LEN`] long.
fn check_scale_table(scale_table: &[f32]) -> Result<()> {
    if scale_table.is_empty()
        || scale_table.iter().any(|s| !s.is_finite() || *s <= 0.0)
        || scale_table.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(Error::Model(
            "gaussian_conditional.scale_table must be positive and increasing".into(),
        ));
    }
    if scale_table.len() > MAX_SCALE_TABLE_LEN {
        return Err(Error::Model(format!(
            "gaussian_conditional.scale_table has {} scales (at most {MAX_SCALE_TABLE_LEN})",
            scale_table.len()
        )));
    }
    Ok(())
}

impl GaussianConditional {
    /// Loads the model from `scale_table` and the coding tables `_quantized_cdf`, `_offset`,
    /// `_cdf_length`; computes the tables from the scale table when the file has none.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let scale_table = if vb.contains_tensor("scale_table") {
            tensor_to_f32(&cpu_view(&vb).get_unchecked("scale_table")?)?
        } else {
            default_scale_table()
        };
        check_scale_table(&scale_table)?;
        let tables = if vb.contains_tensor("_quantized_cdf") {
            let cdf = cpu_view(&vb).get_unchecked("_quantized_cdf")?;
            let (rows, width) = cdf.dims2()?;
            CdfTables::from_padded(
                &int_buffer(&cdf)?,
                rows,
                width,
                &int_buffer(&cpu_view(&vb).get_unchecked("_cdf_length")?)?,
                &int_buffer(&cpu_view(&vb).get_unchecked("_offset")?)?,
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

    /// A model with the given scale table and freshly computed tables. The scale table must be
    /// positive, increasing, at most [`MAX_SCALE_TABLE_LEN`] long and within
    /// [`MAX_COMPUTED_TABLE_SYMBOLS`]; otherwise returns [`Error::Model`].
    pub fn from_scale_table(scale_table: Vec<f32>) -> Result<Self> {
        check_scale_table(&scale_table)?;
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

    /// CompressAI's `update()`: one discretised Gaussian CDF per scale of the table, after
    /// checking the tables' total size against [`MAX_COMPUTED_TABLE_SYMBOLS`].
    fn build_tables(scale_table: &[f32]) -> Result<CdfTables> {
        let mut symbols = 0usize;
        for &s in scale_table {
            symbols += 2 * table_center(s)? as usize + 1;
            if symbols > MAX_COMPUTED_TABLE_SYMBOLS {
                return Err(Error::Model(format!(
                    "gaussian_conditional: the model stores no CDF tables and its scale table \
                     ({} scales up to {}) would need tables of over {MAX_COMPUTED_TABLE_SYMBOLS} \
                     symbols (the most psic computes; docs/FORMAT.md, limits)",
                    scale_table.len(),
                    scale_table.last().copied().unwrap_or(0.0)
                )));
            }
        }
        let (cdfs, offsets) = scale_table
            .iter()
            .map(|&s| gaussian_cdf(s))
            .collect::<Result<(Vec<_>, Vec<_>)>>()?;
        CdfTables::new(cdfs, offsets)
    }

    /// Table index for every scale: the smallest table scale `>=` it (CompressAI's
    /// `build_indexes`), after bounding scales below at 0.11.
    pub fn build_indexes(&self, scales: &Tensor) -> Result<Vec<i32>> {
        Ok(self.indexes_of(&tensor_to_f32(scales)?))
    }

    /// [`build_indexes`](Self::build_indexes) of scales already on the CPU (the portable entropy
    /// path's): a pure function of the f32 values, the same on every machine.
    pub fn indexes_of(&self, scales: &[f32]) -> Vec<i32> {
        let last = self.scale_table.len() as i32 - 1;
        let thresholds = &self.scale_table[..self.scale_table.len() - 1];
        scales
            .iter()
            .map(|&s| {
                let s = s.max(SCALE_BOUND);
                // NaN scales (a broken model) map to the widest table instead of panicking.
                if s.is_nan() {
                    return last;
                }
                last - thresholds.iter().filter(|&&t| s <= t).count() as i32
            })
            .collect()
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
        self.symbols_at(y, means, None)
    }

    /// Symbols of a quality level: `round((y - means)·g)` per channel (`gains` of `y`'s
    /// channels; `None`: all 1, exactly [`symbols`](Self::symbols)).
    pub fn symbols_at(
        &self,
        y: &Tensor,
        means: Option<&Tensor>,
        gains: Option<&[f32]>,
    ) -> Result<Vec<i32>> {
        let v = match means {
            Some(m) => (y - m)?,
            None => y.clone(),
        };
        let v = tensor_to_f32(&v)?;
        Ok(match gains {
            None => v.into_iter().map(round_symbol).collect(),
            Some(g) => {
                let cg = ChannelGains::for_shape(g, y.dims4()?)?;
                v.into_iter()
                    .enumerate()
                    .map(|(i, x)| round_symbol(cg.to_symbol_domain(i, x)))
                    .collect()
            }
        })
    }

    /// Table indexes of a quality level: [`indexes_of`](Self::indexes_of) the scales `σ·g`
    /// ([`ChannelGains::scale_scales`]) of `scales` laid out as `shape` (`[B, C, H, W]`).
    pub fn indexes_at(
        &self,
        mut scales: Vec<f32>,
        shape: (usize, usize, usize, usize),
        gains: Option<&[f32]>,
    ) -> Result<Vec<i32>> {
        if let Some(g) = gains {
            ChannelGains::for_shape(g, shape)?.scale_scales(&mut scales);
        }
        Ok(self.indexes_of(&scales))
    }

    /// Entropy-codes `y` with the given table indexes (one string per batch item).
    pub fn compress(
        &self,
        y: &Tensor,
        indexes: &[i32],
        means: Option<&Tensor>,
        coder: &dyn EntropyCoder,
    ) -> Result<Vec<Vec<u8>>> {
        self.compress_at(y, indexes, means, None, coder)
    }

    /// [`compress`](Self::compress) at a quality level: the symbols of
    /// [`symbols_at`](Self::symbols_at) (`indexes` from [`indexes_at`](Self::indexes_at)).
    pub fn compress_at(
        &self,
        y: &Tensor,
        indexes: &[i32],
        means: Option<&Tensor>,
        gains: Option<&[f32]>,
        coder: &dyn EntropyCoder,
    ) -> Result<Vec<Vec<u8>>> {
        let b = y.dims4()?.0;
        let symbols = self.symbols_at(y, means, gains)?;
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
        let level = LatentLevel { means, gains: None };
        self.decompress_at(strings, indexes, shape, level, coder, device)
    }

    /// [`decompress`](Self::decompress) at a quality level: `y_hat = symbol / g + mean`.
    pub fn decompress_at(
        &self,
        strings: &[&[u8]],
        indexes: &[i32],
        shape: (usize, usize, usize, usize),
        level: LatentLevel<'_>,
        coder: &dyn EntropyCoder,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let LatentLevel { means, gains } = level;
        let gains = gains
            .map(|g| ChannelGains::for_shape(g, shape))
            .transpose()?;
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
            let symbols = coder.decode_with_indexes(s, idx, &self.tables)?;
            let base = values.len();
            values.extend(symbols.into_iter().enumerate().map(|(j, v)| match &gains {
                Some(g) => g.from_symbol(base + j, v),
                None => v as f32,
            }));
        }
        let y = Tensor::from_vec(values, shape, device)?;
        Ok(match means {
            Some(m) => (y + m)?,
            None => y,
        })
    }
}
