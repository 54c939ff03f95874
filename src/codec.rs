//! [`Codec`]: images in, psic bitstreams out, and back.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::backbone::{LicBackbone, Triggers};
use crate::bitstream::{
    fingerprint_hex, Bitstream, EntropyPath, Fingerprint, StreamLevel, MAX_SIDE,
};
use crate::entropy::{EntropyCoder, LatentLevel, RansCoder};
use crate::model::ModelFile;
use crate::rate::RateLevels;
use crate::shield::{Condition, Conditions, TriggerGenerator};
use crate::{Error, Precision, Result};

/// A learned image codec ready to encode and decode: a backbone, its fingerprint, an entropy
/// coder and — for shielded models — the trigger generator and the conditions it was trained
/// for.
///
/// One bitstream, two decodes: [`decode_shielded`](Self::decode_shielded) (what
/// [`decode`](Self::decode) gives, and all anyone with the stream and the public model gets)
/// and [`decode_full`](Self::decode_full) with the model's full condition.
pub struct Codec {
    backbone: Box<dyn LicBackbone>,
    shield: Option<Shield>,
    fingerprint: Fingerprint,
    coder: Box<dyn EntropyCoder + Send + Sync>,
    max_pixels: u64,
    entropy_path: EntropyPath,
    tile_pixels: u64,
    levels: Option<RateLevels>,
    level: usize,
}

/// Default limit on the pixels of an image to encode or a stream to decode (16.8 MP, e.g.
/// 4096x4096): a hostile header cannot make the decoder allocate more than an image of this size
/// needs. Images over [`Codec::tile_pixels`] run their transforms in row strips, so the CLI with
/// the default model peaked at 692 MB (encode) and 587 MB (decode) on a 4032x4160 photo
/// (`docs/FORMAT.md`, "Memory"). Lower it with [`Codec::with_max_pixels`] where that is too
/// much, raise it for larger images.
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 24;

/// Refuses a `w`x`h` image over a codec's limit of `max_pixels` ([`Codec::max_pixels`]).
pub(crate) fn check_pixel_limit(w: u64, h: u64, max_pixels: u64) -> Result<()> {
    if w.saturating_mul(h) > max_pixels {
        return Err(Error::Image(format!(
            "{w}x{h} is over this codec's limit of {max_pixels} pixels (see Codec::with_max_pixels)"
        )));
    }
    Ok(())
}

/// A trigger generator and the conditions its model was trained for.
#[derive(Debug)]
struct Shield {
    generator: Box<dyn TriggerGenerator>,
    conditions: Conditions,
    /// The shielded decode's triggers at `conditions.strength`, computed once.
    shielded: Triggers,
    /// The full decode's triggers, computed once (without adaptive terms whose weights are
    /// all zero, as an anchored generator's are).
    full: Triggers,
}

impl Shield {
    fn new(generator: Box<dyn TriggerGenerator>, conditions: Conditions) -> Result<Self> {
        conditions.check()?;
        let (full, shielded) = conditions.decode_triggers(generator.as_ref())?;
        Ok(Self {
            generator,
            conditions,
            shielded: shielded.without_zero_adaptive()?,
            full: full.without_zero_adaptive()?,
        })
    }

    /// Triggers for `condition`: the model's two conditions as computed once (the shielded
    /// one at the configured strength), any other condition as the generator makes it.
    fn triggers(&self, condition: &Condition) -> Result<Triggers> {
        if *condition == self.conditions.shielded {
            Ok(self.shielded.clone())
        } else if *condition == self.conditions.full {
            Ok(self.full.clone())
        } else {
            self.generator.triggers(condition, 1)
        }
    }
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("architecture", &self.backbone.architecture())
            .field("config", &self.backbone.config_json())
            .field("fingerprint", &fingerprint_hex(&self.fingerprint))
            .field("conditions", &self.conditions())
            .field("entropy_path", &self.entropy_path)
            .field("levels", &self.levels())
            .field("level", &self.level)
            .finish()
    }
}

/// The decoded latent of a stream, before synthesis.
#[derive(Debug, Clone)]
pub struct DecodedLatent {
    /// The parsed stream.
    pub stream: Bitstream,
    /// The quantised latent `y_hat`, `[1, C, H, W]`.
    pub y_hat: Tensor,
    /// The Gaussian-conditional table index of each `y` symbol (from the decoded hyperprior),
    /// as the entropy coder read `stream.strings[0]` with them.
    pub y_indexes: Vec<i32>,
}

impl Codec {
    /// Loads a psic model file onto the CPU.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(path, &Device::Cpu)
    }

    /// Loads a psic model file onto `device`.
    pub fn load_on(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_model_file(&ModelFile::load(path, device)?, device)
    }

    /// Builds a codec from a parsed model file (with its trigger generator, if it has one).
    /// Its transforms run at [`Precision::auto`] (`PSIC_PRECISION`, else f32, so that a
    /// decode gives the same pixels on every CPU): see [`with_precision`](Self::with_precision).
    pub fn from_model_file(model: &ModelFile, device: &Device) -> Result<Self> {
        let mut codec = Self::new(model.build_backbone(device)?, model.fingerprint()?)
            .with_precision(Precision::auto())?;
        if let Some(levels) = model.rate_levels()? {
            codec = codec.with_rate_levels(levels)?;
        }
        // The generator and the conditions come together or not at all: a shielded model that
        // lost either must not load as a plain codec (its default decode would be the full one).
        match (model.build_generator(device)?, model.conditions()?) {
            (Some(g), Some(c)) => codec.with_shield(g, c),
            (None, None) => Ok(codec),
            (Some(_), None) => Err(Error::Model(
                "the model has a trigger generator but no conditions".into(),
            )),
            (None, Some(_)) => Err(Error::Model(
                "the model declares conditions but has no trigger generator".into(),
            )),
        }
    }

    /// Adds a trigger generator (for this backbone's injection points) and the conditions it
    /// was trained for: from now on [`decode`](Self::decode) gives the shielded decode.
    pub fn with_shield(
        mut self,
        generator: Box<dyn TriggerGenerator>,
        conditions: Conditions,
    ) -> Result<Self> {
        let points = self.backbone.injection_points();
        if generator.injection_points() != points.as_slice() {
            return Err(Error::InvalidArgument(format!(
                "trigger generator serves injection points {:?}, the backbone has {:?}",
                generator.injection_points(),
                points
            )));
        }
        let mut generator = generator;
        generator.set_precision(self.backbone.transform_precision())?;
        self.shield = Some(Shield::new(generator, conditions)?);
        Ok(self)
    }

    /// The conditions of a shielded model; `None` for a plain one.
    pub fn conditions(&self) -> Option<Conditions> {
        self.shield.as_ref().map(|s| s.conditions)
    }

    /// Sets the shield strength of the shielded decode ([`Conditions::strength`]: 1 is the
    /// trained shield, 0 the full decode, in between a weaker, less visible shield). Fails for a
    /// plain model and for a strength outside `[0, MAX_SHIELD_STRENGTH]`.
    pub fn with_shield_strength(mut self, strength: f32) -> Result<Self> {
        let shield = self.shield.take().ok_or_else(|| {
            Error::InvalidArgument(
                "this model has no trigger generator: nothing to strengthen".into(),
            )
        })?;
        let conditions = shield.conditions.with_strength(strength)?;
        self.shield = Some(Shield::new(shield.generator, conditions)?);
        Ok(self)
    }

    /// A codec over any backbone; `fingerprint` identifies its weights in the streams it writes.
    pub fn new(backbone: Box<dyn LicBackbone>, fingerprint: Fingerprint) -> Self {
        Self {
            backbone,
            shield: None,
            fingerprint,
            coder: Box::new(RansCoder),
            max_pixels: DEFAULT_MAX_PIXELS,
            entropy_path: EntropyPath::Portable,
            tile_pixels: crate::tiles::DEFAULT_TILE_PIXELS,
            levels: None,
            level: 0,
        }
    }

    /// Gives the codec quality levels (one gain per latent channel per level, [`crate::rate`]);
    /// it then writes version-3 streams at [`level`](Self::level) (the levels' default,
    /// [`RateLevels::default_level`], until [`with_level`](Self::with_level) says otherwise) and
    /// decodes the streams of its levels.
    pub fn with_rate_levels(mut self, levels: RateLevels) -> Result<Self> {
        let m = self.backbone.latent_channels();
        if levels.channels() != m {
            return Err(Error::Model(format!(
                "{} has {} gains per level for a latent of {m} channels",
                crate::rate::GAINS_TENSOR,
                levels.channels()
            )));
        }
        self.level = levels.default_level();
        self.levels = Some(levels);
        Ok(self)
    }

    /// Sets the quality level of the streams this codec writes: `0..levels()`
    /// ([`Error::UnknownLevel`] otherwise). Decoding always follows the stream's own level.
    pub fn with_level(mut self, level: usize) -> Result<Self> {
        if level >= self.levels() {
            return Err(Error::UnknownLevel {
                level,
                levels: self.levels(),
            });
        }
        self.level = level;
        Ok(self)
    }

    /// The number of quality levels: those of the model's `rate.gains`, or 1 (the implicit
    /// level, all gains 1) for a model without levels.
    pub fn levels(&self) -> usize {
        self.levels.as_ref().map_or(1, RateLevels::len)
    }

    /// The quality level of the streams this codec writes.
    pub fn level(&self) -> usize {
        self.level
    }

    /// The model's quality levels; `None` for a model without levels.
    pub fn rate_levels(&self) -> Option<&RateLevels> {
        self.levels.as_ref()
    }

    /// The gains and header level of the streams this codec writes.
    fn encoding_level(&self) -> (Option<&[f32]>, Option<StreamLevel>) {
        let Some(levels) = &self.levels else {
            return (None, None);
        };
        let header = levels.check(self.level).map(|check| StreamLevel {
            index: self.level as u8,
            check,
        });
        (levels.gains(self.level), header)
    }

    /// The gains of a stream's level: `None` (all 1) for a stream without a level; a typed
    /// error for a level this model lacks or has with other gains.
    fn stream_gains(&self, level: Option<StreamLevel>) -> Result<Option<&[f32]>> {
        let Some(level) = level else {
            return Ok(None);
        };
        let index = usize::from(level.index);
        let levels = self.levels.as_ref().ok_or(Error::UnknownLevel {
            level: index,
            levels: 1,
        })?;
        if levels.check(index) != Some(level.check) {
            return Err(match levels.gains(index) {
                None => Error::UnknownLevel {
                    level: index,
                    levels: levels.len(),
                },
                Some(_) => Error::LevelMismatch { level: index },
            });
        }
        Ok(levels.gains(index))
    }

    /// Sets the entropy path of the streams this codec writes (decoding always follows the
    /// stream's own). The default, [`EntropyPath::Portable`], decodes the same on every device,
    /// thread count and kernel path; [`EntropyPath::Float`] gives CompressAI-compatible
    /// streams (the table indexes CompressAI's own code computes, version-1 headers) that only
    /// decode reliably on the same kernels. A backbone without a portable hyper-synthesis
    /// ([`LicBackbone::hyper_synthesis_portable`]) always writes float streams.
    pub fn with_entropy_path(mut self, path: EntropyPath) -> Self {
        self.entropy_path = path;
        self
    }

    /// The entropy path of the streams this codec writes (see
    /// [`with_entropy_path`](Self::with_entropy_path)).
    pub fn entropy_path(&self) -> EntropyPath {
        self.entropy_path
    }

    /// The `y` table indexes (of the scales `σ·g` of the level's `gains`) and means from
    /// `z_hat` on `path`, and the path actually taken (a backbone without a portable
    /// hyper-synthesis falls back to the float path when encoding).
    fn entropy_params(
        &self,
        z_hat: &Tensor,
        path: EntropyPath,
        gains: Option<&[f32]>,
        decoding: bool,
    ) -> Result<(Vec<i32>, Option<Tensor>, EntropyPath)> {
        let b = self.backbone.as_ref();
        let gc = b.gaussian_conditional();
        if path == EntropyPath::Portable {
            match b.hyper_synthesis_portable(z_hat)? {
                Some(p) => {
                    let indexes = gc.indexes_at(p.scales, p.shape, gains)?;
                    let means = p
                        .means
                        .map(|m| Tensor::from_vec(m, p.shape, b.device()))
                        .transpose()?;
                    return Ok((indexes, means, path));
                }
                None if decoding => {
                    return Err(Error::Bitstream(format!(
                        "the stream uses the portable entropy path, which backbone {} lacks",
                        b.architecture()
                    )))
                }
                None => {}
            }
        }
        let params = b.hyper_synthesis(z_hat)?;
        let scales = crate::tensor_util::tensor_to_f32(&params.scales)?;
        let indexes = gc.indexes_at(scales, params.scales.dims4()?, gains)?;
        Ok((indexes, params.means, EntropyPath::Float))
    }

    /// Sets the precision of the analysis and synthesis convolutions on the CPU
    /// ([`LicBackbone::set_transform_precision`]; bf16 runs as f32 on CPUs without
    /// AVX512-BF16), and of a shield's trigger generator
    /// ([`TriggerGenerator::set_precision`]; a generator added later takes it too).
    ///
    /// Streams are compatible across precisions: the hyper-synthesis, which decides the
    /// entropy tables, always runs in f32, so any stream decodes to the same `y_hat` at either
    /// precision; only the encoder's `y` (and so the stream a given image gives) and the
    /// decoder's synthesis differ by bf16 rounding. Byte-identical strings with CompressAI
    /// (whose transforms are f32) need [`Precision::F32`].
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        self.backbone.set_transform_precision(precision)?;
        if let Some(shield) = self.shield.take() {
            // The trigger generator's own convolutions (adaptive triggers) follow, and the
            // triggers computed once are computed again with them.
            let mut generator = shield.generator;
            generator.set_precision(precision)?;
            self.shield = Some(Shield::new(generator, shield.conditions)?);
        }
        Ok(self)
    }

    /// The precision the analysis and synthesis convolutions use.
    pub fn precision(&self) -> Precision {
        self.backbone.transform_precision()
    }

    /// Replaces the entropy coder (the default is the pure-Rust, CompressAI-compatible rANS).
    pub fn with_coder(mut self, coder: Box<dyn EntropyCoder + Send + Sync>) -> Self {
        self.coder = coder;
        self
    }

    /// Sets the largest image (in pixels, padding included) this codec encodes or decodes.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// The largest image (in pixels, padding included) this codec encodes or decodes.
    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    /// Sets the most image pixels (padding included) the analysis and synthesis transforms
    /// take in one pass: a larger image runs in row strips of at most this many pixels plus a
    /// few rows of context each side, with the same result ([`crate::tiles`]); at least one
    /// latent row a strip. The default, [`DEFAULT_TILE_PIXELS`](crate::tiles::DEFAULT_TILE_PIXELS)
    /// (2^21), keeps a 16.8 MP encode or decode under 1 GB; `u64::MAX` always takes one pass.
    /// Backbones that do not state their receptive field
    /// ([`LicBackbone::analysis_halo`]) always take one pass.
    pub fn with_tile_pixels(mut self, pixels: u64) -> Self {
        self.tile_pixels = pixels;
        self
    }

    /// The most image pixels the transforms take in one pass (see
    /// [`with_tile_pixels`](Self::with_tile_pixels)).
    pub fn tile_pixels(&self) -> u64 {
        self.tile_pixels
    }

    /// The longest stream this codec reads: 8 bytes for every latent symbol of the largest
    /// image it accepts ([`max_pixels`](Self::max_pixels)), plus 1 KiB for the container.
    ///
    /// That bounds every stream the encoder writes: a symbol costs at most 16 bits of rANS (a
    /// frequency of at least 1 in 2^16) plus, when it escapes, a 4-bit chunk count and at most
    /// eight 4-bit chunks, 52 bits in all; a hyperprior image of `P` pixels has `M P / 256` `y`
    /// and `N P / 4096` `z` symbols. For the default model (N 64, M 96) and pixel limit (2^24)
    /// that is 52,429,824 bytes. [`parse`](Self::parse) refuses longer streams, and callers
    /// reading a stream from a file should read at most this much
    /// ([`image_io::read_limited`](crate::image_io::read_limited)).
    pub fn max_stream_len(&self) -> u64 {
        let b = self.backbone.as_ref();
        let stride = b.latent_stride() as u64;
        let align = b.alignment() as u64;
        let symbols = (b.latent_channels() as u64)
            .saturating_mul(self.max_pixels / (stride * stride).max(1))
            .saturating_add(
                (b.hyper_channels() as u64)
                    .saturating_mul(self.max_pixels / (align * align).max(1)),
            );
        symbols.saturating_mul(8).saturating_add(1024)
    }

    fn check_pixels(&self, w: u64, h: u64) -> Result<()> {
        check_pixel_limit(w, h, self.max_pixels)
    }

    /// The backbone.
    pub fn backbone(&self) -> &dyn LicBackbone {
        self.backbone.as_ref()
    }

    /// The fingerprint written into (and required of) every stream.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Compresses an 8-bit RGB image of any size into a psic bitstream.
    pub fn encode(&self, img: &RgbImage) -> Result<Vec<u8>> {
        let y = self.analyse(img)?;
        self.encode_latent(img.width(), img.height(), &y)
    }

    /// The padded size (width, height; multiples of the backbone's alignment) of a
    /// `width`x`height` image, after checking the size against the codec's limits.
    pub fn padded_size(&self, width: u32, height: u32) -> Result<(usize, usize)> {
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(Error::Image(format!(
                "image size {width}x{height} outside 1..={MAX_SIDE} pixels per side"
            )));
        }
        self.check_pixels(width as u64, height as u64)?;
        let align = self.backbone.alignment() as u32;
        let pad = |v: u32| (v + (align - v % align) % align) as usize;
        Ok((pad(width), pad(height)))
    }

    /// The latent `y = g_a(x)` an encode starts from: `[1, M, H/s, W/s]` of the image padded
    /// to [`padded_size`](Self::padded_size) by repeating its edges (`s` the latent stride).
    pub fn analyse(&self, img: &RgbImage) -> Result<Tensor> {
        let padded = self.padded_size(img.width(), img.height())?;
        crate::tiles::analyse(self.backbone.as_ref(), img, padded, self.tile_pixels)
    }

    /// Compresses the latent `y` of a `width`x`height` image (shaped as
    /// [`analyse`](Self::analyse) gives it) at the codec's level: `z = h_a(y)`, then both
    /// quantised and entropy-coded. For encoders that choose `y` themselves, e.g. by refining
    /// it against the decoder (`psic::train::refine`); the decoder needs nothing to know.
    pub fn encode_latent(&self, width: u32, height: u32, y: &Tensor) -> Result<Vec<u8>> {
        let (w, h) = (width, height);
        let (pw, ph) = self.padded_size(w, h)?;
        let b = self.backbone.as_ref();
        let stride = b.latent_stride();
        let want = [1, b.latent_channels(), ph / stride, pw / stride];
        if y.dims() != want {
            return Err(Error::InvalidArgument(format!(
                "a latent of shape {:?} does not fit a {w}x{h} image (expected {want:?})",
                y.dims()
            )));
        }
        let (pad_w, pad_h) = (pw as u32 - w, ph as u32 - h);
        let y = y.to_device(b.device())?;
        let z = b.hyper_analysis(&y)?;
        let eb = b.entropy_bottleneck();
        let z_strings = eb.compress(&z, self.coder.as_ref())?;
        let z_hat = eb.quantize(&z)?;
        let (gains, level) = self.encoding_level();
        let (indexes, means, entropy_path) =
            self.entropy_params(&z_hat, self.entropy_path, gains, false)?;
        let gc = b.gaussian_conditional();
        let coder = self.coder.as_ref();
        let y_strings = gc.compress_at(&y, &indexes, means.as_ref(), gains, coder)?;
        let shape3 = |t: &Tensor| -> Result<[u32; 3]> {
            let (_, c, h, w) = t.dims4()?;
            Ok([c as u32, h as u32, w as u32])
        };
        let stream = Bitstream {
            fingerprint: self.fingerprint,
            width: w,
            height: h,
            pad_right: pad_w as u16,
            pad_bottom: pad_h as u16,
            y_shape: shape3(&y)?,
            z_shape: shape3(&z)?,
            entropy_path,
            level,
            strings: vec![
                y_strings.into_iter().next().unwrap_or_default(),
                z_strings.into_iter().next().unwrap_or_default(),
            ],
        };
        stream.to_bytes()
    }

    /// Parses a stream, checks that this model wrote it and that its shapes fit the model.
    pub fn parse(&self, bytes: &[u8]) -> Result<Bitstream> {
        if bytes.len() as u64 > self.max_stream_len() {
            return Err(Error::Bitstream(format!(
                "{} bytes is longer than any stream of an image within this codec's pixel limit \
                 ({} bytes, Codec::max_stream_len)",
                bytes.len(),
                self.max_stream_len()
            )));
        }
        let s = Bitstream::from_bytes(bytes)?;
        if s.fingerprint != self.fingerprint {
            return Err(Error::ModelMismatch {
                stream: fingerprint_hex(&s.fingerprint),
                model: fingerprint_hex(&self.fingerprint),
            });
        }
        self.stream_gains(s.level)?;
        let b = self.backbone.as_ref();
        let (align, stride) = (b.alignment() as u32, b.latent_stride() as u32);
        let (pw, ph) = (s.width + s.pad_right as u32, s.height + s.pad_bottom as u32);
        self.check_pixels(pw as u64, ph as u64)?;
        let ok_pad = (s.pad_right as u32) < align
            && (s.pad_bottom as u32) < align
            && pw % align == 0
            && ph % align == 0;
        let y_expect = [b.latent_channels() as u32, ph / stride, pw / stride];
        let z_expect = [b.hyper_channels() as u32, ph / align, pw / align];
        if !ok_pad || s.y_shape != y_expect || s.z_shape != z_expect || s.strings.len() != 2 {
            return Err(Error::Bitstream(format!(
                "header is inconsistent with the model: {}x{} + padding {}x{}, y {:?}, z {:?}, {} strings",
                s.width,
                s.height,
                s.pad_right,
                s.pad_bottom,
                s.y_shape,
                s.z_shape,
                s.strings.len()
            )));
        }
        Ok(s)
    }

    /// Entropy-decodes a stream into its quantised latent.
    pub fn decode_latent(&self, bytes: &[u8]) -> Result<DecodedLatent> {
        let stream = self.parse(bytes)?;
        let b = self.backbone.as_ref();
        let [_, zh, zw] = stream.z_shape.map(|v| v as usize);
        let [c, yh, yw] = stream.y_shape.map(|v| v as usize);
        let coder = self.coder.as_ref();
        let z_hat = b
            .entropy_bottleneck()
            .decompress(&[&stream.strings[1]], (zh, zw), coder)?;
        let gains = self.stream_gains(stream.level)?;
        let (indexes, means, _) = self.entropy_params(&z_hat, stream.entropy_path, gains, true)?;
        let level = LatentLevel {
            means: means.as_ref(),
            gains,
        };
        let y_hat = b.gaussian_conditional().decompress_at(
            &[&stream.strings[0]],
            &indexes,
            (1, c, yh, yw),
            level,
            coder,
            b.device(),
        )?;
        Ok(DecodedLatent {
            stream,
            y_hat,
            y_indexes: indexes,
        })
    }

    /// Triggers for `condition`: `None` for a plain model (which has one decode only).
    fn triggers(&self, condition: &Condition) -> Result<Option<Triggers>> {
        self.shield
            .as_ref()
            .map(|s| s.triggers(condition))
            .transpose()
    }

    /// The reconstruction of a decoded latent under `condition` (ignored by plain models), as a
    /// `[1, 3, H, W]` tensor cropped to the original size and NOT clamped.
    pub fn synthesize(&self, latent: &DecodedLatent, condition: &Condition) -> Result<Tensor> {
        let triggers = self.triggers(condition)?;
        let size = (latent.stream.width as usize, latent.stream.height as usize);
        let b = self.backbone.as_ref();
        crate::tiles::synthesise_tensor(b, &latent.y_hat, triggers.as_ref(), size, self.tile_pixels)
    }

    /// Decodes under an explicit condition (plain models ignore it).
    pub fn decode_with_condition(&self, bytes: &[u8], condition: &Condition) -> Result<RgbImage> {
        let latent = self.decode_latent(bytes)?;
        let triggers = self.triggers(condition)?;
        let size = (latent.stream.width as usize, latent.stream.height as usize);
        let b = self.backbone.as_ref();
        crate::tiles::synthesise(b, &latent.y_hat, triggers.as_ref(), size, self.tile_pixels)
    }

    /// The shielded decode: an image that looks right to people but that the semantic models
    /// the codec was trained against misread. Fails for a plain model, which cannot shield.
    pub fn decode_shielded(&self, bytes: &[u8]) -> Result<RgbImage> {
        let shield = self.shield.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this model has no trigger generator, so it cannot shield: use decode()".into(),
            )
        })?;
        self.decode_with_condition(bytes, &shield.conditions.shielded)
    }

    /// The full decode under `condition`: the full-semantics reconstruction when `condition` is
    /// the model's full condition ([`conditions`](Self::conditions)). For a plain model this is
    /// its only decode and `condition` is ignored.
    pub fn decode_full(&self, bytes: &[u8], condition: &Condition) -> Result<RgbImage> {
        self.decode_with_condition(bytes, condition)
    }

    /// The default decode: shielded for a shielded model, the plain reconstruction otherwise.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage> {
        match &self.shield {
            Some(_) => self.decode_shielded(bytes),
            // A plain model ignores the condition.
            None => self.decode_with_condition(bytes, &Condition::FULL),
        }
    }
}
