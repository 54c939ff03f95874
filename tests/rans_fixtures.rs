//! The rANS coders against strings written by CompressAI 1.2.8 (fixtures in `../shared/fixtures`):
//! decoding must give the stored symbols exactly and encoding must give the strings byte for byte.

use std::path::{Path, PathBuf};

use psic::entropy::{CdfTables, EntropyCoder, RansCoder};
use safetensors::{Dtype, SafeTensors};

/// The shared fixtures folder, or `None` (after printing why) when it is absent.
fn fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if dir.join("psic-official").is_dir() && dir.join("compressai").is_dir() {
        Some(dir)
    } else {
        println!("skipped: ../shared/fixtures not found");
        None
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tensor's values and shape as i32; float32 tensors must hold exact integers.
fn ints(st: &SafeTensors, name: &str) -> (Vec<i32>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let bytes = t.data();
    let values = match t.dtype() {
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                assert_eq!(v, v.round(), "{name}: {v} is not an integer");
                v as i32
            })
            .collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    };
    (values, t.shape().to_vec())
}

fn floats(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// CompressAI's `{prefix}._quantized_cdf`, `._cdf_length` and `._offset` buffers as tables.
fn tables(st: &SafeTensors, prefix: &str) -> CdfTables {
    let (cdf, shape) = ints(st, &format!("{prefix}._quantized_cdf"));
    let (lengths, _) = ints(st, &format!("{prefix}._cdf_length"));
    let (offsets, _) = ints(st, &format!("{prefix}._offset"));
    assert_eq!(shape.len(), 2);
    CdfTables::from_padded(&cdf, shape[0], shape[1], &lengths, &offsets).unwrap()
}

/// Table index = channel for every element of an NCHW tensor (the entropy bottleneck's rule).
fn channel_indexes(shape: &[usize]) -> Vec<i32> {
    let (c, hw) = (shape[1], shape[2] * shape[3]);
    (0..shape.iter().product::<usize>())
        .map(|i| ((i / hw) % c) as i32)
        .collect()
}

/// Checks one coder on one string in both directions.
fn check_coder(
    coder: &dyn EntropyCoder,
    what: &str,
    tables: &CdfTables,
    data: &[u8],
    symbols: &[i32],
    indexes: &[i32],
) {
    assert_eq!(symbols.len(), indexes.len(), "{what}");
    let decoded = coder
        .decode_with_indexes(data, indexes, tables)
        .unwrap_or_else(|e| panic!("{what}: decoding failed: {e}"));
    let wrong = decoded.iter().zip(symbols).filter(|(a, b)| a != b).count();
    assert_eq!(wrong, 0, "{what}: {wrong} decoded symbols differ");
    let encoded = coder
        .encode_with_indexes(symbols, indexes, tables)
        .unwrap_or_else(|e| panic!("{what}: encoding failed: {e}"));
    assert_eq!(encoded.len(), data.len(), "{what}: encoded length differs");
    assert!(encoded == data, "{what}: encoded bytes differ");
}

/// One fixture string: its tables, bytes, symbols and table indexes.
struct Case {
    name: &'static str,
    tables: CdfTables,
    data: Vec<u8>,
    symbols: Vec<i32>,
    indexes: Vec<i32>,
}

fn psic_official_cases(dir: &Path) -> Vec<Case> {
    let dir = dir.join("psic-official");
    let model_bytes = read(&dir.join("state_dict.safetensors"));
    let model = SafeTensors::deserialize(&model_bytes).unwrap();
    let refs_bytes = read(&dir.join("refs.safetensors"));
    let refs = SafeTensors::deserialize(&refs_bytes).unwrap();
    let gaussian = || tables(&model, "gaussian_conditional");
    let bottleneck = || tables(&model, "entropy_bottleneck");
    let z_case = |name, file: &str, symbols: &str| {
        let (symbols, shape) = ints(&refs, symbols);
        Case {
            name,
            tables: bottleneck(),
            data: read(&dir.join(file)),
            indexes: channel_indexes(&shape),
            symbols,
        }
    };
    let y_case = |name, file: &str, symbols: &str, indexes: &str| Case {
        name,
        tables: gaussian(),
        data: read(&dir.join(file)),
        symbols: ints(&refs, symbols).0,
        indexes: ints(&refs, indexes).0,
    };
    vec![
        y_case(
            "psic stress_tables",
            "stress_tables_string.bin",
            "stress_tables.y_symbols",
            "stress_tables.indexes",
        ),
        y_case(
            "psic stress_pipeline y",
            "stress_y_string.bin",
            "stress_pipeline.y_symbols",
            "stress_pipeline.gaussian_indexes",
        ),
        z_case(
            "psic stress_pipeline z",
            "stress_z_string.bin",
            "stress_pipeline.z_symbols",
        ),
        y_case(
            "psic main y",
            "y_string.bin",
            "y_symbols",
            "gaussian_indexes",
        ),
        z_case("psic main z", "z_string.bin", "z_symbols"),
    ]
}

fn compressai_cases(dir: &Path) -> Vec<Case> {
    let dir = dir.join("compressai");
    let model_bytes = read(&dir.join("hyperprior_128_192.safetensors"));
    let model = SafeTensors::deserialize(&model_bytes).unwrap();
    let refs_bytes = read(&dir.join("test_intermediates.safetensors"));
    let refs = SafeTensors::deserialize(&refs_bytes).unwrap();
    let strings = read(&dir.join("test_strings.bin"));
    assert_eq!(strings.len(), 41704 + 4380);
    let (y, z) = strings.split_at(41704);
    vec![
        Case {
            name: "compressai hyperprior y",
            tables: tables(&model, "gaussian_conditional"),
            data: y.to_vec(),
            symbols: ints(&refs, "y_symbols").0,
            indexes: ints(&refs, "y_indexes").0,
        },
        Case {
            name: "compressai hyperprior z",
            tables: tables(&model, "entropy_bottleneck"),
            data: z.to_vec(),
            symbols: ints(&refs, "z_symbols").0,
            indexes: ints(&refs, "z_indexes").0,
        },
    ]
}

fn all_cases() -> Option<Vec<Case>> {
    let dir = fixtures()?;
    let mut cases = psic_official_cases(&dir);
    cases.extend(compressai_cases(&dir));
    Some(cases)
}

#[test]
fn rans_coder_matches_compressai_strings() {
    let Some(cases) = all_cases() else { return };
    for c in &cases {
        check_coder(
            &RansCoder, c.name, &c.tables, &c.data, &c.symbols, &c.indexes,
        );
    }
}

#[test]
fn fixture_facts() {
    let Some(cases) = all_cases() else { return };
    let find = |name: &str| cases.iter().find(|c| c.name == name).unwrap();
    // The stress cases exercise escapes and all 64 Gaussian tables, as the README says.
    let escaped = |c: &Case| {
        c.symbols
            .iter()
            .zip(&c.indexes)
            .filter(|(&s, &i)| {
                let v = i64::from(s) - i64::from(c.tables.offset(i as usize));
                v < 0 || v >= c.tables.cdf(i as usize).len() as i64 - 2
            })
            .count()
    };
    assert_eq!(escaped(find("psic stress_pipeline z")), 201);
    assert_eq!(escaped(find("psic stress_pipeline y")), 8);
    assert_eq!(escaped(find("psic stress_tables")), 4);
    let tables_case = find("psic stress_tables");
    let mut used: Vec<i32> = tables_case.indexes.clone();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used, (0..64).collect::<Vec<_>>());
    assert_eq!(tables_case.data.len(), 9392);
}

#[cfg(feature = "ryg-rans")]
#[test]
fn ryg_rans_coder_matches_compressai_strings() {
    use psic::entropy::coder::RygRansCoder;
    let Some(cases) = all_cases() else { return };
    for c in &cases {
        check_coder(
            &RygRansCoder,
            c.name,
            &c.tables,
            &c.data,
            &c.symbols,
            &c.indexes,
        );
    }
}

#[cfg(not(feature = "ryg-rans"))]
#[test]
fn ryg_rans_coder_matches_compressai_strings() {
    println!("skipped: built without feature ryg-rans (needs libclang)");
}

#[test]
fn corrupted_fixture_strings_are_rejected() {
    let Some(cases) = all_cases() else { return };
    for c in &cases {
        let n = c.data.len();
        // Truncations, a dropped word in the middle, trailing words: errors, never panics.
        for len in [0, 4, 8, (n / 2) & !3, n - 4]
            .into_iter()
            .filter(|&l| l < n)
        {
            assert!(
                RansCoder
                    .decode_with_indexes(&c.data[..len], &c.indexes, &c.tables)
                    .is_err(),
                "{}: truncated to {len}",
                c.name
            );
        }
        let mut longer = c.data.clone();
        longer.extend_from_slice(&[1, 2, 3, 4]);
        assert!(RansCoder
            .decode_with_indexes(&longer, &c.indexes, &c.tables)
            .is_err());
        // Bit flips either fail or decode to something else: never the original and a success.
        for k in 0..64 {
            let mut bad = c.data.clone();
            let pos = (k * 7919) % n;
            bad[pos] ^= 1 << (k % 8);
            if let Ok(s) = RansCoder.decode_with_indexes(&bad, &c.indexes, &c.tables) {
                assert_eq!(s.len(), c.indexes.len());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rebuilding CompressAI's Gaussian CDF tables with `pmf_to_quantized_cdf`.

#[test]
fn gaussian_tables_rebuilt_from_the_scale_table() {
    let Some(dir) = fixtures() else { return };
    for (file, what) in [
        ("psic-official/state_dict.safetensors", "psic-official"),
        ("compressai/hyperprior_128_192.safetensors", "compressai"),
    ] {
        let bytes = read(&dir.join(file));
        let model = SafeTensors::deserialize(&bytes).unwrap();
        let stored = tables(&model, "gaussian_conditional");
        let scales = floats(&model, "gaussian_conditional.scale_table");
        assert_eq!(scales.len(), stored.len());
        let (mut rows_exact, mut entries, mut entries_exact, mut max_diff) = (0, 0, 0, 0i64);
        let rebuilt = psic::entropy::GaussianConditional::from_scale_table(scales.clone()).unwrap();
        for i in 0..scales.len() {
            let (cdf, offset) = (rebuilt.tables().cdf(i).to_vec(), rebuilt.tables().offset(i));
            assert_eq!(offset, stored.offset(i), "{what} row {i}: offset");
            assert_eq!(cdf.len(), stored.cdf(i).len(), "{what} row {i}: length");
            let same = cdf
                .iter()
                .zip(stored.cdf(i))
                .filter(|(a, b)| a == b)
                .count();
            rows_exact += usize::from(same == cdf.len());
            entries += cdf.len();
            entries_exact += same;
            for (a, b) in cdf.iter().zip(stored.cdf(i)) {
                max_diff = max_diff.max((i64::from(*a) - i64::from(*b)).abs());
            }
        }
        println!(
            "{what}: {rows_exact}/{} Gaussian CDF rows exact, {entries_exact}/{entries} entries \
             exact, largest difference {max_diff}",
            scales.len()
        );
        // psic's erfc is double precision rounded to f32 while torch's is f32 (Sleef), so single
        // entries could in principle differ by one; on these fixtures every entry matches.
        assert_eq!(
            rows_exact,
            scales.len(),
            "{what}: largest difference {max_diff}"
        );
    }
}

/// 1M symbols round(N(0, scale)) with table indexes uniform over the 64 Gaussian tables of the
/// CompressAI model (like CompressAI's own "synthetic_gaussian_uniform_index" benchmark).
fn synthetic_gaussian_case() -> Case {
    let dir = fixtures().unwrap().join("compressai");
    let model_bytes = read(&dir.join("hyperprior_128_192.safetensors"));
    let model = SafeTensors::deserialize(&model_bytes).unwrap();
    let tables = tables(&model, "gaussian_conditional");
    let scales = floats(&model, "gaussian_conditional.scale_table");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        ((rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let n = 1_000_000;
    let mut symbols = Vec::with_capacity(n);
    let mut indexes = Vec::with_capacity(n);
    for _ in 0..n {
        let i = (uniform() * 64.0) as usize;
        let normal = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
        symbols.push((normal * f64::from(scales[i])).round() as i32);
        indexes.push(i as i32);
    }
    let data = RansCoder
        .encode_with_indexes(&symbols, &indexes, &tables)
        .unwrap();
    Case {
        name: "synthetic gaussian",
        tables,
        data,
        symbols,
        indexes,
    }
}

/// Seconds this thread has run on a CPU (Linux schedstat, so other load on the machine does not
/// count), or wall-clock seconds where that is unavailable.
fn thread_seconds(wall: std::time::Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .filter(|&ns| ns > 0)
        .map_or_else(|| wall.elapsed().as_secs_f64(), |ns| ns as f64 * 1e-9)
}

/// Throughput on the fixture strings (not a check; run in release with
/// `cargo test --release --test rans_fixtures -- --ignored --nocapture throughput`).
#[test]
#[ignore]
fn throughput() {
    let start = std::time::Instant::now();
    let Some(mut cases) = all_cases() else { return };
    cases.push(synthetic_gaussian_case());
    #[allow(unused_mut)]
    let mut coders: Vec<(&str, Box<dyn EntropyCoder>)> = vec![("RansCoder", Box::new(RansCoder))];
    #[cfg(feature = "ryg-rans")]
    coders.push(("RygRansCoder", Box::new(psic::entropy::coder::RygRansCoder)));
    // Best of several rounds, to see past other load on the machine.
    let rounds: usize = std::env::var("PSIC_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let only = std::env::var("PSIC_BENCH_ONLY").unwrap_or_default();
    for c in cases
        .iter()
        .filter(|c| c.symbols.len() >= 1000 && c.name.contains(&only))
    {
        for (name, coder) in &coders {
            // Long timings: the schedstat clock advances in scheduler ticks.
            let reps = (30_000_000 / c.symbols.len()).max(1);
            let mut best = [f64::MAX; 2];
            for _ in 0..rounds {
                let t = thread_seconds(start);
                for _ in 0..reps {
                    let out = coder.encode_with_indexes(&c.symbols, &c.indexes, &c.tables);
                    std::hint::black_box(out.unwrap());
                }
                best[0] = best[0].min(thread_seconds(start) - t);
                let t = thread_seconds(start);
                for _ in 0..reps {
                    let out = coder.decode_with_indexes(&c.data, &c.indexes, &c.tables);
                    std::hint::black_box(out.unwrap());
                }
                best[1] = best[1].min(thread_seconds(start) - t);
            }
            let rate = |secs: f64| (reps * c.symbols.len()) as f64 / secs / 1e6;
            println!(
                "{:<26} {name:<13} {:>7} symbols: encode {:6.1} M symbols/s, decode {:6.1} M symbols/s",
                c.name,
                c.symbols.len(),
                rate(best[0]),
                rate(best[1])
            );
        }
    }
}
