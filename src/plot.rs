//! Dependency-free PNG charts for the evaluation reports: rate-distortion curves
//! ([`LineChart`]) and accuracy comparisons ([`BarChart`]), drawn pixel by pixel on an
//! [`RgbImage`] with a built-in 5x7 bitmap font (printable ASCII; other characters show as
//! `?`).
//!
//! Non-finite values are skipped: a NaN point breaks a curve, a NaN bar is left out.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::Result;

/// Distinct series colours (matplotlib's "tab10" order, then six darker or brighter ones so that
/// charts of up to 16 series, such as the trade-off chart across runs, repeat no colour), for
/// callers without a preference; [`BarChart`] colours its series with them.
pub const PALETTE: [Rgb<u8>; 16] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
    Rgb([188, 189, 34]),
    Rgb([23, 190, 207]),
    Rgb([0, 0, 128]),
    Rgb([128, 128, 0]),
    Rgb([0, 128, 128]),
    Rgb([128, 0, 0]),
    Rgb([255, 215, 0]),
    Rgb([255, 0, 255]),
];

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const LEGEND_BORDER: Rgb<u8> = Rgb([150, 150, 150]);

/// One named curve of a [`LineChart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Name shown in the legend.
    pub name: String,
    /// `(x, y)` points, joined in the order given.
    pub points: Vec<(f64, f64)>,
    /// Line and marker colour.
    pub color: Rgb<u8>,
    /// Whether consecutive points are joined by a line (markers only otherwise).
    pub joined: bool,
    /// Whether the markers are outlined squares instead of filled ones (a second kind of
    /// point in the same colour, such as a probe model's reading beside the target's).
    pub hollow: bool,
    /// Whether the series has a legend entry (false: its colour is explained by another).
    pub listed: bool,
}

impl Series {
    /// A series from its parts, its points joined in order.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, color: Rgb<u8>) -> Self {
        Series {
            name: name.into(),
            points,
            color,
            joined: true,
            hollow: false,
            listed: true,
        }
    }

    /// A series of markers only (points that are not a curve, such as one per run).
    pub fn markers(name: impl Into<String>, points: Vec<(f64, f64)>, color: Rgb<u8>) -> Self {
        Series {
            joined: false,
            ..Self::new(name, points, color)
        }
    }

    /// The same series with outlined markers ([`Series::hollow`]).
    pub fn hollow(self) -> Self {
        Series {
            hollow: true,
            ..self
        }
    }

    /// The same series without a legend entry ([`Series::listed`]).
    pub fn unlisted(self) -> Self {
        Series {
            listed: false,
            ..self
        }
    }
}

/// A line chart with markers at the points: axes with numeric ticks, a light grid, axis
/// labels, a title and a legend in the corner that hides the fewest points.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LineChart {
    /// Title above the plot.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label beside the y axis (drawn vertically).
    pub y_label: String,
    /// The curves.
    pub series: Vec<Series>,
}

/// A grouped bar chart: one group of bars per label along the x axis, one bar per
/// `(series name, value)` in a group, coloured by series name (in [`PALETTE`] order of first
/// appearance), with the value written above each bar where it fits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BarChart {
    /// Title above the plot.
    pub title: String,
    /// Label beside the y axis (drawn vertically).
    pub y_label: String,
    /// `(group label, [(series name, value)])`, left to right.
    pub groups: Vec<(String, Vec<(String, f64)>)>,
}

/// 5x7 glyphs for ASCII 32..=126, one row a byte, the leftmost pixel in bit 4.
#[rustfmt::skip]
const FONT: [[u8; 7]; 95] = [
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // ' '
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100], // '!'
    [0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '"'
    [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010], // '#'
    [0b00100, 0b01111, 0b10100, 0b01110, 0b00101, 0b11110, 0b00100], // '$'
    [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011], // '%'
    [0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101], // '&'
    [0b00100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000], // '\''
    [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010], // '('
    [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000], // ')'
    [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000], // '*'
    [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000], // '+'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000], // ','
    [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000], // '-'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100], // '.'
    [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000], // '/'
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110], // '0'
    [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110], // '1'
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111], // '2'
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110], // '3'
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010], // '4'
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110], // '5'
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110], // '6'
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000], // '7'
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110], // '8'
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100], // '9'
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000], // ':'
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b00100, 0b01000], // ';'
    [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010], // '<'
    [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000], // '='
    [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000], // '>'
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100], // '?'
    [0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110], // '@'
    [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001], // 'A'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110], // 'B'
    [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110], // 'C'
    [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100], // 'D'
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111], // 'E'
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000], // 'F'
    [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111], // 'G'
    [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001], // 'H'
    [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110], // 'I'
    [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100], // 'J'
    [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001], // 'K'
    [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111], // 'L'
    [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001], // 'M'
    [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001], // 'N'
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110], // 'O'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000], // 'P'
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101], // 'Q'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001], // 'R'
    [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110], // 'S'
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100], // 'T'
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110], // 'U'
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100], // 'V'
    [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010], // 'W'
    [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001], // 'X'
    [0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100], // 'Y'
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111], // 'Z'
    [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110], // '['
    [0b00000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00001, 0b00000], // '\\'
    [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110], // ']'
    [0b00100, 0b01010, 0b10001, 0b00000, 0b00000, 0b00000, 0b00000], // '^'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111], // '_'
    [0b01000, 0b00100, 0b00010, 0b00000, 0b00000, 0b00000, 0b00000], // '`'
    [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111], // 'a'
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110], // 'b'
    [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110], // 'c'
    [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111], // 'd'
    [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110], // 'e'
    [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000], // 'f'
    [0b00000, 0b00000, 0b01111, 0b10001, 0b01111, 0b00001, 0b01110], // 'g'
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001], // 'h'
    [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110], // 'i'
    [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b10010, 0b01100], // 'j'
    [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010], // 'k'
    [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110], // 'l'
    [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001], // 'm'
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001], // 'n'
    [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110], // 'o'
    [0b00000, 0b00000, 0b11110, 0b10001, 0b11110, 0b10000, 0b10000], // 'p'
    [0b00000, 0b00000, 0b01101, 0b10011, 0b01111, 0b00001, 0b00001], // 'q'
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000], // 'r'
    [0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110], // 's'
    [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110], // 't'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101], // 'u'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100], // 'v'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010], // 'w'
    [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001], // 'x'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // 'y'
    [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111], // 'z'
    [0b00010, 0b00100, 0b00100, 0b01000, 0b00100, 0b00100, 0b00010], // '{'
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100], // '|'
    [0b01000, 0b00100, 0b00100, 0b00010, 0b00100, 0b00100, 0b01000], // '}'
    [0b00000, 0b00000, 0b01000, 0b10101, 0b00010, 0b00000, 0b00000], // '~'
];

/// Horizontal advance of one character at scale 1: the 5-pixel glyph plus one of space.
const CELL_W: i64 = 6;

fn glyph(c: char) -> &'static [u8; 7] {
    let i = c as u32;
    if (32..127).contains(&i) {
        &FONT[(i - 32) as usize]
    } else {
        &FONT[(b'?' - 32) as usize]
    }
}

/// Width in pixels of `s` drawn at `scale` (no trailing space).
fn text_width(s: &str, scale: i64) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * CELL_W - 1) * scale
    }
}

/// Height in pixels of one line of text at `scale`.
fn text_height(scale: i64) -> i64 {
    7 * scale
}

/// An image with clipped drawing primitives in signed coordinates, so that layouts that do
/// not fit (tiny sizes, long labels) draw partially instead of panicking.
struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Canvas {
            img: RgbImage::from_pixel(width, height, WHITE),
        }
    }

    /// Fills the rectangle `[x0, x1) x [y0, y1)`.
    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
        let (w, h) = (self.img.width() as i64, self.img.height() as i64);
        for y in y0.max(0)..y1.min(h) {
            for x in x0.max(0)..x1.min(w) {
                self.img.put_pixel(x as u32, y as u32, c);
            }
        }
    }

    /// Outlines the rectangle `[x0, x1] x [y0, y1]`.
    fn frame(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
        self.frame_wide((x0, y0), (x1, y1), 1, c);
    }

    /// Outlines the rectangle from corner `a` to corner `b` (inclusive) with lines `w` pixels
    /// wide, inside it.
    fn frame_wide(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), w: i64, c: Rgb<u8>) {
        self.fill(x0, y0, x1 + 1, y0 + w, c);
        self.fill(x0, y1 - w + 1, x1 + 1, y1 + 1, c);
        self.fill(x0, y0, x0 + w, y1 + 1, c);
        self.fill(x1 - w + 1, y0, x1 + 1, y1 + 1, c);
    }

    /// A line `thick` pixels wide (Bresenham, stamping a square at each step).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let lo = (thick - 1) / 2;
        loop {
            self.fill(x - lo, y - lo, x - lo + thick, y - lo + thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `s` with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
        for (i, ch) in s.chars().enumerate() {
            let ox = x + i as i64 * CELL_W * scale;
            for (gy, row) in glyph(ch).iter().enumerate() {
                for gx in 0..5 {
                    if row & (0x10 >> gx) != 0 {
                        let (px, py) = (ox + gx * scale, y + gy as i64 * scale);
                        self.fill(px, py, px + scale, py + scale, c);
                    }
                }
            }
        }
    }

    /// Draws `s` turned 90 degrees anticlockwise (read bottom to top), with the bottom-left
    /// corner of its box at `(x, y)`.
    fn text_up(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
        for (i, ch) in s.chars().enumerate() {
            let along = i as i64 * CELL_W * scale;
            for (gy, row) in glyph(ch).iter().enumerate() {
                for gx in 0..5 {
                    if row & (0x10 >> gx) != 0 {
                        let px = x + gy as i64 * scale;
                        let py = y - along - (gx + 1) * scale;
                        self.fill(px, py, px + scale, py + scale, c);
                    }
                }
            }
        }
    }

    /// Draws `s` centred horizontally on `cx`.
    fn text_centered(&mut self, cx: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
        self.text(cx - text_width(s, scale) / 2, y, s, scale, c);
    }
}

/// Text scale for a chart of this size: 1 up to 400 px on the short side, then one more per
/// 300 px, so labels stay readable on large charts.
fn label_scale(width: u32, height: u32) -> i64 {
    (1 + (width.min(height) as i64 - 100) / 300).max(1)
}

/// An axis: the value range shown and the tick values inside it.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    decimals: usize,
}

impl Axis {
    /// An axis over `[min, max]` padded by `pad` of the span on each side, with about
    /// `target` ticks at round values (1, 2 or 5 times a power of ten).
    fn new(min: f64, max: f64, pad: f64, target: usize) -> Axis {
        let (mut min, mut max) = if min.is_finite() && max.is_finite() && min <= max {
            (min, max)
        } else {
            (0.0, 1.0)
        };
        if max - min < 1e-12 * max.abs().max(min.abs()).max(1e-300) {
            let d = (min.abs() * 0.1)
                .max(1e-9)
                .max(if min == 0.0 { 1.0 } else { 0.0 });
            min -= d;
            max += d;
        }
        let span = max - min;
        let (lo, hi) = (min - pad * span, max + pad * span);
        Axis::with_range(lo, hi, target)
    }

    fn with_range(lo: f64, hi: f64, target: usize) -> Axis {
        let raw = (hi - lo) / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        // The round step nearest to the raw one (in ratio), so the count stays near `target`.
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .min_by(|a, b| (a / raw).ln().abs().total_cmp(&(b / raw).ln().abs()))
            .unwrap_or(mag);
        let first = (lo / step).ceil() as i64;
        let last = (hi / step).floor() as i64;
        // Guards against float trouble on extreme ranges; normal axes have about `target`.
        let ticks = (first..=last.min(first + 50))
            .map(|k| k as f64 * step)
            .collect();
        let decimals = (-step.log10().floor()).max(0.0) as usize;
        Axis {
            lo,
            hi,
            ticks,
            decimals,
        }
    }

    fn label(&self, v: f64) -> String {
        let s = format!("{:.*}", self.decimals, v);
        // "-0.0" for a tick at zero reached from below.
        if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
            s[1..].to_string()
        } else {
            s
        }
    }

    /// Maps a value to a pixel between `p0` (at `lo`) and `p1` (at `hi`).
    fn map(&self, v: f64, p0: i64, p1: i64) -> i64 {
        let t = (v - self.lo) / (self.hi - self.lo);
        (p0 as f64 + t * (p1 - p0) as f64).round().clamp(-1e6, 1e6) as i64
    }
}

/// Rectangle of the plot area, inclusive pixel bounds.
#[derive(Clone, Copy)]
struct Area {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

/// Draws the title, a legend row under it (if `legend_row` has entries), the y label, the y
/// ticks with grid lines and labels, and returns the plot area with its y axis. The tick
/// labels' width depends on the axis and the axis on the area's height, so the axis is made
/// here by `make_y(plot height)`.
fn draw_frame(
    cv: &mut Canvas,
    title: &str,
    y_label: &str,
    legend_row: &[LegendEntry],
    bottom_margin: i64,
    make_y: impl Fn(i64) -> Axis,
) -> (Area, Axis) {
    let (w, h) = (cv.img.width() as i64, cv.img.height() as i64);
    let s = label_scale(w as u32, h as u32);
    let pad = 4 * s;
    let title_h = if title.is_empty() {
        pad
    } else {
        text_height(s + 1) + 3 * pad
    };
    if !title.is_empty() {
        cv.text_centered(w / 2, 2 * pad, title, s + 1, BLACK);
    }
    let top = if legend_row.is_empty() {
        title_h
    } else {
        title_h + pad + draw_legend_row(cv, title_h + pad, legend_row)
    };
    let bottom = h - 1 - bottom_margin;
    let y = make_y((bottom - top).max(1));
    let tick_w = y
        .ticks
        .iter()
        .map(|&v| text_width(&y.label(v), s))
        .max()
        .unwrap_or(0);
    let ylabel_w = if y_label.is_empty() {
        0
    } else {
        text_height(s) + 2 * pad
    };
    let left = pad + ylabel_w + tick_w + pad + 2 * s;
    let area = Area {
        left,
        top,
        right: (w - 1 - 3 * pad).max(left + 1),
        bottom: bottom.max(top + 1),
    };
    for &v in &y.ticks {
        let py = y.map(v, area.bottom, area.top);
        cv.fill(area.left + 1, py, area.right, py + 1, GRID);
        cv.fill(area.left - 2 * s, py, area.left, py + 1, BLACK);
        let label = y.label(v);
        cv.text(
            area.left - 2 * s - pad - text_width(&label, s),
            py - text_height(s) / 2,
            &label,
            s,
            BLACK,
        );
    }
    if !y_label.is_empty() {
        let cy = (area.top + area.bottom) / 2;
        cv.text_up(pad, cy + text_width(y_label, s) / 2, y_label, s, BLACK);
    }
    (area, y)
}

/// A legend entry: a colour and a name.
struct LegendEntry<'a> {
    name: &'a str,
    color: Rgb<u8>,
    swatch: Swatch,
}

/// How a legend entry shows its colour.
#[derive(Clone, Copy, PartialEq)]
enum Swatch {
    /// A short line with a marker (a joined series).
    Line,
    /// A filled box (markers, bars).
    Box,
    /// An outlined box (hollow markers).
    Outline,
}

/// Draws a swatch and the name of one legend entry with the swatch's left edge at `x` and the
/// text vertically centred on `cy`.
fn draw_entry(cv: &mut Canvas, x: i64, cy: i64, e: &LegendEntry, s: i64) {
    let swatch = 16 * s;
    match e.swatch {
        Swatch::Line => {
            cv.line((x, cy), (x + swatch, cy), e.color, s + 1);
            let (half, mx) = (s + 1, x + swatch / 2);
            cv.fill(mx - half, cy - half, mx + half + 1, cy + half + 1, e.color);
        }
        Swatch::Box => cv.fill(x, cy - 3 * s, x + swatch, cy + 3 * s + 1, e.color),
        Swatch::Outline => cv.frame_wide((x, cy - 3 * s), (x + swatch, cy + 3 * s), s, e.color),
    }
    cv.text(
        x + swatch + 4 * s,
        cy - text_height(s) / 2,
        e.name,
        s,
        BLACK,
    );
}

/// Width of one legend entry: swatch, gap, name.
fn entry_width(e: &LegendEntry, s: i64) -> i64 {
    16 * s + 4 * s + text_width(e.name, s)
}

/// Draws the entries in centred rows starting at `y`, wrapping where the image is too narrow,
/// and returns the height used (0 without entries). Bar charts use it: bars fill every corner
/// of the plot, so a legend inside would hide some.
fn draw_legend_row(cv: &mut Canvas, y: i64, entries: &[LegendEntry]) -> i64 {
    if entries.is_empty() {
        return 0;
    }
    let s = label_scale(cv.img.width(), cv.img.height());
    let (gap, row_h, avail) = (
        12 * s,
        text_height(s) + 4 * s,
        cv.img.width() as i64 - 8 * s,
    );
    // Greedy wrapping into rows of entries that fit the width (at least one per row).
    let mut rows: Vec<Vec<&LegendEntry>> = vec![vec![]];
    let mut used = 0;
    for e in entries {
        let w = entry_width(e, s);
        let row = rows.last_mut().expect("rows is never empty");
        if !row.is_empty() && used + gap + w > avail {
            rows.push(vec![e]);
            used = w;
        } else {
            used += if row.is_empty() { w } else { gap + w };
            row.push(e);
        }
    }
    for (r, row) in rows.iter().enumerate() {
        let total: i64 =
            row.iter().map(|e| entry_width(e, s)).sum::<i64>() + gap * (row.len() as i64 - 1);
        let mut x = (cv.img.width() as i64 - total) / 2;
        let cy = y + r as i64 * row_h + row_h / 2;
        for e in row {
            draw_entry(cv, x, cy, e, s);
            x += entry_width(e, s) + gap;
        }
    }
    rows.len() as i64 * row_h + 2 * s
}

/// Draws the legend in whichever inside corner of `area` covers the fewest of `occupied`
/// pixels (the data), so it hides as little as possible; returns how many it covers.
fn draw_legend(
    cv: &mut Canvas,
    area: Area,
    entries: &[LegendEntry],
    occupied: &[(i64, i64)],
) -> usize {
    if entries.is_empty() {
        return 0;
    }
    let s = label_scale(cv.img.width(), cv.img.height());
    let pad = 4 * s;
    let swatch = 16 * s;
    let row_h = text_height(s) + 2 * pad;
    let name_w = entries
        .iter()
        .map(|e| text_width(e.name, s))
        .max()
        .unwrap_or(0);
    let (bw, bh) = (
        3 * pad + swatch + name_w,
        row_h * entries.len() as i64 + pad,
    );
    let m = 2 * pad;
    let corners = [
        (area.right - m - bw, area.top + m),
        (area.left + m, area.top + m),
        (area.right - m - bw, area.bottom - m - bh),
        (area.left + m, area.bottom - m - bh),
    ];
    let covered = |&(x, y): &(i64, i64)| {
        occupied
            .iter()
            .filter(|&&(px, py)| px >= x && px <= x + bw && py >= y && py <= y + bh)
            .count()
    };
    let (x, y) = corners
        .iter()
        .copied()
        .min_by_key(|c| covered(c))
        .unwrap_or(corners[0]);
    cv.fill(x, y, x + bw, y + bh, WHITE);
    cv.frame(x, y, x + bw, y + bh, LEGEND_BORDER);
    for (i, e) in entries.iter().enumerate() {
        let cy = y + pad + i as i64 * row_h + row_h / 2 - s;
        draw_entry(cv, x + pad, cy, e, s);
    }
    covered(&(x, y))
}

/// Finite points only.
fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = (f64, f64)> + '_ {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
}

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    crate::image_io::save_png(path, img)
}

impl LineChart {
    /// Draws the chart on a `width` x `height` white image. Never panics: empty series,
    /// single points and non-finite values (skipped; a NaN point breaks its line) all draw.
    /// The legend goes in the inside corner that hides the fewest points, or in a row above
    /// the plot when every corner would hide some.
    pub fn render(&self, width: u32, height: u32) -> RgbImage {
        let (img, hidden) = self.render_with(width, height, false);
        if hidden == 0 {
            img
        } else {
            self.render_with(width, height, true).0
        }
    }

    /// [`render`](Self::render) with the legend inside the plot (returning how many data
    /// pixels it covers) or in a row above it (covering none).
    fn render_with(&self, width: u32, height: u32, legend_row: bool) -> (RgbImage, usize) {
        let mut cv = Canvas::new(width, height);
        let entries: Vec<LegendEntry> = self
            .series
            .iter()
            .filter(|se| se.listed)
            .map(|se| LegendEntry {
                name: &se.name,
                color: se.color,
                swatch: match (se.joined, se.hollow) {
                    (true, _) => Swatch::Line,
                    (false, false) => Swatch::Box,
                    (false, true) => Swatch::Outline,
                },
            })
            .collect();
        let s = label_scale(width, height);
        let pad = 4 * s;
        let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in self.series.iter().flat_map(|se| finite(&se.points)) {
            (xmin, xmax) = (xmin.min(x), xmax.max(x));
            (ymin, ymax) = (ymin.min(y), ymax.max(y));
        }
        let bottom_margin = 2 * s
            + pad
            + text_height(s)
            + pad
            + if self.x_label.is_empty() {
                0
            } else {
                text_height(s) + 2 * pad
            }
            + pad;
        let (area, y) = draw_frame(
            &mut cv,
            &self.title,
            &self.y_label,
            if legend_row { &entries } else { &[] },
            bottom_margin,
            |h| Axis::new(ymin, ymax, 0.05, (h / (20 * s + 20)).clamp(2, 10) as usize),
        );
        let x_target = ((area.right - area.left) / (40 * s + 30)).clamp(2, 10) as usize;
        let x = Axis::new(xmin, xmax, 0.05, x_target);
        for &v in &x.ticks {
            let px = x.map(v, area.left, area.right);
            cv.fill(px, area.top + 1, px + 1, area.bottom, GRID);
            cv.fill(px, area.bottom, px + 1, area.bottom + 2 * s + 1, BLACK);
            cv.text_centered(px, area.bottom + 2 * s + pad, &x.label(v), s, BLACK);
        }
        if !self.x_label.is_empty() {
            let ly = area.bottom + 2 * s + 3 * pad + text_height(s);
            cv.text_centered((area.left + area.right) / 2, ly, &self.x_label, s, BLACK);
        }

        let mut occupied = Vec::new();
        for se in &self.series {
            let mut prev: Option<(i64, i64)> = None;
            for &(vx, vy) in &se.points {
                if !(vx.is_finite() && vy.is_finite()) {
                    prev = None;
                    continue;
                }
                let p = (
                    x.map(vx, area.left, area.right),
                    y.map(vy, area.bottom, area.top),
                );
                if let Some(q) = prev.filter(|_| se.joined) {
                    cv.line(q, p, se.color, s + 1);
                    // Samples along the segment, for the legend placement.
                    for k in 0..=8 {
                        occupied.push((q.0 + (p.0 - q.0) * k / 8, q.1 + (p.1 - q.1) * k / 8));
                    }
                }
                if se.hollow {
                    let half = 2 * s + 1;
                    let (a, b) = ((p.0 - half, p.1 - half), (p.0 + half, p.1 + half));
                    cv.frame_wide(a, b, (s + 1) / 2, se.color);
                } else {
                    let half = s + 1;
                    cv.fill(
                        p.0 - half,
                        p.1 - half,
                        p.0 + half + 1,
                        p.1 + half + 1,
                        se.color,
                    );
                }
                occupied.push(p);
                prev = Some(p);
            }
        }
        cv.frame(area.left, area.top, area.right, area.bottom, BLACK);
        let hidden = if legend_row {
            0
        } else {
            draw_legend(&mut cv, area, &entries, &occupied)
        };
        (cv.img, hidden)
    }

    /// Renders the chart and writes it as a PNG (atomically).
    pub fn save_png(&self, path: impl AsRef<Path>, width: u32, height: u32) -> Result<()> {
        save(&self.render(width, height), path.as_ref())
    }
}

/// Decimals that give the largest bar value three significant digits (at most four); all
/// bars share them so that their labels line up.
fn value_decimals(max_abs: f64) -> usize {
    if max_abs == 0.0 || !max_abs.is_finite() {
        0
    } else {
        (2 - max_abs.log10().floor() as i64).clamp(0, 4) as usize
    }
}

impl BarChart {
    /// Draws the chart on a `width` x `height` white image. The y axis always includes 0;
    /// non-finite values are left out. Never panics, whatever the groups hold.
    pub fn render(&self, width: u32, height: u32) -> RgbImage {
        let mut cv = Canvas::new(width, height);
        let s = label_scale(width, height);
        let pad = 4 * s;
        // Series names in order of first appearance give the colours and the legend.
        let mut names: Vec<&str> = Vec::new();
        for (_, bars) in &self.groups {
            for (name, _) in bars {
                if !names.contains(&name.as_str()) {
                    names.push(name);
                }
            }
        }
        let color_of = |name: &str| {
            let i = names.iter().position(|n| *n == name).unwrap_or(0);
            PALETTE[i % PALETTE.len()]
        };
        let values = self
            .groups
            .iter()
            .flat_map(|(_, b)| b.iter().map(|(_, v)| *v));
        let (mut vmin, mut vmax) = (0.0f64, 0.0f64);
        for v in values.filter(|v| v.is_finite()) {
            (vmin, vmax) = (vmin.min(v), vmax.max(v));
        }
        let decimals = value_decimals(vmin.abs().max(vmax));
        if vmin == vmax {
            vmax = 1.0;
        }
        // Head-room above the bars for their value labels; the zero line stays on the axis.
        let span = vmax - vmin;
        let lo = if vmin < 0.0 { vmin - 0.08 * span } else { 0.0 };
        let hi = if vmax > 0.0 { vmax + 0.12 * span } else { 0.0 };
        let bottom_margin = pad + text_height(s) + 2 * pad;
        let entries: Vec<LegendEntry> = names
            .iter()
            .map(|n| LegendEntry {
                name: n,
                color: color_of(n),
                swatch: Swatch::Box,
            })
            .collect();
        let (area, y) = draw_frame(
            &mut cv,
            &self.title,
            &self.y_label,
            &entries,
            bottom_margin,
            |h| Axis::with_range(lo, hi, (h / (20 * s + 20)).clamp(2, 10) as usize),
        );
        let zero = y.map(0.0, area.bottom, area.top);
        let n_groups = self.groups.len().max(1) as i64;
        let group_w = (area.right - area.left) / n_groups;
        let mut occupied = Vec::new();
        for (g, (label, bars)) in self.groups.iter().enumerate() {
            let gx = area.left + g as i64 * group_w;
            let inner = group_w * 4 / 5;
            let bar_w = inner / (bars.len().max(1) as i64);
            let x0 = gx + (group_w - bar_w * bars.len() as i64) / 2;
            for (i, (name, v)) in bars.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let bx = x0 + i as i64 * bar_w;
                let top = y.map(*v, area.bottom, area.top);
                let (y0, y1) = (top.min(zero), top.max(zero));
                cv.fill(bx + 1, y0, bx + bar_w - 1, y1 + 1, color_of(name));
                for k in 0..=4 {
                    occupied.push((bx + bar_w * k / 4, y0));
                    occupied.push((bx + bar_w * k / 4, (y0 + y1) / 2));
                }
                let text = format!("{v:.decimals$}");
                if text_width(&text, s) <= bar_w {
                    let ty = if *v >= 0.0 {
                        y0 - pad - text_height(s)
                    } else {
                        y1 + pad
                    };
                    cv.text_centered(bx + bar_w / 2, ty, &text, s, BLACK);
                    occupied.push((bx + bar_w / 2, ty));
                }
            }
            cv.text_centered(gx + group_w / 2, area.bottom + 2 * pad, label, s, BLACK);
        }
        cv.fill(area.left, zero, area.right + 1, zero + 1, BLACK);
        cv.frame(area.left, area.top, area.right, area.bottom, BLACK);
        cv.img
    }

    /// Renders the chart and writes it as a PNG (atomically).
    pub fn save_png(&self, path: impl AsRef<Path>, width: u32, height: u32) -> Result<()> {
        save(&self.render(width, height), path.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(img: &RgbImage, c: Rgb<u8>) -> usize {
        img.pixels().filter(|p| **p == c).count()
    }

    fn dark_in(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
        let mut n = 0;
        for y in y0..y1.min(img.height()) {
            for x in x0..x1.min(img.width()) {
                if img.get_pixel(x, y).0.iter().all(|&v| v < 80) {
                    n += 1;
                }
            }
        }
        n
    }

    fn rd_chart() -> LineChart {
        LineChart {
            title: "Kodak: rate-distortion (PSNR)".into(),
            x_label: "bits per pixel".into(),
            y_label: "PSNR [dB]".into(),
            series: vec![
                Series::new(
                    "psic full",
                    vec![
                        (0.12, 27.1),
                        (0.2, 28.6),
                        (0.35, 30.4),
                        (0.55, 32.0),
                        (0.8, 33.6),
                    ],
                    PALETTE[0],
                ),
                Series::new(
                    "psic shielded",
                    vec![
                        (0.12, 25.3),
                        (0.2, 26.5),
                        (0.35, 27.9),
                        (0.55, 29.1),
                        (0.8, 30.2),
                    ],
                    PALETTE[1],
                ),
                Series::new(
                    "JPEG (4:4:4)",
                    vec![
                        (0.3, 24.0),
                        (0.5, 27.2),
                        (0.75, 29.5),
                        (1.1, 31.4),
                        (1.6, 33.9),
                    ],
                    PALETTE[2],
                ),
            ],
        }
    }

    fn accuracy_chart() -> BarChart {
        let bars = |o: f64, f: f64, s: f64| {
            vec![
                ("original".to_string(), o),
                ("full decode".to_string(), f),
                ("shielded decode".to_string(), s),
            ]
        };
        BarChart {
            title: "Top-1 accuracy of the target classifier".into(),
            y_label: "top-1 accuracy".into(),
            groups: vec![
                ("EfficientNet-Lite0".into(), bars(0.752, 0.731, 0.084)),
                ("MobileNetV3".into(), bars(0.741, 0.718, 0.213)),
            ],
        }
    }

    #[test]
    fn line_chart_has_the_size_colours_and_labels() {
        let chart = rd_chart();
        for (w, h) in [(800, 600), (320, 240), (1200, 900)] {
            let img = chart.render(w, h);
            assert_eq!(img.dimensions(), (w, h));
            for se in &chart.series {
                assert!(count(&img, se.color) > 50, "{} missing at {w}x{h}", se.name);
            }
            // The y label and tick labels left of the plot, the x label at the bottom.
            assert!(dark_in(&img, 0, 0, w / 12, h) > 50);
            assert!(dark_in(&img, 0, h - h / 12, w, h) > 50);
            // The title at the top.
            assert!(dark_in(&img, 0, 0, w, h / 15) > 50);
        }
    }

    #[test]
    fn hollow_markers_are_outlines_and_unlisted_series_have_no_legend_entry() {
        let (red, blue) = (Rgb([200, 30, 30]), Rgb([30, 30, 200]));
        let chart = |hollow: bool, listed: bool| {
            let mut se = Series::markers("b", vec![(0.5, 0.5)], blue);
            (se.hollow, se.listed) = (hollow, listed);
            LineChart {
                title: "t".into(),
                series: vec![Series::markers("a", vec![(0.0, 0.0), (1.0, 1.0)], red), se],
                ..Default::default()
            }
        };
        let img = chart(true, true).render(600, 400);
        // The data point (0.5, 0.5) is at the plot's centre: an outline leaves it white.
        let at = |img: &RgbImage, c: Rgb<u8>| {
            img.enumerate_pixels()
                .filter(|(_, _, p)| **p == c)
                .map(|(x, y, _)| (x, y))
                .collect::<Vec<_>>()
        };
        let filled = chart(false, true).render(600, 400);
        let (hollow_px, filled_px) = (at(&img, blue), at(&filled, blue));
        assert!(!hollow_px.is_empty() && !filled_px.is_empty());
        // Same legend place, so the marker is what differs: the filled one covers its centre.
        let centre = |px: &[(u32, u32)]| {
            let (mut xs, mut ys): (Vec<u32>, Vec<u32>) = px.iter().copied().unzip();
            xs.sort();
            ys.sort();
            (xs[xs.len() / 2], ys[ys.len() / 2])
        };
        let c = centre(&at(&filled, blue)[..]);
        assert_eq!(*filled.get_pixel(c.0, c.1), blue);
        assert_ne!(img.get_pixel(c.0, c.1), &blue);
        // Without a legend entry, the colour appears only at the marker.
        let unlisted = chart(true, false).render(600, 400);
        assert!(at(&unlisted, blue).len() < hollow_px.len());
        assert!(!at(&unlisted, blue).is_empty());
    }

    #[test]
    fn legend_leaves_the_plot_when_every_corner_holds_data() {
        let colour = Rgb([200, 30, 30]);
        // A grid of markers covers the whole plot, every corner included.
        let grid: Vec<(f64, f64)> = (0..121)
            .map(|i| (f64::from(i % 11) / 10.0, f64::from(i / 11) / 10.0))
            .collect();
        let chart = |pts: Vec<(f64, f64)>| LineChart {
            title: "t".into(),
            series: vec![Series::markers(
                "a rather long legend entry name",
                pts,
                colour,
            )],
            ..Default::default()
        };
        // Data everywhere: an inside legend would hide some, so it goes above the plot
        // and every marker stays drawn.
        let full = chart(grid);
        let (inside, hidden) = full.render_with(600, 400, false);
        assert!(hidden > 0);
        let img = full.render(600, 400);
        assert_ne!(img, inside);
        let count = |img: &RgbImage| img.pixels().filter(|p| **p == colour).count();
        assert!(count(&img) > count(&inside), "markers hidden by the legend");
        // One corner free: the legend goes there, inside.
        let free = chart(vec![(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]);
        assert_eq!(free.render_with(600, 400, false).1, 0);
        assert_eq!(free.render(600, 400), free.render_with(600, 400, false).0);
    }

    #[test]
    fn line_chart_survives_degenerate_input() {
        let nan = f64::NAN;
        let charts = [
            LineChart::default(),
            LineChart {
                series: vec![Series::new("empty", vec![], PALETTE[0])],
                ..LineChart::default()
            },
            LineChart {
                series: vec![Series::new("one", vec![(1.0, 2.0)], PALETTE[3])],
                ..rd_chart()
            },
            LineChart {
                series: vec![Series::new(
                    "gaps",
                    vec![
                        (nan, 1.0),
                        (0.0, 1.0),
                        (1.0, nan),
                        (2.0, 3.0),
                        (f64::INFINITY, 0.0),
                    ],
                    PALETTE[4],
                )],
                ..rd_chart()
            },
            LineChart {
                series: vec![Series::new("all nan", vec![(nan, nan)], PALETTE[5])],
                ..rd_chart()
            },
            LineChart {
                series: vec![Series::new(
                    "flat",
                    vec![(0.0, 5.0), (0.0, 5.0)],
                    PALETTE[6],
                )],
                ..rd_chart()
            },
            LineChart {
                series: vec![Series::new(
                    "huge",
                    vec![(-1e300, 1e-300), (1e300, 2e-300)],
                    PALETTE[7],
                )],
                ..rd_chart()
            },
        ];
        for chart in &charts {
            for (w, h) in [(400, 300), (40, 30), (1, 1), (0, 0)] {
                assert_eq!(chart.render(w, h).dimensions(), (w, h));
            }
        }
        assert!(count(&charts[2].render(400, 300), PALETTE[3]) > 0);
        assert!(count(&charts[3].render(400, 300), PALETTE[4]) > 0);
    }

    #[test]
    fn bar_chart_draws_every_series() {
        let chart = accuracy_chart();
        let img = chart.render(800, 500);
        assert_eq!(img.dimensions(), (800, 500));
        for c in &PALETTE[..3] {
            assert!(count(&img, *c) > 100);
        }
        assert!(dark_in(&img, 0, 0, 800 / 12, 500) > 50);
        assert!(dark_in(&img, 0, 500 - 500 / 12, 800, 500) > 50);

        let odd = BarChart {
            groups: vec![
                ("nan".into(), vec![("a".into(), f64::NAN)]),
                ("neg".into(), vec![("a".into(), -0.5), ("b".into(), 2.0)]),
                ("none".into(), vec![]),
            ],
            ..BarChart::default()
        };
        for (w, h) in [(400, 300), (10, 10), (0, 0)] {
            assert_eq!(odd.render(w, h).dimensions(), (w, h));
            assert_eq!(BarChart::default().render(w, h).dimensions(), (w, h));
        }
    }

    #[test]
    fn font_glyphs_are_distinct_and_drawn() {
        for (i, g) in FONT.iter().enumerate() {
            assert_eq!(g.iter().all(|&r| r == 0), i == 0, "glyph {}", i + 32);
            assert!(g.iter().all(|&r| r < 32));
            for (j, h) in FONT.iter().enumerate().skip(i + 1) {
                assert_ne!(
                    g,
                    h,
                    "{:?} and {:?} look alike",
                    (i + 32) as u8 as char,
                    (j + 32) as u8 as char
                );
            }
        }
        // Turned text has the same pixels as upright text; unknown characters draw as '?'.
        let mut a = Canvas::new(40, 40);
        a.text(0, 0, "A1", 2, BLACK);
        let mut b = Canvas::new(40, 40);
        b.text_up(0, 39, "A1", 2, BLACK);
        assert_eq!(count(&a.img, BLACK), count(&b.img, BLACK));
        let mut c = Canvas::new(10, 10);
        c.text(0, 0, "é", 1, BLACK);
        let mut d = Canvas::new(10, 10);
        d.text(0, 0, "?", 1, BLACK);
        assert_eq!(c.img, d.img);
    }

    #[test]
    fn ticks_are_round_values() {
        let a = Axis::new(0.12, 0.8, 0.05, 5);
        assert!(a.lo < 0.12 && a.hi > 0.8);
        let labels: Vec<String> = a.ticks.iter().map(|&v| a.label(v)).collect();
        assert_eq!(labels, ["0.2", "0.4", "0.6", "0.8"]);
        let a = Axis::new(24.0, 34.0, 0.05, 5);
        let labels: Vec<String> = a.ticks.iter().map(|&v| a.label(v)).collect();
        assert_eq!(labels, ["24", "26", "28", "30", "32", "34"]);
        let a = Axis::with_range(-1.0, 1.0, 4);
        let labels: Vec<String> = a.ticks.iter().map(|&v| a.label(v)).collect();
        assert_eq!(labels, ["-1.0", "-0.5", "0.0", "0.5", "1.0"]);
        // Bar values: three significant digits of the largest value, the same decimals for all.
        assert_eq!(value_decimals(0.7519), 3);
        assert_eq!(format!("{:.*}", value_decimals(0.7519), 0.084), "0.084");
        assert_eq!(value_decimals(75.19), 1);
        assert_eq!(value_decimals(0.0), 0);
    }

    /// Writes the two example charts to the temp directory for a look:
    /// `cargo test --release --lib plot::tests::example_charts -- --ignored`.
    #[test]
    #[ignore]
    fn example_charts() {
        let dir = std::env::temp_dir();
        rd_chart()
            .save_png(dir.join("psic-line-chart.png"), 800, 600)
            .unwrap();
        rd_chart()
            .save_png(dir.join("psic-line-chart-small.png"), 400, 300)
            .unwrap();
        accuracy_chart()
            .save_png(dir.join("psic-bar-chart.png"), 800, 500)
            .unwrap();
        // Every glyph at scale 3, to check the font by eye.
        let mut sheet = Canvas::new(600, 120);
        let ascii: Vec<char> = (32u8..127).map(char::from).collect();
        for (row, chunk) in ascii.chunks(32).enumerate() {
            let line: String = chunk.iter().collect();
            sheet.text(10, 10 + row as i64 * 36, &line, 3, BLACK);
        }
        crate::image_io::save_png(dir.join("psic-font.png"), &sheet.img).unwrap();
    }
}
