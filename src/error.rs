//! The crate's error type: every fallible public function returns [`Result`].

use std::path::PathBuf;

/// Errors of psic. Bad input (corrupt bitstreams, foreign models, bad images, missing files) always
/// lands here with a message that says what was wrong; psic does not panic on input it did not make.
/// New variants may come in minor releases (`#[non_exhaustive]`): match the ones you handle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// An image could not be decoded, encoded or has an unusable size.
    #[error("image: {0}")]
    Image(String),

    /// The bitstream is not a psic stream, is truncated, corrupted, or otherwise malformed.
    #[error("invalid bitstream: {0}")]
    Bitstream(String),

    /// The bitstream was written by a newer format version than this build understands.
    #[error("unsupported bitstream version {found} (this build reads up to version {supported})")]
    UnsupportedVersion {
        /// Version found in the stream.
        found: u16,
        /// Newest version this build can read.
        supported: u16,
    },

    /// The bitstream was written by a different model than the one asked to decode it.
    #[error(
        "bitstream was written by model {stream} but the decoder is model {model}: load the model that encoded it"
    )]
    ModelMismatch {
        /// Fingerprint recorded in the stream (hex).
        stream: String,
        /// Fingerprint of the decoding model (hex).
        model: String,
    },

    /// The stream was coded at a quality level the decoding model does not have (or a level was
    /// asked of a model without it).
    #[error(
        "quality level {level} is not in this model, which has {levels} level(s) (0..{levels}): load the model that encoded it, or one with its levels (psic rates)"
    )]
    UnknownLevel {
        /// The level asked for or found in the stream.
        level: usize,
        /// The number of levels of the model (1 for a model without levels).
        levels: usize,
    },

    /// The stream's quality level was coded with other channel gains than the decoding model's
    /// level of that index (the same base model with other fitted levels).
    #[error(
        "quality level {level} of this stream was coded with other gains than this model's level {level}: load the model that encoded it"
    )]
    LevelMismatch {
        /// The level of the stream.
        level: usize,
    },

    /// The entropy coder met data it cannot code (hostile or corrupted strings, invalid tables).
    #[error("entropy coding: {0}")]
    EntropyCoding(String),

    /// A model file or checkpoint is missing tensors, has wrong shapes or unreadable metadata.
    #[error("model: {0}")]
    Model(String),

    /// An input file is longer than the most psic reads for it (a stream, a model file or an
    /// image: see the limits in `docs/FORMAT.md`); it was not read further.
    #[error("{path}: larger than {limit} bytes, the most psic reads for this input (docs/FORMAT.md, limits)")]
    InputTooLarge {
        /// The file involved.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },

    /// The output path names the input file itself: writing it would destroy the input.
    #[error("output {output} is the input file {input}: refusing to overwrite it (choose another output path)")]
    OutputIsInput {
        /// The input path.
        input: PathBuf,
        /// The output path (the same file).
        output: PathBuf,
    },

    /// A caller passed an argument outside what the function accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Result type of psic.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
