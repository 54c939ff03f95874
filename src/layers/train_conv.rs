//! Training convolutions on the CPU: one custom op per layer with its backward pass written
//! out (weight, bias and, only when the input needs one, input gradients).
//!
//! Built from tensor ops, a training convolution is a graph of im2col, matmul, permute, pixel
//! shuffle and bias nodes, each a full pass over a large tensor forward and again backward
//! (candle also adds every node's gradient onto a fresh zero tensor). Here the forward pass is
//! the inference op's tiled im2col + gemm ([`Plan::run`]) with the plan rebuilt from the
//! current weights (small next to the activations), and the backward pass walks the same tiles:
//! it recomputes each tile's columns instead of keeping them (a 5x5 kernel's columns are 25
//! times its input), accumulates the weight and bias gradients per thread, and adds the input
//! gradient back with the adjoint of im2col. Transposed convolutions keep their stride-phase
//! form both ways, so no multiply is spent on the zero taps of a padded phase kernel.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::cpu_conv::{product, space_to_depth, Plan};
use crate::precision::Kernel;
use crate::tensor_util::{contiguous_f32, cpu_f32, on_ranges};

/// A trainable convolution on f32 CPU tensors: `apply_op3(x, weight, bias)`. Its products
/// (forward, weight gradient, input gradient) run by `kernel`: f32, or bf16 operands rounded
/// from the f32 weights and activations with f32 sums (the weights stay f32 masters).
#[derive(Debug, Clone, Copy)]
pub(crate) enum TrainConv {
    /// A convolution with `weight` `[O, C, k, k]`, padding `p`.
    Conv {
        stride: usize,
        padding: usize,
        kernel: Kernel,
        /// Whether the backward pass computes the weight and bias gradients.
        kernel_grads: bool,
    },
    /// A transposed convolution with `weight` `[C, O, k, k]` whose output is `stride` times its
    /// input (CompressAI's `deconv`).
    Transposed {
        stride: usize,
        padding: usize,
        kernel: Kernel,
        /// As for `Conv`.
        kernel_grads: bool,
    },
}

impl TrainConv {
    fn plan(&self, w: &[f32], dims: &[usize], bias: Vec<f32>) -> candle_core::Result<Plan> {
        let &[a, b, k, k2] = dims else {
            candle_core::bail!("train conv: kernel must be 4-D, got {dims:?}");
        };
        if k != k2
            || bias.len()
                != if matches!(self, Self::Conv { .. }) {
                    a
                } else {
                    b
                }
        {
            candle_core::bail!(
                "train conv: kernel {dims:?} and bias of {} disagree",
                bias.len()
            );
        }
        Ok(match *self {
            Self::Conv {
                stride,
                padding,
                kernel,
                ..
            } => Plan::conv(w, (a, b, k), bias, stride, padding).with_kernel(kernel),
            Self::Transposed {
                stride,
                padding,
                kernel,
                ..
            } => Plan::transposed(w, (a, b, k), bias, stride, padding).with_kernel(kernel),
        })
    }
}

impl TrainConv {
    /// Whether the backward pass computes the kernel and bias gradients.
    fn kernel_grads(&self) -> bool {
        match *self {
            Self::Conv { kernel_grads, .. } | Self::Transposed { kernel_grads, .. } => kernel_grads,
        }
    }

    /// The layer whose forward pass is this one's input gradient: a strided convolution's
    /// adjoint is the transposed convolution with the same kernel, and the reverse.
    fn adjoint(&self, w: &[f32], dims: &[usize]) -> candle_core::Result<Plan> {
        let &[a, b, k, _] = dims else {
            candle_core::bail!("train conv: kernel must be 4-D, got {dims:?}");
        };
        Ok(match *self {
            // [O, C, k, k] read as a transposed kernel from O to C channels.
            Self::Conv {
                stride,
                padding,
                kernel,
                ..
            } => Plan::transposed(w, (a, b, k), vec![0.0; b], stride, padding).with_kernel(kernel),
            // [C, O, k, k] read as a convolution kernel from O to C channels.
            Self::Transposed {
                stride,
                padding,
                kernel,
                ..
            } => Plan::conv(w, (a, b, k), vec![0.0; a], stride, padding).with_kernel(kernel),
        })
    }
}

impl CustomOp3 for TrainConv {
    fn name(&self) -> &'static str {
        "psic-train-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "conv input")?;
        let w = contiguous_f32(ws, wl, "conv kernel")?;
        let bias = contiguous_f32(bs, bl, "conv bias")?.to_vec();
        let plan = self.plan(w, wl.dims(), bias)?;
        let (b, c, h, wd) = xl.shape().dims4()?;
        if c != plan.c_in {
            candle_core::bail!(
                "train conv: input has {c} channels, kernel expects {}",
                plan.c_in
            );
        }
        let (out, ho, wo) = plan.run(x, (b, h, wd), None);
        Ok((CpuStorage::F32(out), Shape::from((b, plan.c_out, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The image fed to the first layer carries no gradient: skip its (largest) input gradient.
        let need_dx = x.track_op();
        let (x, grad, w) = (x.contiguous()?, grad.contiguous()?, w.contiguous()?);
        let (b, c, h, wd) = x.dims4()?;
        let (plan, adjoint) = {
            let (ws, wl) = w.storage_and_layout();
            let wv = cpu_f32(&ws, wl, "conv kernel")?;
            let plan = self.plan(wv, wl.dims(), vec![0.0; bias.elem_count()])?;
            let adjoint = need_dx.then(|| self.adjoint(wv, wl.dims())).transpose()?;
            (plan, adjoint)
        };
        let (gs, gl) = grad.storage_and_layout();
        let dy = cpu_f32(&gs, gl, "conv output gradient")?;
        let dw_db = self.kernel_grads().then(|| {
            let (xs, xl) = x.storage_and_layout();
            cpu_f32(&xs, xl, "conv input").map(|x| weight_gradients(&plan, x, (b, h, wd), dy))
        });
        let dw_db = dw_db.transpose()?;
        let dev = x.device();
        // The input gradient is the adjoint layer applied to the output gradient; its output
        // can be one row or column larger than an odd-sized input: those are dropped.
        let dx = match adjoint {
            Some(adjoint) => {
                let (gb, _, gh, gw) = grad.dims4()?;
                let (v, ah, aw) = adjoint.run(dy, (gb, gh, gw), None);
                let dx = Tensor::from_vec(v, (b, c, ah, aw), dev)?;
                Some(if (ah, aw) == (h, wd) {
                    dx
                } else {
                    dx.narrow(2, 0, h)?.narrow(3, 0, wd)?.contiguous()?
                })
            }
            None => None,
        };
        let (dw, db) = match dw_db {
            Some((dw, db)) => (
                Some(Tensor::from_vec(dw, w.dims(), dev)?),
                Some(Tensor::from_vec(db, bias.dims(), dev)?),
            ),
            None => (None, None),
        };
        Ok((dx, dw, db))
    }
}

/// Output columns per tile of the weight-gradient products (their inner dimension): larger
/// than the forward pass's tiles, so the `[O, C·taps]` accumulator is read and written fewer
/// times.
const TILE_COLUMNS: usize = 4096;

/// Kernel gradient (in the source layout) and bias gradient of `plan` at input `x`
/// `[b, C, h, w]`, given the output gradient `dy`.
fn weight_gradients(
    plan: &Plan,
    x: &[f32],
    (b, h, w): (usize, usize, usize),
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (s, u, o, c) = (plan.stride, plan.up, plan.c_out, plan.c_in);
    let (ho, wo) = plan.grid(h, w);
    let (h_out, w_out) = (ho * u, wo * u);
    let plane_out = h_out * w_out;
    let mut dw = vec![0f32; o * c * plan.kernel_area];
    let mut db = vec![0f32; o];
    if ho == 0 || wo == 0 || b == 0 {
        return (dw, db);
    }
    let rows = (TILE_COLUMNS / wo).clamp(1, ho);
    let tiles = ho.div_ceil(rows);
    // Stride phases of the input, as the forward pass reads it.
    let (xs_buf, hs, ws) = if s > 1 {
        space_to_depth(x, b * c, (h, w), s)
    } else {
        (Vec::new(), h, w)
    };
    let xs: &[f32] = if s > 1 { &xs_buf } else { x };
    let plane_in = c * s * s * hs * ws;
    let direct = u == 1 && plan.phases.len() == 1;
    let max_k = c * plan.phases.iter().map(|p| p.taps.len()).max().unwrap_or(0);
    let n_max = rows * wo;
    // Each thread sums a fixed run of images, and the runs are added in order: the same
    // gradient bits on every run (resumed training retraces the uninterrupted one).
    let worker = |images: std::ops::Range<usize>| {
        let mut cols = vec![0f32; max_k * n_max];
        let mut dyp = vec![0f32; if direct { 0 } else { o * n_max }];
        let mut gw: Vec<Vec<f32>> = plan
            .phases
            .iter()
            .map(|p| vec![0f32; o * c * p.taps.len()])
            .collect();
        let mut gb = vec![0f32; o];
        for bi in images {
            let xb = &xs[bi * plane_in..][..plane_in];
            let dyb = &dy[bi * o * plane_out..][..o * plane_out];
            for (phase, gw) in plan.phases.iter().zip(&mut gw) {
                let k = c * phase.taps.len();
                for ti in 0..tiles {
                    let (oy0, oy1) = (ti * rows, ((ti + 1) * rows).min(ho));
                    let n = (oy1 - oy0) * wo;
                    plan.fill_cols(xb, (hs, ws), &phase.taps, (oy0, oy1), wo, &mut cols);
                    // The tile's output gradient [O, n], row stride rs: read in place for a
                    // plain convolution, gathered from its phase's pixels otherwise.
                    let (g, rs): (&[f32], usize) = if direct {
                        (&dyb[oy0 * wo..], plane_out)
                    } else {
                        let (ry, rx) = phase.at;
                        for oc in 0..o {
                            for (i, oy) in (oy0..oy1).enumerate() {
                                let src = &dyb[oc * plane_out + (oy * u + ry) * w_out + rx..];
                                for (ox, d) in dyp[oc * n + i * wo..][..wo].iter_mut().enumerate() {
                                    *d = src[ox * u];
                                }
                            }
                        }
                        (&dyp, n)
                    };
                    for (oc, gb) in gb.iter_mut().enumerate() {
                        *gb += g[oc * rs..][..n].iter().sum::<f32>();
                    }
                    // dW [O, k] += g [O, n] · colsᵀ [n, k].
                    // SAFETY: `gw` is [O, k]; `g` holds O rows of n floats rs apart (the slicing
                    // above checked the extent); `cols` holds k rows of n floats.
                    unsafe {
                        product(
                            plan.kernel,
                            (o, k, n),
                            gw.as_mut_ptr(),
                            k,
                            true,
                            g.as_ptr(),
                            (1, rs),
                            cols.as_ptr(),
                            (n, 1),
                        );
                    }
                }
            }
        }
        (gw, gb)
    };
    let parts = on_ranges(b, worker);
    let kk = plan.kernel_area;
    for (gw, gb) in parts {
        for (d, g) in db.iter_mut().zip(gb) {
            *d += g;
        }
        for (phase, gw) in plan.phases.iter().zip(gw) {
            let nt = phase.taps.len();
            for oc in 0..o {
                for ci in 0..c {
                    let base = if plan.transposed {
                        (ci * o + oc) * kk
                    } else {
                        (oc * c + ci) * kk
                    };
                    for (t, &kt) in phase.kernel.iter().enumerate() {
                        dw[base + kt] += gw[(oc * nt + t) * c + ci];
                    }
                }
            }
        }
    }
    (dw, db)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor, Var};

    use crate::layers::conv::tests::max_diff;
    use crate::layers::{Conv2d, ConvTranspose2d};
    use crate::Precision;

    fn scale(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Bounds of [`check_with`]: forward and gradients against the reference within
    /// `rel · max(1, max |reference|)`; central differences with step `eps` within
    /// `fd_rel · max(1, |numeric|)`.
    struct Tolerance {
        /// Whether the op must differ from the reference (bf16 really taken).
        differs: bool,
        rel: f32,
        eps: f32,
        fd_rel: f32,
        /// Central differences may also be off by this share of the largest gradient entry.
        fd_abs: f32,
    }

    /// f32 against f32: the op and the reference differ only in summation order.
    const F32: Tolerance = Tolerance {
        differs: false,
        rel: 1e-4,
        eps: 1e-2,
        fd_rel: 2e-2,
        fd_abs: 0.0,
    };

    /// bf16 against f32: each operand is rounded to 8 significant bits (relative error up to
    /// 2^-9), so sums of a few hundred terms of mixed signs stay within about 1% of the
    /// largest value. The rounded forward pass is piecewise constant in each entry, but the op
    /// is linear in the input and in the kernel, so central differences are exact for any step
    /// in exact arithmetic: a step of 1 makes the rounding of the perturbed entry (at most
    /// 2^-8 of it) small next to the step. The op's gradient is taken with the output
    /// gradient rounded to bf16 too, which the differences of the f32 loss do not see: an
    /// entry is a sum of terms each off by up to 2^-8, so it may be off by about 1% of the
    /// largest entry, not only of itself.
    const BF16: Tolerance = Tolerance {
        differs: true,
        rel: 2e-2,
        eps: 1.0,
        fd_rel: 3e-2,
        fd_abs: 1e-2,
    };

    fn check(
        forward: &dyn Fn(&Tensor) -> Tensor,
        reference: &dyn Fn(&Tensor) -> Tensor,
        x: &Var,
        params: [&Var; 2],
        what: &str,
    ) {
        check_with(forward, reference, x, params, what, &F32)
    }

    /// The loss `Σ y · r` of `forward`, its gradients for `x`, `weight` and `bias` by
    /// `reference` and by the op, compared; then central differences of the op's loss at a few
    /// entries of the input and the kernel.
    fn check_with(
        forward: &dyn Fn(&Tensor) -> Tensor,
        reference: &dyn Fn(&Tensor) -> Tensor,
        x: &Var,
        params: [&Var; 2],
        what: &str,
        tol: &Tolerance,
    ) {
        let y = forward(x.as_tensor());
        let y_ref = reference(x.as_tensor());
        assert_eq!(y.dims(), y_ref.dims(), "{what}");
        let d = max_diff(&y, &y_ref);
        assert!(
            d < tol.rel * scale(&y_ref).max(1.0),
            "{what}: forward off by {d}"
        );
        assert!(
            d > 0.0 || !tol.differs,
            "{what}: forward identical to the reference"
        );
        let r = Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu).unwrap();
        let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap();
        let g = loss(&y).backward().unwrap();
        let g_ref = loss(&y_ref).backward().unwrap();
        for (t, name) in [
            (x.as_tensor(), "input"),
            (params[0].as_tensor(), "kernel"),
            (params[1].as_tensor(), "bias"),
        ] {
            let (a, b) = (g.get(t).unwrap(), g_ref.get(t).unwrap());
            assert_eq!(a.dims(), b.dims(), "{what}: {name} gradient shape");
            let d = max_diff(a, b);
            assert!(
                d < tol.rel * scale(b).max(1.0),
                "{what}: {name} gradient off by {d}"
            );
        }
        // Central differences (f32: a large step, a loose bound).
        for (v, name) in [(x, "input"), (params[0], "kernel")] {
            let grad: Vec<f32> = g
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let largest = grad.iter().fold(0f32, |m, g| m.max(g.abs()));
            for idx in [0, base.len() / 3, base.len() - 1] {
                let at = |delta: f32| {
                    let mut p = base.clone();
                    p[idx] += delta;
                    v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    let l = loss(&forward(x.as_tensor())).to_scalar::<f32>().unwrap();
                    v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    l
                };
                let eps = tol.eps;
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (numeric - grad[idx]).abs()
                        < tol.fd_rel * numeric.abs().max(1.0) + tol.fd_abs * largest,
                    "{what}: {name}[{idx}] analytic {} vs numeric {numeric}",
                    grad[idx]
                );
            }
        }
    }

    fn var(dims: &[usize], std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, std, dims, &Device::Cpu).unwrap()).unwrap()
    }

    fn param(varmap: &candle_nn::VarMap, name: &str) -> Var {
        varmap.data().lock().unwrap().get(name).unwrap().clone()
    }

    #[test]
    fn convolution_gradients_equal_the_tensor_op_path() {
        // Odd sizes, a single image and more images than threads; 1x1 and 3x3 kernels. The
        // reference is im2col + matmul as tensor ops (candle's own conv2d backward mis-sizes the
        // input gradient of odd inputs).
        for &(k, s, c_in, c_out, b, h, w) in &[
            (5, 2, 3, 4, 3, 13, 11),
            (5, 2, 4, 5, 1, 8, 10),
            (3, 1, 4, 3, 2, 9, 7),
            (1, 1, 3, 2, 2, 5, 6),
            (3, 2, 3, 4, 2, 7, 8),
        ] {
            let varmap = candle_nn::VarMap::new();
            let vb = crate::init::seeded_var_builder(&varmap, 11, DType::F32, &Device::Cpu);
            let conv = Conv2d::new(vb, c_in, c_out, k, s).unwrap();
            let (wt, bias) = (param(&varmap, "weight"), param(&varmap, "bias"));
            let reference = |x: &Tensor| {
                super::super::conv::conv2d_gemm(x, wt.as_tensor(), k / 2, s)
                    .unwrap()
                    .broadcast_add(&bias.as_tensor().reshape((1, c_out, 1, 1)).unwrap())
                    .unwrap()
            };
            let x = var(&[b, c_in, h, w], 1.0);
            check(
                &|x| conv.forward(x).unwrap(),
                &reference,
                &x,
                [&wt, &bias],
                &format!("conv k{k} s{s} {b}x{c_in}x{h}x{w}"),
            );
        }
    }

    #[test]
    fn transposed_convolution_gradients_equal_candle() {
        for &(k, s, c_in, c_out, b, h, w) in &[
            (5, 2, 4, 3, 3, 7, 9),
            (5, 2, 3, 5, 1, 6, 6),
            (3, 2, 4, 3, 2, 5, 4),
            (3, 1, 3, 4, 2, 6, 5),
        ] {
            let varmap = candle_nn::VarMap::new();
            let vb = crate::init::seeded_var_builder(&varmap, 12, DType::F32, &Device::Cpu);
            let deconv = ConvTranspose2d::new(vb, c_in, c_out, k, s).unwrap();
            let (wt, bias) = (param(&varmap, "weight"), param(&varmap, "bias"));
            let x = var(&[b, c_in, h, w], 1.0);
            check(
                &|x| deconv.forward(x).unwrap(),
                &|x| deconv.forward_reference(x).unwrap(),
                &x,
                [&wt, &bias],
                &format!("deconv k{k} s{s} {b}x{c_in}x{h}x{w}"),
            );
        }
    }

    /// A frozen kernel ([`ConvTranspose2d::freeze_kernel`]): the same output and input gradient,
    /// and no kernel or bias gradient.
    #[test]
    fn frozen_kernels_pass_the_input_gradient_and_skip_their_own() {
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 13, DType::F32, &Device::Cpu);
        let mut deconv = ConvTranspose2d::new(vb, 4, 3, 5, 2).unwrap();
        let (wt, bias) = (param(&varmap, "weight"), param(&varmap, "bias"));
        let x = var(&[2, 4, 5, 6], 1.0);
        let grads = |deconv: &ConvTranspose2d| {
            let y = deconv.forward(x.as_tensor()).unwrap();
            let loss = (&y * &y).unwrap().sum_all().unwrap();
            (y, loss.backward().unwrap())
        };
        let (y, trained) = grads(&deconv);
        deconv.freeze_kernel();
        let (y_frozen, frozen) = grads(&deconv);
        assert_eq!(max_diff(&y, &y_frozen), 0.0);
        let dx = |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).unwrap().clone();
        assert_eq!(max_diff(&dx(&trained), &dx(&frozen)), 0.0);
        assert!(trained.get(wt.as_tensor()).is_some() && trained.get(bias.as_tensor()).is_some());
        assert!(frozen.get(wt.as_tensor()).is_none() && frozen.get(bias.as_tensor()).is_none());
    }

    /// The bf16 kernels this CPU runs: the emulation always, AVX512-BF16 where present.
    fn bf16_precisions() -> Vec<Precision> {
        let mut out = vec![Precision::Bf16Emulated];
        if Precision::bf16_supported() {
            out.push(Precision::Bf16);
        } else {
            eprintln!("AVX512-BF16 kernel not tested: this CPU has no AVX512-BF16");
        }
        out
    }

    #[test]
    fn bf16_convolution_gradients_follow_f32() {
        // At least 16 output and input channels, so the forward product, the weight gradient
        // and the input gradient (the adjoint's forward) all take the bf16 kernel; odd
        // reduction sizes (17 channels x 25 taps), odd pixel counts and tile edges.
        for p in bf16_precisions() {
            for &(k, s, c_in, c_out, b, h, w) in &[
                (5, 2, 17, 19, 2, 13, 11),
                (3, 1, 16, 21, 1, 9, 7),
                (5, 2, 3, 20, 3, 8, 10),
            ] {
                let varmap = candle_nn::VarMap::new();
                let vb = crate::init::seeded_var_builder(&varmap, 14, DType::F32, &Device::Cpu);
                let conv = Conv2d::new(vb, c_in, c_out, k, s).unwrap();
                let mut low = conv.clone();
                low.set_precision(p).unwrap();
                assert_eq!(low.precision(), p);
                let (wt, bias) = (param(&varmap, "weight"), param(&varmap, "bias"));
                let x = var(&[b, c_in, h, w], 1.0);
                check_with(
                    &|x| low.forward(x).unwrap(),
                    &|x| conv.forward(x).unwrap(),
                    &x,
                    [&wt, &bias],
                    &format!("{p} conv k{k} s{s} {b}x{c_in}x{h}x{w} -> {c_out}"),
                    &BF16,
                );
            }
        }
    }

    #[test]
    fn bf16_transposed_convolution_gradients_follow_f32() {
        for p in bf16_precisions() {
            // 24 -> 3: the forward and weight products (3 rows) stay f32, the input gradient
            // (24 rows) is bf16.
            for &(k, s, c_in, c_out, b, h, w) in &[(5, 2, 19, 17, 2, 7, 9), (5, 2, 24, 3, 1, 6, 5)]
            {
                let varmap = candle_nn::VarMap::new();
                let vb = crate::init::seeded_var_builder(&varmap, 15, DType::F32, &Device::Cpu);
                let deconv = ConvTranspose2d::new(vb, c_in, c_out, k, s).unwrap();
                let mut low = deconv.clone();
                low.set_precision(p).unwrap();
                let (wt, bias) = (param(&varmap, "weight"), param(&varmap, "bias"));
                let x = var(&[b, c_in, h, w], 1.0);
                check_with(
                    &|x| low.forward(x).unwrap(),
                    &|x| deconv.forward(x).unwrap(),
                    &x,
                    [&wt, &bias],
                    &format!("{p} deconv k{k} s{s} {b}x{c_in}x{h}x{w} -> {c_out}"),
                    &Tolerance {
                        differs: c_out >= 16,
                        ..BF16
                    },
                );
            }
        }
    }

    #[test]
    fn gradients_repeat_bit_for_bit() {
        // Resumed training must retrace the uninterrupted run, so the per-thread partial sums
        // of the kernel, bias and GDN gradients must be added in the same order on every call.
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 13, DType::F32, &Device::Cpu);
        let conv = Conv2d::new(vb.pp("conv"), 3, 8, 5, 2).unwrap();
        let gdn = crate::layers::Gdn::new(vb.pp("gdn"), 8, false).unwrap();
        let x = Tensor::randn(0f32, 1.0, (12, 3, 24, 20), &Device::Cpu).unwrap();
        let r = Tensor::randn(0f32, 1.0, (12, 8, 12, 10), &Device::Cpu).unwrap();
        let vars = varmap.all_vars();
        let grads = || -> Vec<Vec<u32>> {
            let y = gdn.forward(&conv.forward(&x).unwrap()).unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            vars.iter()
                .map(|v| {
                    let t = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|f| f.to_bits())
                        .collect()
                })
                .collect()
        };
        let first = grads();
        for _ in 0..20 {
            assert!(grads() == first, "gradients differ between identical calls");
        }
    }
}
