//! The psic bitstream container (versions 1 to 3). `docs/FORMAT.md` is the normative
//! description.
//!
//! ```text
//! offset size  field
//!  0     4     magic "PSIC"
//!  4     2     format version (u16 LE): 1 (float entropy path), 2 or 3 (quality level)
//!  6     2     version 1: flags (u16 LE), must be 0
//!              version 2: entropy path (u8: 1 portable), then flags (u8), must be 0
//!              version 3: entropy path (u8: 0 float, 1 portable), then the level (u8)
//!  8     16    model fingerprint (first 16 bytes of the model's SHA-256)
//!              version 3 only: 8 bytes, the level check (RateLevels::check); the offsets
//!              below then move by 8
//! 24     4+4   original width, height (u32 LE)
//! 32     2+2   padding added on the right, at the bottom (u16 LE)
//! 36     12    y shape C, H, W (u32 LE each)
//! 48     12    z shape C, H, W (u32 LE each)
//! 60     1     number of strings S
//! 61     ...   S times: length (u32 LE), bytes
//! end-4  4     CRC-32 (IEEE) of every byte before it
//! ```

use crate::rate::LEVEL_CHECK_LEN;
use crate::{Error, Result};

/// The four magic bytes that open every psic stream.
pub const MAGIC: [u8; 4] = *b"PSIC";
/// The newest format version this build reads and writes. Streams of a model without quality
/// levels are written as before: version 1 on the float entropy path (byte for byte what
/// earlier builds wrote), version 2 on the portable path; streams of a model with levels are
/// version 3 (either path), which adds the level.
pub const VERSION: u16 = 3;
/// Length of a model fingerprint in bytes.
pub const FINGERPRINT_LEN: usize = 16;
/// Largest accepted image side, to bound allocations on hostile input.
pub const MAX_SIDE: u32 = 1 << 15;
/// The most bytes of a stream a reader without a model reads (`psic info`): 1 GiB. A decoder
/// reads at most [`Codec::max_stream_len`](crate::Codec::max_stream_len), derived from its pixel
/// limit and model (52,429,824 bytes for the default model and limit).
pub const MAX_STREAM_LEN: u64 = 1 << 30;
/// Largest accepted string count.
const MAX_STRINGS: usize = 8;
const HEADER_LEN: usize = 61;

/// Identifies the model that wrote a stream; a decoder refuses streams from other models.
pub type Fingerprint = [u8; FINGERPRINT_LEN];

/// How the table index of every `y` symbol was computed from `z_hat`: the decoder must compute
/// it the same way, or it decodes garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntropyPath {
    /// The backbone's float hyper-synthesis on the decoder's own kernels, then CompressAI's
    /// `build_indexes`: what CompressAI itself does, and byte-compatible with it. Not portable:
    /// another kernel path, thread count or device sums in another order, and a scale within
    /// rounding of a table threshold can pick another table. Every version-1 stream.
    Float,
    /// Version 1 of the portable path: the hyper-synthesis in fixed-order f64 arithmetic
    /// ([`PortableHyperSynthesis`](crate::backbone::PortableHyperSynthesis)), the same bit for
    /// bit everywhere. Version-2 streams with entropy path byte 1.
    Portable,
}

impl EntropyPath {
    /// The entropy path byte of a version-2 header.
    pub fn code(self) -> u8 {
        match self {
            Self::Float => 0,
            Self::Portable => 1,
        }
    }

    /// The path of a version-2 entropy path byte; `None` for codes this build does not know.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Float),
            1 => Some(Self::Portable),
            _ => None,
        }
    }
}

/// The quality level of a version-3 stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamLevel {
    /// The level's index in the model.
    pub index: u8,
    /// The check of the level's gains ([`RateLevels::check`](crate::rate::RateLevels::check)):
    /// a decoder whose level has other gains refuses the stream.
    pub check: [u8; LEVEL_CHECK_LEN],
}

/// Everything a psic stream holds, parsed and checked for internal consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitstream {
    /// Fingerprint of the model that wrote the stream.
    pub fingerprint: Fingerprint,
    /// Original image width in pixels.
    pub width: u32,
    /// Original image height in pixels.
    pub height: u32,
    /// Pixels of padding added on the right before encoding.
    pub pad_right: u16,
    /// Pixels of padding added at the bottom before encoding.
    pub pad_bottom: u16,
    /// Shape `[C, H, W]` of the latent `y`.
    pub y_shape: [u32; 3],
    /// Shape `[C, H, W]` of the hyper-latent `z`.
    pub z_shape: [u32; 3],
    /// How the `y` table indexes were computed (version 1: always [`EntropyPath::Float`]).
    pub entropy_path: EntropyPath,
    /// The quality level (version 3); `None`: the implicit level of a model without levels,
    /// all gains 1 (versions 1 and 2).
    pub level: Option<StreamLevel>,
    /// The entropy-coded strings (for the hyperprior: `y` then `z`).
    pub strings: Vec<Vec<u8>>,
}

/// Hex form of a fingerprint, for messages.
pub fn fingerprint_hex(f: &Fingerprint) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| Error::Bitstream("stream is truncated".into()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn shape(&mut self) -> Result<[u32; 3]> {
        Ok([self.u32()?, self.u32()?, self.u32()?])
    }
}

impl Bitstream {
    /// The format version of the stream: 3 with a level, else 1 on the float path and 2 on the
    /// portable one (every stream has one encoding).
    pub fn version(&self) -> u16 {
        match (self.level, self.entropy_path) {
            (Some(_), _) => 3,
            (None, EntropyPath::Float) => 1,
            (None, _) => 2,
        }
    }

    /// Serialises the stream.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.strings.len() > MAX_STRINGS {
            return Err(Error::InvalidArgument(format!(
                "{} strings (at most {MAX_STRINGS})",
                self.strings.len()
            )));
        }
        let body: usize = self.strings.iter().map(|s| 4 + s.len()).sum();
        let mut out = Vec::with_capacity(HEADER_LEN + body + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version().to_le_bytes());
        out.extend_from_slice(&match self.level {
            Some(level) => [self.entropy_path.code(), level.index],
            // Version 1: flags 0 (exactly the header of earlier builds); version 2: flags 0.
            None if self.entropy_path == EntropyPath::Float => [0, 0],
            None => [self.entropy_path.code(), 0],
        });
        out.extend_from_slice(&self.fingerprint);
        if let Some(level) = self.level {
            out.extend_from_slice(&level.check);
        }
        out.extend_from_slice(&self.width.to_le_bytes());
        out.extend_from_slice(&self.height.to_le_bytes());
        out.extend_from_slice(&self.pad_right.to_le_bytes());
        out.extend_from_slice(&self.pad_bottom.to_le_bytes());
        for v in self.y_shape.iter().chain(&self.z_shape) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(self.strings.len() as u8);
        for s in &self.strings {
            let len = u32::try_from(s.len())
                .map_err(|_| Error::InvalidArgument("entropy-coded string over 4 GiB".into()))?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses and checks a stream: magic, version, integrity (CRC-32), sizes and lengths.
    /// Model-specific checks (fingerprint, latent shapes) are the codec's.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if data.len() < 4 || data[..4] != MAGIC {
            return Err(Error::Bitstream(
                "not a psic stream (missing \"PSIC\" magic bytes)".into(),
            ));
        }
        if data.len() < 6 {
            return Err(Error::Bitstream("stream is truncated".into()));
        }
        let version = u16::from_le_bytes([data[4], data[5]]);
        if version > VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        if version == 0 {
            return Err(Error::Bitstream("format version 0 does not exist".into()));
        }
        if data.len() < HEADER_LEN + 4 {
            return Err(Error::Bitstream("stream is truncated".into()));
        }
        let (payload, crc) = data.split_at(data.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32fast::hash(payload) != stored {
            return Err(Error::Bitstream(
                "integrity check failed: the stream is corrupted or truncated".into(),
            ));
        }
        let mut r = Reader {
            data: payload,
            pos: 6,
        };
        let (entropy_path, level_index) = read_path_and_level(&mut r, version)?;
        let fingerprint: Fingerprint = r.take(FINGERPRINT_LEN)?.try_into().expect("16 bytes");
        let level = match level_index {
            Some(index) => Some(StreamLevel {
                index,
                check: r.take(LEVEL_CHECK_LEN)?.try_into().expect("8 bytes"),
            }),
            None => None,
        };
        let (width, height) = (r.u32()?, r.u32()?);
        let (pad_right, pad_bottom) = (r.u16()?, r.u16()?);
        let (y_shape, z_shape) = (r.shape()?, r.shape()?);
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(Error::Bitstream(format!(
                "image size {width}x{height} outside 1..={MAX_SIDE}"
            )));
        }
        let n = r.take(1)?[0] as usize;
        if n > MAX_STRINGS {
            return Err(Error::Bitstream(format!(
                "{n} strings (at most {MAX_STRINGS})"
            )));
        }
        let mut strings = Vec::with_capacity(n);
        for _ in 0..n {
            let len = r.u32()? as usize;
            strings.push(r.take(len)?.to_vec());
        }
        if r.pos != payload.len() {
            return Err(Error::Bitstream(format!(
                "{} unexpected bytes after the last string",
                payload.len() - r.pos
            )));
        }
        Ok(Self {
            fingerprint,
            width,
            height,
            pad_right,
            pad_bottom,
            y_shape,
            z_shape,
            entropy_path,
            level,
            strings,
        })
    }
}

/// Header bytes 6–7: the entropy path and, for version 3, the level index.
fn read_path_and_level(r: &mut Reader<'_>, version: u16) -> Result<(EntropyPath, Option<u8>)> {
    if version == 1 {
        if r.u16()? != 0 {
            return Err(Error::Bitstream("unknown flags set in header".into()));
        }
        return Ok((EntropyPath::Float, None));
    }
    let b = r.take(2)?;
    let path = EntropyPath::from_code(b[0]);
    if version == 3 {
        let path = path.ok_or_else(|| {
            Error::Bitstream(format!(
                "entropy path {} in a version-3 header (this build knows 0 and 1)",
                b[0]
            ))
        })?;
        return Ok((path, Some(b[1])));
    }
    if b[1] != 0 {
        return Err(Error::Bitstream("unknown flags set in header".into()));
    }
    // Float streams without a level are always version 1, so every stream has one encoding.
    match path {
        Some(EntropyPath::Float) | None => Err(Error::Bitstream(format!(
            "entropy path {} in a version-2 header (this build knows 1; float streams are \
             version 1)",
            b[0]
        ))),
        Some(path) => Ok((path, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bitstream {
        Bitstream {
            fingerprint: [7; FINGERPRINT_LEN],
            width: 100,
            height: 60,
            pad_right: 28,
            pad_bottom: 4,
            y_shape: [8, 4, 8],
            z_shape: [4, 1, 2],
            entropy_path: EntropyPath::Portable,
            level: None,
            strings: vec![vec![1, 2, 3, 4], vec![9; 8]],
        }
    }

    #[test]
    fn version_3_carries_the_level() {
        for path in [EntropyPath::Float, EntropyPath::Portable] {
            let b = Bitstream {
                entropy_path: path,
                level: Some(StreamLevel {
                    index: 5,
                    check: [3; LEVEL_CHECK_LEN],
                }),
                ..sample()
            };
            let bytes = b.to_bytes().unwrap();
            assert_eq!(&bytes[4..8], &[3, 0, path.code(), 5]);
            assert_eq!(&bytes[24..32], &[3; LEVEL_CHECK_LEN]);
            assert_eq!(
                bytes.len(),
                sample().to_bytes().unwrap().len() + LEVEL_CHECK_LEN
            );
            assert_eq!(Bitstream::from_bytes(&bytes).unwrap(), b);
        }
    }

    #[test]
    fn round_trip() {
        let b = sample();
        assert_eq!(Bitstream::from_bytes(&b.to_bytes().unwrap()).unwrap(), b);
        let float = Bitstream {
            entropy_path: EntropyPath::Float,
            ..sample()
        };
        let bytes = float.to_bytes().unwrap();
        // The float path keeps the version-1 header of earlier builds.
        assert_eq!(&bytes[4..8], &[1, 0, 0, 0]);
        assert_eq!(Bitstream::from_bytes(&bytes).unwrap(), float);
    }

    #[test]
    fn version_2_header_fields() {
        let bytes = sample().to_bytes().unwrap();
        assert_eq!(&bytes[4..8], &[2, 0, 1, 0]);
        let with = |i: usize, v: u8| {
            let mut c = bytes.clone();
            c[i] = v;
            let n = c.len() - 4;
            let crc = crc32fast::hash(&c[..n]);
            c[n..].copy_from_slice(&crc.to_le_bytes());
            Bitstream::from_bytes(&c)
        };
        // Found by tests/fuzz.rs: a version-2 header naming the float path parsed, and wrote back
        // as version 1; float streams have one encoding, version 1.
        assert!(matches!(with(6, 0), Err(Error::Bitstream(m)) if m.contains("entropy path 0")));
        assert!(matches!(with(6, 2), Err(Error::Bitstream(m)) if m.contains("entropy path 2")));
        assert!(matches!(with(7, 1), Err(Error::Bitstream(m)) if m.contains("flags")));
        // A version-1 header has no entropy path byte: any non-zero flags are refused.
        let mut v1 = with(4, 1);
        assert!(matches!(v1.as_mut(), Err(Error::Bitstream(m)) if m.contains("flags")));
    }

    #[test]
    fn rejects_every_truncation_and_single_bit_flip() {
        let bytes = sample().to_bytes().unwrap();
        for len in 0..bytes.len() {
            assert!(Bitstream::from_bytes(&bytes[..len]).is_err(), "len {len}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut c = bytes.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Bitstream::from_bytes(&c).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn newer_version_is_a_typed_error() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[4] = 4;
        assert!(matches!(
            Bitstream::from_bytes(&bytes),
            Err(Error::UnsupportedVersion { found: 4, .. })
        ));
    }
}
