//! Line plots as PNG (loss curves): axes, ticks, labels and a legend, drawn with the 8x8 public-domain
//! glyphs of `font8x8` so that no system font is needed.

use crate::util::write_atomic;
use crate::{Error, Result};
use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};
use std::path::Path;

/// One named series of (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points; non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// Draws `text` with its top-left corner at (x, y), each glyph pixel scaled by `scale`.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let mut cx = x;
    for ch in text.chars() {
        if let Some(glyph) = font8x8::BASIC_FONTS.get(ch) {
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                put(
                                    img,
                                    cx + (col * scale + dx) as i64,
                                    y + (row as u32 * scale + dy) as i64,
                                    color,
                                );
                            }
                        }
                    }
                }
            }
        }
        cx += 8 * scale as i64;
    }
}

/// Width in pixels of `text` at `scale`.
pub fn text_width(text: &str, scale: u32) -> i64 {
    text.chars().count() as i64 * 8 * scale as i64
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        put(img, x.round() as i64, y.round() as i64, c);
        put(img, x.round() as i64, y.round() as i64 + 1, c);
    }
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// Renders series as a PNG line chart at `path` (written atomically).
/// `log_y` draws the y axis in log10 (for losses spanning decades); non-positive values are then skipped.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let fy_of = |y: f64| if log_y { y.log10() } else { y };
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series {
            label: s.label.clone(),
            points: s.points.iter().map(|(x, y)| (*x, fy_of(*y))).collect(),
        })
        .collect();
    let series = &series[..];
    let (w, h) = (900u32, 560u32);
    let (left, right, top, bottom) = (90.0, 20.0, 50.0, 60.0);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let black = Rgb([0, 0, 0]);
    draw_text(
        &mut img,
        (w as i64 - text_width(title, 2)) / 2,
        12,
        title,
        2,
        black,
    );
    if !pts.is_empty() {
        let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
        for (x, y) in &pts {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-12 {
            y1 = y0 + 1.0;
        }
        let pad = (y1 - y0) * 0.05;
        let (y0, y1) = (y0 - pad, y1 + pad);
        let pw = w as f64 - left - right;
        let ph = h as f64 - top - bottom;
        let tx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
        let ty = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * ph;
        let grey = Rgb([225, 225, 225]);
        for i in 0..=5 {
            let fx = x0 + (x1 - x0) * i as f64 / 5.0;
            let fy = y0 + (y1 - y0) * i as f64 / 5.0;
            line(&mut img, (tx(fx), top), (tx(fx), top + ph), grey);
            line(&mut img, (left, ty(fy)), (left + pw, ty(fy)), grey);
            let lx = fmt_tick(fx);
            draw_text(
                &mut img,
                tx(fx) as i64 - text_width(&lx, 1) / 2,
                (top + ph + 8.0) as i64,
                &lx,
                1,
                black,
            );
            let ly = fmt_tick(if log_y { 10f64.powf(fy) } else { fy });
            draw_text(
                &mut img,
                left as i64 - 8 - text_width(&ly, 1),
                ty(fy) as i64 - 4,
                &ly,
                1,
                black,
            );
        }
        line(&mut img, (left, top), (left, top + ph), black);
        line(&mut img, (left, top + ph), (left + pw, top + ph), black);
        for (si, s) in series.iter().enumerate() {
            let c = Rgb(COLORS[si % COLORS.len()]);
            let p: Vec<_> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            for win in p.windows(2) {
                line(
                    &mut img,
                    (tx(win[0].0), ty(win[0].1)),
                    (tx(win[1].0), ty(win[1].1)),
                    c,
                );
            }
            if p.len() == 1 {
                line(
                    &mut img,
                    (tx(p[0].0) - 2.0, ty(p[0].1)),
                    (tx(p[0].0) + 2.0, ty(p[0].1)),
                    c,
                );
            }
            let ly = top + 8.0 + 14.0 * si as f64;
            let lx = left + pw - 16.0 - text_width(&s.label, 1) as f64 - 24.0;
            line(&mut img, (lx, ly + 4.0), (lx + 18.0, ly + 4.0), c);
            draw_text(&mut img, lx as i64 + 24, ly as i64, &s.label, 1, black);
        }
    }
    draw_text(
        &mut img,
        (w as i64 - text_width(x_label, 1)) / 2,
        h as i64 - 22,
        x_label,
        1,
        black,
    );
    let y_label = if log_y {
        format!("{y_label} (log scale)")
    } else {
        y_label.to_string()
    };
    draw_text(&mut img, 8, top as i64 - 16, &y_label, 1, black);
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Msg(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}
