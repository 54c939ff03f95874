//! OpenAI CLIP's byte-level BPE tokenizer (`clip.tokenize`), reading the original merges file.
//!
//! Text goes through the same steps as in `openai/CLIP`'s `simple_tokenizer.py`:
//!
//! 1. cleaning ([`clean_text`]): ftfy's `fix_text`, `html.unescape` twice, strip, runs of
//!    whitespace to one space, lower-case (see [`super::ftfy`] for what the ftfy port covers);
//! 2. pre-tokenising with CLIP's expression: the literal special tokens `<|startoftext|>` and
//!    `<|endoftext|>`, the contractions `'s 't 're 've 'm 'll 'd`, runs of letters (`\p{L}`),
//!    single digits (`\p{N}`), runs of other non-space characters;
//! 3. every piece's UTF-8 bytes mapped to printable characters (GPT-2's byte-to-unicode table),
//!    `</w>` appended to its last symbol, and byte-pair merges applied in rank order;
//! 4. ids: `[49406] + BPE ids + [49407]`, truncated to the context length (77) with the last id
//!    overwritten by 49407, zero-padded.
//!
//! Special-token text inside a caption follows **OpenAI's** tokenizer: a literal
//! `<|endoftext|>` or `<|startoftext|>` becomes the special id (49407 / 49406), as in
//! `clip.tokenize`. (`open_clip` instead splits such text as ordinary characters.)
//!
//! The vocabulary is built from the merges file exactly as OpenAI does: the 256 byte symbols,
//! the same with `</w>`, the first 48,894 merges (lines 2 to 48,895 of the file), then the two
//! special tokens, 49,408 entries in all.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Tensor};
use regex::Regex;

use super::ftfy;
use crate::{Error, Result};

/// The start-of-text token of the standard CLIP vocabulary.
pub const SOT_TOKEN: u32 = 49406;
/// The end-of-text token of the standard CLIP vocabulary (where the text tower pools).
pub const EOT_TOKEN: u32 = 49407;
/// CLIP's context length: every tokenised caption has this many ids.
pub const CONTEXT_LENGTH: usize = 77;

/// Number of merges OpenAI reads from the file: `49152 - 256 - 2`.
const N_MERGES: usize = 49152 - 256 - 2;
/// Entries kept in the BPE cache before it is cleared.
const CACHE_LIMIT: usize = 100_000;

const SOT_TEXT: &str = "<|startoftext|>";
const EOT_TEXT: &str = "<|endoftext|>";

/// GPT-2's byte-to-unicode table: bytes of printable Latin-1 map to themselves, the other 68
/// bytes to U+0100 onwards, in byte order.
fn byte_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("Latin Extended")
        };
    }
    table
}

/// The order of the vocabulary's first 256 entries: OpenAI lists the printable bytes first,
/// then the others (`bytes_to_unicode().values()`).
fn byte_symbols_in_vocab_order(table: &[char; 256]) -> Vec<char> {
    let printable: Vec<usize> = (0x21..=0x7e)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let others = (0..256).filter(|b| !printable.contains(b));
    printable
        .iter()
        .copied()
        .chain(others)
        .map(|b| table[b])
        .collect()
}

fn pre_tokenizer() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("CLIP's pattern compiles")
    })
}

/// Python's `str.isspace`: Unicode white space plus the information separators U+001C–U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// CLIP's text cleaning: `whitespace_clean(basic_clean(text)).lower()`, i.e. ftfy's `fix_text`,
/// `html.unescape` twice, strip, every run of white space to one space, strip, lower-case.
pub fn clean_text(text: &str) -> String {
    let fixed = ftfy::fix_text(text);
    let unescaped = ftfy::html_unescape(&ftfy::html_unescape(&fixed));
    let stripped = unescaped.trim_matches(py_isspace);
    let mut collapsed = String::with_capacity(stripped.len());
    let mut in_space = false;
    for c in stripped.chars() {
        if c.is_whitespace() {
            if !in_space {
                collapsed.push(' ');
            }
            in_space = true;
        } else {
            collapsed.push(c);
            in_space = false;
        }
    }
    collapsed.trim_matches(py_isspace).to_lowercase()
}

/// CLIP's BPE tokenizer (see the module docs). Cheap to share: encoding takes `&self` (a
/// mutex-guarded cache remembers the BPE of pieces already seen).
pub struct ClipTokenizer {
    byte_encoder: [char; 256],
    /// Token string -> id.
    encoder: HashMap<String, u32>,
    /// Id -> token string.
    decoder: Vec<String>,
    /// `(left id, right id)` -> `(merge rank, id of the merged token)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    sot: u32,
    eot: u32,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.decoder.len())
            .field("merges", &self.merges.len())
            .finish()
    }
}

impl ClipTokenizer {
    /// Reads a merges file: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (gzip, recognised by its
    /// magic bytes) or the same list as plain text, such as Hugging Face's `merges.txt`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut s)
                .map_err(|e| Error::io(path, e))?;
            s
        } else {
            String::from_utf8(raw).map_err(|_| {
                Error::Model(format!("{}: merges file is not UTF-8", path.display()))
            })?
        };
        Self::from_merges(&text).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
    }

    /// Builds the tokenizer from the text of a merges file: a header line, then one merge
    /// (`left right`) per line; lines past the 48,895th are ignored, as OpenAI does. A shorter
    /// list gives a smaller vocabulary (the special tokens are then its last two ids).
    pub fn from_merges(text: &str) -> Result<Self> {
        let byte_encoder = byte_to_unicode();
        let mut decoder: Vec<String> = Vec::with_capacity(2 * 256 + N_MERGES + 2);
        let symbols = byte_symbols_in_vocab_order(&byte_encoder);
        decoder.extend(symbols.iter().map(|c| c.to_string()));
        decoder.extend(symbols.iter().map(|c| format!("{c}</w>")));
        let mut lines: Vec<&str> = text.split('\n').skip(1).take(N_MERGES).collect();
        // A newline at the end of a short file leaves one empty last line.
        if lines.last() == Some(&"") && text.split('\n').count() == lines.len() + 1 {
            lines.pop();
        }
        let pairs = lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a, b)),
                    _ => Err(Error::Model(format!(
                        "merges line {} is not two symbols: {line:?}",
                        i + 2
                    ))),
                }
            })
            .collect::<Result<Vec<(&str, &str)>>>()?;
        decoder.extend(pairs.iter().map(|(a, b)| format!("{a}{b}")));
        decoder.push(SOT_TEXT.to_string());
        decoder.push(EOT_TEXT.to_string());
        // Later duplicates win, as in Python's dict(zip(vocab, range(len(vocab)))).
        let encoder: HashMap<String, u32> = decoder
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let mut merges = HashMap::with_capacity(pairs.len());
        for (rank, (a, b)) in pairs.iter().enumerate() {
            let id = |s: &str| {
                encoder.get(s).copied().ok_or_else(|| {
                    Error::Model(format!(
                        "merge {} ({a} {b}) uses {s:?}, which is not an earlier token",
                        rank + 1
                    ))
                })
            };
            let merged = encoder[&format!("{a}{b}")];
            merges.insert((id(a)?, id(b)?), (rank as u32, merged));
        }
        Ok(Self {
            byte_encoder,
            sot: encoder[SOT_TEXT],
            eot: encoder[EOT_TEXT],
            encoder,
            decoder,
            merges,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Number of tokens (49,408 with the standard merges file).
    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    /// Id of `<|startoftext|>` (49406 with the standard merges file).
    pub fn sot_token(&self) -> u32 {
        self.sot
    }

    /// Id of `<|endoftext|>` (49407 with the standard merges file).
    pub fn eot_token(&self) -> u32 {
        self.eot
    }

    /// The token string of an id (byte-level symbols, `</w>` marking a word's end), if any.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.decoder.get(id as usize).map(String::as_str)
    }

    /// BPE of one pre-tokenised piece (already mapped to byte symbols).
    fn bpe(&self, piece: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().expect("cache lock").get(piece) {
            return ids.clone();
        }
        let chars: Vec<char> = piece.chars().collect();
        let mut word: Vec<u32> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = if i + 1 == chars.len() {
                    format!("{c}</w>")
                } else {
                    c.to_string()
                };
                self.encoder[&s]
            })
            .collect();
        while word.len() > 1 {
            // The adjacent pair with the lowest merge rank.
            let best = word
                .windows(2)
                .filter_map(|w| self.merges.get(&(w[0], w[1])).map(|&m| ((w[0], w[1]), m)))
                .min_by_key(|(_, (rank, _))| *rank);
            let Some(((first, second), (_, merged))) = best else {
                break;
            };
            // Merge every occurrence, left to right, without overlaps.
            let mut next = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if word[i] == first && i + 1 < word.len() && word[i + 1] == second {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(word[i]);
                    i += 1;
                }
            }
            word = next;
        }
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(piece.to_string(), word.clone());
        word
    }

    /// BPE ids of `text` after cleaning, without start/end tokens and without truncation
    /// (OpenAI's `SimpleTokenizer.encode`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean_text(text);
        let mut ids = Vec::new();
        for m in pre_tokenizer().find_iter(&cleaned) {
            let piece = m.as_str();
            if piece.eq_ignore_ascii_case(SOT_TEXT) {
                ids.push(self.sot);
            } else if piece.eq_ignore_ascii_case(EOT_TEXT) {
                ids.push(self.eot);
            } else {
                let symbols: String = piece
                    .bytes()
                    .map(|b| self.byte_encoder[b as usize])
                    .collect();
                ids.extend(self.bpe(&symbols));
            }
        }
        ids
    }

    /// The token strings [`encode`](Self::encode) produces.
    pub fn encode_to_strings(&self, text: &str) -> Vec<String> {
        self.encode(text)
            .into_iter()
            .map(|id| self.decoder[id as usize].clone())
            .collect()
    }

    /// `clip.tokenize(text, context_length, truncate=True)` for one text:
    /// `[sot] + encode(text) + [eot]`, cut to `context_length` ids with the last one set to
    /// `eot` when longer, zero-padded when shorter. `context_length` must be at least 2.
    pub fn tokenize_with_context(&self, text: &str, context_length: usize) -> Result<Vec<u32>> {
        if context_length < 2 {
            return Err(Error::InvalidArgument(format!(
                "context length must be at least 2, got {context_length}"
            )));
        }
        let mut ids = Vec::with_capacity(context_length);
        ids.push(self.sot);
        ids.extend(self.encode(text));
        ids.push(self.eot);
        if ids.len() > context_length {
            ids.truncate(context_length);
            ids[context_length - 1] = self.eot;
        }
        ids.resize(context_length, 0);
        Ok(ids)
    }

    /// [`tokenize_with_context`](Self::tokenize_with_context) with CLIP's 77 ids.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenize_with_context(text, CONTEXT_LENGTH)
            .expect("77 is a valid context length")
    }

    /// Tokenises several texts into a `[N, context_length]` `u32` tensor.
    pub fn tokenize_batch(
        &self,
        texts: &[&str],
        context_length: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let mut all = Vec::with_capacity(texts.len() * context_length);
        for t in texts {
            all.extend(self.tokenize_with_context(t, context_length)?);
        }
        Ok(Tensor::from_vec(
            all,
            (texts.len(), context_length),
            device,
        )?)
    }

    /// Text of token ids (special tokens and padding included as their strings; `</w>` becomes a
    /// space; invalid UTF-8 is replaced), like OpenAI's `decode`. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut byte_decoder = HashMap::with_capacity(256);
        for (b, c) in self.byte_encoder.iter().enumerate() {
            byte_decoder.insert(*c, b as u8);
        }
        let text: String = ids
            .iter()
            .filter_map(|&id| self.decoder.get(id as usize))
            .map(String::as_str)
            .collect();
        let bytes: Vec<u8> = text
            .chars()
            .filter_map(|c| byte_decoder.get(&c).copied())
            .collect();
        String::from_utf8_lossy(&bytes).replace("</w>", " ")
    }
}
