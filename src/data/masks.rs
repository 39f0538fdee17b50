//! Masks as files and tools: white (1) marks the region an adapter or an edit may change, black (0)
//! what must stay. Masks are soft (values in [0, 1]) and are read from 1-bit, grey, grey+alpha, RGB
//! and RGBA PNG/JPEG/WebP files:
//!
//! - grey: the grey value; RGB: its luminance (ITU-R 601, as PIL's `convert("L")`);
//! - with an alpha channel: the value times the alpha (a transparent pixel is never edited).
//!
//! The tools build masks from a box, a colour key or the procedural shape detector, and transform
//! them: invert, dilate, erode, feather (Gaussian), threshold and combine. A mask whose size differs
//! from its image is area-resized with a warning, or refused with both sizes named when strict.

use crate::data::shapes::{detect, BACKGROUNDS, COLORS, SHAPES};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage};
use std::path::Path;

/// A soft mask of `h × w` values in [0, 1], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    /// Width in pixels.
    pub w: usize,
    /// Height in pixels.
    pub h: usize,
    /// Values in [0, 1], row-major.
    pub data: Vec<f32>,
}

/// How [`Mask::combine`] joins two masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Elementwise maximum.
    Union,
    /// Elementwise minimum.
    Intersect,
    /// Sum, clamped to 1.
    Add,
    /// `a · (1 − b)`: a without b.
    Subtract,
}

impl Combine {
    /// Parses `union`, `intersect`, `add`, `subtract`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "union" | "max" => Self::Union,
            "intersect" | "min" => Self::Intersect,
            "add" => Self::Add,
            "subtract" | "minus" => Self::Subtract,
            _ => {
                return Err(Error::Config(format!(
                    "mask combination `{s}` is not one of union, intersect, add, subtract"
                )))
            }
        })
    }
}

fn luminance(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

impl Mask {
    /// A mask of `value` everywhere.
    pub fn filled(w: usize, h: usize, value: f32) -> Self {
        Self {
            w,
            h,
            data: vec![value.clamp(0.0, 1.0); w * h],
        }
    }

    fn at(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.w + x]
    }

    /// Reads a mask file (see the module documentation for how channels become values).
    pub fn read(path: &Path) -> Result<Self> {
        let img = image::open(path).map_err(|e| {
            Error::format(
                path,
                format!("cannot read mask (truncated, corrupt or not an image): {e}"),
            )
        })?;
        let m = Self::from_image(&img);
        if m.w == 0 || m.h == 0 {
            return Err(Error::format(path, "the mask is empty (0 pixels)"));
        }
        Ok(m)
    }

    /// A mask from a decoded image: grey or luminance, times alpha where there is one.
    pub fn from_image(img: &DynamicImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let alpha = img.color().has_alpha();
        let rgba = img.to_rgba32f();
        let data = rgba
            .pixels()
            .map(|p| {
                let [r, g, b, a] = p.0;
                let v = luminance(r, g, b).clamp(0.0, 1.0);
                if alpha {
                    v * a.clamp(0.0, 1.0)
                } else {
                    v
                }
            })
            .collect();
        Self { w, h, data }
    }

    /// The alpha channel of an image file as a mask (kohya's `alpha_mask`); `None` when the image
    /// has no alpha channel.
    pub fn alpha_of(path: &Path) -> Result<Option<Self>> {
        let img = image::open(path)
            .map_err(|e| Error::format(path, format!("cannot read image: {e}")))?;
        if !img.color().has_alpha() {
            return Ok(None);
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let data = img.to_rgba32f().pixels().map(|p| p.0[3]).collect();
        Ok(Some(Self { w, h, data }))
    }

    /// This mask for an image of `w × h`: unchanged when the sizes agree; otherwise area-resized
    /// with a warning (returned), or, when `strict`, an error naming the mask file and both sizes.
    pub fn fit(
        self,
        w: usize,
        h: usize,
        strict: bool,
        path: &Path,
    ) -> Result<(Self, Option<String>)> {
        if (self.w, self.h) == (w, h) {
            return Ok((self, None));
        }
        let msg = format!(
            "mask {} is {}x{} but the image is {w}x{h}",
            path.display(),
            self.w,
            self.h
        );
        if strict {
            return Err(Error::format(
                path,
                format!("{msg} (--strict refuses masks of another size)"),
            ));
        }
        Ok((
            self.resize(w, h),
            Some(format!("{msg}; resized by area averaging")),
        ))
    }

    /// Area-averages to `w × h`: every target pixel is the mean over its exact footprint, so soft
    /// masks stay soft and any ratio works.
    pub fn resize(&self, w: usize, h: usize) -> Self {
        if (w, h) == (self.w, self.h) {
            return self.clone();
        }
        let rows = area_weights(h, self.h);
        let cols = area_weights(w, self.w);
        let mut data = vec![0f32; w * h];
        for (ty, rw) in rows.iter().enumerate() {
            for (tx, cw) in cols.iter().enumerate() {
                let mut s = 0f32;
                for &(sy, wy) in rw {
                    for &(sx, wx) in cw {
                        s += wy * wx * self.at(sx, sy);
                    }
                }
                data[ty * w + tx] = s.clamp(0.0, 1.0);
            }
        }
        Self { w, h, data }
    }

    /// A box `[x0, x1) × [y0, y1)` in pixels on a `w × h` canvas (clipped to it).
    pub fn from_box(
        w: usize,
        h: usize,
        (x0, y0, x1, y1): (usize, usize, usize, usize),
    ) -> Result<Self> {
        if x0 >= x1 || y0 >= y1 {
            return Err(Error::Config(format!(
                "box {x0},{y0},{x1},{y1} is empty: it needs x0 < x1 and y0 < y1"
            )));
        }
        if x0 >= w || y0 >= h {
            return Err(Error::Config(format!(
                "box {x0},{y0},{x1},{y1} starts outside the {w}x{h} image"
            )));
        }
        let mut m = Self::filled(w, h, 0.0);
        for y in y0..y1.min(h) {
            for x in x0..x1.min(w) {
                m.data[y * w + x] = 1.0;
            }
        }
        Ok(m)
    }

    /// Pixels within `tolerance` (Euclidean, 0–441 in 8-bit RGB) of `rgb`.
    pub fn from_color_key(img: &RgbImage, rgb: [u8; 3], tolerance: f32) -> Self {
        let data = img
            .pixels()
            .map(|p| {
                let d: f32 = (0..3)
                    .map(|i| (p.0[i] as f32 - rgb[i] as f32).powi(2))
                    .sum::<f32>()
                    .sqrt();
                (d <= tolerance) as u8 as f32
            })
            .collect();
        Self {
            w: img.width() as usize,
            h: img.height() as usize,
            data,
        }
    }

    /// The object that the procedural shape detector finds, as a solid region (each row filled
    /// between its outermost object pixels, so stripes and outlines count as the shape). `query`
    /// names the object by its words (`red`, `circle`, `red circle`, or a whole caption): the
    /// object of that colour; with no colour word, the detector's object, whose shape must match a
    /// shape word if one is given. Errors say what was looked for and what the detector saw.
    pub fn from_shape(img: &RgbImage, query: &str) -> Result<Self> {
        let words: Vec<String> = query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| w.to_lowercase())
            .collect();
        let det = detect(img);
        let seen = det
            .scene
            .map(|s| format!("{} {}", COLORS[s.color].0, SHAPES[s.shape]))
            .unwrap_or_else(|| "no shape".into());
        let color = match COLORS.iter().position(|c| words.iter().any(|w| w == c.0)) {
            Some(c) => c,
            None => {
                let s = det.scene.ok_or_else(|| {
                    Error::Config(format!(
                        "shape mask `{query}`: the detector finds no shape in the image"
                    ))
                })?;
                if let Some(k) = SHAPES.iter().position(|n| words.iter().any(|w| w == n)) {
                    if k != s.shape {
                        return Err(Error::Config(format!(
                            "shape mask `{query}`: the detector sees a {seen}, not a {}",
                            SHAPES[k]
                        )));
                    }
                }
                s.color
            }
        };
        let bg = det
            .scene
            .map(|s| BACKGROUNDS[s.background].1)
            .unwrap_or(BACKGROUNDS[0].1);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let fg = COLORS[color].1.map(|v| v as f32);
        let bgf = bg.map(|v| v as f32);
        let d2 =
            |p: [u8; 3], c: [f32; 3]| (0..3).map(|i| (p[i] as f32 - c[i]).powi(2)).sum::<f32>();
        // Pixels of the colour (and, for striped shapes, the near-white stripes between them).
        let mut hit = vec![false; w * h];
        // A pixel belongs to the object when the object's colour is its nearest named colour (so a
        // yellow object does not take in an orange one beside it) and it is nearer than the background.
        let nearest = |p: [u8; 3]| {
            (0..COLORS.len())
                .min_by(|&a, &b| {
                    d2(p, COLORS[a].1.map(|v| v as f32))
                        .total_cmp(&d2(p, COLORS[b].1.map(|v| v as f32)))
                })
                .unwrap_or(0)
        };
        for (x, y, p) in img.enumerate_pixels() {
            hit[y as usize * w + x as usize] =
                nearest(p.0) == color && d2(p.0, fg) < 90f32.powi(2) && d2(p.0, fg) < d2(p.0, bgf);
        }
        if hit.iter().filter(|b| **b).count() < 4 {
            return Err(Error::Config(format!(
                "shape mask `{query}`: no {} object in the image (the detector sees a {seen})",
                COLORS[color].0
            )));
        }
        // Solid: fill each row and each column between their outermost hits, then keep the
        // pixels filled both ways (a convex shape is its own row and column hull).
        let mut rows = vec![0f32; w * h];
        for y in 0..h {
            let xs: Vec<usize> = (0..w).filter(|&x| hit[y * w + x]).collect();
            if let (Some(&a), Some(&b)) = (xs.first(), xs.last()) {
                for x in a..=b {
                    rows[y * w + x] = 1.0;
                }
            }
        }
        let mut data = vec![0f32; w * h];
        for x in 0..w {
            let ys: Vec<usize> = (0..h).filter(|&y| hit[y * w + x]).collect();
            if let (Some(&a), Some(&b)) = (ys.first(), ys.last()) {
                for y in a..=b {
                    data[y * w + x] = rows[y * w + x];
                }
            }
        }
        Ok(Self { w, h, data })
    }

    /// 1 − m.
    pub fn invert(&self) -> Self {
        self.map(|v| 1.0 - v)
    }

    fn map(&self, f: impl Fn(f32) -> f32) -> Self {
        Self {
            w: self.w,
            h: self.h,
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }

    /// Values ≥ `t` become 1, the rest 0.
    pub fn threshold(&self, t: f32) -> Self {
        self.map(|v| (v >= t) as u8 as f32)
    }

    /// Grows the white region by `r` pixels (maximum over a disc of radius `r`).
    pub fn dilate(&self, r: usize) -> Self {
        self.morph(r, f32::max, 0.0)
    }

    /// Shrinks the white region by `r` pixels (minimum over a disc of radius `r`).
    pub fn erode(&self, r: usize) -> Self {
        self.morph(r, f32::min, 1.0)
    }

    fn morph(&self, r: usize, pick: fn(f32, f32) -> f32, start: f32) -> Self {
        if r == 0 {
            return self.clone();
        }
        // A disc wider than the image covers it from any pixel: no larger radius changes anything.
        let r = r.min(self.w.max(self.h));
        let (w, h, ri) = (self.w as i64, self.h as i64, r as i64);
        let mut data = vec![0f32; self.data.len()];
        for y in 0..h {
            for x in 0..w {
                let mut acc = start;
                for dy in -ri..=ri {
                    for dx in -ri..=ri {
                        if dx * dx + dy * dy > ri * ri {
                            continue;
                        }
                        let (sx, sy) = (x + dx, y + dy);
                        // Outside the image counts as the edge pixel (no border effects).
                        let (sx, sy) = (sx.clamp(0, w - 1), sy.clamp(0, h - 1));
                        acc = pick(acc, self.data[(sy * w + sx) as usize]);
                    }
                }
                data[(y * w + x) as usize] = acc;
            }
        }
        Self {
            w: self.w,
            h: self.h,
            data,
        }
    }

    /// Gaussian feathering with standard deviation `sigma` pixels (kernel radius ⌈3σ⌉, edges
    /// repeated). σ = 0 returns the mask unchanged.
    pub fn feather(&self, sigma: f32) -> Self {
        if sigma <= 0.0 {
            return self.clone();
        }
        // Edges repeat, so a kernel wider than twice the image adds nothing but time.
        let r = ((3.0 * sigma).ceil() as i64).min(2 * self.w.max(self.h) as i64);
        let k: Vec<f32> = (-r..=r)
            .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
            .collect();
        let sum: f32 = k.iter().sum();
        let k: Vec<f32> = k.iter().map(|v| v / sum).collect();
        let (w, h) = (self.w as i64, self.h as i64);
        let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
            let mut out = vec![0f32; src.len()];
            for y in 0..h {
                for x in 0..w {
                    let mut s = 0f32;
                    for (j, kv) in k.iter().enumerate() {
                        let o = j as i64 - r;
                        let (sx, sy) = if horizontal {
                            ((x + o).clamp(0, w - 1), y)
                        } else {
                            (x, (y + o).clamp(0, h - 1))
                        };
                        s += kv * src[(sy * w + sx) as usize];
                    }
                    out[(y * w + x) as usize] = s.clamp(0.0, 1.0);
                }
            }
            out
        };
        let data = pass(&pass(&self.data, true), false);
        Self {
            w: self.w,
            h: self.h,
            data,
        }
    }

    /// Combines with `other` (resized to this size first if it differs).
    pub fn combine(&self, other: &Self, how: Combine) -> Self {
        let o = other.resize(self.w, self.h);
        let data = self
            .data
            .iter()
            .zip(&o.data)
            .map(|(&a, &b)| match how {
                Combine::Union => a.max(b),
                Combine::Intersect => a.min(b),
                Combine::Add => (a + b).min(1.0),
                Combine::Subtract => a * (1.0 - b),
            })
            .collect();
        Self {
            w: self.w,
            h: self.h,
            data,
        }
    }

    /// The mean value (the covered share of the image).
    pub fn coverage(&self) -> f32 {
        self.data.iter().sum::<f32>() / self.data.len().max(1) as f32
    }

    /// As an 8-bit grey image.
    pub fn to_gray(&self) -> GrayImage {
        GrayImage::from_fn(self.w as u32, self.h as u32, |x, y| {
            image::Luma([(self.at(x as usize, y as usize) * 255.0).round() as u8])
        })
    }

    /// As an RGB image (grey levels), e.g. for a grid cell.
    pub fn to_rgb(&self) -> RgbImage {
        DynamicImage::ImageLuma8(self.to_gray()).to_rgb8()
    }

    /// Writes an 8-bit grey PNG atomically.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        self.to_gray()
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .map_err(|e| Error::Msg(format!("encoding {}: {e}", path.display())))?;
        crate::util::write_atomic(path, &bytes)
    }

    /// As a tensor (1, H, W) in [0, 1] (a routing mask for one image, broadcast over a batch).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data.clone(),
            (1, self.h, self.w),
            device,
        )?)
    }

    /// A mask from a tensor (H, W) or (1, H, W) of values in [0, 1] (clamped).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = t.to_dtype(candle_core::DType::F32)?;
        let (h, w) = match t.dims() {
            &[h, w] | &[1, h, w] | &[1, 1, h, w] => (h, w),
            d => {
                return Err(Error::Msg(format!(
                    "a mask tensor must be (H, W) or (1, H, W), got {d:?}"
                )))
            }
        };
        let data = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| {
                if v.is_finite() {
                    v.clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self { w, h, data })
    }
}

/// For each of `n` target cells, the source cells of `src` it overlaps and their weights (summing
/// to 1).
fn area_weights(n: usize, src: usize) -> Vec<Vec<(usize, f32)>> {
    let step = src as f64 / n as f64;
    (0..n)
        .map(|i| {
            let (a, b) = (i as f64 * step, (i + 1) as f64 * step);
            ((a.floor() as usize)..(b.ceil() as usize).min(src))
                .map(|j| {
                    let overlap = (b.min(j as f64 + 1.0) - a.max(j as f64)).max(0.0);
                    (j, (overlap / step) as f32)
                })
                .filter(|(_, w)| *w > 0.0)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn morphology_and_feathering_keep_their_promises() {
        let m = Mask::from_box(9, 9, (3, 3, 6, 6)).unwrap();
        assert_eq!(m.coverage() * 81.0, 9.0);
        let d = m.dilate(1);
        assert!(
            d.at(2, 4) == 1.0 && d.at(2, 2) == 0.0,
            "a disc, not a square"
        );
        assert_eq!(d.erode(1), m);
        let f = m.feather(1.0);
        assert!(f.at(4, 4) > 0.5 && f.at(4, 4) < 1.0 && f.at(1, 4) > 0.0 && f.at(1, 4) < 0.1);
        assert!(
            (f.coverage() - m.coverage()).abs() < 0.01,
            "feathering keeps the mass"
        );
        assert_eq!(
            m.invert().combine(&m, Combine::Union),
            Mask::filled(9, 9, 1.0)
        );
        assert_eq!(m.combine(&m, Combine::Subtract), Mask::filled(9, 9, 0.0));
        let r = m.resize(3, 3);
        assert_eq!(r.at(1, 1), 1.0);
        assert_eq!(r.at(0, 0), 0.0);
    }
}
