//! Hostile and damaged input: every corrupted stream is a typed `Err`, never a panic; foreign
//! models and newer versions are refused by name; odd image sizes round-trip.

mod common;

use common::{test_image, tiny_codec, Rng};
use psic::Error;

/// Recomputes the trailing CRC so that damage reaches the header checks and the rANS decoder.
fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

#[test]
fn corrupted_streams_are_errors_not_panics() {
    let codec = tiny_codec(1);
    let good = codec.encode(&test_image(100, 70)).unwrap();
    assert_eq!(codec.decode(&good).unwrap().dimensions(), (100, 70));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut rejected = 0;
    for case in 0..600 {
        let mut b = good.clone();
        match case % 6 {
            0 => b.truncate(rng.below(good.len())),
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
            2 => {
                let start = rng.below(b.len());
                let end = (start + 1 + rng.below(64)).min(b.len());
                for v in &mut b[start..end] {
                    *v = rng.next() as u8;
                }
            }
            3 => b.extend((0..1 + rng.below(16)).map(|_| rng.next() as u8)),
            4 => {
                b = (0..rng.below(2 * good.len()))
                    .map(|_| rng.next() as u8)
                    .collect()
            }
            _ => {
                // Damage the entropy-coded payload but keep the container valid.
                let start = 61 + rng.below(b.len() - 65);
                for _ in 0..1 + rng.below(4) {
                    let i = start + rng.below(b.len() - 4 - start);
                    b[i] = rng.next() as u8;
                }
                fix_crc(&mut b);
            }
        }
        if b == good {
            continue;
        }
        match codec.decode(&b) {
            Err(_) => rejected += 1,
            // Only damage hidden from the CRC can decode, and then to an image of the
            // declared size.
            Ok(img) => {
                assert_eq!(case % 6, 5, "case {case}: corrupted stream decoded");
                assert_eq!(img.dimensions(), (100, 70));
            }
        }
    }
    assert!(
        rejected >= 500,
        "only {rejected} of 600 corrupted streams rejected"
    );
}

#[test]
fn hostile_headers_with_valid_crc_are_rejected() {
    let codec = tiny_codec(1);
    let good = codec.encode(&test_image(64, 64)).unwrap();
    // Field offsets from docs/FORMAT.md: size, padding, shapes, string count.
    for (offset, value) in [
        (24usize, u32::MAX),
        (28, 0),
        (24, 65),
        (36, 13),
        (40, 1 << 30),
        (52, 0),
        (56, 2),
    ] {
        let mut b = good.clone();
        b[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        fix_crc(&mut b);
        assert!(
            codec.decode(&b).is_err(),
            "field at {offset} = {value} accepted"
        );
    }
    let mut b = good.clone();
    b[60] = 255;
    fix_crc(&mut b);
    assert!(codec.decode(&b).is_err());
}

#[test]
fn stream_from_another_model_is_a_model_mismatch() {
    let a = tiny_codec(1);
    let b = tiny_codec(2);
    let stream = a.encode(&test_image(32, 32)).unwrap();
    let err = b.decode(&stream).unwrap_err();
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err}");
    assert!(err.to_string().contains("load the model that encoded it"));
}

#[test]
fn newer_version_is_refused_with_both_versions_named() {
    let codec = tiny_codec(1);
    let mut b = codec.encode(&test_image(32, 32)).unwrap();
    b[4..6].copy_from_slice(&7u16.to_le_bytes());
    fix_crc(&mut b);
    let err = codec.decode(&b).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                found: 7,
                supported: 3
            }
        ),
        "{err}"
    );
}

#[test]
fn odd_image_sizes_round_trip() {
    let codec = tiny_codec(3);
    for (w, h) in [(1, 1), (3, 130), (65, 64), (129, 7)] {
        let bytes = codec.encode(&test_image(w, h)).unwrap();
        assert_eq!(codec.decode(&bytes).unwrap().dimensions(), (w, h));
    }
    assert!(codec.encode(&image::RgbImage::new(0, 5)).is_err());
}

#[test]
fn oversized_headers_are_refused_before_any_allocation() {
    let codec = tiny_codec(1);
    let mut b = codec.encode(&test_image(64, 64)).unwrap();
    // 32768 x 32768 with consistent latent shapes: over the default pixel limit.
    let side = 32768u32;
    b[24..28].copy_from_slice(&side.to_le_bytes());
    b[28..32].copy_from_slice(&side.to_le_bytes());
    for (off, v) in [
        (40, side / 16),
        (44, side / 16),
        (52, side / 64),
        (56, side / 64),
    ] {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fix_crc(&mut b);
    let err = codec.decode(&b).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let small = tiny_codec(1).with_max_pixels(32 * 32);
    assert!(small.encode(&test_image(64, 64)).is_err());
}
