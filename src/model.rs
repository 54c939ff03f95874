//! Self-describing model files and the checkpoint importer.
//!
//! A psic model file is a safetensors file whose metadata names the architecture and its
//! configuration, so a model loads from a path alone:
//!
//! | metadata key | value |
//! | --- | --- |
//! | `format` | `psic-model` |
//! | `psic.model_version` | `1` |
//! | `architecture` | e.g. `bmshj2018-hyperprior` |
//! | `config` | the architecture's configuration as JSON, e.g. `{"n":128,"m":192}` |
//!
//! The file's bytes depend only on its content (metadata keys sorted, tensors in safetensors'
//! order), so writing the same model twice gives the same checksum.
//!
//! Tensors keep CompressAI's names. The model's *fingerprint*, written into every bitstream, is
//! the first 16 bytes of a SHA-256 over the architecture, the configuration and every tensor
//! (name, dtype, shape, bytes) in name order, except the generic trigger generator (`cltg.*`)
//! and the quality levels (`rate.*`, [`crate::rate`]: a stream carries its own level's check).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use crate::backbone::{
    LicBackbone, MeanScaleHyperprior, MeanScaleHyperpriorConfig, PsicHy2018, PsicHy2018Config,
    RegisteredArchitecture, ScaleHyperprior, ScaleHyperpriorConfig, MBT2018_MEAN, PSIC_HY2018,
};
use crate::bitstream::{Fingerprint, FINGERPRINT_LEN};
use crate::shield::{
    AnchoredGenerator, Cltg, CltgConfig, CltgNames, Conditions, Modulation, TriggerGenerator,
};
use crate::{Error, Result};

/// `format` metadata value of psic model files.
pub const MODEL_FORMAT: &str = "psic-model";
/// Version of the model-file layout this build writes and reads.
pub const MODEL_VERSION: &str = "1";

/// Largest model file (or checkpoint) psic reads: 1 GiB. The shipped default model is 8.6 MB and
/// CompressAI's largest hyperprior checkpoints are under 100 MB; a longer file is refused with
/// [`Error::InputTooLarge`] after reading at most this much.
pub const MAX_MODEL_FILE_LEN: u64 = 1 << 30;

/// CompressAI buffers that hold integers (some converters store them as floats).
pub(crate) const INT_BUFFERS: [&str; 3] = ["_quantized_cdf", "_offset", "_cdf_length"];

/// The architectures psic can build, with their configurations: the built-in ones and those
/// registered with [`register_backbone`](crate::backbone::register_backbone). New built-in
/// architectures may come in minor releases (`#[non_exhaustive]`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Architecture {
    /// Ballé et al. 2018 scale hyperprior (`bmshj2018-hyperprior`).
    ScaleHyperprior(ScaleHyperpriorConfig),
    /// Minnen et al. 2018 mean-scale hyperprior (`mbt2018-mean`).
    MeanScaleHyperprior(MeanScaleHyperpriorConfig),
    /// The official PSIC model (`psic-hy2018`): hyperprior with a conditional synthesis.
    PsicHy2018(PsicHy2018Config),
    /// A backbone defined outside psic and registered with
    /// [`register_backbone`](crate::backbone::register_backbone): its name, configuration and
    /// factory.
    Registered(RegisteredArchitecture),
}

impl Architecture {
    /// The architecture names built into psic (see [`known_names`](Self::known_names) for
    /// these and the registered ones).
    pub const NAMES: &'static [&'static str] = &["bmshj2018-hyperprior", MBT2018_MEAN, PSIC_HY2018];

    /// Built-in and registered architecture names.
    pub fn known_names() -> Vec<String> {
        let mut names: Vec<String> = Self::NAMES.iter().map(|s| s.to_string()).collect();
        names.extend(crate::backbone::registered_backbones());
        names
    }

    /// The name written into model files.
    pub fn name(&self) -> &str {
        match self {
            Architecture::ScaleHyperprior(_) => "bmshj2018-hyperprior",
            Architecture::MeanScaleHyperprior(_) => MBT2018_MEAN,
            Architecture::PsicHy2018(_) => PSIC_HY2018,
            Architecture::Registered(r) => r.name(),
        }
    }

    /// The configuration as JSON.
    pub fn config_json(&self) -> serde_json::Value {
        match self {
            Architecture::ScaleHyperprior(c) => serde_json::to_value(c).unwrap_or_default(),
            Architecture::MeanScaleHyperprior(c) => serde_json::to_value(c).unwrap_or_default(),
            Architecture::PsicHy2018(c) => serde_json::to_value(c).unwrap_or_default(),
            Architecture::Registered(r) => r.config().clone(),
        }
    }

    /// Parses a name and JSON configuration (as stored in model-file metadata).
    pub fn from_name_and_config(name: &str, config: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::Model(format!("bad {name} config {config:?}: {e}"));
        match name {
            "bmshj2018-hyperprior" => Ok(Architecture::ScaleHyperprior(
                serde_json::from_str(config).map_err(bad)?,
            )),
            MBT2018_MEAN => Ok(Architecture::MeanScaleHyperprior(
                serde_json::from_str(config).map_err(bad)?,
            )),
            PSIC_HY2018 => Ok(Architecture::PsicHy2018(
                serde_json::from_str(config).map_err(bad)?,
            )),
            other if crate::backbone::factory(other).is_some() => Ok(Architecture::Registered(
                RegisteredArchitecture::new(other, serde_json::from_str(config).map_err(bad)?)?,
            )),
            other => Err(Error::Model(format!(
                "unknown architecture {other:?} (known: {}; register others with \
                 psic::backbone::register_backbone)",
                Self::known_names().join(", ")
            ))),
        }
    }

    /// Infers the architecture and its size from the tensor names and shapes of a state dict.
    pub fn infer(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        if PsicHy2018Config::matches(tensors) {
            return Ok(Architecture::PsicHy2018(PsicHy2018Config::infer(tensors)?));
        }
        if tensors.contains_key("g_s.0.weight") && tensors.contains_key("h_s.4.weight") {
            return Self::infer_hyperprior(tensors);
        }
        for factory in crate::backbone::factories() {
            if let Some(config) = factory.infer_config(tensors) {
                return Ok(Architecture::Registered(RegisteredArchitecture::new(
                    factory.name(),
                    config?,
                )?));
            }
        }
        Err(Error::Model(format!(
            "cannot infer the architecture from the checkpoint's keys (known: {}); pass --arch",
            Self::known_names().join(", ")
        )))
    }

    /// The scale or the mean-scale hyperprior, told apart by the width of `h_s`'s output: `M`
    /// scales, or `2M` scales and means. CompressAI's joint autoregressive model (`mbt2018`)
    /// has the mean-scale `h_s` and a context model besides: it is refused, not mis-loaded.
    fn infer_hyperprior(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let dim = |name: &str, i: usize| crate::tensor_util::state_dim(tensors, name, i);
        let n = dim("g_a.0.weight", 0)?;
        let m = dim("g_a.6.weight", 0)?;
        let h_s_out = dim("h_s.4.weight", 0)?;
        if h_s_out == m {
            return Ok(Architecture::ScaleHyperprior(ScaleHyperpriorConfig {
                n,
                m,
            }));
        }
        if h_s_out != 2 * m {
            return Err(Error::Model(format!(
                "h_s ends with {h_s_out} channels for a latent of {m}: neither a scale (M) nor \
                 a mean-scale (2M) hyperprior"
            )));
        }
        if tensors.keys().any(|k| k.starts_with("context_prediction.")) {
            return Err(Error::Model(
                "the checkpoint has a context model (CompressAI's joint autoregressive mbt2018): \
                 not supported"
                    .into(),
            ));
        }
        Ok(Architecture::MeanScaleHyperprior(
            MeanScaleHyperpriorConfig { n, m },
        ))
    }

    /// Builds the backbone from weights in `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn LicBackbone>> {
        Ok(match self {
            Architecture::ScaleHyperprior(c) => Box::new(ScaleHyperprior::new(vb, c)?),
            Architecture::MeanScaleHyperprior(c) => Box::new(MeanScaleHyperprior::new(vb, c)?),
            Architecture::PsicHy2018(c) => Box::new(PsicHy2018::new(vb, c)?),
            Architecture::Registered(r) => r.build(vb)?,
        })
    }

    /// Channels of the hyper-latent (the entropy bottleneck's width).
    pub fn hyper_channels(&self) -> usize {
        match self {
            Architecture::ScaleHyperprior(c) => c.n,
            Architecture::MeanScaleHyperprior(c) => c.n,
            Architecture::PsicHy2018(c) => c.n,
            Architecture::Registered(r) => r.hyper_channels(),
        }
    }

    /// Injection points of a generic (`cltg.*`) trigger generator for this architecture:
    /// the (mean-)scale hyperprior's three, a registered backbone's own (built on `device` to
    /// ask it), none for `psic-hy2018`, whose generator is its own.
    fn generic_injection_points(
        &self,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Vec<usize>> {
        Ok(match self {
            Architecture::ScaleHyperprior(c) => vec![c.n; 3],
            Architecture::MeanScaleHyperprior(c) => vec![c.n; 3],
            Architecture::PsicHy2018(_) => Vec::new(),
            Architecture::Registered(_) => self
                .build(VarBuilder::from_tensors(
                    tensors.clone(),
                    DType::F32,
                    device,
                ))?
                .injection_points(),
        })
    }
}

/// A model read from (or about to be written to) a psic model file.
#[derive(Debug, Clone)]
pub struct ModelFile {
    /// Architecture and configuration.
    pub architecture: Architecture,
    /// All weights and buffers by CompressAI name.
    pub tensors: HashMap<String, Tensor>,
    /// Further metadata (provenance, training facts), kept verbatim.
    pub extra_metadata: BTreeMap<String, String>,
}

impl ModelFile {
    /// Reads a psic model file.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::image_io::read_limited(path, MAX_MODEL_FILE_LEN)?;
        Self::from_bytes(&bytes, device).map_err(|e| match e {
            Error::Model(m) => Error::Model(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses a psic model file from memory.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Model(format!("not a safetensors file: {e}")))?;
        let mut info: BTreeMap<String, String> = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(MODEL_FORMAT) {
            return Err(Error::Model(
                "not a psic model file (no format=psic-model metadata); import checkpoints with \
                 `psic convert`"
                    .into(),
            ));
        }
        match info.get("psic.model_version").map(String::as_str) {
            Some(MODEL_VERSION) => {}
            v => {
                return Err(Error::Model(format!(
                    "model file version {v:?} is not supported (this build reads {MODEL_VERSION})"
                )))
            }
        }
        let arch = info
            .remove("architecture")
            .ok_or_else(|| Error::Model("model file names no architecture".into()))?;
        let config = info
            .remove("config")
            .ok_or_else(|| Error::Model("model file has no config".into()))?;
        info.remove("format");
        info.remove("psic.model_version");
        let architecture = Architecture::from_name_and_config(&arch, &config)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
        Ok(Self {
            architecture,
            tensors,
            extra_metadata: info,
        })
    }

    /// A freshly initialised (untrained) model of `architecture`, reproducible from `seed`, with
    /// its CDF tables computed: the starting point of training, and a fixture for tests.
    pub fn initialize(architecture: Architecture, seed: u64, device: &Device) -> Result<Self> {
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, seed, DType::F32, device);
        architecture.build(vb)?;
        Self::from_varmap(
            architecture,
            &varmap,
            BTreeMap::from([(
                "source".to_string(),
                format!("psic initialisation, seed {seed} (untrained)"),
            )]),
            device,
        )
    }

    /// A model file from the variables of a (trained) `VarMap`: copies every variable, builds
    /// the coding tables from the learned densities, and records the conditions of shielded
    /// models.
    pub fn from_varmap(
        architecture: Architecture,
        varmap: &candle_nn::VarMap,
        extra_metadata: BTreeMap<String, String>,
        device: &Device,
    ) -> Result<Self> {
        let tensors = varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .filter(|(k, _)| !INT_BUFFERS.iter().any(|b| k.ends_with(b)))
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let mut model = Self {
            architecture,
            tensors,
            extra_metadata,
        };
        model.complete_cdf_tables(device)?;
        model.extra_metadata.remove("entropy_bottleneck.tables");
        model.extra_metadata.remove("gaussian_conditional.tables");
        if let Some(c) = model.conditions()? {
            let json = serde_json::to_string(&c).unwrap_or_default();
            model.extra_metadata.insert("conditions".into(), json);
        }
        Ok(model)
    }

    /// Imports a CompressAI-style checkpoint: safetensors with CompressAI key names, or a
    /// PyTorch pickle (`.pth`, `.pth.tar`, `.pt`; a `{"state_dict": ...}` wrapper is unwrapped).
    /// The architecture is inferred from the keys unless given. Integer buffers stored as floats
    /// become `i32`, and missing CDF tables are computed.
    pub fn import(path: impl AsRef<Path>, arch: Option<&str>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let bytes = crate::image_io::read_limited(path, MAX_MODEL_FILE_LEN)?;
        let mut tensors: HashMap<String, Tensor> =
            if safetensors::SafeTensors::read_metadata(&bytes).is_ok() {
                // Parse the bytes already read rather than reading the file a second time.
                candle_core::safetensors::load_buffer(&bytes, device)?
            } else {
                let pairs = candle_core::pickle::read_all_with_key(path, Some("state_dict"))
                    .or_else(|_| candle_core::pickle::read_all(path))
                    .map_err(|e| {
                        Error::Model(format!(
                            "{}: neither safetensors nor a readable PyTorch checkpoint: {e}",
                            path.display()
                        ))
                    })?;
                pairs
                    .into_iter()
                    .map(|(k, v)| Ok((k, v.to_device(device)?)))
                    .collect::<Result<_>>()?
            };
        // DataParallel checkpoints prefix every key with "module.".
        if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module.")) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (k["module.".len()..].to_string(), v))
                .collect();
        }
        for (name, t) in tensors.iter_mut() {
            if INT_BUFFERS.iter().any(|b| name.ends_with(b)) && t.dtype() != DType::I32 {
                let vals = crate::tensor_util::int_buffer(t)?;
                *t = Tensor::from_vec(vals, t.shape(), device)?;
            }
        }
        let architecture = match arch {
            Some(a) => {
                let inferred = Architecture::infer(&tensors)?;
                if inferred.name() != a {
                    return Err(Error::Model(format!(
                        "--arch {a} given but the checkpoint's keys are those of {}",
                        inferred.name()
                    )));
                }
                inferred
            }
            None => Architecture::infer(&tensors)?,
        };
        let mut model = Self {
            architecture,
            tensors,
            extra_metadata: BTreeMap::from([(
                "source".to_string(),
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )]),
        };
        model.complete_cdf_tables(device)?;
        if let Some(c) = model.conditions()? {
            let json = serde_json::to_string(&c).unwrap_or_default();
            model.extra_metadata.insert("conditions".into(), json);
        }
        // Building the backbone checks every tensor's presence and shape.
        model.build_backbone(device)?;
        Ok(model)
    }

    /// Adds CDF tables computed from the entropy models where the checkpoint has none.
    fn complete_cdf_tables(&mut self, device: &Device) -> Result<()> {
        let n = self.architecture.hyper_channels();
        if !self
            .tensors
            .contains_key("entropy_bottleneck._quantized_cdf")
        {
            let vb = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device);
            let mut eb = crate::entropy::EntropyBottleneck::new(vb.pp("entropy_bottleneck"), n)?;
            eb.update()?;
            let tables = eb.tables().expect("update builds tables");
            self.insert_tables("entropy_bottleneck", tables, device)?;
            self.extra_metadata.insert(
                "entropy_bottleneck.tables".into(),
                "computed by psic".into(),
            );
        }
        if !self
            .tensors
            .contains_key("gaussian_conditional._quantized_cdf")
        {
            let vb = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device);
            let gc = crate::entropy::GaussianConditional::new(vb.pp("gaussian_conditional"))?;
            let table =
                Tensor::from_vec(gc.scale_table().to_vec(), gc.scale_table().len(), device)?;
            self.tensors
                .insert("gaussian_conditional.scale_table".into(), table);
            self.insert_tables("gaussian_conditional", gc.tables(), device)?;
            self.extra_metadata.insert(
                "gaussian_conditional.tables".into(),
                "computed by psic".into(),
            );
        }
        Ok(())
    }

    fn insert_tables(
        &mut self,
        prefix: &str,
        tables: &crate::entropy::CdfTables,
        device: &Device,
    ) -> Result<()> {
        let (padded, rows, width, lengths, offsets) = tables.to_padded();
        let t = |v: Vec<i32>, shape: &[usize]| Tensor::from_vec(v, shape, device);
        self.tensors.insert(
            format!("{prefix}._quantized_cdf"),
            t(padded, &[rows, width])?,
        );
        self.tensors
            .insert(format!("{prefix}._cdf_length"), t(lengths, &[rows])?);
        self.tensors
            .insert(format!("{prefix}._offset"), t(offsets, &[rows])?);
        Ok(())
    }

    /// Builds the backbone on `device` (weights converted to f32).
    pub fn build_backbone(&self, device: &Device) -> Result<Box<dyn LicBackbone>> {
        let vb = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device);
        self.architecture.build(vb)
    }

    /// The trigger generator of a shielded model: the official CLTG of `psic-hy2018`, or the
    /// generic `cltg.*` generator of a wrapped backbone (anchored at the full condition, so its
    /// full decode is the plain backbone's). `None` for plain models.
    ///
    /// A model that declares a shield (a `conditions` metadata entry, or any `cltg.*` tensor)
    /// must carry its whole generator: a missing or unexpected generator tensor is an
    /// [`Error::Model`], never a silently unshielded codec (the generator's weights are not part
    /// of the fingerprint, so such a model would decode the same streams in full).
    pub fn build_generator(&self, device: &Device) -> Result<Option<Box<dyn TriggerGenerator>>> {
        let vb = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device);
        match &self.architecture {
            Architecture::PsicHy2018(c) => {
                self.check_generator_tensors(&c.cltg_config(), &CltgNames::psic_hy2018(), None)?;
                Ok(Some(Box::new(PsicHy2018::load_cltg(vb, c)?)))
            }
            architecture => {
                let prefix = format!("{}.", CltgNames::GENERIC_PREFIX);
                let declared = self.extra_metadata.contains_key("conditions")
                    || self.tensors.keys().any(|k| k.starts_with(&prefix));
                let Some(cfg) = CltgConfig::infer_generic(&self.tensors)? else {
                    if declared {
                        return Err(Error::Model(format!(
                            "the model declares a shield ({}) but has no trigger generator \
                             weight {}.weight: refusing to load it without its shield",
                            if self.extra_metadata.contains_key("conditions") {
                                "conditions metadata"
                            } else {
                                "cltg.* tensors"
                            },
                            CltgNames::generic(0).fc1
                        )));
                    }
                    return Ok(None);
                };
                let points = architecture.generic_injection_points(&self.tensors, device)?;
                if cfg.injection_points != points {
                    return Err(Error::Model(format!(
                        "cltg.* weights are for injection points {:?}, the backbone has {:?}",
                        cfg.injection_points, points
                    )));
                }
                let names = CltgNames::generic(points.len());
                self.check_generator_tensors(&cfg, &names, Some(&prefix))?;
                let full = self.conditions()?.unwrap_or_default().full;
                Ok(Some(Box::new(AnchoredGenerator::new(
                    Cltg::new(vb, &cfg)?,
                    full,
                ))))
            }
        }
    }

    /// Checks that every tensor of a generator with `names` is present with its shape, and (for
    /// a namespace of its own, `prefix`) that no other tensor lives there.
    fn check_generator_tensors(
        &self,
        cfg: &CltgConfig,
        names: &CltgNames,
        prefix: Option<&str>,
    ) -> Result<()> {
        let expected = names.tensor_shapes(cfg);
        for (name, shape) in &expected {
            match self.tensors.get(name) {
                None => {
                    return Err(Error::Model(format!(
                        "shielded model lacks trigger generator tensor {name}: refusing to load \
                         it without its shield"
                    )))
                }
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(Error::Model(format!(
                        "trigger generator tensor {name} has shape {:?}, expected {shape:?}",
                        t.dims()
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(prefix) = prefix {
            let mut extra: Vec<&String> = self
                .tensors
                .keys()
                .filter(|k| k.starts_with(prefix) && !expected.iter().any(|(n, _)| n == *k))
                .collect();
            extra.sort();
            if let Some(name) = extra.first() {
                return Err(Error::Model(format!(
                    "unexpected trigger generator tensor {name} ({} in all)",
                    extra.len()
                )));
            }
        }
        Ok(())
    }

    /// Wraps this (plain) model with a freshly initialised, seeded CLTG for its backbone's
    /// injection points (`cltg.*` weights): the starting point of shielding training. The full
    /// decode of the result is exactly the plain model's until the backbone itself is trained.
    ///
    /// Works for every backbone that declares injection points (the scale hyperprior, registered
    /// backbones); `psic-hy2018`, which has its own generator, and a backbone without injection
    /// points are an [`Error::InvalidArgument`].
    pub fn with_new_cltg(&self, seed: u64, device: &Device) -> Result<Self> {
        self.with_new_cltg_modulated(seed, Modulation::Bias, device)
    }

    /// [`with_new_cltg`](Self::with_new_cltg) with triggers of the given [`Modulation`] (fresh
    /// gain projections start at zero, see [`Cltg`]). A shielded model's generator is replaced.
    pub fn with_new_cltg_modulated(
        &self,
        seed: u64,
        modulation: Modulation,
        device: &Device,
    ) -> Result<Self> {
        if matches!(self.architecture, Architecture::PsicHy2018(_)) {
            return Err(Error::InvalidArgument(format!(
                "{} already has its own trigger generator",
                self.architecture.name()
            )));
        }
        let points = self.build_backbone(device)?.injection_points();
        if points.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} declares no injection points: there is nowhere to put a trigger generator",
                self.architecture.name()
            )));
        }
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, seed, DType::F32, device);
        Cltg::new(vb, &CltgConfig::new(points).with_modulation(modulation))?;
        let mut out = self.without_cltg();
        for (name, var) in varmap.data().lock().expect("VarMap lock").iter() {
            out.tensors.insert(name.clone(), var.as_tensor().copy()?);
        }
        let conditions = serde_json::to_string(&Conditions::default()).unwrap_or_default();
        out.extra_metadata.insert("conditions".into(), conditions);
        Ok(out)
    }

    /// This model's backbone with the generic (`cltg.*`) trigger generator and the conditions of
    /// `donor`, a shielded model of a backbone with the same injection points: the starting
    /// point for re-shielding a retrained backbone from a trained shield instead of a fresh
    /// generator. A generator of its own (if any) is replaced; the backbone's weights, levels
    /// and metadata stay. The shield of the result is whatever the donor's triggers do to this
    /// synthesis, which is measured, not assumed: a shield is trained together with its
    /// synthesis (`docs/TRAINING.md`, "Re-shielding a retrained backbone").
    ///
    /// [`Error::InvalidArgument`] for a `psic-hy2018` model (its generator is its own), a donor
    /// without a generic generator, or injection points of other widths.
    pub fn with_generator_from(&self, donor: &ModelFile, device: &Device) -> Result<Self> {
        if matches!(self.architecture, Architecture::PsicHy2018(_)) {
            return Err(Error::InvalidArgument(format!(
                "{} has its own trigger generator",
                self.architecture.name()
            )));
        }
        let cfg = donor.generic_cltg_config()?;
        let points = self.build_backbone(device)?.injection_points();
        if cfg.injection_points != points {
            return Err(Error::InvalidArgument(format!(
                "the donor's generator feeds injection points of {:?} channels, this backbone \
                 has {points:?}",
                cfg.injection_points
            )));
        }
        let prefix = format!("{}.", CltgNames::GENERIC_PREFIX);
        let mut out = self.without_cltg();
        for (name, t) in donor.tensors.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            out.tensors
                .insert(name.clone(), t.to_device(device)?.copy()?);
        }
        let conditions = donor.conditions()?.unwrap_or_default();
        let json = serde_json::to_string(&conditions)
            .map_err(|e| Error::Model(format!("conditions metadata: {e}")))?;
        out.extra_metadata.insert("conditions".into(), json);
        out.build_generator(device)?;
        Ok(out)
    }

    /// This model without its generic `cltg.*` generator (the `conditions` metadata stays).
    fn without_cltg(&self) -> Self {
        let prefix = format!("{}.", CltgNames::GENERIC_PREFIX);
        let mut out = self.clone();
        out.tensors.retain(|k, _| !k.starts_with(&prefix));
        out
    }

    /// Gives a shielded model's generic generator gain projections (`cltg.scale.*`, zero, so
    /// every decode is unchanged until training moves them): its triggers become
    /// [`Modulation::Affine`]. A generator that already has gains is returned as it is.
    pub fn with_cltg_gains(&self, device: &Device) -> Result<Self> {
        let cfg = self.generic_cltg_config()?;
        if cfg.modulation.has_scale() {
            return Ok(self.clone());
        }
        self.with_cltg_modulation(Modulation::Affine, 0, device)
    }

    /// Extends a shielded model's generic generator to `modulation`, adding what it lacks:
    /// gain and adaptive-weight projections at zero (so every decode is unchanged until
    /// training moves them) and adaptive convolutions seeded by `seed`. Only extensions are
    /// possible (bias → affine → adaptive, scale → affine → adaptive); anything else is an
    /// [`Error::InvalidArgument`].
    pub fn with_cltg_modulation(
        &self,
        modulation: Modulation,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let have = self.generic_cltg_config()?;
        let (h, w) = (have.modulation, modulation);
        let keeps = (!h.has_bias() || w.has_bias())
            && (!h.has_scale() || w.has_scale())
            && (!h.has_adaptive() || w.has_adaptive());
        if !keeps {
            return Err(Error::InvalidArgument(format!(
                "cannot turn a generator with {h:?} triggers into one with {w:?} triggers \
                 (it would drop trained weights): start a fresh generator"
            )));
        }
        let cfg = have.with_modulation(modulation);
        let names = CltgNames::generic(cfg.injection_points.len());
        // Fresh tensors come from a seeded generator of the target layout; those that exist
        // stay as they are.
        let varmap = candle_nn::VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, seed, DType::F32, device);
        Cltg::new(vb, &cfg)?;
        let fresh = varmap.data().lock().expect("VarMap lock");
        let mut out = self.clone();
        for (name, shape) in names.tensor_shapes(&cfg) {
            if let std::collections::hash_map::Entry::Vacant(e) = out.tensors.entry(name) {
                let var = fresh.get(e.key()).ok_or_else(|| {
                    Error::Model(format!("no fresh generator tensor {}", e.key()))
                })?;
                let is_projection = shape.len() == 2;
                e.insert(if is_projection {
                    Tensor::zeros(shape, DType::F32, device)?
                } else {
                    var.as_tensor().copy()?
                });
            }
        }
        Ok(out)
    }

    /// The configuration of the model's generic (`cltg.*`) generator.
    fn generic_cltg_config(&self) -> Result<CltgConfig> {
        CltgConfig::infer_generic(&self.tensors)?.ok_or_else(|| {
            Error::InvalidArgument("the model has no generic (cltg.*) trigger generator".into())
        })
    }

    /// The conditions of a shielded model: the `conditions` metadata, or the official
    /// convention (0 full, 1 shielded) for models with a generator and no such entry.
    pub fn conditions(&self) -> Result<Option<Conditions>> {
        if let Some(json) = self.extra_metadata.get("conditions") {
            let bad = |e: &dyn std::fmt::Display| {
                Error::Model(format!("bad conditions metadata {json:?}: {e}"))
            };
            let c: Conditions = serde_json::from_str(json).map_err(|e| bad(&e))?;
            c.check().map_err(|e| bad(&e))?;
            return Ok(Some(c));
        }
        let shielded = matches!(self.architecture, Architecture::PsicHy2018(_))
            || self.tensors.keys().any(|k| k.starts_with("cltg."));
        Ok(shielded.then(Conditions::default))
    }

    /// This shielded model with its shielded decode at `strength` by default
    /// ([`Conditions::strength`], recorded in the `conditions` metadata; the weights, the
    /// fingerprint and so the streams are unchanged). Fails for a plain model.
    pub fn with_shield_strength(&self, strength: f32) -> Result<Self> {
        let conditions = self.conditions()?.ok_or_else(|| {
            Error::InvalidArgument(
                "the model has no trigger generator: nothing to strengthen".into(),
            )
        })?;
        let conditions = conditions.with_strength(strength)?;
        let mut out = self.clone();
        let json = serde_json::to_string(&conditions)
            .map_err(|e| Error::Model(format!("conditions metadata: {e}")))?;
        out.extra_metadata.insert("conditions".into(), json);
        Ok(out)
    }

    /// The model's quality levels (`rate.gains` and the `rate.levels` metadata); `None` for a
    /// model without levels (one implicit level, all gains 1).
    pub fn rate_levels(&self) -> Result<Option<crate::rate::RateLevels>> {
        use crate::rate::{RateLevels, GAINS_TENSOR, TENSOR_PREFIX};
        if let Some(k) = self
            .tensors
            .keys()
            .find(|k| k.starts_with(TENSOR_PREFIX) && k.as_str() != GAINS_TENSOR)
        {
            return Err(Error::Model(format!("unknown quality-level tensor {k}")));
        }
        RateLevels::from_model_parts(self.tensors.get(GAINS_TENSOR), |k| {
            self.extra_metadata.get(k).map(String::as_str)
        })
    }

    /// This model with `levels` as its quality levels (replacing any it had); `None` removes
    /// them. The fingerprint does not change.
    pub fn with_rate_levels(&self, levels: Option<&crate::rate::RateLevels>) -> Result<Self> {
        use crate::rate::{DEFAULT_LEVEL_METADATA, GAINS_TENSOR, LEVELS_METADATA};
        let mut out = self.clone();
        out.tensors.remove(GAINS_TENSOR);
        out.extra_metadata.remove(LEVELS_METADATA);
        out.extra_metadata.remove(DEFAULT_LEVEL_METADATA);
        if let Some(l) = levels {
            out.tensors.insert(GAINS_TENSOR.into(), l.gains_tensor()?);
            out.extra_metadata.extend(l.metadata());
        }
        Ok(out)
    }

    /// The model's fingerprint (see the module docs).
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let mut h = Sha256::new();
        h.update(MODEL_FORMAT.as_bytes());
        h.update([0]);
        h.update(self.architecture.name().as_bytes());
        h.update([0]);
        h.update(self.architecture.config_json().to_string().as_bytes());
        // The trigger generator of a wrapped backbone is left out: shielding a backbone must not
        // change its streams (a wrapped model reads the plain model's streams and vice versa).
        // So are the quality levels: adding levels keeps the model's level-less streams
        // decodable, and each level-3 stream carries the check of its own level's gains.
        let prefix = format!("{}.", crate::shield::CltgNames::GENERIC_PREFIX);
        let mut names: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !k.starts_with(&prefix) && !k.starts_with(crate::rate::TENSOR_PREFIX))
            .collect();
        names.sort();
        for name in names {
            let t = &self.tensors[name];
            h.update([0]);
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
            h.update(tensor_le_bytes(t)?);
        }
        let digest = h.finalize();
        let mut f = [0u8; FINGERPRINT_LEN];
        f.copy_from_slice(&digest[..FINGERPRINT_LEN]);
        Ok(f)
    }

    /// Serialises as a psic model file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut meta: HashMap<String, String> = self.extra_metadata.clone().into_iter().collect();
        meta.insert("format".into(), MODEL_FORMAT.into());
        meta.insert("psic.model_version".into(), MODEL_VERSION.into());
        meta.insert("architecture".into(), self.architecture.name().into());
        meta.insert("config".into(), self.architecture.config_json().to_string());
        serialize_safetensors("model", self.tensors.iter(), meta)
    }

    /// Writes the model file atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::image_io::write_atomic(path, &self.to_bytes()?)
    }
}

/// Serialises tensors and metadata as a safetensors file whose bytes depend only on its content.
/// `safetensors::serialize` orders the tensors by alignment and name but writes the metadata in
/// the iteration order of its `HashMap`, which differs from process to process; here the header
/// is rewritten with the metadata keys sorted, so exporting the same weights twice gives the same
/// file (and checksum). `what` names the file kind in the error. Model files and checkpoints.
pub(crate) fn serialize_safetensors<'a, S>(
    what: &str,
    tensors: impl IntoIterator<Item = (S, &'a Tensor)>,
    meta: HashMap<String, String>,
) -> Result<Vec<u8>>
where
    S: AsRef<str> + Ord + std::fmt::Display,
{
    /// A header entry: the metadata (all strings) or a tensor's dtype, shape and offsets.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Metadata(BTreeMap<String, String>),
        Tensor(serde_json::Value),
    }
    let fail = |e: &dyn std::fmt::Display| Error::Model(format!("cannot serialise {what}: {e}"));
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| fail(&e))?;
    let (len, rest) = bytes.split_at(8);
    let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
    let (header, data) = rest.split_at(len);
    let header: BTreeMap<String, Entry> = serde_json::from_slice(header).map_err(|e| fail(&e))?;
    let mut header = serde_json::to_string(&header).map_err(|e| fail(&e))?;
    // The data starts 8-byte aligned, as safetensors writes it.
    header.push_str(&" ".repeat((8 - header.len() % 8) % 8));
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

/// The raw little-endian bytes of a tensor in its own dtype.
fn tensor_le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    fn bytes<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        f: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>> {
        Ok(t.to_vec1::<T>()?.into_iter().flat_map(f).collect())
    }
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    match t.dtype() {
        DType::U8 => Ok(t.to_vec1::<u8>()?),
        DType::U32 => bytes(&t, u32::to_le_bytes),
        DType::I32 => bytes(&t, i32::to_le_bytes),
        DType::I64 => bytes(&t, i64::to_le_bytes),
        DType::F16 => bytes(&t, half::f16::to_le_bytes),
        DType::BF16 => bytes(&t, half::bf16::to_le_bytes),
        DType::F64 => bytes(&t, f64::to_le_bytes),
        _ => bytes(&t.to_dtype(DType::F32)?, f32::to_le_bytes),
    }
}
