//! The backbone registry: backbones defined outside psic, built from model files by name.
//!
//! psic's own architectures (`bmshj2018-hyperprior`, `mbt2018-mean`, `psic-hy2018`) are built
//! in. Another crate (or a program) adds its own with [`register_backbone`]: a
//! [`BackboneFactory`] names the architecture and builds a [`LicBackbone`] from the model
//! file's configuration (JSON) and weights. From then on a model file whose `architecture`
//! metadata carries that name loads like any other ([`ModelFile::load`](crate::ModelFile::load),
//! [`Codec::load`](crate::Codec::load)), is fingerprinted from its name, configuration and
//! tensors, can be shielded with [`ModelFile::with_new_cltg`](crate::ModelFile::with_new_cltg)
//! when it declares injection points, and trains with psic's trainer (its parameter groups come
//! from [`LicBackbone::synthesis_prefixes`]).
//!
//! ```rust,ignore
//! struct TinyFactory;
//! impl BackboneFactory for TinyFactory {
//!     fn name(&self) -> &str { "tiny-hyperprior" }
//!     fn hyper_channels(&self, config: &serde_json::Value) -> Result<usize> { /* from config */ }
//!     fn build(&self, config: &serde_json::Value, vb: VarBuilder) -> Result<Box<dyn LicBackbone>> {
//!         Ok(Box::new(Tiny::new(vb, &serde_json::from_value(config.clone())?)?))
//!     }
//! }
//! psic::backbone::register_backbone(TinyFactory)?;
//! let arch = Architecture::from_name_and_config("tiny-hyperprior", r#"{"n":16,"m":24}"#)?;
//! let model = ModelFile::initialize(arch, 1, &Device::Cpu)?.with_new_cltg(2, &Device::Cpu)?;
//! ```
//!
//! `examples/custom_backbone.rs` is the whole round trip: registered, shielded, trained, saved,
//! loaded and decoded both ways.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock};

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::LicBackbone;
use crate::{Error, Result};

/// Builds one architecture of backbone from a model file's configuration and weights.
///
/// The factory is registered once per process ([`register_backbone`]); the configuration it
/// receives is the model file's `config` metadata (JSON), the weights come through a
/// [`VarBuilder`] (psic's model loader, or a fresh seeded initialisation, or the trainer's
/// variables). A factory must not panic on a bad configuration or missing weights: it returns
/// [`Error::Model`] (or the candle error of the missing tensor).
pub trait BackboneFactory: Send + Sync {
    /// The architecture name written into model files (metadata `architecture`). Must not be
    /// one of psic's built-in names.
    fn name(&self) -> &str;

    /// Channels of the hyper-latent `z` (the width of the entropy bottleneck) for a
    /// configuration: psic computes the coding tables of a model file before it builds the
    /// backbone. An unusable configuration is an [`Error::Model`].
    fn hyper_channels(&self, config: &serde_json::Value) -> Result<usize>;

    /// Builds the backbone: loads its weights from `vb` (or creates them, when `vb` is backed
    /// by a `VarMap` for initialisation and training).
    fn build(&self, config: &serde_json::Value, vb: VarBuilder) -> Result<Box<dyn LicBackbone>>;

    /// The configuration of a foreign checkpoint (a state dict) that has this architecture's
    /// tensor names, for [`ModelFile::import`](crate::ModelFile::import) and
    /// [`Architecture::infer`](crate::model::Architecture::infer); `None` (the default) when
    /// the checkpoint is not of this architecture.
    fn infer_config(
        &self,
        _tensors: &HashMap<String, Tensor>,
    ) -> Option<Result<serde_json::Value>> {
        None
    }
}

/// The registered factories by name.
fn registry() -> &'static RwLock<BTreeMap<String, Arc<dyn BackboneFactory>>> {
    static REGISTRY: OnceLock<RwLock<BTreeMap<String, Arc<dyn BackboneFactory>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Registers a backbone architecture for this process, so that model files naming it load,
/// shield, train and save like psic's own.
///
/// Errors ([`Error::InvalidArgument`]): an empty name, a name with characters other than ASCII
/// letters, digits, `-`, `_` and `.`, a built-in name, or a name already registered (register
/// each architecture once, for instance at start-up).
pub fn register_backbone(factory: impl BackboneFactory + 'static) -> Result<()> {
    let name = factory.name().to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::InvalidArgument(format!(
            "backbone name {name:?}: use ASCII letters, digits, '-', '_' or '.'"
        )));
    }
    if crate::model::Architecture::NAMES.contains(&name.as_str()) {
        return Err(Error::InvalidArgument(format!(
            "backbone name {name:?} is built into psic"
        )));
    }
    let mut map = registry().write().unwrap_or_else(|e| e.into_inner());
    if map.contains_key(&name) {
        return Err(Error::InvalidArgument(format!(
            "backbone {name:?} is already registered"
        )));
    }
    map.insert(name, Arc::new(factory));
    Ok(())
}

/// Names of the backbones registered with [`register_backbone`], in name order (the built-in
/// ones are [`Architecture::NAMES`](crate::model::Architecture::NAMES)).
pub fn registered_backbones() -> Vec<String> {
    let map = registry().read().unwrap_or_else(|e| e.into_inner());
    map.keys().cloned().collect()
}

/// The factory registered under `name`.
pub(crate) fn factory(name: &str) -> Option<Arc<dyn BackboneFactory>> {
    let map = registry().read().unwrap_or_else(|e| e.into_inner());
    map.get(name).cloned()
}

/// Every registered factory, in name order.
pub(crate) fn factories() -> Vec<Arc<dyn BackboneFactory>> {
    let map = registry().read().unwrap_or_else(|e| e.into_inner());
    map.values().cloned().collect()
}

/// A registered architecture with its configuration: the
/// [`Architecture::Registered`](crate::model::Architecture::Registered) variant's payload.
#[derive(Clone)]
pub struct RegisteredArchitecture {
    name: String,
    config: serde_json::Value,
    hyper_channels: usize,
    factory: Arc<dyn BackboneFactory>,
}

impl RegisteredArchitecture {
    /// Looks `name` up in the registry and checks `config` with its factory.
    ///
    /// Errors: [`Error::Model`] for an unknown name (listing the known ones) or a configuration
    /// the factory refuses.
    pub fn new(name: &str, config: serde_json::Value) -> Result<Self> {
        let factory = factory(name).ok_or_else(|| {
            let mut known: Vec<String> = crate::model::Architecture::NAMES
                .iter()
                .map(|s| s.to_string())
                .collect();
            known.extend(registered_backbones());
            Error::Model(format!(
                "unknown architecture {name:?} (known: {}; register others with \
                 psic::backbone::register_backbone)",
                known.join(", ")
            ))
        })?;
        let hyper_channels = factory.hyper_channels(&config)?;
        if hyper_channels == 0 {
            return Err(Error::Model(format!(
                "{name}: the configuration {config} gives a hyper-latent of 0 channels"
            )));
        }
        Ok(Self {
            name: name.to_string(),
            config,
            hyper_channels,
            factory,
        })
    }

    /// The architecture name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration (JSON), as written into model files.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Channels of the hyper-latent.
    pub fn hyper_channels(&self) -> usize {
        self.hyper_channels
    }

    /// Builds the backbone from weights in `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn LicBackbone>> {
        self.factory.build(&self.config, vb)
    }
}

impl std::fmt::Debug for RegisteredArchitecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredArchitecture")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

impl PartialEq for RegisteredArchitecture {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.config == other.config
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::backbone::{ScaleHyperprior, ScaleHyperpriorConfig};
    use crate::model::Architecture;
    use crate::{Codec, ModelFile};

    /// The scale hyperprior under another name, with a synthesis prefix of its own choosing.
    #[derive(Debug)]
    struct Renamed(ScaleHyperprior);

    impl LicBackbone for Renamed {
        fn architecture(&self) -> &'static str {
            "test-renamed-hyperprior"
        }
        fn config_json(&self) -> serde_json::Value {
            self.0.config_json()
        }
        fn device(&self) -> &candle_core::Device {
            self.0.device()
        }
        fn latent_channels(&self) -> usize {
            self.0.latent_channels()
        }
        fn hyper_channels(&self) -> usize {
            self.0.hyper_channels()
        }
        fn analysis(&self, x: &Tensor) -> Result<Tensor> {
            self.0.analysis(x)
        }
        fn hyper_analysis(&self, y: &Tensor) -> Result<Tensor> {
            self.0.hyper_analysis(y)
        }
        fn hyper_synthesis(&self, z_hat: &Tensor) -> Result<crate::backbone::GaussianParams> {
            self.0.hyper_synthesis(z_hat)
        }
        fn injection_points(&self) -> Vec<usize> {
            self.0.injection_points()
        }
        fn synthesis(
            &self,
            y_hat: &Tensor,
            triggers: Option<&crate::backbone::Triggers>,
        ) -> Result<Tensor> {
            self.0.synthesis(y_hat, triggers)
        }
        fn synthesis_prefixes(&self) -> Vec<String> {
            vec!["g_s.".into()]
        }
        fn entropy_bottleneck(&self) -> &crate::entropy::EntropyBottleneck {
            self.0.entropy_bottleneck()
        }
        fn gaussian_conditional(&self) -> &crate::entropy::GaussianConditional {
            self.0.gaussian_conditional()
        }
    }

    struct RenamedFactory;

    impl BackboneFactory for RenamedFactory {
        fn name(&self) -> &str {
            "test-renamed-hyperprior"
        }
        fn hyper_channels(&self, config: &serde_json::Value) -> Result<usize> {
            config["n"]
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::Model(format!("no n in {config}")))
        }
        fn build(
            &self,
            config: &serde_json::Value,
            vb: VarBuilder,
        ) -> Result<Box<dyn LicBackbone>> {
            let cfg: ScaleHyperpriorConfig = serde_json::from_value(config.clone())
                .map_err(|e| Error::Model(format!("bad config {config}: {e}")))?;
            Ok(Box::new(Renamed(ScaleHyperprior::new(vb, &cfg)?)))
        }
    }

    /// Registers the test factory once for every test of this process.
    fn registered() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| register_backbone(RenamedFactory).unwrap());
    }

    #[test]
    fn registered_backbone_loads_shields_and_saves_like_a_built_in_one() {
        registered();
        let dev = Device::Cpu;
        let arch =
            Architecture::from_name_and_config("test-renamed-hyperprior", r#"{"n":8,"m":12}"#)
                .unwrap();
        assert_eq!(arch.name(), "test-renamed-hyperprior");
        assert_eq!(arch.hyper_channels(), 8);
        let plain = ModelFile::initialize(arch, 3, &dev).unwrap();
        assert!(plain.build_generator(&dev).unwrap().is_none());
        let shielded = plain.with_new_cltg(4, &dev).unwrap();
        assert_eq!(
            shielded.fingerprint().unwrap(),
            plain.fingerprint().unwrap()
        );
        let loaded = ModelFile::from_bytes(&shielded.to_bytes().unwrap(), &dev).unwrap();
        assert_eq!(loaded.architecture, shielded.architecture);
        assert_eq!(loaded.fingerprint().unwrap(), plain.fingerprint().unwrap());
        let backbone = loaded.build_backbone(&dev).unwrap();
        assert_eq!(backbone.synthesis_prefixes(), vec!["g_s.".to_string()]);

        // The same weights as the built-in architecture give the same decode; the wrapped
        // model's full decode is the plain one, its shielded decode differs.
        let img =
            image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([x as u8 * 6, y as u8 * 9, 77]));
        let plain_codec = Codec::from_model_file(&plain, &dev).unwrap();
        let codec = Codec::from_model_file(&loaded, &dev).unwrap();
        let bytes = codec.encode(&img).unwrap();
        assert_eq!(bytes, plain_codec.encode(&img).unwrap());
        let full = codec
            .decode_full(&bytes, &codec.conditions().unwrap().full)
            .unwrap();
        assert_eq!(full, plain_codec.decode(&bytes).unwrap());
        assert_ne!(codec.decode_shielded(&bytes).unwrap(), full);
    }

    #[test]
    fn names_are_checked() {
        registered();
        let again = register_backbone(RenamedFactory).unwrap_err();
        assert!(again.to_string().contains("already registered"), "{again}");
        struct Named(&'static str);
        impl BackboneFactory for Named {
            fn name(&self) -> &str {
                self.0
            }
            fn hyper_channels(&self, _: &serde_json::Value) -> Result<usize> {
                Ok(1)
            }
            fn build(&self, _: &serde_json::Value, _: VarBuilder) -> Result<Box<dyn LicBackbone>> {
                Err(Error::Model("never built".into()))
            }
        }
        for bad in [
            "bmshj2018-hyperprior",
            "mbt2018-mean",
            "psic-hy2018",
            "",
            "a b",
            "é",
        ] {
            assert!(register_backbone(Named(bad)).is_err(), "{bad:?}");
        }
        let unknown =
            Architecture::from_name_and_config("no-such-backbone", r#"{"n":8}"#).unwrap_err();
        let msg = unknown.to_string();
        assert!(msg.contains("no-such-backbone") && msg.contains("test-renamed-hyperprior"));
        let bad_config =
            Architecture::from_name_and_config("test-renamed-hyperprior", r#"{"m":8}"#)
                .unwrap_err();
        assert!(matches!(bad_config, Error::Model(_)), "{bad_config}");
        assert!(registered_backbones().contains(&"test-renamed-hyperprior".to_string()));
    }

    #[test]
    fn psic_hy2018_refuses_a_new_cltg() {
        let dev = Device::Cpu;
        let arch = Architecture::PsicHy2018(crate::backbone::PsicHy2018Config { n: 8, m: 12 });
        let model = ModelFile::initialize(arch, 1, &dev).unwrap();
        assert!(matches!(
            model.with_new_cltg(1, &dev),
            Err(Error::InvalidArgument(_))
        ));
    }
}
