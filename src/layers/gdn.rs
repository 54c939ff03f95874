//! Generalized divisive normalization (Ballé et al.), with CompressAI's parametrisation.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::cpu_conv::CpuGdn;
use super::gdn_op::GdnOp;
use crate::Result;
use std::sync::Arc;

/// CompressAI's reparametrisation offset: `2^-18`.
const REPARAM_OFFSET: f64 = 1.0 / 262_144.0;
/// CompressAI's `beta_min`.
const BETA_MIN: f64 = 1e-6;
/// CompressAI's initial `gamma` diagonal.
const GAMMA_INIT: f64 = 0.1;

/// GDN (`y = x / sqrt(beta + gamma · x²)`) or, with `inverse`, IGDN (`y = x * sqrt(...)`).
///
/// The stored `beta` `[C]` and `gamma` `[C, C]` are CompressAI's non-negative reparametrisation:
/// the value used is `max(p, bound)² − pedestal`, with `pedestal = 2^-36`, `beta`'s bound
/// `sqrt(1e-6 + pedestal)` and `gamma`'s bound `2^-18`, so CompressAI checkpoints load unchanged.
/// The `gamma · x²` term is a 1x1 convolution, computed as a channel matmul (cheaper than
/// candle's generic convolution for 1x1 kernels).
#[derive(Debug, Clone)]
pub struct Gdn {
    /// Stored (reparametrised) parameters; trainable variables when built from a `VarMap`.
    beta_p: Tensor,
    gamma_p: Tensor,
    /// Effective `(beta, gamma)`, cached for frozen weights; recomputed each forward when
    /// training, so optimiser updates of the stored parameters take effect.
    cached: Option<(Tensor, Tensor)>,
    inverse: bool,
    /// The effective parameters as plain vectors, for the fused CPU convolution epilogue.
    cpu: Option<Arc<CpuGdn>>,
}

fn reparametrise(p: &Tensor, bound: f64, pedestal: f64) -> candle_core::Result<Tensor> {
    // max() passes the gradient through where p > bound, which is what training needs.
    p.maximum(bound)?.sqr()? - pedestal
}

impl Gdn {
    /// Loads (or creates, initialised as CompressAI does) a GDN layer over `channels` channels.
    pub fn new(vb: VarBuilder, channels: usize, inverse: bool) -> Result<Self> {
        let pedestal = REPARAM_OFFSET * REPARAM_OFFSET;
        let beta_p = vb.get_with_hints(channels, "beta", Init::Const((1.0 + pedestal).sqrt()))?;
        let gamma_p = if vb.contains_tensor("gamma") {
            vb.get((channels, channels), "gamma")?
        } else {
            // CompressAI initialises gamma to sqrt(0.1 * I + pedestal); VarBuilder has no identity
            // init, so create the variable with the off-diagonal value and set the diagonal.
            let off = pedestal.sqrt();
            let var = vb.get_with_hints((channels, channels), "gamma", Init::Const(off))?;
            let diag = (GAMMA_INIT + pedestal).sqrt() - off;
            let eye = Tensor::eye(channels, var.dtype(), var.device())?;
            let init = (&var + (eye * diag)?)?;
            set_var_value(&vb, "gamma", &init)?;
            vb.get((channels, channels), "gamma")?
        };
        let mut gdn = Self {
            beta_p,
            gamma_p,
            cached: None,
            inverse,
            cpu: None,
        };
        if !gdn.beta_p.is_variable() && !gdn.gamma_p.is_variable() {
            let (beta, gamma) = gdn.effective()?;
            if beta.device().is_cpu() {
                gdn.cpu = Some(Arc::new(CpuGdn::new(&beta, &gamma, inverse)?));
            }
            gdn.cached = Some((beta, gamma));
        }
        Ok(gdn)
    }

    /// The fused-epilogue form (frozen CPU layers only).
    pub(crate) fn cpu(&self) -> Option<&CpuGdn> {
        self.cpu.as_deref()
    }

    /// The effective `(beta, gamma)` from the stored parameters.
    fn effective(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let pedestal = REPARAM_OFFSET * REPARAM_OFFSET;
        let beta_bound = (BETA_MIN + pedestal).sqrt();
        Ok((
            reparametrise(&self.beta_p, beta_bound, pedestal)?,
            reparametrise(&self.gamma_p, REPARAM_OFFSET, pedestal)?,
        ))
    }
}

/// Overwrites a freshly created variable of a `VarMap`-backed builder (used for custom inits).
fn set_var_value(vb: &VarBuilder, name: &str, value: &Tensor) -> Result<()> {
    let t = vb.get(value.dims(), name)?;
    // Tensors from a VarMap-backed builder are `Var`s sharing storage with the map.
    if t.is_variable() {
        candle_core::Var::from_tensor(&t)?.set(value)?;
    }
    Ok(())
}

impl Module for Gdn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (beta, gamma) = match &self.cached {
            Some(c) => c.clone(),
            None => self.effective()?,
        };
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
        if f32_cpu(x) && f32_cpu(&beta) && f32_cpu(&gamma) && x.rank() == 4 {
            let op = GdnOp {
                inverse: self.inverse,
            };
            return x
                .contiguous()?
                .apply_op3(&beta.contiguous()?, &gamma.contiguous()?, op);
        }
        self.forward_reference(x, &beta, &gamma)
    }
}

impl Gdn {
    /// The layer as tensor ops (any device; the CPU takes the fused [`GdnOp`]).
    fn forward_reference(
        &self,
        x: &Tensor,
        beta: &Tensor,
        gamma: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let x2 = x.sqr()?.reshape((b, c, h * w))?;
        let norm = gamma
            .broadcast_matmul(&x2)?
            .broadcast_add(&beta.reshape((c, 1))?)?
            .sqrt()?
            .reshape((b, c, h, w))?;
        if self.inverse {
            x * norm
        } else {
            x / norm
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn trainable_gdn_follows_parameter_updates() {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 3, DType::F32, &dev);
        let gdn = Gdn::new(vb, 4, false).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 4, 3, 3), &dev).unwrap();
        let before = gdn.forward(&x).unwrap();
        // The gradient reaches the stored parameters...
        let grads = before.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&gdn.beta_p).is_some() && grads.get(&gdn.gamma_p).is_some());
        // ...and an update of them changes the output.
        let beta = candle_core::Var::from_tensor(&gdn.beta_p).unwrap();
        beta.set(&(beta.as_tensor() * 2.0).unwrap()).unwrap();
        let after = gdn.forward(&x).unwrap();
        let diff = (after - before).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 1e-3);
    }

    #[test]
    fn fused_op_equals_tensor_ops_and_finite_differences() {
        // Several tiles per image (23x29 pixels), a partial last tile, more images than
        // threads, non-trivial gamma; forward and every gradient against the tensor-op form.
        let dev = Device::Cpu;
        for inverse in [false, true] {
            let varmap = candle_nn::VarMap::new();
            let vb = crate::init::seeded_var_builder(&varmap, 4, DType::F32, &dev);
            let gdn = Gdn::new(vb, 5, inverse).unwrap();
            for (name, v) in varmap.data().lock().unwrap().iter() {
                let r = Tensor::rand(0.2f32, 1.0, v.dims(), &dev).unwrap();
                v.set(&r).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            let x = candle_core::Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (3, 5, 23, 29), &dev).unwrap(),
            )
            .unwrap();
            let r = Tensor::randn(0f32, 1.0, (3, 5, 23, 29), &dev).unwrap();
            let loss = |y: Tensor| (y * &r).unwrap().sum_all().unwrap();
            let reference = |x: &Tensor| {
                let (beta, gamma) = gdn.effective().unwrap();
                gdn.forward_reference(x, &beta, &gamma).unwrap()
            };
            let (a, b) = (gdn.forward(&x).unwrap(), reference(&x));
            let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                d.to_scalar::<f32>().unwrap() < 1e-5,
                "inverse {inverse}: forward"
            );
            let g = loss(a).backward().unwrap();
            let g_ref = loss(b).backward().unwrap();
            for (t, what) in [
                (x.as_tensor(), "x"),
                (&gdn.beta_p, "beta"),
                (&gdn.gamma_p, "gamma"),
            ] {
                let (a, b) = (g.get(t).unwrap(), g_ref.get(t).unwrap());
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let s = b.abs().unwrap().max_all().unwrap();
                let (d, s) = (d.to_scalar::<f32>().unwrap(), s.to_scalar::<f32>().unwrap());
                assert!(
                    d < 1e-4 * s.max(1.0),
                    "inverse {inverse}: {what} gradient off by {d}"
                );
            }
            // Central differences on gamma's stored parameter.
            let gamma = candle_core::Var::from_tensor(&gdn.gamma_p).unwrap();
            let base: Vec<f32> = gamma.flatten_all().unwrap().to_vec1().unwrap();
            let analytic: Vec<f32> = g
                .get(&gdn.gamma_p)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for idx in [0, 7, 24] {
                let at = |delta: f32| {
                    let mut p = base.clone();
                    p[idx] += delta;
                    gamma
                        .set(&Tensor::from_vec(p, (5, 5), &dev).unwrap())
                        .unwrap();
                    let l = loss(gdn.forward(&x).unwrap()).to_scalar::<f32>().unwrap();
                    gamma
                        .set(&Tensor::from_vec(base.clone(), (5, 5), &dev).unwrap())
                        .unwrap();
                    l
                };
                let numeric = (at(1e-2) - at(-1e-2)) / 2e-2;
                assert!(
                    (numeric - analytic[idx]).abs() < 2e-2 * numeric.abs().max(1.0),
                    "inverse {inverse}: gamma[{idx}] analytic {} vs numeric {numeric}",
                    analytic[idx]
                );
            }
        }
    }
}
