//! Quality levels: per-level channel gains on the latent (rate control in one model).
//!
//! A model may carry `L` quality levels, a tensor `rate.gains` of shape `[L, M]` (f32, every
//! gain positive) and, optionally, metadata naming each level (`rate.levels`, a JSON array of
//! [`LevelInfo`]). Level `l` codes `y` with the quantisation step `1 / g` per channel: the
//! encoder writes `round((y − μ)·g)` (μ = 0 without means) with the Gaussian tables of the
//! scales `σ·g`; the decoder's latent is `symbol / g + μ`. The transforms, the hyperprior and
//! the `z` path are those of the model, unchanged; a level whose gains are all 1 codes exactly
//! what the model without levels codes.
//!
//! A model without `rate.gains` has one implicit level (all gains 1). `docs/FORMAT.md` says how
//! the level is written into a stream and how a stream is tied to its level's gains.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Name of the gains tensor in a model file.
pub const GAINS_TENSOR: &str = "rate.gains";
/// Metadata key of the levels' descriptions ([`LevelInfo`] as a JSON array).
pub const LEVELS_METADATA: &str = "rate.levels";
/// Metadata key of the level a codec writes unless told otherwise (a decimal index; absent
/// means level 0).
pub const DEFAULT_LEVEL_METADATA: &str = "rate.default_level";
/// Prefix of the tensors of the quality levels (left out of the model fingerprint: each
/// stream is tied to its own level's gains instead, see [`RateLevels::check`]).
pub const TENSOR_PREFIX: &str = "rate.";
/// Most levels a model may carry (the level index is one byte of the stream header).
pub const MAX_LEVELS: usize = 64;
/// Smallest accepted gain (a quantisation step of 256).
pub const MIN_GAIN: f32 = 1.0 / 256.0;
/// Largest accepted gain (a quantisation step of 1/256).
pub const MAX_GAIN: f32 = 256.0;
/// Length of a level check in a stream header.
pub const LEVEL_CHECK_LEN: usize = 8;

/// What a model file says about one level (all optional but `lambda`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelInfo {
    /// The λ of CompressAI's `bpp + λ·255²·MSE` the gains were fitted for.
    pub lambda: f64,
    /// Measured bits per pixel on Kodak, if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kodak_bpp: Option<f64>,
    /// Measured PSNR (dB, full decode) on Kodak, if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kodak_psnr: Option<f64>,
}

/// The quality levels of a model: one gain per latent channel per level.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLevels {
    gains: Vec<Vec<f32>>,
    info: Vec<Option<LevelInfo>>,
    default: usize,
}

/// The gains of one level applied to NCHW latent values: value `i` belongs to channel
/// `(i / plane) % C`. All the level arithmetic of coding lives here.
#[derive(Debug, Clone, Copy)]
pub struct ChannelGains<'a> {
    gains: &'a [f32],
    plane: usize,
}

impl<'a> ChannelGains<'a> {
    /// The gains of `C` channels for values laid out NCHW with `plane = H·W`.
    pub fn new(gains: &'a [f32], plane: usize) -> Result<Self> {
        if gains.is_empty() || plane == 0 {
            return Err(Error::InvalidArgument(format!(
                "channel gains: {} gains over planes of {plane} values",
                gains.len()
            )));
        }
        Ok(Self { gains, plane })
    }

    /// The gains of a `[B, C, H, W]` latent (`C` must be the number of gains).
    pub fn for_shape(gains: &'a [f32], shape: (usize, usize, usize, usize)) -> Result<Self> {
        let (_, c, h, w) = shape;
        if c != gains.len() {
            return Err(Error::InvalidArgument(format!(
                "{} level gains for a latent of {c} channels",
                gains.len()
            )));
        }
        Self::new(gains, h * w)
    }

    /// The gain of value `i`.
    #[inline]
    pub fn gain(&self, i: usize) -> f32 {
        self.gains[(i / self.plane) % self.gains.len()]
    }

    /// Scales `σ` to the level's `σ·g`, in place: the product of the two f32 values in f64,
    /// rounded once to f32 (which is also IEEE f32 multiplication: the f64 product of two f32
    /// values is exact). A pure function of the values, so the portable path stays portable.
    pub fn scale_scales(&self, scales: &mut [f32]) {
        for (i, s) in scales.iter_mut().enumerate() {
            *s = (f64::from(*s) * f64::from(self.gain(i))) as f32;
        }
    }

    /// The value to round into the symbol of `v = y − μ`: `v·g` (f32).
    #[inline]
    pub fn to_symbol_domain(&self, i: usize, v: f32) -> f32 {
        v * self.gain(i)
    }

    /// The latent value (before adding the mean) of symbol `s`: `s / g` (f32).
    #[inline]
    pub fn from_symbol(&self, i: usize, s: i32) -> f32 {
        s as f32 / self.gain(i)
    }
}

impl RateLevels {
    /// Levels from their gains (each level `M` positive gains within [`MIN_GAIN`]..=
    /// [`MAX_GAIN`]) and optional descriptions (empty, or one per level).
    pub fn new(gains: Vec<Vec<f32>>, info: Vec<Option<LevelInfo>>) -> Result<Self> {
        let m = gains.first().map_or(0, Vec::len);
        if gains.is_empty() || gains.len() > MAX_LEVELS || m == 0 {
            return Err(Error::Model(format!(
                "{GAINS_TENSOR}: {} levels of {m} gains (1..={MAX_LEVELS} levels of at least one)",
                gains.len()
            )));
        }
        let ok = |g: &f32| g.is_finite() && (MIN_GAIN..=MAX_GAIN).contains(g);
        if gains.iter().any(|l| l.len() != m || !l.iter().all(ok)) {
            return Err(Error::Model(format!(
                "{GAINS_TENSOR}: every level needs {m} finite gains within {MIN_GAIN}..={MAX_GAIN}"
            )));
        }
        let info = match info.len() {
            0 => vec![None; gains.len()],
            n if n == gains.len() => info,
            n => {
                return Err(Error::Model(format!(
                    "{LEVELS_METADATA} describes {n} levels, {GAINS_TENSOR} has {}",
                    gains.len()
                )))
            }
        };
        Ok(Self {
            gains,
            info,
            default: 0,
        })
    }

    /// These levels with `level` as the one a codec writes by default
    /// ([`Error::UnknownLevel`] for a level they lack).
    pub fn with_default_level(mut self, level: usize) -> Result<Self> {
        if level >= self.len() {
            return Err(Error::UnknownLevel {
                level,
                levels: self.len(),
            });
        }
        self.default = level;
        Ok(self)
    }

    /// The level a codec writes unless told otherwise (0 unless the model says).
    pub fn default_level(&self) -> usize {
        self.default
    }

    /// The levels of a model file's tensors and metadata (`rate.levels`,
    /// `rate.default_level`); `None` without `rate.gains`.
    /// `metadata` looks a metadata key up.
    pub fn from_model_parts<'a>(
        gains: Option<&Tensor>,
        metadata: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Option<Self>> {
        let Some(t) = gains else {
            return match [LEVELS_METADATA, DEFAULT_LEVEL_METADATA]
                .into_iter()
                .find(|k| metadata(k).is_some())
            {
                Some(k) => Err(Error::Model(format!(
                    "{k} metadata without a {GAINS_TENSOR} tensor"
                ))),
                None => Ok(None),
            };
        };
        let rows = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()
            .map_err(|e| Error::Model(format!("{GAINS_TENSOR} must be [L, M]: {e}")))?;
        let info = match metadata(LEVELS_METADATA) {
            None => Vec::new(),
            Some(json) => serde_json::from_str::<Vec<Option<LevelInfo>>>(json)
                .map_err(|e| Error::Model(format!("bad {LEVELS_METADATA} metadata: {e}")))?,
        };
        let levels = Self::new(rows, info)?;
        let Some(default) = metadata(DEFAULT_LEVEL_METADATA) else {
            return Ok(Some(levels));
        };
        let n = levels.len();
        default
            .parse::<usize>()
            .ok()
            .filter(|&d| d < n)
            .map(|d| levels.with_default_level(d))
            .transpose()?
            .map(Some)
            .ok_or_else(|| {
                Error::Model(format!(
                    "{DEFAULT_LEVEL_METADATA} is {default:?}, not a level below {n}"
                ))
            })
    }

    /// The `rate.gains` tensor, `[L, M]` f32 on the CPU.
    pub fn gains_tensor(&self) -> Result<Tensor> {
        let m = self.channels();
        let flat: Vec<f32> = self.gains.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (self.len(), m), &Device::Cpu)?)
    }

    /// The metadata entries that describe these levels (`rate.levels` and, for a default
    /// other than level 0, `rate.default_level`); [`from_model_parts`](Self::from_model_parts)
    /// reads them back.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let info = serde_json::to_string(&self.info).unwrap_or_default();
        let mut out = vec![(LEVELS_METADATA.to_string(), info)];
        if self.default != 0 {
            out.push((DEFAULT_LEVEL_METADATA.to_string(), self.default.to_string()));
        }
        out
    }

    /// Number of levels.
    pub fn len(&self) -> usize {
        self.gains.len()
    }

    /// Always false (a `RateLevels` has at least one level).
    pub fn is_empty(&self) -> bool {
        self.gains.is_empty()
    }

    /// Gains per level (`M` each).
    pub fn channels(&self) -> usize {
        self.gains[0].len()
    }

    /// The gains of level `level`, if the model has it.
    pub fn gains(&self, level: usize) -> Option<&[f32]> {
        self.gains.get(level).map(Vec::as_slice)
    }

    /// The description of level `level`, if any.
    pub fn info(&self, level: usize) -> Option<&LevelInfo> {
        self.info.get(level).and_then(Option::as_ref)
    }

    /// Replaces the description of level `level` (no-op for a level the model lacks).
    pub fn set_info(&mut self, level: usize, info: LevelInfo) {
        if let Some(slot) = self.info.get_mut(level) {
            *slot = Some(info);
        }
    }

    /// The check a stream of level `level` carries: the first [`LEVEL_CHECK_LEN`] bytes of the
    /// SHA-256 of `psic-level`, a zero byte and the level's gains (f32 little-endian).
    pub fn check(&self, level: usize) -> Option<[u8; LEVEL_CHECK_LEN]> {
        self.gains(level).map(gains_check)
    }
}

/// The level check of `gains` (see [`RateLevels::check`]).
pub fn gains_check(gains: &[f32]) -> [u8; LEVEL_CHECK_LEN] {
    let mut h = Sha256::new();
    h.update(b"psic-level\0");
    for g in gains {
        h.update(g.to_le_bytes());
    }
    let mut out = [0u8; LEVEL_CHECK_LEN];
    out.copy_from_slice(&h.finalize()[..LEVEL_CHECK_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn unit_gains_change_nothing() {
        let g = [1.0f32, 1.0];
        let cg = ChannelGains::new(&g, 2).unwrap();
        let mut s = vec![0.3f32, 7.1, 0.11, 255.9];
        let before = s.clone();
        cg.scale_scales(&mut s);
        assert_eq!(s, before);
        assert_eq!(cg.from_symbol(1, -3), -3.0);
        assert_eq!(cg.to_symbol_domain(3, 0.49), 0.49);
    }

    #[test]
    fn gains_follow_the_channel_of_each_value() {
        let g = [2.0f32, 0.5];
        let cg = ChannelGains::for_shape(&g, (2, 2, 1, 3)).unwrap();
        let mut s = vec![1.0f32; 12];
        cg.scale_scales(&mut s);
        assert_eq!(s, [2., 2., 2., 0.5, 0.5, 0.5, 2., 2., 2., 0.5, 0.5, 0.5]);
        assert!(ChannelGains::for_shape(&g, (1, 3, 1, 1)).is_err());
    }

    #[test]
    fn levels_are_validated_and_round_trip() {
        assert!(RateLevels::new(vec![], vec![]).is_err());
        assert!(RateLevels::new(vec![vec![1.0, 0.0]], vec![]).is_err());
        assert!(RateLevels::new(vec![vec![1.0], vec![1.0, 2.0]], vec![]).is_err());
        assert!(RateLevels::new(vec![vec![1e9]], vec![]).is_err());
        let info = LevelInfo {
            lambda: 0.01,
            kodak_bpp: Some(0.3),
            kodak_psnr: None,
        };
        let l =
            RateLevels::new(vec![vec![0.5, 1.0], vec![2.0, 3.0]], vec![None, Some(info)]).unwrap();
        let back = |l: &RateLevels| {
            let meta: HashMap<String, String> = l.metadata().into_iter().collect();
            RateLevels::from_model_parts(Some(&l.gains_tensor().unwrap()), |k| {
                meta.get(k).map(String::as_str)
            })
            .unwrap()
            .unwrap()
        };
        assert_eq!(back(&l), l);
        assert_eq!(l.default_level(), 0);
        assert!(l.clone().with_default_level(2).is_err());
        let l1 = l.clone().with_default_level(1).unwrap();
        assert_eq!(back(&l1).default_level(), 1);
        let bad = |v: &str| {
            let meta = HashMap::from([(DEFAULT_LEVEL_METADATA.to_string(), v.to_string())]);
            RateLevels::from_model_parts(Some(&l.gains_tensor().unwrap()), |k| {
                meta.get(k).map(String::as_str)
            })
        };
        assert!(matches!(bad("2"), Err(Error::Model(_))));
        assert!(matches!(bad("-1"), Err(Error::Model(_))));
        assert!(matches!(
            bad("1").map(|l| l.unwrap().default_level()),
            Ok(1)
        ));
        let orphan = HashMap::from([(DEFAULT_LEVEL_METADATA.to_string(), "0".to_string())]);
        assert!(RateLevels::from_model_parts(None, |k| orphan.get(k).map(String::as_str)).is_err());
        assert_ne!(l.check(0), l.check(1));
        assert_eq!(l.check(2), None);
    }
}
