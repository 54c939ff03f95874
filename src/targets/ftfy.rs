//! Text repair for the CLIP tokenizer: a port of ftfy 6.3.1's `fix_text` (default settings) and
//! of Python's `html.unescape`, the two clean-ups OpenAI's CLIP tokenizer applies before
//! tokenising (`basic_clean`).
//!
//! `fix_text` works on line-sized segments (split after every `\n`, and every 10⁶ characters)
//! and repeats, until nothing changes:
//!
//! 1. HTML entities (`&amp;`, `&#x2019;`, upper-case `&EACUTE;`, ...) are decoded, unless a
//!    literal `<` was seen (then the text is taken to be real HTML, for this segment and all
//!    later ones);
//! 2. mojibake is repaired: when the segment looks wrong (ftfy's "badness" expression), it is
//!    encoded in each of ftfy's ten single-byte encodings that can represent it (Latin-1,
//!    Windows-1252/1251/1250/1253/1254/1257 in their "sloppy" forms, ISO 8859-2, Mac Roman,
//!    CP437) and decoded as UTF-8 (or CESU-8/Java UTF-8 when bytes `ED`/`C0` occur), with ftfy's
//!    repairs for spaces that were non-breaking spaces and for lossy `�`/`?` sequences; failing
//!    that, embedded UTF-8 mojibake is fixed piecewise, and C1 controls become their
//!    Windows-1252 characters;
//! 3. Latin ligatures are split (`ﬁ` → `fi`), fullwidth/halfwidth forms get their usual width,
//!    curly quotes become straight, line breaks become `\n`, ANSI terminal escapes and invisible
//!    control characters are removed;
//! 4. the text is put in Unicode NFC.
//!
//! Known differences from the Python originals: HTML entities are limited to the HTML 4 set plus
//! `&apos;` (Python knows the ~2,200 HTML5 names; the rare HTML5-only ones such as `&checkmark;`
//! stay undecoded here), and NFC uses Unicode 9 composition data (characters added later are
//! left as they are). The character tables are generated from ftfy's own definitions
//! (`scripts/gen_ftfy_tables.py`).

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::bytes::Regex as BytesRegex;
use regex::Regex;
use unicode_normalization_alignments::UnicodeNormalization;

use super::ftfy_tables as tables;

/// ftfy's `max_decode_length`: longest segment fixed at once, in characters.
const MAX_DECODE_LENGTH: usize = 1_000_000;

struct Compiled {
    badness: Regex,
    utf8_detector: Regex,
    utf8_not_after: Regex,
    ftfy_entity: Regex,
    py_charref: Regex,
    ansi: Regex,
    altered_utf8: BytesRegex,
    lossy_utf8: BytesRegex,
    /// Per encoding of [`tables::CHARMAP_ENCODINGS`]: character -> byte.
    encoders: Vec<HashMap<char, u8>>,
}

fn compiled() -> &'static Compiled {
    static C: OnceLock<Compiled> = OnceLock::new();
    C.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("built-in pattern compiles");
        let bre = |p: &str| BytesRegex::new(p).expect("built-in pattern compiles");
        let encoders = tables::CHARMAP_ENCODINGS
            .iter()
            .map(|(_, table)| {
                table
                    .iter()
                    .enumerate()
                    .filter_map(|(b, &c)| char::from_u32(c).map(|c| (c, b as u8)))
                    .collect()
            })
            .collect();
        Compiled {
            badness: re(tables::BADNESS_RE),
            utf8_detector: re(tables::UTF8_DETECTOR_RE),
            utf8_not_after: re(&format!("^{}$", tables::UTF8_DETECTOR_NOT_AFTER)),
            ftfy_entity: re(r"&#?[0-9A-Za-z]{1,24};"),
            py_charref: re(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\x0c <&#;]{1,32};?)"),
            ansi: re(r"\x1b\[((?:\d|;)*)([a-zA-Z])"),
            altered_utf8: bre(concat!(
                r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9][ ]",
                r"|[\xe2\xe3][ ][\x80-\x84\x86-\x9f\xa1-\xbf]",
                r"|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf][ ]",
                r"|[\xf0][ ][\x80-\xbf][\x80-\xbf]",
                r"|[\xf0][\x80-\xbf][ ][\x80-\xbf]",
                r"|[\xf0][\x80-\xbf][\x80-\xbf][ ]",
            )),
            lossy_utf8: bre(concat!(
                r"(?-u)[\xc2-\xdf][\x1a]",
                r"|[\xc2-\xc3][?]",
                r"|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]",
                r"|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]",
                r"|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]",
                r"|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]",
                r"|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]",
                r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]",
                r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]",
                r"|\x1a",
            )),
            encoders,
        }
    })
}

/// ftfy's `fix_text` with its default settings (see the module docs).
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    let mut rest = text;
    while !rest.is_empty() {
        // Up to and including the next '\n', at most MAX_DECODE_LENGTH characters.
        let mut end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        if let Some((i, _)) = rest[..end].char_indices().nth(MAX_DECODE_LENGTH) {
            end = i;
        }
        let segment = &rest[..end];
        rest = &rest[end..];
        if unescape && segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

/// ftfy's `fix_and_explain` loop on one segment.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = unescape_html(&text);
        }
        text = fix_encoding(&text);
        text = fix_c1_controls(&text);
        text = fix_latin_ligatures(&text);
        text = fix_character_width(&text);
        text = uncurl_quotes(&text);
        text = fix_line_breaks(&text);
        // fix_surrogates: a Rust string cannot hold surrogates.
        text = compiled().ansi.replace_all(&text, "").into_owned();
        text = remove_control_chars(&text);
        text = text.nfc().map(|(c, _)| c).collect();
        if text == orig {
            return text;
        }
    }
}

/// ftfy's `is_bad`: whether the text contains a sequence typical of mojibake.
pub fn is_bad(text: &str) -> bool {
    compiled().badness.is_match(text)
}

/// ftfy's `fix_encoding` (default settings): repeats one repair step until nothing changes.
pub fn fix_encoding(text: &str) -> String {
    let mut text = text.to_string();
    loop {
        let next = fix_encoding_step(&text);
        if next == text {
            return text;
        }
        text = next;
    }
}

/// Encodes `text` in single-byte encoding `index` of [`tables::CHARMAP_ENCODINGS`], if every
/// character has a byte there (ftfy's `possible_encoding` and `str.encode`).
fn encode_charmap(text: &str, index: usize) -> Option<Vec<u8>> {
    let encoder = &compiled().encoders[index];
    text.chars().map(|c| encoder.get(&c).copied()).collect()
}

fn fix_encoding_step(text: &str) -> String {
    if text.is_ascii() || !is_bad(text) {
        return text.to_string();
    }
    let mut latin1_possible = false;
    for (index, (name, _)) in tables::CHARMAP_ENCODINGS.iter().enumerate() {
        let Some(mut bytes) = encode_charmap(text, index) else {
            continue;
        };
        if *name == "latin-1" {
            latin1_possible = true;
        }
        if *name != "macroman" && compiled().altered_utf8.is_match(&bytes) {
            bytes = restore_byte_a0(&bytes);
        }
        if name.starts_with("sloppy") {
            bytes = compiled()
                .lossy_utf8
                .replace_all(&bytes, "\u{fffd}".as_bytes())
                .into_owned();
        }
        let decoded = if bytes.contains(&0xed) || bytes.contains(&0xc0) {
            decode_utf8_variants(&bytes)
        } else {
            String::from_utf8(bytes).ok()
        };
        if let Some(fixed) = decoded {
            return fixed;
        }
    }
    if compiled().utf8_detector.is_match(text) {
        let fixed = decode_inconsistent_utf8(text);
        if fixed != text {
            return fixed;
        }
    }
    if latin1_possible {
        // `text.encode("latin-1").decode("windows-1252")`, strict: undefined bytes fail.
        let sloppy = &tables::CHARMAP_ENCODINGS[1].1;
        let fixed: Option<String> = text
            .chars()
            .map(|c| match c as u32 {
                0x81 | 0x8d | 0x8f | 0x90 | 0x9d => None,
                b @ 0x80..=0x9f => char::from_u32(sloppy[b as usize]),
                _ => Some(c),
            })
            .collect();
        if let Some(fixed) = fixed {
            if fixed != text {
                return fixed;
            }
        }
    }
    if text.chars().any(is_c1) {
        return fix_c1_controls(text);
    }
    text.to_string()
}

fn is_c1(c: char) -> bool {
    ('\u{80}'..='\u{9f}').contains(&c)
}

/// ftfy's `restore_byte_a0`: byte `20` that stands for `A0` inside a UTF-8 sequence is put back.
fn restore_byte_a0(bytes: &[u8]) -> Vec<u8> {
    // A_GRAVE_WORD_RE: b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 ".
    let mut out = Vec::with_capacity(bytes.len() + 4);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0xc3 && bytes.get(i + 1) == Some(&b' ') {
            let after = &bytes[i + 2..];
            let excluded = [&b" "[..], b"quele", b"quela", b"quilo", b"s "]
                .iter()
                .any(|p| after.starts_with(p));
            if !excluded {
                out.extend_from_slice(&[0xc3, 0xa0, b' ']);
                i += 2;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    compiled()
        .altered_utf8
        .replace_all(&out, |m: &regex::bytes::Captures| {
            m[0].iter()
                .map(|&b| if b == b' ' { 0xa0 } else { b })
                .collect::<Vec<u8>>()
        })
        .into_owned()
}

/// Strict decoding with ftfy's `utf-8-variants` codec: UTF-8, plus CESU-8 surrogate pairs and
/// Java's `C0 80` for U+0000. `None` where Python raises `UnicodeDecodeError`.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let special = match bytes[i] {
            0xc0 => bytes.get(i + 1).is_none_or(|&b| b == 0x80),
            0xed => bytes.get(i + 1).is_none_or(|&b| (0xa0..=0xbf).contains(&b)),
            _ => false,
        };
        if !special {
            i += 1;
            continue;
        }
        out.push_str(std::str::from_utf8(&bytes[start..i]).ok()?);
        if bytes[i] == 0xc0 {
            if i + 1 >= bytes.len() {
                return None;
            }
            out.push('\0');
            i += 2;
        } else {
            let s = bytes.get(i..i + 6)?;
            let cesu = (0xa0..=0xaf).contains(&s[1])
                && (0x80..=0xbf).contains(&s[2])
                && s[3] == 0xed
                && (0xb0..=0xbf).contains(&s[4])
                && (0x80..=0xbf).contains(&s[5]);
            if !cesu {
                return None;
            }
            let cp = ((u32::from(s[1]) & 0x0f) << 16)
                + ((u32::from(s[2]) & 0x3f) << 10)
                + ((u32::from(s[4]) & 0x0f) << 6)
                + (u32::from(s[5]) & 0x3f)
                + 0x10000;
            out.push(char::from_u32(cp)?);
            i += 6;
        }
        start = i;
    }
    out.push_str(std::str::from_utf8(&bytes[start..]).ok()?);
    Some(out)
}

/// ftfy's `decode_inconsistent_utf8`: fixes each UTF-8-looking run (not preceded by a strict
/// continuation character) that is bad on its own, independently of the rest.
fn decode_inconsistent_utf8(text: &str) -> String {
    let c = compiled();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut pos = 0;
    while let Some(m) = c.utf8_detector.find_at(text, pos) {
        let prev = text[..m.start()].chars().next_back();
        let blocked = prev.is_some_and(|p| c.utf8_not_after.is_match(p.encode_utf8(&mut [0; 4])));
        if blocked {
            // The lookbehind fails here: try from the next character.
            pos = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        let sub = m.as_str();
        out.push_str(&text[copied..m.start()]);
        if sub.len() < text.len() && is_bad(sub) {
            out.push_str(&fix_encoding(sub));
        } else {
            out.push_str(sub);
        }
        copied = m.end();
        pos = m.end();
    }
    out.push_str(&text[copied..]);
    out
}

/// ftfy's `fix_c1_controls`: U+0080–U+009F read as their (sloppy) Windows-1252 bytes.
fn fix_c1_controls(text: &str) -> String {
    if !text.chars().any(is_c1) {
        return text.to_string();
    }
    let sloppy = &tables::CHARMAP_ENCODINGS[1].1;
    text.chars()
        .map(|c| {
            if is_c1(c) {
                char::from_u32(sloppy[c as usize]).unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

fn translate(text: &str, map: &[(char, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match map.binary_search_by(|(k, _)| k.cmp(&c)) {
            Ok(i) => out.push_str(map[i].1),
            Err(_) => out.push(c),
        }
    }
    out
}

fn fix_latin_ligatures(text: &str) -> String {
    translate(text, tables::LIGATURES)
}

fn fix_character_width(text: &str) -> String {
    translate(text, tables::WIDTH_MAP)
}

fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            c => c,
        })
        .collect()
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

fn remove_control_chars(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            !matches!(c,
                '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
                | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
        })
        .collect()
}

fn lookup<'a>(table: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    table
        .binary_search_by(|(k, _)| (*k).cmp(key))
        .ok()
        .map(|i| table[i].1)
}

/// ftfy's `unescape_html`: entities that end in `;` (and upper-case Latin-letter variants such
/// as `&EACUTE;`) and numeric character references.
fn unescape_html(text: &str) -> String {
    compiled()
        .ftfy_entity
        .replace_all(text, |m: &regex::Captures| {
            let e = &m[0];
            if let Some(v) = lookup(tables::FTFY_ENTITIES, e) {
                v.to_string()
            } else if e.starts_with("&#") {
                let u = html_unescape(e);
                if u.contains(';') {
                    e.to_string()
                } else {
                    u
                }
            } else {
                e.to_string()
            }
        })
        .into_owned()
}

/// Python's `html.unescape` (entity names limited to HTML 4 and `&apos;`, see the module docs):
/// named references with or without `;` (longest known prefix), decimal and hexadecimal ones
/// with HTML5's replacements for invalid code points.
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    compiled()
        .py_charref
        .replace_all(text, |m: &regex::Captures| {
            let s = &m[1];
            if let Some(num) = s.strip_prefix('#') {
                let (digits, radix) = match num.strip_prefix(['x', 'X']) {
                    Some(h) => (h, 16),
                    None => (num, 10),
                };
                let digits = digits.trim_end_matches(';');
                // Saturate: anything past U+10FFFF is replaced alike.
                let n = u32::from_str_radix(digits, radix).unwrap_or(u32::MAX);
                if let Ok(i) = tables::INVALID_CHARREFS.binary_search_by(|(k, _)| k.cmp(&n)) {
                    return tables::INVALID_CHARREFS[i].1.to_string();
                }
                if (0xd800..=0xdfff).contains(&n) || n > 0x10ffff {
                    return "\u{fffd}".to_string();
                }
                if tables::INVALID_CODEPOINTS.binary_search(&n).is_ok() {
                    return String::new();
                }
                return char::from_u32(n).map_or_else(String::new, String::from);
            }
            if let Some(v) = lookup(tables::HTML_ENTITIES, s) {
                return v.to_string();
            }
            let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
            for x in (2..bounds.len()).rev() {
                if let Some(v) = lookup(tables::HTML_ENTITIES, &s[..bounds[x]]) {
                    return format!("{v}{}", &s[bounds[x]..]);
                }
            }
            format!("&{s}")
        })
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charmaps_are_ascii_compatible() {
        for (name, table) in tables::CHARMAP_ENCODINGS.iter() {
            for (b, &c) in table.iter().enumerate().take(0x80) {
                if b == 0x1a {
                    continue;
                }
                assert_eq!(c, b as u32, "{name} byte {b:#x}");
            }
        }
    }

    #[test]
    fn ftfy_docstring_examples() {
        for (input, want) in [
            ("âœ” No problems", "✔ No problems"),
            ("&macr;\\_(ã\u{83}\u{84})_/&macr;", "¯\\_(ツ)_/¯"),
            (
                "Broken text&hellip; it&#x2019;s ﬂubberiﬁc!",
                "Broken text… it's flubberific!",
            ),
            ("ＬＯＵＤ　ＮＯＩＳＥＳ", "LOUD NOISES"),
            ("sÃ³", "só"),
            ("voilÃ le travail", "voilà le travail"),
            ("P&EACUTE;REZ", "PÉREZ"),
            ("&ntilde; &Ntilde; &NTILDE; &nTILDE;", "ñ Ñ Ñ &nTILDE;"),
            ("\u{1b}[36;44mI'm blue\u{1b}[0m", "I'm blue"),
            ("a\r\nb\rc\u{2028}d", "a\nb\nc\nd"),
            ("“here’s a test”", "\"here's a test\""),
            ("Ｕﾀｰﾝ", "Uターン"),
            ("e\u{301}", "\u{e9}"),
            ("<b>&amp;</b>", "<b>&amp;</b>"),
        ] {
            assert_eq!(fix_text(input), want, "{input:?}");
        }
    }

    #[test]
    fn python_html_unescape() {
        for (input, want) in [
            (
                "fish &amp; chips &lt;3 &quot;yum&quot;",
                "fish & chips <3 \"yum\"",
            ),
            ("&amp", "&"),
            ("&ampx", "&x"),
            ("&notit;", "¬it;"),
            ("&#x41;&#66;&#X43", "ABC"),
            ("&#0;&#128;&#x110000;&#1;", "\u{fffd}€\u{fffd}"),
            ("&unknown; & &#;", "&unknown; & &#;"),
            ("&apos;", "'"),
        ] {
            assert_eq!(html_unescape(input), want, "{input:?}");
        }
    }
}
