//! Adaptive multi-objective weighting: balance several loss terms by their current size.
//!
//! PSIC's stage 2 weights each shielding term by its inverse share,
//! `w_i = (1/L_i) / Σ_j (1/L_j)`, so a term that is already small gets more weight and no term
//! dominates just by its scale. The reference computes the weights from the loss tensors
//! themselves (so gradients flow through them) and divides by losses that can be negative. Here
//! the weights are plain numbers computed from the terms' values (detached by construction),
//! losses must be non-negative (a value below `floor` counts as `floor`), and an absent term
//! (an empty sub-batch) gets weight 0 while the others are renormalised.

use candle_core::Tensor;

use crate::{Error, Result};

/// Inverse-loss weighting of several non-negative loss terms, optionally smoothed over steps.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveWeighting {
    /// Smallest loss value used in `1/L` (keeps weights finite when a term reaches 0).
    pub floor: f64,
    /// Exponential smoothing of the loss values across calls: 0 uses each batch's values alone
    /// (the reference), 0.9 averages over about ten steps.
    pub momentum: f64,
    smoothed: Vec<Option<f64>>,
}

impl AdaptiveWeighting {
    /// A weighting of `terms` losses.
    pub fn new(terms: usize, floor: f64, momentum: f64) -> Result<Self> {
        if floor.is_nan() || floor <= 0.0 || !(0.0..1.0).contains(&momentum) {
            return Err(Error::InvalidArgument(format!(
                "adaptive weighting needs floor > 0 and 0 <= momentum < 1, got {floor}, {momentum}"
            )));
        }
        Ok(Self {
            floor,
            momentum,
            smoothed: vec![None; terms],
        })
    }

    /// The weights for this step's loss values (`None`: the term is absent). They sum to 1 over
    /// the present terms; all are 0 when none is present.
    pub fn weights(&mut self, losses: &[Option<f64>]) -> Result<Vec<f64>> {
        if losses.len() != self.smoothed.len() {
            return Err(Error::InvalidArgument(format!(
                "adaptive weighting of {} terms given {} losses",
                self.smoothed.len(),
                losses.len()
            )));
        }
        let mut inv = vec![0.0; losses.len()];
        for (i, l) in losses.iter().enumerate() {
            let Some(l) = *l else { continue };
            if !l.is_finite() || l < 0.0 {
                return Err(Error::InvalidArgument(format!(
                    "adaptive weighting needs finite non-negative losses, term {i} is {l}"
                )));
            }
            let s = match self.smoothed[i] {
                Some(prev) => self.momentum * prev + (1.0 - self.momentum) * l,
                None => l,
            };
            self.smoothed[i] = Some(s);
            inv[i] = 1.0 / s.max(self.floor);
        }
        let total: f64 = inv.iter().sum();
        Ok(if total > 0.0 {
            inv.iter().map(|v| v / total).collect()
        } else {
            inv
        })
    }

    /// `Σ w_i L_i` over the present terms, with the weights of [`weights`](Self::weights)
    /// (constants: no gradient flows through them).
    pub fn combine(&mut self, terms: &[Option<&Tensor>]) -> Result<Option<(Tensor, Vec<f64>)>> {
        let values = terms
            .iter()
            .map(|t| {
                t.map(|t| t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>())
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w = self.weights(&values)?;
        let mut sum: Option<Tensor> = None;
        for (t, wi) in terms.iter().zip(&w) {
            let Some(t) = t else { continue };
            let term = (*t * *wi)?;
            sum = Some(match sum {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        Ok(sum.map(|s| (s, w)))
    }

    /// Restores the smoothed values (for exact resume); see [`state`](Self::state).
    pub fn set_state(&mut self, state: &[f64]) {
        for (s, &v) in self.smoothed.iter_mut().zip(state) {
            *s = if v.is_nan() { None } else { Some(v) };
        }
    }

    /// The smoothed values (NaN where no value was seen yet).
    pub fn state(&self) -> Vec<f64> {
        self.smoothed
            .iter()
            .map(|s| s.unwrap_or(f64::NAN))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_loss_weights() {
        let mut w = AdaptiveWeighting::new(2, 1e-6, 0.0).unwrap();
        // L = (1, 3): 1/L = (1, 1/3), sum 4/3 -> (3/4, 1/4).
        let got = w.weights(&[Some(1.0), Some(3.0)]).unwrap();
        assert!((got[0] - 0.75).abs() < 1e-12 && (got[1] - 0.25).abs() < 1e-12);
        // An absent term gets 0 and the other takes everything.
        assert_eq!(w.weights(&[None, Some(2.0)]).unwrap(), vec![0.0, 1.0]);
        assert_eq!(w.weights(&[None, None]).unwrap(), vec![0.0, 0.0]);
        // A zero loss is floored, not divided by.
        let z = w.weights(&[Some(0.0), Some(1.0)]).unwrap();
        assert!(z[0] > 0.999 && z[0].is_finite());
        assert!(w.weights(&[Some(-1.0), Some(1.0)]).is_err());
        assert!(w.weights(&[Some(1.0)]).is_err());
        assert!(AdaptiveWeighting::new(2, 0.0, 0.0).is_err());
    }

    #[test]
    fn smoothing_and_state() {
        let mut w = AdaptiveWeighting::new(2, 1e-6, 0.5).unwrap();
        w.weights(&[Some(1.0), Some(1.0)]).unwrap();
        // Smoothed: (0.5·1 + 0.5·3, 1) = (2, 1) -> weights (1/3, 2/3).
        let got = w.weights(&[Some(3.0), Some(1.0)]).unwrap();
        assert!((got[0] - 1.0 / 3.0).abs() < 1e-12, "{got:?}");
        let mut resumed = AdaptiveWeighting::new(2, 1e-6, 0.5).unwrap();
        resumed.set_state(&w.state());
        assert_eq!(resumed, w);
    }

    #[test]
    fn combined_loss_has_constant_weights() {
        let dev = candle_core::Device::Cpu;
        let a = candle_core::Var::new(2.0f32, &dev).unwrap();
        let b = candle_core::Var::new(6.0f32, &dev).unwrap();
        let mut w = AdaptiveWeighting::new(2, 1e-6, 0.0).unwrap();
        let (sum, weights) = w
            .combine(&[Some(a.as_tensor()), Some(b.as_tensor())])
            .unwrap()
            .unwrap();
        // Weights (3/4, 1/4); sum = 1.5 + 1.5; d/da = 3/4 exactly (no gradient through w).
        assert!((weights[0] - 0.75).abs() < 1e-12);
        assert!((sum.to_scalar::<f32>().unwrap() - 3.0).abs() < 1e-6);
        let g = sum.backward().unwrap();
        let ga = g.get(a.as_tensor()).unwrap().to_scalar::<f32>().unwrap();
        assert!((ga - 0.75).abs() < 1e-6, "{ga}");
    }
}
