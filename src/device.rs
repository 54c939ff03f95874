//! Which device runs a model: a closed set of choices ([`DeviceKind`]) resolved once to a
//! candle [`Device`].

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// Where a model runs. Written and read as `auto`, `cpu`, `cuda` or `metal` (in training
/// configurations, on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA when this build has it (feature `cuda`) and a GPU is there, else Metal likewise
    /// (feature `metal`), else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first NVIDIA GPU (a build with `--features cuda`).
    Cuda,
    /// The first Apple GPU (a build with `--features metal`).
    Metal,
}

impl DeviceKind {
    /// The device: an [`Error::InvalidArgument`] that says what to do when this build or this
    /// machine has no such device.
    pub fn device(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => Device::new_cuda(0).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot use CUDA ({e}); build psic with `--features cuda` on a machine with \
                     an NVIDIA driver"
                ))
            }),
            Self::Metal => Device::new_metal(0).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot use Metal ({e}); build psic with `--features metal` on a Mac"
                ))
            }),
            Self::Auto => Ok(Self::first_gpu().unwrap_or(Device::Cpu)),
        }
    }

    /// The first GPU this build can use, if any.
    fn first_gpu() -> Option<Device> {
        #[cfg(feature = "cuda")]
        if candle_core::utils::cuda_is_available() {
            if let Ok(d) = Device::new_cuda(0) {
                return Some(d);
            }
        }
        #[cfg(feature = "metal")]
        if candle_core::utils::metal_is_available() {
            if let Ok(d) = Device::new_metal(0) {
                return Some(d);
            }
        }
        None
    }

    /// The kind of a device (never [`Auto`](Self::Auto)).
    pub fn of(device: &Device) -> Self {
        if device.is_cuda() {
            Self::Cuda
        } else if device.is_metal() {
            Self::Metal
        } else {
            Self::Cpu
        }
    }

    /// The name: `auto`, `cpu`, `cuda` or `metal`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        [Self::Auto, Self::Cpu, Self::Cuda, Self::Metal]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("device {s:?}: use auto, cpu, cuda or metal"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_resolve() {
        for k in [
            DeviceKind::Auto,
            DeviceKind::Cpu,
            DeviceKind::Cuda,
            DeviceKind::Metal,
        ] {
            assert_eq!(k.name().parse::<DeviceKind>().unwrap(), k);
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{k}\""));
            assert_eq!(serde_json::from_str::<DeviceKind>(&json).unwrap(), k);
        }
        assert_eq!("CPU".parse::<DeviceKind>().unwrap(), DeviceKind::Cpu);
        assert!("tpu".parse::<DeviceKind>().is_err());
        assert!(DeviceKind::Cpu.device().unwrap().is_cpu());
        assert_eq!(DeviceKind::of(&Device::Cpu), DeviceKind::Cpu);
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceKind::Cuda.device().is_err());
    }
}
