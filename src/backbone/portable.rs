//! The portable hyper-synthesis: `z_hat → h_s → scales` computed the same, bit for bit, on every
//! machine, device, thread count and kernel path, so that the encoder and the decoder always
//! pick the same Gaussian table for every `y` symbol ([`EntropyPath::Portable`]).
//!
//! The float hyper-synthesis of a backbone ([`LicBackbone::hyper_synthesis`]) runs on whatever
//! kernels the device has (psic's tiled CPU convolutions, candle's, cuDNN, …); they sum in
//! different orders and so differ in the last bits. A scale that lands within those bits of a
//! table threshold then selects another table on the decoder than on the encoder, and the rest
//! of the `y` string decodes to garbage. This module fixes the arithmetic instead:
//!
//! - every value is an IEEE-754 binary64 (`f64`); inputs (`z_hat`, weights, biases) are the f32
//!   values of the model widened exactly;
//! - each output of a layer is **one sum in a fixed order**: the bias, then the terms of the
//!   kernel taps `(ky, kx)` in row-major order and, within a tap, the input channels in order;
//!   a term whose input value is zero is skipped; every product and every addition is rounded
//!   on its own (no fused multiply-add: Rust never contracts `a * b + c`);
//! - out-of-image taps (zero padding) contribute nothing; each layer's activation follows it
//!   (a ReLU `max(v, 0)`, a leaky ReLU `v > 0 ? v : v · 0.01`, or none); the final values are
//!   rounded once to f32 (round to nearest even). A mean-scale hyperprior's last layer gives
//!   the scales then the means (its channels split in two halves).
//!
//! Work is split over output rows and vectorised across output channels (independent sums),
//! never inside one sum, so the result does not depend on the thread count or the SIMD width.
//! `docs/FORMAT.md` ("The portable entropy path") is the normative description.
//!
//! [`EntropyPath::Portable`]: crate::bitstream::EntropyPath::Portable
//! [`LicBackbone::hyper_synthesis`]: super::LicBackbone::hyper_synthesis

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use crate::tensor_util::tensor_to_f32;
use crate::{Error, Result};

/// Gaussian parameters of `y` from the portable hyper-synthesis, in NCHW order.
#[derive(Debug, Clone, PartialEq)]
pub struct PortableParams {
    /// Shape `[B, C, H, W]` of `y`.
    pub shape: (usize, usize, usize, usize),
    /// Scales (standard deviations), one per element of `y`.
    pub scales: Vec<f32>,
    /// Means, one per element of `y`; `None` for zero-mean models.
    pub means: Option<Vec<f32>>,
}

/// How a [`PortableLayer`] maps its input to its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortableKind {
    /// A convolution, weight `[out, in, k, k]` (PyTorch `nn.Conv2d`).
    Conv,
    /// A transposed convolution, weight `[in, out, k, k]` (PyTorch `nn.ConvTranspose2d`), with
    /// output padding `stride - 1` (CompressAI's `deconv`: output = stride x input).
    Transposed,
}

/// The activation after a [`PortableLayer`], in f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortableActivation {
    /// `max(v, 0)` (NaN becomes 0): Ballé's hyperprior, after every layer of `h_s`.
    Relu,
    /// PyTorch's `LeakyReLU()`: `v` where `v > 0`, else `v · 0.01` (the f64 nearest 0.01, one
    /// rounding): the mean-scale hyperprior, between the layers of `h_s`.
    LeakyRelu,
    /// None: the mean-scale hyperprior's last layer (its scales and means).
    Identity,
}

/// The negative slope of [`PortableActivation::LeakyRelu`] (PyTorch's default).
pub const LEAKY_RELU_SLOPE: f64 = 0.01;

impl PortableActivation {
    /// The activation of one value.
    #[inline(always)]
    pub fn apply(self, v: f64) -> f64 {
        match self {
            PortableActivation::Relu if v > 0.0 => v,
            PortableActivation::Relu => 0.0,
            PortableActivation::LeakyRelu if v > 0.0 => v,
            PortableActivation::LeakyRelu => v * LEAKY_RELU_SLOPE,
            PortableActivation::Identity => v,
        }
    }
}

/// One layer of a portable hyper-synthesis: a square-kernel convolution or transposed
/// convolution with padding `kernel / 2`, followed by its activation (a ReLU unless
/// [`with_activation`](Self::with_activation) says otherwise).
#[derive(Debug, Clone)]
pub struct PortableLayer {
    kind: PortableKind,
    activation: PortableActivation,
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    /// `(c_in, c_out, k)`.
    dims: (usize, usize, usize),
    /// The weights as `[ky][kx][c_in][c_out]` f64 and the bias, cached for frozen weights.
    packed: Arc<OnceLock<Packed>>,
}

#[derive(Debug)]
struct Packed {
    weight: Vec<f64>,
    bias: Vec<f64>,
}

impl PortableLayer {
    /// A layer over `weight` and `bias` (any device and float dtype; their values must be the
    /// model's f32 values, which every float dtype from f32 up holds exactly). Trainable
    /// weights are re-read at every call, frozen ones once.
    pub fn new(kind: PortableKind, weight: &Tensor, bias: &Tensor, stride: usize) -> Result<Self> {
        let (a, b, k, k2) = weight.dims4()?;
        let (c_in, c_out) = match kind {
            PortableKind::Conv => (b, a),
            PortableKind::Transposed => (a, b),
        };
        if k != k2 || k == 0 || stride == 0 || bias.dims() != [c_out] {
            return Err(Error::Model(format!(
                "portable hyper-synthesis: unsupported layer, weight {:?}, bias {:?}, stride {stride}",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(Self {
            kind,
            activation: PortableActivation::Relu,
            weight: weight.clone(),
            bias: bias.clone(),
            stride,
            dims: (c_in, c_out, k),
            packed: Arc::new(OnceLock::new()),
        })
    }

    /// The same layer followed by `activation` instead of a ReLU.
    pub fn with_activation(mut self, activation: PortableActivation) -> Self {
        self.activation = activation;
        self
    }

    fn pack(&self) -> Result<Packed> {
        let (c_in, c_out, k) = self.dims;
        let w = tensor_to_f32(&self.weight)?;
        let d1 = self.weight.dims()[1];
        let mut weight = vec![0f64; w.len()];
        for (i, &v) in w.iter().enumerate() {
            // PyTorch layout: `i = ((a d1 + b) k + ky) k + kx`.
            let (a, b) = (i / (d1 * k * k), (i / (k * k)) % d1);
            let (ky, kx) = ((i / k) % k, i % k);
            let (c, o) = match self.kind {
                PortableKind::Conv => (b, a),
                PortableKind::Transposed => (a, b),
            };
            weight[((ky * k + kx) * c_in + c) * c_out + o] = f64::from(v);
        }
        let bias = tensor_to_f32(&self.bias)?
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Packed { weight, bias })
    }

    fn with_packed<R>(&self, f: impl FnOnce(&Packed) -> R) -> Result<R> {
        if self.weight.is_variable() || self.bias.is_variable() {
            return Ok(f(&self.pack()?));
        }
        if let Some(p) = self.packed.get() {
            return Ok(f(p));
        }
        let p = self.pack()?;
        Ok(f(self.packed.get_or_init(|| p)))
    }

    /// Output size for an input of `h` x `w`.
    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let (k, s, p) = (self.dims.2, self.stride, self.dims.2 / 2);
        match self.kind {
            PortableKind::Conv => (
                (h + 2 * p).saturating_sub(k) / s + 1,
                (w + 2 * p).saturating_sub(k) / s + 1,
            ),
            PortableKind::Transposed => (
                ((h - 1) * s + k + s - 1).saturating_sub(2 * p),
                ((w - 1) * s + k + s - 1).saturating_sub(2 * p),
            ),
        }
    }

    /// Runs the layer and its activation on one `[c_in, h, w]` image (f64, planar).
    fn run(&self, x: &[f64], h: usize, w: usize) -> Result<(Vec<f64>, usize, usize)> {
        let (c_in, c_out, k) = self.dims;
        if x.len() != c_in * h * w || h == 0 || w == 0 {
            return Err(Error::InvalidArgument(format!(
                "portable hyper-synthesis: input of {} values for [{c_in}, {h}, {w}]",
                x.len()
            )));
        }
        let (ho, wo) = self.out_size(h, w);
        let (s, p) = (self.stride as isize, (k / 2) as isize);
        // The input position feeding output `o` through tap `t` (`None` for none): a
        // convolution reads `o·s − p + t`; a transposed convolution is fed by `i` where
        // `i·s − p + t = o`.
        let source = |o: usize, t: usize, len: usize| -> Option<usize> {
            let i = match self.kind {
                PortableKind::Conv => o as isize * s - p + t as isize,
                PortableKind::Transposed => {
                    let v = o as isize + p - t as isize;
                    if v.rem_euclid(s) != 0 {
                        return None;
                    }
                    v.div_euclid(s)
                }
            };
            (0..len as isize).contains(&i).then_some(i as usize)
        };
        // For each kx, the (output column, input column) pairs, in increasing output column.
        let pairs: Vec<Vec<(usize, usize)>> = (0..k)
            .map(|kx| {
                (0..wo)
                    .filter_map(|ox| source(ox, kx, w).map(|ix| (ox, ix)))
                    .collect()
            })
            .collect();
        self.with_packed(|packed| {
            let mut out = vec![0f64; c_out * ho * wo];
            // Rows are independent: split them over threads; each output is summed by exactly one
            // thread, in the fixed order, so the split does not change any value.
            let threads = candle_core::utils::get_num_threads().clamp(1, ho.max(1));
            let rows_per = ho.div_ceil(threads);
            let row_job = |first: usize, chunk: &mut [Vec<f64>]| {
                let mut acc = vec![0f64; wo * c_out];
                for (i, row_out) in chunk.iter_mut().enumerate() {
                    let oy = first + i;
                    for accs in acc.chunks_exact_mut(c_out) {
                        accs.copy_from_slice(&packed.bias);
                    }
                    let rows: Vec<(usize, usize)> = (0..k)
                        .filter_map(|ky| source(oy, ky, h).map(|iy| (ky, iy)))
                        .collect();
                    let job = RowJob {
                        x,
                        weight: &packed.weight,
                        dims: (c_in, c_out, k, h, w),
                        rows: &rows,
                        pairs: &pairs,
                    };
                    job.run(&mut acc);
                    // The activation, transposed to planar order below.
                    row_out.clear();
                    row_out.extend(acc.iter().map(|&v| self.activation.apply(v)));
                }
            };
            let mut rows = vec![Vec::new(); ho];
            if threads == 1 {
                row_job(0, &mut rows);
            } else {
                std::thread::scope(|scope| {
                    for (t, chunk) in rows.chunks_mut(rows_per).enumerate() {
                        let row_job = &row_job;
                        scope.spawn(move || row_job(t * rows_per, chunk));
                    }
                });
            }
            for (oy, row) in rows.iter().enumerate() {
                for ox in 0..wo {
                    for o in 0..c_out {
                        out[(o * ho + oy) * wo + ox] = row[ox * c_out + o];
                    }
                }
            }
            (out, ho, wo)
        })
    }
}

/// The sums of one output row: `acc[ox·c_out + o] += x[c, iy, ix] · w[ky, kx, c, o]` over the
/// taps `(ky, iy)` in `rows`, `kx` in order, the input channels in order and the `(ox, ix)`
/// pairs of that `kx`; terms with a zero input are skipped. Each `acc` entry sees its terms in
/// the order of the format, whatever the instruction set: the innermost loop runs over the
/// output channels, independent sums.
struct RowJob<'a> {
    x: &'a [f64],
    weight: &'a [f64],
    /// `(c_in, c_out, k, h, w)`.
    dims: (usize, usize, usize, usize, usize),
    rows: &'a [(usize, usize)],
    pairs: &'a [Vec<(usize, usize)>],
}

impl RowJob<'_> {
    fn run(&self, acc: &mut [f64]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { self.run_avx2(acc) };
            return;
        }
        self.run_generic(acc);
    }

    /// The same code compiled for AVX2 (4 f64 lanes): separate multiplies and adds, as in the
    /// generic build (Rust never fuses them), so the values are the same.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, acc: &mut [f64]) {
        self.run_generic(acc);
    }

    #[inline(always)]
    fn run_generic(&self, acc: &mut [f64]) {
        let (c_in, c_out, k, h, w) = self.dims;
        for &(ky, iy) in self.rows {
            for (kx, pairs) in self.pairs.iter().enumerate() {
                for c in 0..c_in {
                    let wt = &self.weight[((ky * k + kx) * c_in + c) * c_out..][..c_out];
                    let xrow = &self.x[(c * h + iy) * w..][..w];
                    for &(ox, ix) in pairs {
                        let xv = xrow[ix];
                        if xv == 0.0 {
                            continue;
                        }
                        for (a, &wv) in acc[ox * c_out..][..c_out].iter_mut().zip(wt) {
                            *a += xv * wv;
                        }
                    }
                }
            }
        }
    }
}

/// A portable hyper-synthesis: layers applied in order, each followed by its activation; the
/// output of the last layer is the scales, or, [`with_means`](Self::with_means), the scales in
/// its first half of channels and the means in the second (CompressAI's `chunk(2, 1)`).
#[derive(Debug, Clone)]
pub struct PortableHyperSynthesis {
    layers: Vec<PortableLayer>,
    means: bool,
}

impl PortableHyperSynthesis {
    /// The layers of `h_s`, in order.
    pub fn new(layers: Vec<PortableLayer>) -> Result<Self> {
        if layers.is_empty() || layers.windows(2).any(|l| l[0].dims.1 != l[1].dims.0) {
            return Err(Error::Model(
                "portable hyper-synthesis: layer widths do not chain".into(),
            ));
        }
        Ok(Self {
            layers,
            means: false,
        })
    }

    /// The same layers with the last one's output split into scales (first half of its
    /// channels) and means (second half), as a mean-scale hyperprior's `h_s`. The last layer
    /// must have an even number of output channels.
    pub fn with_means(mut self) -> Result<Self> {
        let c = self.layers.last().map_or(0, |l| l.dims.1);
        if c % 2 != 0 {
            return Err(Error::Model(format!(
                "portable hyper-synthesis: {c} output channels cannot split into scales and means"
            )));
        }
        self.means = true;
        Ok(self)
    }

    /// Runs on `z_hat` `[B, N, h, w]` (any device; read back to the CPU).
    pub fn forward(&self, z_hat: &Tensor) -> Result<PortableParams> {
        let (b, c, h, w) = z_hat.dims4()?;
        if c != self.layers[0].dims.0 {
            return Err(Error::InvalidArgument(format!(
                "portable hyper-synthesis: z_hat has {c} channels, h_s expects {}",
                self.layers[0].dims.0
            )));
        }
        let z = tensor_to_f32(z_hat)?;
        let per = c * h * w;
        let c_out = self.layers.last().map_or(0, |l| l.dims.1);
        let c_y = if self.means { c_out / 2 } else { c_out };
        let mut scales = Vec::new();
        let mut means = Vec::new();
        let mut shape = (b, c_y, 0, 0);
        for i in 0..b {
            let mut x: Vec<f64> = z[i * per..(i + 1) * per]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let (mut hh, mut ww) = (h, w);
            for l in &self.layers {
                (x, hh, ww) = l.run(&x, hh, ww)?;
            }
            shape = (b, c_y, hh, ww);
            // Per item the output is `[c_out, hh, ww]`: the scales are its first `c_y` planes.
            let (s, m) = x.split_at(c_y * hh * ww);
            scales.extend(s.iter().map(|&v| v as f32));
            means.extend(m.iter().map(|&v| v as f32));
        }
        Ok(PortableParams {
            shape,
            scales,
            means: self.means.then_some(means),
        })
    }
}
