//! Quantised cumulative distribution functions (CDFs) as CompressAI builds and stores them.
//!
//! [`pmf_to_quantized_cdf`] turns a probability mass function into an integer CDF exactly like
//! CompressAI's C++ helper of the same name, and [`CdfTables`] holds a validated set of such CDFs
//! (one per entropy-model "index") together with their offsets and a decode lookup table.

use crate::error::{Error, Result};

/// Precision, in bits, of the quantised CDFs used by the rANS coder: every CDF ends at
/// `1 << PRECISION`.
pub const PRECISION: u32 = 16;

/// Most cumulative-frequency bits a decode lookup uses: 2^9 buckets of 8 bytes, 4 KiB a table.
const MAX_LUT_BITS: u32 = 9;

/// A decode lookup stops growing once at most `2^16 >> SEARCH_SHARE_SHIFT` (1/32) of the
/// cumulative frequencies fall into buckets that need a CDF search.
const SEARCH_SHARE_SHIFT: u32 = 5;

/// Buckets spanning at most this many symbols are searched linearly, others by bisection.
const LINEAR_SCAN_MAX: usize = 8;

/// Converts a probability mass function to a quantised CDF with `precision` bits, reproducing
/// CompressAI's C++ `pmf_to_quantized_cdf` (`cpp_exts/ops/ops.cpp`) bit for bit.
///
/// The result has `pmf.len() + 1` entries, starts at 0, ends at `1 << precision` and is strictly
/// increasing (every symbol gets a frequency of at least 1, "stolen" from the lowest frequency above
/// 1, as CompressAI does).
///
/// Where CompressAI would divide by zero, assert or run into undefined behaviour this returns
/// [`Error::InvalidArgument`] instead: `precision` outside `1..=30`, an empty pmf or one that
/// rounds to all zeros, an entry that is NaN or rounds to a negative value or one beyond `u32`,
/// more symbols than `1 << precision`, or a CDF in which no frequency can be stolen to make it
/// strictly increasing.
///
/// The original's stealing pass rescans the whole CDF for every zero-frequency symbol (time
/// quadratic in the pmf's length: minutes for a few wide tables); this one gives the same CDF in
/// `O(n log n)` (see `steal_frequencies`).
pub fn pmf_to_quantized_cdf(pmf: &[f32], precision: u32) -> Result<Vec<u32>> {
    if !(1..=30).contains(&precision) {
        return Err(Error::InvalidArgument(format!(
            "pmf_to_quantized_cdf: precision {precision} is outside 1..=30"
        )));
    }
    let one = 1u32 << precision;
    if pmf.is_empty() || pmf.len() > one as usize {
        return Err(Error::InvalidArgument(format!(
            "pmf_to_quantized_cdf: {} symbols cannot get a nonzero frequency at precision {precision}",
            pmf.len()
        )));
    }

    let scale = one as f32;
    let mut cdf = Vec::with_capacity(pmf.len() + 1);
    cdf.push(0u32);
    for (i, &p) in pmf.iter().enumerate() {
        // f32 multiply and round half away from zero, as std::round(float) in the C++ code.
        let r = (p * scale).round();
        if !(0.0..4_294_967_296.0).contains(&r) {
            return Err(Error::InvalidArgument(format!(
                "pmf_to_quantized_cdf: pmf[{i}] = {p} is not a usable probability"
            )));
        }
        cdf.push(r as u32);
    }

    // std::accumulate with an int accumulator: wraps like u32 arithmetic.
    let total = cdf.iter().fold(0u32, |acc, &c| acc.wrapping_add(c));
    if total == 0 {
        return Err(Error::InvalidArgument(
            "pmf_to_quantized_cdf: the pmf rounds to all zeros".into(),
        ));
    }
    for c in cdf.iter_mut() {
        *c = ((u64::from(one) * u64::from(*c)) / u64::from(total)) as u32;
    }
    for i in 1..cdf.len() {
        cdf[i] = cdf[i].wrapping_add(cdf[i - 1]);
    }
    let last = cdf.len() - 1;
    cdf[last] = one;

    steal_frequencies(&mut cdf)?;

    if cdf[0] != 0 || cdf[last] != one || cdf.windows(2).any(|w| w[1] <= w[0]) {
        return Err(Error::InvalidArgument(
            "pmf_to_quantized_cdf: the pmf does not give a strictly increasing CDF".into(),
        ));
    }
    Ok(cdf)
}

/// CompressAI's stealing pass: every symbol `i` with frequency 0 (in order) takes one unit of
/// frequency from the symbol with the lowest frequency above 1 (the first one on ties), by
/// shifting the CDF entries between the two. Frequencies are `u32` differences of neighbouring
/// entries, with wrapping arithmetic as in the C++ code.
///
/// The original rescans the CDF for every such symbol. In frequency terms a steal only adds 1 to
/// `freq[i]` (0 becomes 1, never a donor) and takes 1 from the donor, which then is still the
/// lowest frequency above 1 until it reaches 1; the other frequencies do not change. So the
/// donors are the symbols with frequency above 1 in (frequency, index) order, each giving until
/// it is down to 1: one sort and one pass, the same CDF as the quadratic original.
fn steal_frequencies(cdf: &mut [u32]) -> Result<()> {
    let last = cdf.len() - 1;
    let mut freq: Vec<u32> = cdf.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    if !freq.contains(&0) {
        return Ok(());
    }
    let mut donors: Vec<usize> = (0..last).filter(|&j| freq[j] > 1).collect();
    donors.sort_unstable_by_key(|&j| (freq[j], j));
    let mut donors = donors.into_iter();
    let mut donor = donors.next();
    for i in 0..last {
        if freq[i] != 0 {
            continue;
        }
        let Some(d) = donor else {
            return Err(Error::InvalidArgument(
                "pmf_to_quantized_cdf: no frequency left to steal for a zero-probability symbol"
                    .into(),
            ));
        };
        freq[i] = 1;
        freq[d] -= 1;
        if freq[d] == 1 {
            donor = donors.next();
        }
    }
    for j in 0..last {
        cdf[j + 1] = cdf[j].wrapping_add(freq[j]);
    }
    Ok(())
}

/// One validated CDF with its offset and decode lookup.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    /// The CDF: `cdf[0] == 0`, `cdf[last] == 1 << PRECISION`, strictly increasing.
    pub(crate) cdf: Box<[u32]>,
    /// Decode lookup, one entry per bucket of cumulative frequencies.
    lut: Box<[Bucket]>,
    /// Cumulative frequency `c` falls into bucket `c >> lut_shift`.
    lut_shift: u32,
    /// Value of symbol 0.
    pub(crate) offset: i32,
    /// The escape symbol, `cdf.len() - 2`.
    pub(crate) max_value: u32,
}

/// Decode lookup entry of one bucket of cumulative frequencies (8 bytes, fields loaded directly).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    /// Frequency of the symbol holding the whole bucket, or 0 if the bucket needs a scan.
    pub(crate) freq: u16,
    /// Cumulative frequency where that symbol starts.
    pub(crate) start: u16,
    /// Its value (symbol + offset); for a scan bucket, the symbol holding the bucket's start.
    pub(crate) value: i32,
}

impl Bucket {
    /// The bucket's number of symbols after the first, for a scan bucket (whose `freq` is 0).
    fn span(&self) -> usize {
        usize::from(self.start)
    }
}

impl Table {
    fn new(cdf: Vec<u32>, offset: i32, which: usize) -> Result<Self> {
        let one = 1u32 << PRECISION;
        let bad = |what: &str| {
            Err(Error::InvalidArgument(format!(
                "CDF table {which} (length {}): {what}",
                cdf.len()
            )))
        };
        if cdf.len() < 2 {
            return bad("needs at least 2 entries");
        }
        if cdf[0] != 0 {
            return bad("does not start at 0");
        }
        if cdf[cdf.len() - 1] != one {
            return bad("does not end at 65536");
        }
        if let Some(k) = cdf.windows(2).position(|w| w[1] <= w[0]) {
            return bad(&format!(
                "is not strictly increasing at entry {k} (every symbol needs a frequency >= 1)"
            ));
        }
        // Strictly increasing from 0 to 65536: at most 65536 symbols, frequencies <= 65536.
        let n_symbols = cdf.len() - 1;
        let max_value = n_symbols - 1;
        // The smallest lookup that sends few cumulative frequencies to a search.
        let mut lut_bits = 1;
        let lut = loop {
            let (lut, searched) = build_lut(&cdf, offset, lut_bits);
            if lut_bits == MAX_LUT_BITS || searched <= (1 << PRECISION) >> SEARCH_SHARE_SHIFT {
                break lut;
            }
            lut_bits += 1;
        };
        let lut_shift = PRECISION - lut_bits;
        Ok(Table {
            max_value: max_value as u32,
            cdf: cdf.into_boxed_slice(),
            lut: lut.into_boxed_slice(),
            lut_shift,
            offset,
        })
    }

    /// The lookup bucket of cumulative frequency `cum < 1 << PRECISION`. A nonzero `freq`
    /// means the bucket lies inside one ordinary (non-escape) symbol, `[start, start + freq)`,
    /// whose value (symbol + offset) fits in `i32`: the decoder's fast path uses it whole.
    #[inline(always)]
    pub(crate) fn bucket(&self, cum: u32) -> Bucket {
        self.lut[(cum >> self.lut_shift) as usize]
    }

    /// The symbol `s` with `cdf[s] <= cum < cdf[s + 1]`, for `cum < 1 << PRECISION`: the bucket's
    /// symbol, or a search of the CDF between the symbols holding the bucket's ends.
    #[inline(always)]
    pub(crate) fn find(&self, cum: u32) -> usize {
        let b = self.bucket(cum);
        if b.freq != 0 {
            return (i64::from(b.value) - i64::from(self.offset)) as usize;
        }
        let (first, last) = (b.value as usize, b.value as usize + b.span());
        if last - first <= LINEAR_SCAN_MAX {
            let mut s = first;
            while self.cdf[s + 1] <= cum {
                s += 1;
            }
            s
        } else {
            first + self.cdf[first + 1..=last].partition_point(|&c| c <= cum)
        }
    }
}

/// Builds the decode lookup of a validated CDF with `2^bits` buckets; also returns how many
/// cumulative frequencies fall into buckets that need a search.
fn build_lut(cdf: &[u32], offset: i32, bits: u32) -> (Vec<Bucket>, u32) {
    let max_value = cdf.len() - 2;
    let shift = PRECISION - bits;
    let width = 1u32 << shift;
    let mut lut = Vec::with_capacity(1 << bits);
    let mut searched = 0;
    let (mut first, mut last) = (0usize, 0usize);
    for b in 0..(1u32 << bits) {
        let lo = b << shift;
        let hi = lo + width - 1;
        while cdf[first + 1] <= lo {
            first += 1;
        }
        last = last.max(first);
        while cdf[last + 1] <= hi {
            last += 1;
        }
        let value = i32::try_from(first as i64 + i64::from(offset));
        let bucket = match value {
            // One ordinary symbol: its freq is below 65536 (the escape symbol takes at least 1)
            // and it starts below 65536.
            Ok(value) if first == last && first != max_value => Bucket {
                freq: (cdf[first + 1] - cdf[first]) as u16,
                start: cdf[first] as u16,
                value,
            },
            // At most 65536 symbols: first and last - first fit in 16 bits.
            _ => {
                searched += width;
                Bucket {
                    freq: 0,
                    start: (last - first) as u16,
                    value: first as i32,
                }
            }
        };
        lut.push(bucket);
    }
    (lut, searched)
}

/// A validated set of quantised CDF tables, as CompressAI's entropy models store them (one CDF and
/// one offset per table index), with a precomputed decode lookup per table.
///
/// Table `i` codes values `offset(i) ..= offset(i) + cdf(i).len() - 3` directly; its last symbol
/// (`cdf(i).len() - 2`) is the escape that precedes a bypass-coded out-of-range value.
#[derive(Debug, Clone)]
pub struct CdfTables {
    tables: Vec<Table>,
}

impl CdfTables {
    /// Builds the tables from one CDF and one offset per table.
    ///
    /// Every CDF must have at least 2 entries, start at 0, end at `1 << PRECISION` (65536) and be
    /// strictly increasing; `offsets` must have one entry per CDF. Otherwise returns
    /// [`Error::InvalidArgument`].
    pub fn new(cdfs: Vec<Vec<u32>>, offsets: Vec<i32>) -> Result<Self> {
        if cdfs.len() != offsets.len() {
            return Err(Error::InvalidArgument(format!(
                "CDF tables: {} CDFs but {} offsets",
                cdfs.len(),
                offsets.len()
            )));
        }
        let tables = cdfs
            .into_iter()
            .zip(offsets)
            .enumerate()
            .map(|(i, (cdf, offset))| Table::new(cdf, offset, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(CdfTables { tables })
    }

    /// Builds the tables from CompressAI's buffers: `_quantized_cdf` (`rows` x `row_width`, row-major,
    /// each row zero-padded past its length), `_cdf_length` and `_offset` (one entry per row).
    ///
    /// Accepts `i32` (as PyTorch stores the buffers) or `u32` values; lengths, shapes and the CDFs
    /// themselves are validated as in [`CdfTables::new`], so a hostile model file gives an error.
    pub fn from_padded<T: Copy + TryInto<u32>>(
        quantized_cdf: &[T],
        rows: usize,
        row_width: usize,
        cdf_lengths: &[i32],
        offsets: &[i32],
    ) -> Result<Self> {
        let bad = |msg: String| Err(Error::InvalidArgument(format!("CDF tables: {msg}")));
        if rows.checked_mul(row_width) != Some(quantized_cdf.len()) {
            return bad(format!(
                "{} CDF values do not form {rows} rows of {row_width}",
                quantized_cdf.len()
            ));
        }
        if cdf_lengths.len() != rows || offsets.len() != rows {
            return bad(format!(
                "{rows} CDF rows but {} lengths and {} offsets",
                cdf_lengths.len(),
                offsets.len()
            ));
        }
        let mut cdfs = Vec::with_capacity(rows);
        for (i, &len) in cdf_lengths.iter().enumerate() {
            let len = match usize::try_from(len) {
                Ok(len) if len <= row_width => len,
                _ => return bad(format!("row {i}: length {len} outside 0..={row_width}")),
            };
            let row = &quantized_cdf[i * row_width..i * row_width + len];
            let mut cdf = Vec::with_capacity(len);
            for (k, &v) in row.iter().enumerate() {
                match v.try_into() {
                    Ok(v) => cdf.push(v),
                    Err(_) => return bad(format!("row {i}, entry {k} is negative")),
                }
            }
            cdfs.push(cdf);
        }
        CdfTables::new(cdfs, offsets.to_vec())
    }

    /// Number of tables.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether there are no tables.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The CDF of table `i` (its `_cdf_length` entries, without padding).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn cdf(&self, i: usize) -> &[u32] {
        &self.tables[i].cdf
    }

    /// The offset of table `i`: the value coded by symbol 0.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn offset(&self, i: usize) -> i32 {
        self.tables[i].offset
    }

    /// Table `index` of a coder call, or an entropy-coding error naming position `k`.
    #[inline(always)]
    pub(crate) fn table(&self, index: i32, k: usize) -> Result<&Table> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.tables.get(i))
            .ok_or_else(|| {
                Error::EntropyCoding(format!(
                    "table index {index} at position {k} is outside 0..{}",
                    self.tables.len()
                ))
            })
    }
}

impl CdfTables {
    /// All tables, for decode loops that check each index themselves.
    #[inline(always)]
    pub(crate) fn all(&self) -> &[Table] {
        &self.tables
    }

    /// The tables in CompressAI's buffer layout: (`_quantized_cdf` row-major and zero-padded,
    /// rows, row width, `_cdf_length`, `_offset`), for writing model files.
    pub fn to_padded(&self) -> (Vec<i32>, usize, usize, Vec<i32>, Vec<i32>) {
        let rows = self.len();
        let width = (0..rows).map(|i| self.cdf(i).len()).max().unwrap_or(0);
        let mut padded = vec![0i32; rows * width];
        for i in 0..rows {
            for (k, &v) in self.cdf(i).iter().enumerate() {
                padded[i * width + k] = v as i32;
            }
        }
        let lengths = (0..rows).map(|i| self.cdf(i).len() as i32).collect();
        let offsets = (0..rows).map(|i| self.offset(i)).collect();
        (padded, rows, width, lengths, offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmf_hand_cases() {
        // Exact quarters.
        assert_eq!(
            pmf_to_quantized_cdf(&[0.25, 0.5, 0.25], 16).unwrap(),
            vec![0, 16384, 49152, 65536]
        );
        // Unnormalised pmf is rescaled by its rounded total.
        assert_eq!(
            pmf_to_quantized_cdf(&[1.0, 1.0], 16).unwrap(),
            vec![0, 32768, 65536]
        );
        // Precision 4: pmf*16 = [8, 0, 8]; symbol 1 steals from the first lowest freq > 1 (symbol 0).
        assert_eq!(
            pmf_to_quantized_cdf(&[0.5, 0.0, 0.5], 4).unwrap(),
            vec![0, 7, 8, 16]
        );
        // Zero at the front steals forward from the first lowest frequency (symbol 2 has 2).
        // pmf*16 = [0, 14, 2] -> [0, 0, 14, 16]; steal: best is j=2 (freq 2) -> increment 1..=2.
        assert_eq!(
            pmf_to_quantized_cdf(&[0.0, 0.875, 0.125], 4).unwrap(),
            vec![0, 1, 15, 16]
        );
        // Round half away from zero: 8.5 -> 9 and 2.5 -> 3 (total 18) gives [0, 8, 10, 12, 16];
        // banker's rounding (8, 2, 2, 2; total 14) would give [0, 9, 11, 13, 16].
        let cdf = pmf_to_quantized_cdf(&[8.5 / 16.0, 2.5 / 16.0, 2.5 / 16.0, 2.5 / 16.0], 4);
        assert_eq!(cdf.unwrap(), vec![0, 8, 10, 12, 16]);
        // The floor rescale: [3,3,3] of total 9 at precision 4 -> 16*3/9 = 5 each, last forced.
        assert_eq!(
            pmf_to_quantized_cdf(&[3.0 / 16.0; 3], 4).unwrap(),
            vec![0, 5, 10, 16]
        );
    }

    /// CompressAI's stealing pass as written (quadratic), for comparison.
    fn steal_quadratic(cdf: &mut [u32]) -> Result<()> {
        let last = cdf.len() - 1;
        for i in 0..last {
            if cdf[i] != cdf[i + 1] {
                continue;
            }
            let mut best_freq = u32::MAX;
            let mut best_steal = None;
            for j in 0..last {
                let freq = cdf[j + 1].wrapping_sub(cdf[j]);
                if freq > 1 && freq < best_freq {
                    best_freq = freq;
                    best_steal = Some(j);
                }
            }
            let Some(best_steal) = best_steal else {
                return Err(Error::InvalidArgument("nothing to steal".into()));
            };
            if best_steal < i {
                for c in &mut cdf[best_steal + 1..=i] {
                    *c = c.wrapping_sub(1);
                }
            } else {
                for c in &mut cdf[i + 1..=best_steal] {
                    *c = c.wrapping_add(1);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fast_stealing_matches_compressai_quadratic_pass() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut stolen = 0;
        for case in 0..3000 {
            // Short CDFs (non-decreasing, with runs of equal entries, some wrapping) of any end
            // value, as the rescaling can leave them.
            let n = 2 + (next() % 40) as usize;
            let mut cdf = vec![0u32];
            for _ in 0..n {
                let step = match next() % 4 {
                    0 => 0,
                    1 => 1,
                    2 => (next() % 5) as u32,
                    _ if case % 7 == 0 => next() as u32,
                    _ => (next() % 300) as u32,
                };
                let prev = *cdf.last().unwrap();
                cdf.push(prev.wrapping_add(step));
            }
            let (mut a, mut b) = (cdf.clone(), cdf.clone());
            let ra = steal_frequencies(&mut a);
            let rb = steal_quadratic(&mut b);
            assert_eq!(ra.is_ok(), rb.is_ok(), "{cdf:?}");
            if ra.is_ok() {
                assert_eq!(a, b, "{cdf:?}");
                stolen += usize::from(a != cdf);
            }
        }
        assert!(stolen > 1000, "only {stolen} cases stole anything");
        // Wide Gaussian-like tables, where CompressAI steals for thousands of symbols.
        for width in [3_000usize, 20_000] {
            let sigma = width as f32 / 12.0;
            let pmf: Vec<f32> = (0..width)
                .map(|k| {
                    let x = (k as f32 - width as f32 / 2.0) / sigma;
                    (-x * x / 2.0).exp()
                })
                .collect();
            let total: f32 = pmf.iter().sum();
            let pmf: Vec<f32> = pmf.iter().map(|p| p / total).collect();
            let fast = pmf_to_quantized_cdf(&pmf, 16).unwrap();
            // Rebuild the pre-stealing CDF and run the original pass on it.
            let mut slow = vec![0u32];
            for &p in &pmf {
                slow.push((p * 65536.0).round() as u32);
            }
            let total = slow.iter().fold(0u32, |a, &c| a.wrapping_add(c));
            for c in slow.iter_mut() {
                *c = ((65536u64 * u64::from(*c)) / u64::from(total)) as u32;
            }
            for i in 1..slow.len() {
                slow[i] = slow[i].wrapping_add(slow[i - 1]);
            }
            *slow.last_mut().unwrap() = 65536;
            steal_quadratic(&mut slow).unwrap();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn pmf_errors() {
        assert!(pmf_to_quantized_cdf(&[], 16).is_err());
        assert!(pmf_to_quantized_cdf(&[0.0, 0.0], 16).is_err());
        assert!(pmf_to_quantized_cdf(&[f32::NAN, 1.0], 16).is_err());
        assert!(pmf_to_quantized_cdf(&[-1.0, 1.0], 16).is_err());
        assert!(pmf_to_quantized_cdf(&[f32::INFINITY], 16).is_err());
        assert!(pmf_to_quantized_cdf(&[1.0], 0).is_err());
        assert!(pmf_to_quantized_cdf(&[1.0], 31).is_err());
        // Five symbols cannot fit in 2 bits.
        assert!(pmf_to_quantized_cdf(&[0.2; 5], 2).is_err());
        // Four symbols at 2 bits: all frequencies 1 after stealing.
        assert_eq!(
            pmf_to_quantized_cdf(&[0.7, 0.1, 0.1, 0.1], 2).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
        // Tiny negative values round to -0 and count as zero (as in C++).
        assert_eq!(
            pmf_to_quantized_cdf(&[-1e-9, 1.0], 4).unwrap(),
            vec![0, 1, 16]
        );
    }

    #[test]
    fn table_validation() {
        let ok = vec![0, 100, 65536];
        assert!(CdfTables::new(vec![ok.clone()], vec![0]).is_ok());
        assert!(CdfTables::new(vec![ok.clone()], vec![]).is_err());
        assert!(CdfTables::new(vec![vec![0]], vec![0]).is_err());
        assert!(CdfTables::new(vec![vec![]], vec![0]).is_err());
        assert!(CdfTables::new(vec![vec![1, 65536]], vec![0]).is_err());
        assert!(CdfTables::new(vec![vec![0, 65535]], vec![0]).is_err());
        assert!(CdfTables::new(vec![vec![0, 65537]], vec![0]).is_err());
        assert!(CdfTables::new(vec![vec![0, 5, 5, 65536]], vec![0]).is_err());
        assert!(CdfTables::new(vec![vec![0, 7, 5, 65536]], vec![0]).is_err());
        assert!(CdfTables::new(vec![ok, vec![0, 65536, 65536]], vec![0, 0]).is_err());
        let t = CdfTables::new(vec![vec![0, 65536]], vec![-3]).unwrap();
        assert_eq!((t.len(), t.cdf(0), t.offset(0)), (1, &[0, 65536][..], -3));
        let empty = CdfTables::new(vec![], vec![]).unwrap();
        assert!(empty.is_empty());
        // The largest possible table: every cumulative frequency its own symbol.
        let full: Vec<u32> = (0..=65536).collect();
        let t = CdfTables::new(vec![full], vec![0]).unwrap();
        for cum in 0..65536 {
            assert_eq!(t.tables[0].find(cum), cum as usize);
        }
    }

    #[test]
    fn padded_validation() {
        let q: [i32; 8] = [0, 10, 65536, 0, 0, 65536, 0, 0];
        let t = CdfTables::from_padded(&q, 2, 4, &[3, 2], &[-1, 5]).unwrap();
        assert_eq!(t.cdf(0), &[0, 10, 65536]);
        assert_eq!(t.cdf(1), &[0, 65536]);
        assert_eq!(t.offset(1), 5);
        let qu: Vec<u32> = q.iter().map(|&v| v as u32).collect();
        assert!(CdfTables::from_padded(&qu, 2, 4, &[3, 2], &[-1, 5]).is_ok());
        assert!(CdfTables::from_padded(&q, 2, 3, &[3, 2], &[-1, 5]).is_err());
        assert!(CdfTables::from_padded(&q, 2, 4, &[3], &[-1, 5]).is_err());
        assert!(CdfTables::from_padded(&q, 2, 4, &[3, 2], &[-1]).is_err());
        assert!(CdfTables::from_padded(&q, 2, 4, &[5, 2], &[-1, 5]).is_err());
        assert!(CdfTables::from_padded(&q, 2, 4, &[-1, 2], &[-1, 5]).is_err());
        assert!(CdfTables::from_padded(&q, 2, 4, &[4, 2], &[-1, 5]).is_err());
        assert!(CdfTables::from_padded(&q, usize::MAX, 2, &[], &[]).is_err());
        let neg: [i32; 3] = [0, -10, 65536];
        assert!(CdfTables::from_padded(&neg, 1, 3, &[3], &[0]).is_err());
    }

    #[test]
    fn lookup_matches_linear_search() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..50 {
            let n = 1 + (next() % 3000) as usize;
            let mut pmf: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 + 0.5).collect();
            let sum: f32 = pmf.iter().sum();
            pmf.iter_mut().for_each(|p| *p /= sum);
            let cdf = pmf_to_quantized_cdf(&pmf, 16).unwrap();
            let t = Table::new(cdf.clone(), 0, 0).unwrap();
            for cum in 0..65536u32 {
                let s = t.find(cum);
                assert!(cdf[s] <= cum && cum < cdf[s + 1]);
            }
        }
    }
}
