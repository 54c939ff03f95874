//! rANS entropy coder, byte-compatible with CompressAI 1.2.x (`RansEncoder.encode_with_indexes` /
//! `RansDecoder.decode_with_indexes`, on ryg's `rans64.h`).
//!
//! Format: a 64-bit rANS state with lower bound 2^31, renormalised in 32-bit words stored
//! little-endian, CDFs of [`PRECISION`] (16) bits. The encoder codes the symbols last to first, so
//! the decoder reads the string front to back: first the two-word final state (low word first),
//! then one word each time the state drops below 2^31.
//!
//! A value `v = symbol - offset` outside `0..max_value` (with `max_value = cdf_length - 2`) is
//! coded as the escape symbol `max_value`, followed by a raw value (`-2v - 1` below the range,
//! `2(v - max_value)` above it) in 4-bit bypass chunks: first the chunk count (as 4-bit values,
//! 15 meaning "15 and more follow"), then the chunks, lowest first.
//!
//! Raw values are limited to `i32::MAX` (at most 8 chunks): symbols further out of range are an
//! error on encoding, and longer bypass counts an error on decoding (CompressAI itself hits
//! undefined behaviour for raw values of 2^28 and more).

use super::cdf::{CdfTables, Table, PRECISION};
use crate::error::{Error, Result};

/// Lower bound of the normalised rANS state.
const RANS64_L: u64 = 1 << 31;
/// Bits per bypass chunk.
const BYPASS_PRECISION: u32 = 4;
/// Largest bypass chunk value; as a count chunk it means "more count chunks follow".
const MAX_BYPASS_VAL: u32 = (1 << BYPASS_PRECISION) - 1;
/// Most bypass chunks of one raw value (raw values are at most `i32::MAX`).
const MAX_BYPASS_CHUNKS: u32 = 8;
/// Mask of the cumulative-frequency bits of the state.
const CUM_MASK: u64 = (1 << PRECISION) - 1;

/// An entropy coder for symbols drawn from [`CdfTables`], one table index per symbol.
pub trait EntropyCoder {
    /// Encodes `symbols[k]` with table `indexes[k]`; returns the byte string.
    fn encode_with_indexes(
        &self,
        symbols: &[i32],
        indexes: &[i32],
        tables: &CdfTables,
    ) -> Result<Vec<u8>>;

    /// Decodes `indexes.len()` symbols from `data`.
    fn decode_with_indexes(
        &self,
        data: &[u8],
        indexes: &[i32],
        tables: &CdfTables,
    ) -> Result<Vec<i32>>;
}

/// The pure-Rust rANS coder (the default): safe on untrusted input (no `unsafe`, no panics, every
/// read checked), and fast: decoding finds symbols through the tables' precomputed lookups (one
/// load for most symbols) instead of searching the CDF.
///
/// Decoding is strict: besides truncated data, bad table indexes and oversized escapes, a string
/// whose length is not a multiple of 4, that has words left over after the last symbol, or whose
/// final state is not the encoder's initial state is rejected with [`Error::EntropyCoding`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RansCoder;

#[cold]
fn coding_error(msg: String) -> Error {
    Error::EntropyCoding(msg)
}

fn check_lengths(symbols: usize, indexes: usize) -> Result<()> {
    if symbols == indexes {
        Ok(())
    } else {
        Err(coding_error(format!(
            "{symbols} symbols but {indexes} table indexes"
        )))
    }
}

/// Splits `symbol` into the coded CDF symbol and, for the escape symbol, the raw bypass value.
#[inline(always)]
fn split_symbol(symbol: i32, table: &Table, k: usize) -> Result<(u32, u32)> {
    let v = i64::from(symbol) - i64::from(table.offset);
    let max_value = i64::from(table.max_value);
    if (0..max_value).contains(&v) {
        return Ok((v as u32, 0));
    }
    let raw = if v < 0 {
        -2 * v - 1
    } else {
        2 * (v - max_value)
    };
    if raw > i64::from(i32::MAX) {
        return Err(coding_error(format!(
            "symbol {symbol} at position {k} is too far outside its table's range \
             (offset {}, {} values) to escape-code",
            table.offset, table.max_value
        )));
    }
    Ok((table.max_value, raw as u32))
}

/// Number of 4-bit chunks of `raw` (0 for 0), at most [`MAX_BYPASS_CHUNKS`].
#[inline]
fn bypass_chunks(raw: u32) -> u32 {
    (u32::BITS - raw.leading_zeros()).div_ceil(BYPASS_PRECISION)
}

/// Checks a decoded bypass chunk count: a count chunk of 15 would announce at least 15 chunks,
/// more than any raw value up to `i32::MAX` needs.
fn check_bypass_count(n: u32, k: usize) -> Result<()> {
    if n > MAX_BYPASS_CHUNKS {
        return Err(coding_error(format!(
            "escape at position {k} announces too many bypass chunks"
        )));
    }
    Ok(())
}

/// The symbol value of a decoded escape with raw value `raw`, or an error if `raw` exceeds
/// `i32::MAX` or the value leaves `i32`.
fn unescape(raw: u32, table: &Table, k: usize) -> Result<i32> {
    if raw > i32::MAX as u32 {
        return Err(coding_error(format!(
            "escaped value at position {k} is out of range"
        )));
    }
    let raw = i64::from(raw);
    let v = if raw & 1 == 1 {
        -(raw >> 1) - 1
    } else {
        (raw >> 1) + i64::from(table.max_value)
    };
    i32::try_from(v + i64::from(table.offset))
        .map_err(|_| coding_error(format!("escaped value at position {k} does not fit in i32")))
}

/// rANS encoder state; emitted words are collected in emission order.
struct Rans64Enc {
    x: u64,
    words: Vec<u32>,
}

impl Rans64Enc {
    fn new(capacity: usize) -> Self {
        Rans64Enc {
            x: RANS64_L,
            words: Vec::with_capacity(capacity),
        }
    }

    /// Codes the symbol `[start, start + freq)` of a [`PRECISION`]-bit CDF.
    #[inline(always)]
    fn put(&mut self, start: u32, freq: u32) {
        let freq = u64::from(freq);
        let x_max = ((RANS64_L >> PRECISION) << 32) * freq;
        let mut x = self.x;
        if x >= x_max {
            self.words.push(x as u32);
            x >>= 32;
        }
        self.x = ((x / freq) << PRECISION) + (x % freq) + u64::from(start);
    }

    /// Codes a 4-bit bypass value (CompressAI's `Rans64EncPutBits`).
    #[inline(always)]
    fn put_bits(&mut self, val: u32) {
        let x_max = ((RANS64_L >> PRECISION) << 32) << (PRECISION - BYPASS_PRECISION);
        let mut x = self.x;
        if x >= x_max {
            self.words.push(x as u32);
            x >>= 32;
        }
        self.x = (x << BYPASS_PRECISION) | u64::from(val);
    }

    /// Flushes the state and returns the string: state low word, high word, then the emitted
    /// words last to first.
    fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * self.words.len());
        out.extend_from_slice(&(self.x as u32).to_le_bytes());
        out.extend_from_slice(&((self.x >> 32) as u32).to_le_bytes());
        for w in self.words.iter().rev() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// rANS decoder state over the string's words.
///
/// The decode loop keeps `x` and `pos` in locals and calls back into this type only on its cold
/// paths, so the state stays in registers: each symbol is one serial chain (mask, lookup,
/// multiply, add), and every instruction off that chain still costs throughput.
struct Rans64Dec {
    x: u64,
    words: Vec<u32>,
    pos: usize,
}

/// Refills a state that fell below 2^31 with the next word (CompressAI's `Rans64DecRenorm`).
/// A free function so the decode loop can run it on its own copies of the state in registers.
#[inline(always)]
fn renorm(x: &mut u64, pos: &mut usize, words: &[u32]) -> Result<()> {
    if *x < RANS64_L {
        let Some(&w) = words.get(*pos) else {
            return Err(coding_error("rANS string is truncated".into()));
        };
        *pos += 1;
        *x = (*x << 32) | u64::from(w);
    }
    Ok(())
}

impl Rans64Dec {
    fn new(data: &[u8]) -> Result<Self> {
        if data.len() % 4 != 0 {
            return Err(coding_error(format!(
                "rANS string length {} is not a multiple of 4",
                data.len()
            )));
        }
        let words: Vec<u32> = data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if words.len() < 2 {
            return Err(coding_error(format!(
                "rANS string of {} bytes is shorter than its 8-byte state",
                data.len()
            )));
        }
        let x = u64::from(words[0]) | (u64::from(words[1]) << 32);
        if x < RANS64_L {
            return Err(coding_error(
                "rANS string is corrupt (initial state below 2^31)".into(),
            ));
        }
        Ok(Rans64Dec { x, words, pos: 2 })
    }

    #[inline(always)]
    fn renorm(&mut self) -> Result<()> {
        renorm(&mut self.x, &mut self.pos, &self.words)
    }

    /// Decodes the symbol at position `k` whose cumulative frequency `cum` fell into a lookup
    /// bucket without a direct answer: a bucket shared by several symbols (searched), the escape
    /// (followed by its bypass chunks), or a value outside `i32` (an error).
    #[cold]
    #[inline(never)]
    fn get_searched(&mut self, table: &Table, cum: u32, k: usize) -> Result<i32> {
        let s = table.find(cum);
        let start = table.cdf[s];
        let freq = table.cdf[s + 1] - start;
        // freq <= 2^16 and x >> 16 < 2^48: cannot overflow.
        self.x = u64::from(freq) * (self.x >> PRECISION) + u64::from(cum - start);
        self.renorm()?;
        if s as u32 == table.max_value {
            let n = self.get_bits()?;
            check_bypass_count(n, k)?;
            let mut raw = 0u32;
            for j in 0..n {
                raw |= self.get_bits()? << (j * BYPASS_PRECISION);
            }
            return unescape(raw, table, k);
        }
        i32::try_from(s as i64 + i64::from(table.offset))
            .map_err(|_| coding_error(format!("decoded value at position {k} does not fit in i32")))
    }

    /// Decodes a 4-bit bypass value (CompressAI's `Rans64DecGetBits`).
    #[inline(always)]
    fn get_bits(&mut self) -> Result<u32> {
        let val = (self.x & u64::from(MAX_BYPASS_VAL)) as u32;
        self.x >>= BYPASS_PRECISION;
        self.renorm()?;
        Ok(val)
    }

    /// Checks that the string ended exactly where the encoder started.
    fn finish(&self) -> Result<()> {
        if self.pos != self.words.len() {
            return Err(coding_error(format!(
                "rANS string has {} unused bytes after the last symbol",
                4 * (self.words.len() - self.pos)
            )));
        }
        if self.x != RANS64_L {
            return Err(coding_error(
                "rANS string is corrupt (final state mismatch)".into(),
            ));
        }
        Ok(())
    }
}

impl EntropyCoder for RansCoder {
    fn encode_with_indexes(
        &self,
        symbols: &[i32],
        indexes: &[i32],
        tables: &CdfTables,
    ) -> Result<Vec<u8>> {
        check_lengths(symbols.len(), indexes.len())?;
        let mut enc = Rans64Enc::new(symbols.len() / 2 + 16);
        for (k, (&symbol, &index)) in symbols.iter().zip(indexes).enumerate().rev() {
            let table = tables.table(index, k)?;
            let (value, raw) = split_symbol(symbol, table, k)?;
            if value == table.max_value {
                // Reverse of: chunk count (a single chunk, as it is <= 8), then chunks lowest first.
                let n = bypass_chunks(raw);
                for j in (0..n).rev() {
                    enc.put_bits((raw >> (j * BYPASS_PRECISION)) & MAX_BYPASS_VAL);
                }
                enc.put_bits(n);
            }
            let start = table.cdf[value as usize];
            enc.put(start, table.cdf[value as usize + 1] - start);
        }
        Ok(enc.finish())
    }

    fn decode_with_indexes(
        &self,
        data: &[u8],
        indexes: &[i32],
        tables: &CdfTables,
    ) -> Result<Vec<i32>> {
        let mut dec = Rans64Dec::new(data)?;
        let all = tables.all();
        let mut out = Vec::with_capacity(indexes.len());
        let (mut x, mut pos) = (dec.x, dec.pos);
        for (k, &index) in indexes.iter().enumerate() {
            // A negative index wraps to a huge one and misses too.
            let Some(table) = all.get(index as usize) else {
                return Err(tables.table(index, k).unwrap_err());
            };
            let cum = (x & CUM_MASK) as u32;
            let b = table.bucket(cum);
            if b.freq != 0 {
                // The bucket lies inside one ordinary symbol: no search, no escape.
                // freq < 2^16 and x >> 16 < 2^48: cannot overflow.
                x = u64::from(b.freq) * (x >> PRECISION) + u64::from(cum - u32::from(b.start));
                renorm(&mut x, &mut pos, &dec.words)?;
                out.push(b.value);
            } else {
                (dec.x, dec.pos) = (x, pos);
                out.push(dec.get_searched(table, cum, k)?);
                (x, pos) = (dec.x, dec.pos);
            }
        }
        (dec.x, dec.pos) = (x, pos);
        dec.finish()?;
        Ok(out)
    }
}

#[cfg(feature = "ryg-rans")]
pub use ryg::RygRansCoder;

#[cfg(feature = "ryg-rans")]
mod ryg {
    use rans::b64_decoder::{B64RansDecSymbol, B64RansDecoder};
    use rans::b64_encoder::{B64RansEncSymbol, B64RansEncoder};
    use rans::{RansDecSymbol, RansDecoder, RansEncSymbol, RansEncoder, RansEncoderMulti};

    use super::*;

    /// The same coder as [`RansCoder`] on ryg's C `rans64` (through the `rans` crate), to
    /// cross-check the pure-Rust implementation; it produces and reads identical strings.
    ///
    /// Its decoder is meant for **trusted data only**: it checks the string length, table indexes
    /// and escapes like [`RansCoder`] and never reads outside its (zero-padded) copy of the data,
    /// but it cannot tell how much of the string the C decoder consumed, so truncated or corrupt
    /// strings may decode to wrong symbols instead of an error.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct RygRansCoder;

    impl EntropyCoder for RygRansCoder {
        fn encode_with_indexes(
            &self,
            symbols: &[i32],
            indexes: &[i32],
            tables: &CdfTables,
        ) -> Result<Vec<u8>> {
            check_lengths(symbols.len(), indexes.len())?;
            // Validate everything and count the puts first: the C encoder writes into a buffer
            // of fixed size, at most one word per put plus the two-word flush.
            let mut puts = 0usize;
            for (k, (&symbol, &index)) in symbols.iter().zip(indexes).enumerate() {
                let table = tables.table(index, k)?;
                let (value, raw) = split_symbol(symbol, table, k)?;
                puts += 1;
                if value == table.max_value {
                    puts += 1 + bypass_chunks(raw) as usize;
                }
            }
            let mut enc = B64RansEncoder::new(4 * (puts + 2));
            let bypass = |val: u32| B64RansEncSymbol::new(val, 1, BYPASS_PRECISION);
            for (k, (&symbol, &index)) in symbols.iter().zip(indexes).enumerate().rev() {
                let table = tables.table(index, k)?;
                let (value, raw) = split_symbol(symbol, table, k)?;
                if value == table.max_value {
                    let n = bypass_chunks(raw);
                    for j in (0..n).rev() {
                        enc.put(&bypass((raw >> (j * BYPASS_PRECISION)) & MAX_BYPASS_VAL));
                    }
                    enc.put(&bypass(n));
                }
                let start = table.cdf[value as usize];
                let freq = table.cdf[value as usize + 1] - start;
                enc.put(&B64RansEncSymbol::new(start, freq, PRECISION));
            }
            enc.flush();
            Ok(enc.data().to_vec())
        }

        fn decode_with_indexes(
            &self,
            data: &[u8],
            indexes: &[i32],
            tables: &CdfTables,
        ) -> Result<Vec<i32>> {
            if data.len() % 4 != 0 || data.len() < 8 {
                return Err(coding_error(format!(
                    "rANS string length {} is not a multiple of 4 of at least 8",
                    data.len()
                )));
            }
            // With an initial state >= 2^31 every later state stays >= 2^31 (so the C decoder's
            // assertion on renormalisation cannot fire): a state x >= 2^31 advances to at least
            // freq * (x >> 16) >= 2^15, and a state below 2^31 then reads a word above it.
            let x0 = u64::from_le_bytes([
                data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7],
            ]);
            if x0 < RANS64_L {
                return Err(coding_error(
                    "rANS string is corrupt (initial state below 2^31)".into(),
                ));
            }
            // Each advance reads at most one word. Pad the copy with enough zero words for the
            // advances allowed so far; if a hostile string needs more, start over with more.
            let mut pad_words = indexes.len() + 16;
            loop {
                match decode_padded(data, indexes, tables, pad_words)? {
                    Some(out) => return Ok(out),
                    None => pad_words *= 2,
                }
            }
        }
    }

    /// Decodes with `pad_words` zero words after the data; `None` if that might not be enough.
    fn decode_padded(
        data: &[u8],
        indexes: &[i32],
        tables: &CdfTables,
        pad_words: usize,
    ) -> Result<Option<Vec<i32>>> {
        let total_words = data.len() / 4 + pad_words;
        let mut buf = Vec::with_capacity(4 * total_words);
        buf.extend_from_slice(data);
        buf.resize(4 * total_words, 0);
        let mut dec = B64RansDecoder::new(buf);
        // Words the C decoder may have read so far (the state, then one per advance).
        let mut may_read = 2usize;
        let mut out = Vec::with_capacity(indexes.len());
        macro_rules! advance {
            ($start:expr, $freq:expr, $bits:expr) => {
                if may_read == total_words {
                    return Ok(None);
                }
                may_read += 1;
                dec.advance(&B64RansDecSymbol::new($start, $freq), $bits);
            };
        }
        macro_rules! get_bits {
            () => {{
                let val = dec.get(BYPASS_PRECISION);
                advance!(val, 1, BYPASS_PRECISION);
                val
            }};
        }
        for (k, &index) in indexes.iter().enumerate() {
            let table = tables.table(index, k)?;
            let s = table.find(dec.get(PRECISION));
            let start = table.cdf[s];
            advance!(start, table.cdf[s + 1] - start, PRECISION);
            let symbol = if s as u32 == table.max_value {
                let n = get_bits!();
                check_bypass_count(n, k)?;
                let mut raw = 0u32;
                for j in 0..n {
                    raw |= get_bits!() << (j * BYPASS_PRECISION);
                }
                unescape(raw, table, k)?
            } else {
                i32::try_from(s as i64 + i64::from(table.offset)).map_err(|_| {
                    coding_error(format!("decoded value at position {k} does not fit in i32"))
                })?
            };
            out.push(symbol);
        }
        // The final state must be 2^31; the C decoder only shows its low 31 bits.
        if dec.get(31) != 0 {
            return Err(coding_error(
                "rANS string is corrupt (final state mismatch)".into(),
            ));
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::cdf::pmf_to_quantized_cdf;

    /// Tiny deterministic xorshift64 generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Gaussian-like tables of increasing width, plus degenerate ones.
    fn test_tables() -> CdfTables {
        let mut cdfs = Vec::new();
        let mut offsets = Vec::new();
        for (i, scale) in [0.11f32, 0.5, 1.0, 3.0, 10.0, 40.0, 300.0]
            .into_iter()
            .enumerate()
        {
            let center = (scale * 6.0).ceil() as i32;
            let mut pmf: Vec<f32> = (-center..=center)
                .map(|v| (-(v as f32 / scale).powi(2) / 2.0).exp())
                .collect();
            let sum: f32 = pmf.iter().sum();
            pmf.iter_mut().for_each(|p| *p /= sum * 1.0001);
            pmf.push(1e-4 * (i as f32 + 1.0));
            cdfs.push(pmf_to_quantized_cdf(&pmf, PRECISION).unwrap());
            offsets.push(-center);
        }
        // Only the escape symbol; an escape symbol taking almost everything; offset extremes.
        cdfs.push(vec![0, 65536]);
        offsets.push(0);
        cdfs.push(vec![0, 1, 2, 65536]);
        offsets.push(5);
        cdfs.push(vec![0, 30000, 65535, 65536]);
        offsets.push(i32::MAX - 1);
        cdfs.push(vec![0, 30000, 65535, 65536]);
        offsets.push(i32::MIN);
        CdfTables::new(cdfs, offsets).unwrap()
    }

    fn random_case(rng: &mut Rng, tables: &CdfTables, n: usize) -> (Vec<i32>, Vec<i32>) {
        let mut symbols = Vec::with_capacity(n);
        let mut indexes = Vec::with_capacity(n);
        for _ in 0..n {
            let i = rng.below(tables.len() as u64) as usize;
            let off = i64::from(tables.offset(i));
            let width = tables.cdf(i).len() as i64 - 2;
            let v = match rng.below(20) {
                0 => rng.below(200) as i64 - 100,
                1 => rng.below(1 << 20) as i64 - (1 << 19),
                2 => rng.below(1 << 31) as i64 - (1 << 30),
                _ => rng.below(width.max(1) as u64) as i64,
            };
            // Keep the raw escape value within i32 and the symbol within i32.
            let lo = i64::from(i32::MIN).max(off - (1 << 30));
            let hi = i64::from(i32::MAX).min(off + width + (1 << 30) - 1);
            symbols.push((off + v).clamp(lo, hi) as i32);
            indexes.push(i as i32);
        }
        (symbols, indexes)
    }

    fn coders() -> Vec<Box<dyn EntropyCoder>> {
        #[allow(unused_mut)]
        let mut c: Vec<Box<dyn EntropyCoder>> = vec![Box::new(RansCoder)];
        #[cfg(feature = "ryg-rans")]
        c.push(Box::new(RygRansCoder));
        c
    }

    #[test]
    fn empty_input() {
        let tables = test_tables();
        for c in coders() {
            let data = c.encode_with_indexes(&[], &[], &tables).unwrap();
            assert_eq!(data, [0, 0, 0, 0x80, 0, 0, 0, 0]);
            assert!(c
                .decode_with_indexes(&data, &[], &tables)
                .unwrap()
                .is_empty());
            assert!(c.decode_with_indexes(&[], &[], &tables).is_err());
            assert!(c.decode_with_indexes(&[], &[0], &tables).is_err());
        }
    }

    #[test]
    fn round_trips_with_escapes() {
        let tables = test_tables();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for n in [1usize, 2, 3, 10, 100, 1000, 20000] {
            let (symbols, indexes) = random_case(&mut rng, &tables, n);
            let data = RansCoder
                .encode_with_indexes(&symbols, &indexes, &tables)
                .unwrap();
            for c in coders() {
                assert_eq!(
                    c.encode_with_indexes(&symbols, &indexes, &tables).unwrap(),
                    data
                );
                assert_eq!(
                    c.decode_with_indexes(&data, &indexes, &tables).unwrap(),
                    symbols
                );
            }
        }
    }

    #[test]
    fn known_bytes() {
        // One symbol 0 with freq 1/2 from the initial state 2^31: x = (2^31 / 2^15) << 16 = 2^32.
        let tables = CdfTables::new(vec![vec![0, 32768, 65535, 65536]], vec![0]).unwrap();
        let data = RansCoder.encode_with_indexes(&[0], &[0], &tables).unwrap();
        assert_eq!(data, [0, 0, 0, 0, 1, 0, 0, 0]);
        // An escape of value -1 (raw 1: one chunk): chunk 1, count 1, then escape symbol 2.
        let data = RansCoder.encode_with_indexes(&[-1], &[0], &tables).unwrap();
        let x = ((1u64 << 31) << 4 | 1) << 4 | 1;
        let x = (x << 16) + 65535;
        assert_eq!(data, x.to_le_bytes());
        assert_eq!(
            RansCoder.decode_with_indexes(&data, &[0], &tables).unwrap(),
            [-1]
        );
    }

    #[test]
    fn extreme_values() {
        let tables = test_tables();
        let n = tables.len() as i32;
        for c in coders() {
            for i in 0..n {
                let off = i64::from(tables.offset(i as usize));
                let max = tables.cdf(i as usize).len() as i64 - 2;
                // Largest escapes that fit: raw = i32::MAX on both sides (when inside i32).
                let lowest = off - (1 << 30);
                let highest = off + max + (1 << 30) - 1;
                for v in [lowest, highest, off, off + max, off - 1] {
                    if let Ok(v) = i32::try_from(v) {
                        let data = c.encode_with_indexes(&[v, v], &[i, i], &tables).unwrap();
                        let back = c.decode_with_indexes(&data, &[i, i], &tables).unwrap();
                        assert_eq!(back, [v, v], "table {i}");
                    }
                }
                for v in [lowest - 1, highest + 1] {
                    if let Ok(v) = i32::try_from(v) {
                        assert!(c.encode_with_indexes(&[v], &[i], &tables).is_err());
                    }
                }
                for v in [i32::MIN, i32::MAX] {
                    if let Ok(data) = c.encode_with_indexes(&[v], &[i], &tables) {
                        assert_eq!(c.decode_with_indexes(&data, &[i], &tables).unwrap(), [v]);
                    }
                }
            }
            assert!(c.encode_with_indexes(&[0], &[n], &tables).is_err());
            assert!(c.encode_with_indexes(&[0], &[-1], &tables).is_err());
            assert!(c.encode_with_indexes(&[0, 0], &[0], &tables).is_err());
            let data = c.encode_with_indexes(&[0], &[0], &tables).unwrap();
            assert!(c.decode_with_indexes(&data, &[n], &tables).is_err());
            assert!(c.decode_with_indexes(&data, &[i32::MIN], &tables).is_err());
        }
    }

    #[test]
    fn escape_decoding_limits() {
        // Hand-made strings with an escape (table 0, symbol 2) and a given count chunk.
        let tables = CdfTables::new(vec![vec![0, 32768, 65535, 65536]], vec![0]).unwrap();
        let string_for = |chunks: &[u32]| {
            let mut enc = Rans64Enc::new(16);
            for &c in chunks.iter().rev() {
                enc.put_bits(c);
            }
            enc.put(65535, 1);
            enc.finish()
        };
        // 9 chunks, or a count chunk of 15, are rejected.
        let data = string_for(&[9, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert!(RansCoder.decode_with_indexes(&data, &[0], &tables).is_err());
        let mut chunks = vec![15, 0];
        chunks.extend([1; 15]);
        let data = string_for(&chunks);
        assert!(RansCoder.decode_with_indexes(&data, &[0], &tables).is_err());
        // 8 chunks with a top chunk >= 8 exceed i32::MAX.
        let data = string_for(&[8, 0, 0, 0, 0, 0, 0, 0, 8]);
        assert!(RansCoder.decode_with_indexes(&data, &[0], &tables).is_err());
        // 8 chunks with top chunk 7 decode; non-canonical leading zero chunks too.
        let data = string_for(&[8, 15, 15, 15, 15, 15, 15, 15, 7]);
        // raw = i32::MAX is odd: v = -(raw >> 1) - 1 = -2^30.
        let got = RansCoder.decode_with_indexes(&data, &[0], &tables).unwrap();
        assert_eq!(got, [-(1 << 30)]);
        let data = string_for(&[3, 4, 0, 0]);
        assert_eq!(
            RansCoder.decode_with_indexes(&data, &[0], &tables).unwrap(),
            [2 + 2]
        );
        #[cfg(feature = "ryg-rans")]
        for chunks in [
            &[9, 1, 1, 1, 1, 1, 1, 1, 1, 1][..],
            &[8, 0, 0, 0, 0, 0, 0, 0, 8],
        ] {
            let data = string_for(chunks);
            assert!(RygRansCoder
                .decode_with_indexes(&data, &[0], &tables)
                .is_err());
        }
    }

    #[test]
    fn strict_decoding() {
        let tables = test_tables();
        let mut rng = Rng(77);
        let (symbols, indexes) = random_case(&mut rng, &tables, 500);
        let data = RansCoder
            .encode_with_indexes(&symbols, &indexes, &tables)
            .unwrap();
        // Trailing words, a partial word, or every truncation are errors.
        let mut longer = data.clone();
        longer.extend([0, 0, 0, 0]);
        assert!(RansCoder
            .decode_with_indexes(&longer, &indexes, &tables)
            .is_err());
        longer.truncate(data.len() + 1);
        assert!(RansCoder
            .decode_with_indexes(&longer, &indexes, &tables)
            .is_err());
        for len in 0..data.len() {
            assert!(RansCoder
                .decode_with_indexes(&data[..len], &indexes, &tables)
                .is_err());
        }
        // Decoding fewer symbols leaves state and words over.
        assert!(RansCoder
            .decode_with_indexes(&data, &indexes[..499], &tables)
            .is_err());
        // A bad table index is named with its position, by every coder.
        for bad in [-1, tables.len() as i32] {
            let mut wrong = indexes.clone();
            wrong[321] = bad;
            for coder in coders() {
                let err = coder
                    .decode_with_indexes(&data, &wrong, &tables)
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains(&format!("table index {bad} at position 321")),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let tables = test_tables();
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let mut ok = 0;
        for round in 0..600 {
            let n = rng.below(300) as usize;
            let (symbols, mut indexes) = random_case(&mut rng, &tables, n);
            let mut data = RansCoder
                .encode_with_indexes(&symbols, &indexes, &tables)
                .unwrap();
            match round % 6 {
                0 => data = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
                1 => {
                    let len = rng.below(data.len() as u64 + 1) as usize;
                    data.truncate(len);
                }
                2 => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(data.len() as u64) as usize;
                        data[i] ^= 1 << rng.below(8);
                    }
                }
                3 => {
                    for _ in 0..rng.below(8) {
                        data.push(rng.next() as u8);
                    }
                }
                4 => {
                    for ix in indexes.iter_mut() {
                        if rng.below(10) == 0 {
                            *ix = rng.next() as i32 % 20;
                        }
                    }
                }
                _ => {
                    data = (0..4 * rng.below(100)).map(|_| rng.next() as u8).collect();
                    indexes.extend((0..rng.below(100)).map(|_| rng.below(11) as i32));
                }
            }
            for c in coders() {
                if c.decode_with_indexes(&data, &indexes, &tables).is_ok() {
                    ok += 1;
                }
            }
        }
        // Unchanged strings (e.g. empty truncations of empty input) may still decode.
        assert!(ok < 600);
        // All-ones and all-zeros strings with escape-heavy tables.
        for fill in [0u8, 0xff] {
            for len in [8usize, 12, 64, 4096] {
                let data = vec![fill; len];
                let indexes = vec![8; 1000];
                for c in coders() {
                    let _ = c.decode_with_indexes(&data, &indexes, &tables);
                }
            }
        }
    }

    #[test]
    fn tables_are_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<CdfTables>();
        check::<RansCoder>();
    }
}
