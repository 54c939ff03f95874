//! Adam with exactly resumable state.

use candle_core::{Device, Tensor};

use crate::Result;

/// Adam with optional global-norm gradient clipping, whose state (moments, step) can be saved
/// and restored exactly — candle's optimisers keep theirs private, which rules out exact resume.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, candle_core::Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    /// Learning rate.
    pub lr: f64,
    /// Per-variable factors on the learning rate (1 unless [`scale_lr`](Self::scale_lr) set them).
    lr_scale: Vec<f64>,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Adam {
    /// Adam (β = 0.9, 0.999; ε = 1e-8) over named variables.
    pub fn new(vars: Vec<(String, candle_core::Var)>, lr: f64) -> Result<Self> {
        let zeros = |v: &candle_core::Var| v.as_tensor().zeros_like();
        Ok(Self {
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            lr_scale: vec![1.0; vars.len()],
            vars,
            step: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// Multiplies the learning rate of the variables whose names `select` picks by `factor`
    /// (a configuration, not state: set it again after a resume).
    pub fn scale_lr(&mut self, select: impl Fn(&str) -> bool, factor: f64) {
        for ((name, _), s) in self.vars.iter().zip(&mut self.lr_scale) {
            if select(name) {
                *s = factor;
            }
        }
    }

    /// One update from `grads`; with `clip`, gradients are scaled so that their global L2 norm
    /// is at most `clip`. Returns the norm before clipping.
    pub fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        clip: Option<f64>,
    ) -> Result<f64> {
        let gs: Vec<Option<&Tensor>> = self
            .vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()))
            .collect();
        // One device-to-host copy for the norm, not one per variable.
        let mut sq: Option<Tensor> = None;
        for g in gs.iter().flatten() {
            let s = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?;
            sq = Some(match sq {
                None => s,
                Some(acc) => (acc + s)?,
            });
        }
        let norm = match sq {
            Some(s) => s.to_scalar::<f64>()?.sqrt(),
            None => 0.0,
        };
        let scale = match clip {
            Some(c) if norm > c => c / norm,
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, g) in gs.into_iter().enumerate() {
            let Some(g) = g else { continue };
            // Detached: the moments must not keep each step's autograd graph alive (that grows
            // memory without bound over a run).
            let g = (g.detach() * scale)?;
            self.m[i] = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?.detach();
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = ((m_hat / (v_hat.sqrt()? + self.eps)?)? * (self.lr * self.lr_scale[i]))?;
            let var = &self.vars[i].1;
            var.set(&(var.as_tensor().detach() - update)?)?;
        }
        Ok(norm)
    }

    /// Number of updates done.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The state as named tensors (`{prefix}.m.{var}`, `{prefix}.v.{var}`, `{prefix}.step`).
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.vars.len() + 1);
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("{prefix}.m.{name}"), self.m[i].clone()));
            out.push((format!("{prefix}.v.{name}"), self.v[i].clone()));
        }
        let step = Tensor::new(
            &[self.step as i64],
            self.m.first().map(|t| t.device()).unwrap_or(&Device::Cpu),
        )?;
        out.push((format!("{prefix}.step"), step));
        Ok(out)
    }

    /// Restores a state saved by [`state`](Self::state).
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<()> {
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .ok_or_else(|| crate::Error::Model(format!("checkpoint lacks {k}")))
        };
        for (i, (name, _)) in self.vars.iter().enumerate() {
            self.m[i] = get(format!("{prefix}.m.{name}"))?;
            self.v[i] = get(format!("{prefix}.v.{name}"))?;
        }
        self.step = get(format!("{prefix}.step"))?.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}
