//! Labeled evaluation grids in the manner of the X/Y/Z plot: columns are the X axis, rows the Y
//! axis, one sub-grid per Z value side by side under its own title; axis labels are drawn on the PNG.

use super::plot::{draw_text, text_width};
use crate::{Error, Result};
use image::{imageops, Rgb, RgbImage};

/// Labels of one grid.
#[derive(Debug, Clone, Default)]
pub struct GridLabels {
    /// Title over the grid (the Z value).
    pub title: Option<String>,
    /// One label per column (X values, e.g. `LoRA scale: 0.5`).
    pub columns: Vec<String>,
    /// One label per row (Y values, e.g. a prompt).
    pub rows: Vec<String>,
}

const PAD: u32 = 6;
const BG: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);

/// Splits `text` into lines of at most `max` characters, at spaces where possible.
fn wrap(text: &str, max: usize) -> Vec<String> {
    let mut lines = vec![];
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        while word.chars().count() > max {
            let head: String = word.chars().take(max).collect();
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            lines.push(head);
            word = word.chars().skip(max).collect();
        }
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > max {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Renders `cells[row][col]` with labels. Cells are upscaled (nearest) by an integer factor so that
/// the smaller side reaches `min_cell` pixels; all cells must share one size.
pub fn render(cells: &[Vec<RgbImage>], labels: &GridLabels, min_cell: u32) -> Result<RgbImage> {
    let rows = cells.len();
    let cols = cells.first().map(|r| r.len()).unwrap_or(0);
    if rows == 0 || cols == 0 || cells.iter().any(|r| r.len() != cols) {
        return Err(Error::Msg(format!(
            "a grid needs equal, non-empty rows (got {rows} rows)"
        )));
    }
    if labels.columns.len() != cols || labels.rows.len() != rows {
        return Err(Error::Msg(format!(
            "{} column and {} row labels for a {rows}x{cols} grid",
            labels.columns.len(),
            labels.rows.len()
        )));
    }
    let (w0, h0) = cells[0][0].dimensions();
    if cells.iter().flatten().any(|c| c.dimensions() != (w0, h0)) {
        return Err(Error::Msg("grid cells differ in size".into()));
    }
    let k = ((min_cell + w0.min(h0) - 1) / w0.min(h0).max(1)).max(1);
    let (cw, ch) = (w0 * k, h0 * k);
    let chars = ((cw / 8) as usize).max(4);
    let col_lines: Vec<Vec<String>> = labels.columns.iter().map(|l| wrap(l, chars)).collect();
    let header = col_lines.iter().map(|l| l.len()).max().unwrap_or(1) as u32 * 10 + PAD;
    let row_chars = 22usize;
    let row_lines: Vec<Vec<String>> = labels.rows.iter().map(|l| wrap(l, row_chars)).collect();
    let left = (row_chars as u32) * 8 + 2 * PAD;
    let title_h = if labels.title.is_some() { 26 } else { 0 };
    let width = left + cols as u32 * (cw + PAD) + PAD;
    let height = title_h + header + rows as u32 * (ch + PAD) + PAD;
    let mut img = RgbImage::from_pixel(width, height, BG);
    if let Some(t) = &labels.title {
        draw_text(
            &mut img,
            (width as i64 - text_width(t, 2)) / 2,
            6,
            t,
            2,
            INK,
        );
    }
    for (c, lines) in col_lines.iter().enumerate() {
        let x0 = (left + c as u32 * (cw + PAD)) as i64;
        for (i, line) in lines.iter().enumerate() {
            let x = x0 + (cw as i64 - text_width(line, 1)) / 2;
            draw_text(
                &mut img,
                x,
                (title_h + PAD / 2 + i as u32 * 10) as i64,
                line,
                1,
                INK,
            );
        }
    }
    for (r, row) in cells.iter().enumerate() {
        let y0 = title_h + header + r as u32 * (ch + PAD);
        let lines = &row_lines[r];
        let text_h = lines.len() as u32 * 10;
        for (i, line) in lines.iter().enumerate() {
            let y = y0 as i64 + (ch as i64 - text_h as i64) / 2 + i as i64 * 10;
            draw_text(&mut img, PAD as i64, y, line, 1, INK);
        }
        for (c, cell) in row.iter().enumerate() {
            let big = imageops::resize(cell, cw, ch, imageops::FilterType::Nearest);
            imageops::replace(
                &mut img,
                &big,
                (left + c as u32 * (cw + PAD)) as i64,
                y0 as i64,
            );
        }
    }
    Ok(img)
}

/// Places several grids (one per Z value) side by side, top-aligned.
pub fn side_by_side(grids: &[RgbImage]) -> Result<RgbImage> {
    if grids.is_empty() {
        return Err(Error::Msg("no grids to combine".into()));
    }
    let width = grids.iter().map(|g| g.width()).sum::<u32>() + PAD * (grids.len() as u32 - 1);
    let height = grids.iter().map(|g| g.height()).max().unwrap_or(0);
    let mut img = RgbImage::from_pixel(width, height, BG);
    let mut x = 0i64;
    for g in grids {
        imageops::replace(&mut img, g, x, 0);
        x += (g.width() + PAD) as i64;
    }
    Ok(img)
}
