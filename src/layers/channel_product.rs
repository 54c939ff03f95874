//! A frozen 1x1 convolution on the CPU, `y [B, O, N] = W [O, C] · x [B, C, N] (+ bias)`, by
//! psic's product kernels ([`super::cpu_conv::product`]), so that a bf16 [`Kernel`] speeds up
//! a frozen network's channel products as it does the backbone's convolutions (the semantic
//! target's 1x1 convolutions while training). The weights are constants: the backward pass
//! gives the input gradient only, `dx = Wᵀ · dy`, the same op with the matrix read transposed.
//!
//! Columns are split between candle's threads; every output element is one kernel's sum over
//! the whole reduction, so the split does not change the result.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::precision::{Kernel, Precision};
use crate::tensor_util::{contiguous_f32, on_ranges};

/// `W · x (+ bias)` (or `Wᵀ · x` for the input gradient) as a candle op on `[B, C, N]` f32
/// CPU tensors.
#[derive(Debug, Clone)]
pub(crate) struct ChannelProduct {
    /// `[O, C]`, row-major.
    weight: Arc<Vec<f32>>,
    /// `[O]`, added to the forward product only.
    bias: Option<Arc<Vec<f32>>>,
    rows: usize,
    cols: usize,
    transposed: bool,
    kernel: Kernel,
}

impl ChannelProduct {
    /// The op for `weight [O, C]` and `bias [O]` (any shape of `O` values) at `precision`.
    pub(crate) fn new(weight: &Tensor, bias: &Tensor, precision: Precision) -> crate::Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let bias = bias.flatten_all()?.to_vec1::<f32>()?;
        if bias.len() != rows {
            return Err(crate::Error::Model(format!(
                "channel product: {} bias values for {rows} output channels",
                bias.len()
            )));
        }
        Ok(Self {
            weight: Arc::new(weight.flatten_all()?.to_vec1::<f32>()?),
            bias: Some(Arc::new(bias)),
            rows,
            cols,
            transposed: false,
            kernel: Kernel::new(precision),
        })
    }

    /// `self(x)` for `x [B, C, N]` (contiguous, f32, on the CPU).
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    /// (output channels, input channels) of this direction.
    fn out_in(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// The input-gradient op: the matrix read transposed, no bias.
    fn adjoint(&self) -> Self {
        Self {
            bias: None,
            transposed: !self.transposed,
            ..self.clone()
        }
    }

    /// (column, row) strides of the left operand as this direction reads `weight`.
    fn lhs_strides(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, 1)
        } else {
            (1, self.cols)
        }
    }

    /// Columns `cols` of every batch item: `dst` and `x` are whole `[B, ·, N]` buffers.
    ///
    /// # Safety
    /// `dst` must hold `b · out · n` values and `x` `b · in · n`, with `cols` inside `0..n`;
    /// no other thread may write these columns of `dst`.
    unsafe fn columns(
        &self,
        dst: *mut f32,
        x: &[f32],
        (b, n): (usize, usize),
        cols: std::ops::Range<usize>,
    ) {
        let (out, inp) = self.out_in();
        let width = cols.end - cols.start;
        assert!(cols.end <= n && x.len() == b * inp * n && self.weight.len() == out * inp);
        if width == 0 {
            return;
        }
        for i in 0..b {
            // SAFETY: batch item i's rows start at i·out·n in `dst` (b·out·n values, the
            // caller's promise) and at i·inp·n in `x` (asserted), and `cols` lies inside a row;
            // the weight holds out·inp values (asserted) read at the strides `lhs_strides`
            // gives, and only this thread writes these columns.
            let d = dst.add(i * out * n + cols.start);
            let xs = x.as_ptr().add(i * inp * n + cols.start);
            let w = self.weight.as_ptr();
            super::cpu_conv::product(
                self.kernel,
                (out, width, inp),
                d,
                n,
                false,
                w,
                self.lhs_strides(),
                xs,
                (1, n),
            );
            if let Some(bias) = &self.bias {
                for (r, &v) in bias.iter().enumerate() {
                    // SAFETY: row r < out of item i, columns `cols`: inside `dst` and this
                    // thread's alone (no other reference to them exists meanwhile).
                    std::slice::from_raw_parts_mut(d.add(r * n), width)
                        .iter_mut()
                        .for_each(|y| *y += v);
                }
            }
        }
    }
}

/// An output pointer that threads writing disjoint columns share.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: each thread writes only its own columns of the buffer (`ChannelProduct::columns`),
// and the buffer outlives the scoped threads.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl CustomOp1 for ChannelProduct {
    fn name(&self) -> &'static str {
        "psic-channel-product"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, n) = l.shape().dims3()?;
        let (out, inp) = self.out_in();
        if c != inp {
            candle_core::bail!("channel product: input has {c} channels, the weight {inp}");
        }
        let x = contiguous_f32(s, l, "channel product: input")?;
        let mut y = vec![0f32; b * out * n];
        let dst = Shared(y.as_mut_ptr());
        // Whole 64-column strips per thread (the bf16 kernel's tile width).
        on_ranges(n.div_ceil(64), |strips| {
            let cols = strips.start * 64..(strips.end * 64).min(n);
            // SAFETY: `y` holds b·out·n values and `x` b·inp·n (checked above); each thread
            // writes only its own strips' columns, disjoint from the other threads'.
            unsafe { self.columns(dst.ptr(), x, (b, n), cols) }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, out, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(self.adjoint())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .and_then(|a| a.max_all())
            .and_then(|m| m.to_scalar::<f32>())
            .unwrap()
    }

    /// The op's forward pass and input gradient against candle's matmul, in f32 and (with the
    /// emulation's operand rounding, so within bf16 tolerance) in bf16.
    #[test]
    fn matches_candle_matmul_forward_and_backward() {
        let dev = Device::Cpu;
        let (b, c, o, n) = (2, 37, 24, 150);
        let w = Tensor::from_vec(values(o * c, 1), (o, c), &dev).unwrap();
        let bias = Tensor::from_vec(values(o, 2), (1, o, 1), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::from_vec(values(b * c * n, 3), (b, c, n), &dev).unwrap())
            .unwrap();
        let dy = Tensor::from_vec(values(b * o * n, 4), (b, o, n), &dev).unwrap();
        let reference = w
            .broadcast_matmul(x.as_tensor())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let ref_dx = reference
            .mul(&dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ref_dx = ref_dx.get(x.as_tensor()).unwrap();
        for (precision, tol) in [
            (Precision::F32, 1e-5),
            (Precision::Bf16Emulated, 3e-2),
            (Precision::Bf16, 3e-2),
        ] {
            let op = ChannelProduct::new(&w, &bias, precision).unwrap();
            let y = op.forward(x.as_tensor()).unwrap();
            let dx = y.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = dx.get(x.as_tensor()).unwrap();
            for (got, want) in [(&y, &reference), (dx, ref_dx)] {
                let (err, scale) = (max_abs(&(got - want).unwrap()), max_abs(want));
                assert!(
                    err <= tol * scale,
                    "{precision}: max error {err} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn refuses_a_mismatched_input_or_bias() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(ChannelProduct::new(
            &w,
            &Tensor::zeros(5, candle_core::DType::F32, &dev).unwrap(),
            Precision::F32
        )
        .is_err());
        let op = ChannelProduct::new(
            &w,
            &Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap(),
            Precision::F32,
        )
        .unwrap();
        let x = Tensor::zeros((1, 5, 7), candle_core::DType::F32, &dev).unwrap();
        assert!(op.forward(&x).is_err());
    }
}
