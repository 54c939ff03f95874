//! The factorized entropy model of the hyper-latent (Ballé et al. 2018; CompressAI's
//! `EntropyBottleneck`).

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use super::cdf::{pmf_to_quantized_cdf, CdfTables, PRECISION};
use super::EntropyCoder;
use crate::tensor_util::{cpu_view, int_buffer, tensor_to_f32};
use crate::{Error, Result};

/// Filter widths of the univariate density model (CompressAI's default `(3, 3, 3, 3)`).
const FILTERS: [usize; 4] = [3, 3, 3, 3];
/// Lower bound on likelihoods, as CompressAI.
pub(crate) const LIKELIHOOD_BOUND: f64 = 1e-9;
/// Tail mass left outside the coded range.
const TAIL_MASS: f64 = 1e-9;
/// Widest `maxima + minima` of a channel's quantiles [`EntropyBottleneck::update`] tabulates:
/// `span + 1` values and the tail make at most `2^16` symbols, all a 16-bit CDF can hold.
const MAX_PMF_SPAN: u32 = (1 << PRECISION) - 2;

/// A learned, per-channel factorized density for the hyper-latent `z`.
///
/// Weights (CompressAI names): `matrices.{0..4}`, `biases.{0..4}`, `factors.{0..3}`, `quantiles`
/// `[C,1,3]` (lower tail, median, upper tail), and the coding tables `_quantized_cdf`, `_offset`,
/// `_cdf_length`. The tables are read from the model file when present and computed from the
/// density otherwise ([`EntropyBottleneck::update`]).
#[derive(Debug, Clone)]
pub struct EntropyBottleneck {
    channels: usize,
    matrices: Vec<Tensor>,
    biases: Vec<Tensor>,
    factors: Vec<Tensor>,
    quantiles: Tensor,
    medians: Vec<f32>,
    tables: Option<CdfTables>,
}

fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), stable for large |x|.
    let pos = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    pos + tail
}

impl EntropyBottleneck {
    /// Loads (or creates, initialised as CompressAI does) an entropy bottleneck over `channels`.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let init_scale: f64 = 10.0;
        let dims: Vec<usize> = std::iter::once(1)
            .chain(FILTERS)
            .chain(std::iter::once(1))
            .collect();
        let scale = init_scale.powf(1.0 / (FILTERS.len() + 1) as f64);
        let (mut matrices, mut biases, mut factors) = (vec![], vec![], vec![]);
        for i in 0..=FILTERS.len() {
            let init = (1.0 / scale / dims[i + 1] as f64).exp_m1().ln();
            matrices.push(vb.get_with_hints(
                (channels, dims[i + 1], dims[i]),
                &format!("matrices.{i}"),
                Init::Const(init),
            )?);
            biases.push(vb.get_with_hints(
                (channels, dims[i + 1], 1),
                &format!("biases.{i}"),
                Init::Uniform { lo: -0.5, up: 0.5 },
            )?);
            if i < FILTERS.len() {
                factors.push(vb.get_with_hints(
                    (channels, dims[i + 1], 1),
                    &format!("factors.{i}"),
                    Init::Const(0.0),
                )?);
            }
        }
        let quantiles = if vb.contains_tensor("quantiles") {
            vb.get((channels, 1, 3), "quantiles")?
        } else {
            let v = vb.get_with_hints((channels, 1, 3), "quantiles", Init::Const(0.0))?;
            let init = Tensor::new(&[-init_scale as f32, 0.0, init_scale as f32], vb.device())?
                .to_dtype(v.dtype())?
                .reshape((1, 1, 3))?
                .broadcast_as((channels, 1, 3))?;
            candle_core::Var::from_tensor(&v)?.set(&init.contiguous()?)?;
            v
        };
        let medians = tensor_to_f32(&quantiles.narrow(2, 1, 1)?)?;
        let tables = if vb.contains_tensor("_quantized_cdf") {
            let cdf = cpu_view(&vb).get_unchecked("_quantized_cdf")?;
            let (rows, width) = cdf.dims2()?;
            if rows != channels {
                return Err(Error::Model(format!(
                    "entropy_bottleneck._quantized_cdf has {rows} rows for {channels} channels"
                )));
            }
            Some(CdfTables::from_padded(
                &int_buffer(&cdf)?,
                rows,
                width,
                &int_buffer(&cpu_view(&vb).get_unchecked("_cdf_length")?)?,
                &int_buffer(&cpu_view(&vb).get_unchecked("_offset")?)?,
            )?)
        } else {
            None
        };
        Ok(Self {
            channels,
            matrices,
            biases,
            factors,
            quantiles,
            medians,
            tables,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Per-channel medians (`quantiles[:, 0, 1]`): symbols are coded relative to them.
    pub fn medians(&self) -> &[f32] {
        &self.medians
    }

    /// The coding tables, if built.
    pub fn tables(&self) -> Option<&CdfTables> {
        self.tables.as_ref()
    }

    /// Cumulative logits of the density at `x` (`[C, 1, n]`).
    fn logits_cumulative(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.logits_cumulative_with(x, false)
    }

    /// Cumulative logits; with `detach_params` no gradient reaches the density parameters.
    fn logits_cumulative_with(
        &self,
        x: &Tensor,
        detach_params: bool,
    ) -> candle_core::Result<Tensor> {
        let param = |t: &Tensor| if detach_params { t.detach() } else { t.clone() };
        let mut logits = x.clone();
        for i in 0..self.matrices.len() {
            let m = softplus(&param(&self.matrices[i]))?;
            logits = m.matmul(&logits)?.broadcast_add(&param(&self.biases[i]))?;
            if let Some(f) = self.factors.get(i) {
                logits = (&logits + param(f).tanh()?.broadcast_mul(&logits.tanh()?)?)?;
            }
        }
        Ok(logits)
    }

    /// Likelihoods of quantised values `z_hat` (`[B, C, H, W]`), lower-bounded at 1e-9.
    pub fn likelihood(&self, z_hat: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z_hat.dims4()?;
        let v = z_hat.permute((1, 0, 2, 3))?.reshape((c, 1, b * h * w))?;
        let lower = self.logits_cumulative(&(&v - 0.5)?)?;
        let upper = self.logits_cumulative(&(&v + 0.5)?)?;
        // Evaluate on the side of the median where the sigmoids are not saturated.
        let sign = (&lower + &upper)?.sign()?.neg()?;
        let lik = (candle_nn::ops::sigmoid(&(&sign * &upper)?)?
            - candle_nn::ops::sigmoid(&(&sign * &lower)?)?)?
        .abs()?
        .maximum(LIKELIHOOD_BOUND)?;
        Ok(lik.reshape((c, b, h, w))?.permute((1, 0, 2, 3))?)
    }

    /// Eval-mode quantisation: `round(z - median) + median` (round half to even, as PyTorch).
    pub fn quantize(&self, z: &Tensor) -> Result<Tensor> {
        let symbols = self.symbols(z)?;
        self.dequantize(&symbols, z.dims4()?)
    }

    /// `round(z − median) + median` as tensor operations on the current `quantiles` (trainable
    /// or not, any device): what [`quantize`](Self::quantize) gives, up to exact ties, for a
    /// training graph whose quantiles may have moved since construction.
    pub fn round_to_medians(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = z.dims4()?;
        self.check_channels(c)?;
        let med = self
            .quantiles
            .narrow(2, 1, 1)?
            .reshape((1, c, 1, 1))?
            .to_dtype(z.dtype())?;
        Ok(z.broadcast_sub(&med)?.round()?.broadcast_add(&med)?)
    }

    /// The integer symbols `round(z - median)` in NCHW order.
    pub fn symbols(&self, z: &Tensor) -> Result<Vec<i32>> {
        let (_, c, h, w) = z.dims4()?;
        self.check_channels(c)?;
        let vals = tensor_to_f32(z)?;
        let plane = h * w;
        Ok(vals
            .iter()
            .enumerate()
            .map(|(i, &v)| round_symbol(v - self.medians[(i / plane) % c]))
            .collect())
    }

    /// Latent values from symbols: `symbol + median`.
    pub fn dequantize(
        &self,
        symbols: &[i32],
        shape: (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let (b, c, h, w) = shape;
        self.check_channels(c)?;
        let plane = h * w;
        let vals: Vec<f32> = symbols
            .iter()
            .enumerate()
            .map(|(i, &s)| s as f32 + self.medians[(i / plane) % c])
            .collect();
        Ok(Tensor::from_vec(
            vals,
            (b, c, h, w),
            self.quantiles.device(),
        )?)
    }

    fn check_channels(&self, c: usize) -> Result<()> {
        if c != self.channels {
            return Err(Error::InvalidArgument(format!(
                "hyper-latent has {c} channels, the entropy bottleneck {}",
                self.channels
            )));
        }
        Ok(())
    }

    fn tables_or_err(&self) -> Result<&CdfTables> {
        self.tables.as_ref().ok_or_else(|| {
            Error::Model("entropy bottleneck has no CDF tables: call update() first".into())
        })
    }

    /// Entropy-codes `z` (one string per batch item); returns the strings and the symbols.
    pub fn compress(&self, z: &Tensor, coder: &dyn EntropyCoder) -> Result<Vec<Vec<u8>>> {
        let (b, c, h, w) = z.dims4()?;
        let symbols = self.symbols(z)?;
        let per_item = c * h * w;
        let indexes = channel_indexes(c, h * w);
        let tables = self.tables_or_err()?;
        (0..b)
            .map(|i| {
                coder.encode_with_indexes(
                    &symbols[i * per_item..(i + 1) * per_item],
                    &indexes,
                    tables,
                )
            })
            .collect()
    }

    /// Decodes strings made by [`compress`](Self::compress) into `z_hat` of spatial size `(h, w)`.
    pub fn decompress(
        &self,
        strings: &[&[u8]],
        (h, w): (usize, usize),
        coder: &dyn EntropyCoder,
    ) -> Result<Tensor> {
        let c = self.channels;
        let indexes = channel_indexes(c, h * w);
        let tables = self.tables_or_err()?;
        let mut symbols = Vec::with_capacity(strings.len() * indexes.len());
        for s in strings {
            symbols.extend(coder.decode_with_indexes(s, &indexes, tables)?);
        }
        self.dequantize(&symbols, (strings.len(), c, h, w))
    }

    /// (Re)builds the coding tables from the learned density, as CompressAI's `update()`, and
    /// refreshes the medians: call it after training steps, before coding.
    pub fn update(&mut self) -> Result<()> {
        self.medians = tensor_to_f32(&self.quantiles.narrow(2, 1, 1)?)?;
        let q = tensor_to_f32(&self.quantiles)?;
        let c = self.channels;
        let mut pmf_start = Vec::with_capacity(c);
        let mut pmf_length = Vec::with_capacity(c);
        let mut offsets = Vec::with_capacity(c);
        for ch in 0..c {
            let (lo, med, hi) = (q[3 * ch], q[3 * ch + 1], q[3 * ch + 2]);
            let minima = (med - lo).ceil().max(0.0);
            let maxima = (hi - med).ceil().max(0.0);
            // pmf_length symbols plus the tail: at most 2^16 symbols fit a 16-bit CDF.
            if !(minima.is_finite() && maxima.is_finite()) || minima + maxima > MAX_PMF_SPAN as f32
            {
                return Err(Error::Model(format!(
                    "entropy bottleneck channel {ch} has unusable quantiles {lo}, {med}, {hi}"
                )));
            }
            offsets.push(-(minima as i32));
            pmf_start.push(med - minima);
            pmf_length.push((minima + maxima) as usize + 1);
        }
        let max_len = pmf_length.iter().copied().max().unwrap_or(1);
        let dev = self.quantiles.device();
        let samples: Vec<f32> = pmf_start
            .iter()
            .flat_map(|&s| (0..max_len).map(move |k| k as f32 + s))
            .collect();
        let samples =
            Tensor::from_vec(samples, (c, 1, max_len), dev)?.to_dtype(self.quantiles.dtype())?;
        let lower = self.logits_cumulative(&(&samples - 0.5)?)?;
        let upper = self.logits_cumulative(&(&samples + 0.5)?)?;
        let pmf =
            tensor_to_f32(&(candle_nn::ops::sigmoid(&upper)? - candle_nn::ops::sigmoid(&lower)?)?)?;
        let lower = tensor_to_f32(&lower)?;
        let upper = tensor_to_f32(&upper)?;
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        let mut cdfs = Vec::with_capacity(c);
        for ch in 0..c {
            let row = &pmf[ch * max_len..ch * max_len + pmf_length[ch]];
            let tail = sigmoid(lower[ch * max_len]) + sigmoid(-upper[ch * max_len + max_len - 1]);
            let mut prob = row.to_vec();
            prob.push(tail);
            cdfs.push(pmf_to_quantized_cdf(&prob, PRECISION)?);
        }
        self.tables = Some(CdfTables::new(cdfs, offsets)?);
        Ok(())
    }

    /// The auxiliary loss that fits `quantiles` to the tails of the density (train it with its
    /// own optimiser, as CompressAI does). Only the quantiles receive gradient.
    pub fn aux_loss(&self) -> Result<Tensor> {
        let bound = (2.0 / TAIL_MASS - 1.0).ln() as f32;
        let target = Tensor::new(&[-bound, 0.0, bound], self.quantiles.device())?
            .to_dtype(self.quantiles.dtype())?
            .reshape((1, 1, 3))?;
        let logits = self.logits_cumulative_with(&self.quantiles, true)?;
        Ok(logits
            .broadcast_sub(&target)?
            .abs()?
            .sum_all()?
            .to_dtype(DType::F32)?)
    }
}

/// Rounds half to even, like `torch.round`, and saturates to the i32 range.
pub(crate) fn round_symbol(v: f32) -> i32 {
    let r = v.round_ties_even();
    if r.is_nan() {
        0
    } else {
        r.clamp(i32::MIN as f32, i32::MAX as f32) as i32
    }
}

/// Table index of every symbol of a `[C, H, W]` hyper-latent: its channel.
fn channel_indexes(c: usize, plane: usize) -> Vec<i32> {
    (0..c as i32)
        .flat_map(|ch| std::iter::repeat_n(ch, plane))
        .collect()
}
