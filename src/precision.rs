//! Arithmetic precision of the CPU convolutions of the analysis and synthesis transforms.
//!
//! On CPUs with AVX512-BF16 the convolutions of `g_a` and `g_s` (inference and training) can
//! multiply bf16 operands with f32 accumulation (`vdpbf16ps`): about twice the f32 arithmetic
//! rate. Weights stay f32 (training updates f32 master weights; each product rounds its
//! operands to bf16), and GDN/IGDN, the hyper transforms `h_a`/`h_s` and all entropy-model
//! math stay f32, so the table indexes a stream decodes with are the same whatever precision
//! the transforms use (see [`Codec::with_precision`](crate::Codec::with_precision)).
//!
//! The default, [`Precision::auto`], is read once per process: the environment variable
//! `PSIC_PRECISION` (`f32`, `bf16` or `bf16-emulated`) if set, otherwise f32 (bf16 is opt-in;
//! see [`Precision::auto`]).

use std::sync::OnceLock;

/// Precision of the analysis (`g_a`) and synthesis (`g_s`) convolutions on the CPU. Written
/// and read as `f32`, `bf16` or `bf16-emulated` (in training configurations, by
/// `PSIC_PRECISION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// f32 operands and products: matches CompressAI's float transforms to f32 rounding (its
    /// byte-identical strings need this).
    F32,
    /// bf16 operands (8-bit mantissa, rounded to nearest even), f32 accumulation. Runs as f32
    /// on CPUs without AVX512-BF16.
    Bf16,
    /// The numerics of [`Precision::Bf16`] on any CPU (operands rounded to bf16, then an f32
    /// product): slower than f32, for measuring what bf16 does to a codec or a training run
    /// on CPUs without AVX512-BF16, and the reference the bf16 kernel is tested against.
    Bf16Emulated,
}

impl Precision {
    /// The process default: `PSIC_PRECISION` (`f32`, `bf16` or `bf16-emulated`, read once) if
    /// set, otherwise [`Precision::F32`]. bf16 stays opt-in: it is faster on some AVX512-BF16
    /// CPUs and not on others (docs/PERFORMANCE.md), and f32 gives a decode the same pixels on
    /// every CPU, which reports and tests rely on. Training configurations choose their own
    /// (`precision`). An unrecognised value is reported once on stderr and ignored.
    pub fn auto() -> Self {
        static AUTO: OnceLock<Precision> = OnceLock::new();
        *AUTO.get_or_init(|| {
            let detected = Self::F32;
            match std::env::var("PSIC_PRECISION") {
                Ok(v) => v.parse().unwrap_or_else(|e| {
                    eprintln!("psic: ignoring PSIC_PRECISION: {e}");
                    detected
                }),
                Err(_) => detected,
            }
        })
    }

    /// Whether this CPU has the bf16 dot-product instructions (AVX512-BF16 with AVX512F/BW),
    /// detected once.
    pub fn bf16_supported() -> bool {
        Avx512Bf16::detect().is_some()
    }

    /// The precision the convolutions will really use: [`Precision::F32`] for a bf16 request
    /// on a CPU without AVX512-BF16.
    pub fn effective(self) -> Self {
        Kernel::new(self).precision()
    }

    /// The name `PSIC_PRECISION` and the CLI use: `f32`, `bf16` or `bf16-emulated`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Bf16Emulated => "bf16-emulated",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "bf16-emulated" => Ok(Self::Bf16Emulated),
            other => Err(format!(
                "unknown precision {other:?} (expected f32, bf16 or bf16-emulated)"
            )),
        }
    }
}

/// Proof that this CPU runs AVX512F, AVX512BW and AVX512-BF16 code: only [`Avx512Bf16::detect`]
/// makes one, after checking the CPU, so holding one is what makes calling the bf16 kernels
/// sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512Bf16(());

impl Avx512Bf16 {
    /// The token, if the CPU has the features (checked once per process).
    pub(crate) fn detect() -> Option<Self> {
        static HAS: OnceLock<bool> = OnceLock::new();
        let has = *HAS.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        });
        has.then_some(Self(()))
    }
}

/// The matrix-product kernel a convolution plan was built with: chosen once, when the layer is
/// built or its precision set, never per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The `gemm` crate in f32.
    F32,
    /// psic's bf16 kernel (`layers::bf16_gemm`), holding the proof that the CPU runs it.
    Bf16(Avx512Bf16),
    /// Operands rounded to bf16, then f32 `gemm` (`layers::bf16_emul`): bf16 numerics anywhere.
    Bf16Emulated,
}

impl Kernel {
    /// The kernel for `precision` on this CPU (f32 when bf16 is asked for but unsupported).
    pub(crate) fn new(precision: Precision) -> Self {
        match precision {
            Precision::F32 => Self::F32,
            Precision::Bf16 => Avx512Bf16::detect().map_or(Self::F32, Self::Bf16),
            Precision::Bf16Emulated => Self::Bf16Emulated,
        }
    }

    /// The precision this kernel computes in.
    pub(crate) fn precision(self) -> Precision {
        match self {
            Self::F32 => Precision::F32,
            Self::Bf16(_) => Precision::Bf16,
            Self::Bf16Emulated => Precision::Bf16Emulated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        for p in [Precision::F32, Precision::Bf16, Precision::Bf16Emulated] {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!(" BF16 ".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("f16".parse::<Precision>().is_err());
    }

    #[test]
    fn effective_precision_follows_the_cpu() {
        assert_eq!(Precision::F32.effective(), Precision::F32);
        let bf16 = Precision::Bf16.effective();
        assert_eq!(bf16 == Precision::Bf16, Precision::bf16_supported());
        assert_eq!(Precision::Bf16Emulated.effective(), Precision::Bf16Emulated);
    }
}
