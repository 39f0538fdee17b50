//! Procedural captioned images: shapes × colours × positions × backgrounds, in a filled, outlined or
//! striped style, drawn deterministically from a seed, and a detector that reads those attributes
//! back from an image (used to measure how well a model follows its prompts, and a style score).

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Shape kinds.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// Colour names and values.
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 180, 40]),
    ("blue", [40, 70, 230]),
    ("yellow", [235, 215, 30]),
    ("purple", [150, 40, 190]),
    ("orange", [245, 130, 20]),
];
/// Positions and their centres as fractions of the image size.
pub const POSITIONS: [(&str, f32, f32); 5] = [
    ("left", 0.27, 0.5),
    ("right", 0.73, 0.5),
    ("top", 0.5, 0.27),
    ("bottom", 0.5, 0.73),
    ("center", 0.5, 0.5),
];
/// Backgrounds.
pub const BACKGROUNDS: [(&str, [u8; 3]); 3] = [
    ("black", [10, 10, 10]),
    ("gray", [128, 128, 128]),
    ("white", [245, 245, 245]),
];

/// How the shape is painted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Solid fill.
    Filled,
    /// A two-pixel outline, background inside.
    Outlined,
    /// Diagonal stripes of the colour and white.
    Striped,
}

impl Style {
    /// Parses `filled`, `outlined`, `striped`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "filled" => Some(Self::Filled),
            "outlined" => Some(Self::Outlined),
            "striped" => Some(Self::Striped),
            _ => None,
        }
    }
    /// The name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Filled => "filled",
            Self::Outlined => "outlined",
            Self::Striped => "striped",
        }
    }
}

/// What one image shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scene {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLORS`].
    pub color: usize,
    /// Index into [`POSITIONS`].
    pub position: usize,
    /// Index into [`BACKGROUNDS`].
    pub background: usize,
}

impl Scene {
    /// A random scene.
    pub fn random(rng: &mut ChaCha8Rng) -> Self {
        Self {
            shape: rng.random_range(0..SHAPES.len()),
            color: rng.random_range(0..COLORS.len()),
            position: rng.random_range(0..POSITIONS.len()),
            background: rng.random_range(0..BACKGROUNDS.len()),
        }
    }

    /// The caption: `a red circle on the left, gray background`.
    pub fn caption(&self) -> String {
        let pos = match POSITIONS[self.position].0 {
            "center" => "in the center".to_string(),
            p => format!("on the {p}"),
        };
        format!(
            "a {} {} {pos}, {} background",
            COLORS[self.color].0, SHAPES[self.shape], BACKGROUNDS[self.background].0
        )
    }

    /// Parses a caption written by [`Self::caption`] (extra words such as a style are ignored).
    pub fn parse(caption: &str) -> Option<Self> {
        let words: Vec<&str> = caption
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        let find = |names: &[&str]| names.iter().position(|n| words.contains(n));
        let bg_word = words
            .iter()
            .position(|w| *w == "background")
            .and_then(|i| i.checked_sub(1))
            .map(|i| words[i]);
        Some(Self {
            shape: find(&SHAPES)?,
            color: find(&COLORS.map(|c| c.0))?,
            position: find(&POSITIONS.map(|p| p.0))?,
            background: BACKGROUNDS.iter().position(|b| Some(b.0) == bg_word)?,
        })
    }

    /// Draws the scene at `size`×`size` in `style`, with a little jitter from `rng`.
    pub fn draw(&self, size: u32, style: Style, rng: &mut ChaCha8Rng) -> RgbImage {
        let s = size as f32;
        let bg = Rgb(BACKGROUNDS[self.background].1);
        let fg = COLORS[self.color].1;
        let mut img = RgbImage::from_pixel(size, size, bg);
        let (_, px, py) = POSITIONS[self.position];
        let jitter = s * 0.04;
        let cx = px * s + rng.random_range(-jitter..=jitter);
        let cy = py * s + rng.random_range(-jitter..=jitter);
        let r = s * rng.random_range(0.17..0.2);
        let inside = |x: f32, y: f32, r: f32| -> bool {
            let (dx, dy) = (x - cx, y - cy);
            match SHAPES[self.shape] {
                "circle" => dx * dx + dy * dy <= r * r,
                "square" => dx.abs() <= r * 0.9 && dy.abs() <= r * 0.9,
                _ => {
                    // upward triangle: apex at (cx, cy - r), base at y = cy + r
                    let t = (dy + r) / (2.0 * r);
                    (0.0..=1.0).contains(&t) && dx.abs() <= t * r * 1.05
                }
            }
        };
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                if !inside(fx, fy, r) {
                    continue;
                }
                let c = match style {
                    Style::Filled => fg,
                    Style::Outlined if inside(fx, fy, r - s * 0.07) => continue,
                    Style::Outlined => fg,
                    Style::Striped => {
                        if ((x + y) / 2) % 2 == 0 {
                            fg
                        } else {
                            [250, 250, 250]
                        }
                    }
                };
                img.put_pixel(x, y, Rgb(c));
            }
        }
        img
    }
}

fn dist2(a: [u8; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] as f32 - b[i]).powi(2)).sum()
}

/// What the detector reads from an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// The scene it saw (`None` when no shape stands out from the background).
    pub scene: Option<Scene>,
    /// Fraction of the shape's bounding box covered by shape-coloured pixels.
    pub fill: f32,
    /// Intersection over union of the filled shape with a circle, a square and a triangle drawn into
    /// its box.
    pub fits: [f32; 3],
}

/// Reads background, colour, position and shape from an image made like [`Scene::draw`] (or sampled
/// by a model trained on such images).
pub fn detect(img: &RgbImage) -> Detection {
    let (w, h) = img.dimensions();
    // Background: the mean of the border pixels, snapped to the nearest background.
    let mut border = [0f32; 3];
    let mut n = 0f32;
    for (x, y, p) in img.enumerate_pixels() {
        if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
            for (b, v) in border.iter_mut().zip(p.0) {
                *b += v as f32;
            }
            n += 1.0;
        }
    }
    let border = border.map(|v| v / n.max(1.0));
    let background = (0..BACKGROUNDS.len())
        .min_by(|&a, &b| {
            dist2(BACKGROUNDS[a].1, border).total_cmp(&dist2(BACKGROUNDS[b].1, border))
        })
        .unwrap_or(0);
    let bg = BACKGROUNDS[background].1.map(|v| v as f32);
    // Foreground: pixels far from the background and not near-white stripes; vote for a colour.
    let mut votes = [0usize; COLORS.len()];
    let mut pts = vec![];
    for (x, y, p) in img.enumerate_pixels() {
        let d = dist2(p.0, bg);
        if d < 60.0f32.powi(2) {
            continue;
        }
        let pf = p.0.map(|v| v as f32);
        let (ci, cd) = (0..COLORS.len())
            .map(|i| (i, dist2(COLORS[i].1, pf)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, f32::MAX));
        if cd < 90.0f32.powi(2) {
            votes[ci] += 1;
            pts.push((x, y, ci));
        }
    }
    let total: usize = votes.iter().sum();
    if total < 4 {
        return Detection {
            scene: None,
            fill: 0.0,
            fits: [0.0; 3],
        };
    }
    let color = (0..COLORS.len()).max_by_key(|&i| votes[i]).unwrap_or(0);
    let mine: Vec<(u32, u32)> = pts
        .iter()
        .filter(|p| p.2 == color)
        .map(|p| (p.0, p.1))
        .collect();
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for &(x, y) in &mine {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let (mx, my) = (
        (x0 + x1 + 1) as f32 / 2.0 / w as f32,
        (y0 + y1 + 1) as f32 / 2.0 / h as f32,
    );
    let position = (0..POSITIONS.len())
        .min_by(|&a, &b| {
            let d = |i: usize| (POSITIONS[i].1 - mx).powi(2) + (POSITIONS[i].2 - my).powi(2);
            d(a).total_cmp(&d(b))
        })
        .unwrap_or(0);
    // The outline: every pixel that is not background, within a pixel of the colour's box. A striped
    // or blurred shape mixes its colour with white at the edges (pastel pixels far from the colour);
    // those belong to the shape, and dropping them would round off a striped square's corners.
    let (bx0, by0) = (x0.saturating_sub(1), y0.saturating_sub(1));
    let (bx1, by1) = ((x1 + 1).min(w - 1), (y1 + 1).min(h - 1));
    let contrast = dist2(COLORS[color].1, bg).sqrt();
    let cut = (0.5 * contrast).max(60.0).powi(2);
    let mut outline = vec![];
    for y in by0..=by1 {
        for x in bx0..=bx1 {
            if dist2(img.get_pixel(x, y).0, bg) >= cut {
                outline.push((x, y));
            }
        }
    }
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for &(x, y) in &outline {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    // Fill each row between its outermost shape pixels, so outlines and stripes count as solid.
    let rows = (y1 - y0 + 1) as usize;
    let mut span = vec![(u32::MAX, 0u32); rows];
    for &(x, y) in &outline {
        let s = &mut span[(y - y0) as usize];
        s.0 = s.0.min(x);
        s.1 = s.1.max(x);
    }
    let widths: Vec<f32> = span
        .iter()
        .map(|&(a, b)| {
            if b >= a && a != u32::MAX {
                (b - a + 1) as f32
            } else {
                0.0
            }
        })
        .collect();
    let solid: f32 = widths.iter().sum();
    let area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
    let fill = solid / area;
    // Triangles: the top half of the box holds far less than the bottom half.
    let top: f32 = widths[..rows / 2].iter().sum();
    let top_share = top / solid.max(1.0);
    // Triangles hold far less in the top half of their box. Otherwise the shape is the nearer of a
    // circle and a square drawn into its box (no threshold to tune): the convex hull of the pixel
    // centres ignores stripes, outlines and holes, so the style does not bend the reading. Centres
    // (doubled to stay integral) rather than pixel corners, so that a pixelated circle stays round.
    let centres = hull_of(
        outline
            .iter()
            .map(|&(x, y)| (2 * x as i64 + 1, 2 * y as i64 + 1))
            .collect(),
    );
    let fits = template_fits(&centres, (x0, y0, x1, y1));
    let shape = if top_share < 0.36 {
        2
    } else if fits[1] > fits[0] {
        1
    } else {
        0
    };
    Detection {
        scene: Some(Scene {
            shape,
            color,
            position,
            background,
        }),
        fill,
        fits,
    }
}

/// How well the shape matches each shape drawn into its box: intersection over union of the convex
/// hull of its pixel centres (`hull`, in doubled coordinates; the hull ignores stripes, outlines and
/// holes) with the inscribed circle (ellipse), the box
/// itself and the upward triangle, counted over pixel centres.
fn template_fits(hull: &[(i64, i64)], (x0, y0, x1, y1): (u32, u32, u32, u32)) -> [f32; 3] {
    let (w, h) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    // Inside a convex polygon: on the inner side of every edge, or on it.
    let inside = |px: i64, py: i64| {
        hull.len() >= 3
            && (0..hull.len()).all(|i| cross(hull[i], hull[(i + 1) % hull.len()], (px, py)) >= 0)
    };
    let mut inter = [0f32; 3];
    let mut union = [0f32; 3];
    for y in y0..=y1 {
        for x in x0..=x1 {
            let m = inside(2 * x as i64 + 1, 2 * y as i64 + 1);
            let (px, py) = ((x - x0) as f32 + 0.5, (y - y0) as f32 + 0.5);
            let (dx, dy) = ((px - w / 2.0) / (w / 2.0), (py - h / 2.0) / (h / 2.0));
            let t = [
                dx * dx + dy * dy <= 1.0,
                true,
                (px - w / 2.0).abs() <= py / h * w / 2.0,
            ];
            for k in 0..3 {
                inter[k] += (m && t[k]) as u8 as f32;
                union[k] += (m || t[k]) as u8 as f32;
            }
        }
    }
    [0, 1, 2].map(|k| inter[k] / union[k].max(1.0))
}

/// The convex hull of points (Andrew's monotone chain), counter-clockwise in image coordinates.
fn hull_of(mut pts: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    pts.sort_unstable();
    pts.dedup();
    if pts.len() < 3 {
        return pts;
    }
    // Andrew's monotone chain: lower then upper hull.
    let mut hull: Vec<(i64, i64)> = Vec::with_capacity(2 * pts.len());
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(i64, i64)>> = if pass == 0 {
            Box::new(pts.iter())
        } else {
            Box::new(pts.iter().rev())
        };
        for &p in iter {
            while hull.len() >= start + 2
                && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0
            {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    hull
}

fn cross(o: (i64, i64), a: (i64, i64), b: (i64, i64)) -> i64 {
    (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
}

/// Whether an image shows the shape, colour and position of `want` (the prompt adherence test).
pub fn adheres(img: &RgbImage, want: &Scene) -> bool {
    detect(img).scene.is_some_and(|s| {
        s.shape == want.shape && s.color == want.color && s.position == want.position
    })
}

/// How strongly an image shows `style` in [0, 1]: outlined = share of the shape's box centre that is
/// background; striped = share of colour changes between diagonal neighbours inside the box; filled =
/// 1 − the larger of the two.
pub fn style_score(img: &RgbImage, style: Style) -> f32 {
    let (w, h) = img.dimensions();
    let det = detect(img);
    let Some(scene) = det.scene else { return 0.0 };
    let fg = COLORS[scene.color].1.map(|v| v as f32);
    let bg = BACKGROUNDS[scene.background].1.map(|v| v as f32);
    // Box of pixels that are closer to the shape colour than to the background.
    let is_fg = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0.map(|v| v as f32);
        let d = |c: [f32; 3]| (0..3).map(|i| (p[i] - c[i]).powi(2)).sum::<f32>();
        d(fg) < d(bg) && d(fg) < 90f32.powi(2)
    };
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if is_fg(x, y) {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
    }
    if x1 < x0 || y1 < y0 {
        return 0.0;
    }
    let (cx0, cx1, cy0, cy1) = (
        x0 + (x1 - x0) / 3,
        x1 - (x1 - x0) / 3,
        y0 + (y1 - y0) / 3,
        y1 - (y1 - y0) / 3,
    );
    let mut hollow = (0, 0);
    for y in cy0..=cy1 {
        for x in cx0..=cx1 {
            hollow.1 += 1;
            let p = img.get_pixel(x, y).0.map(|v| v as f32);
            if (0..3).map(|i| (p[i] - bg[i]).powi(2)).sum::<f32>() < 60f32.powi(2) {
                hollow.0 += 1;
            }
        }
    }
    let outlined = hollow.0 as f32 / hollow.1.max(1) as f32;
    let mut changes = (0, 0);
    for y in y0..y1 {
        for x in x0..x1 {
            let (a, b) = (img.get_pixel(x, y).0, img.get_pixel(x + 1, y).0);
            let white = |p: [u8; 3]| p.iter().all(|v| *v > 200);
            if is_fg(x, y) || white(a) {
                changes.1 += 1;
                if white(a) != white(b) {
                    changes.0 += 1;
                }
            }
        }
    }
    let striped = (changes.0 as f32 / changes.1.max(1) as f32 * 2.0).min(1.0);
    match style {
        Style::Outlined => outlined,
        Style::Striped => striped,
        Style::Filled => 1.0 - outlined.max(striped),
    }
}

/// `n` captioned images from `seed`: (image, caption, scene), each scene drawn at random.
pub fn dataset(
    n: usize,
    size: u32,
    style: Style,
    seed: u64,
) -> crate::Result<Vec<(RgbImage, String, Scene)>> {
    fits(n, size)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok((0..n)
        .map(|_| {
            let s = Scene::random(&mut rng);
            let img = s.draw(size, style, &mut rng);
            (img, s.caption(), s)
        })
        .collect())
}

/// `n` captioned images from `seed` whose scenes cover every shape, colour, position and background as
/// evenly as `n` allows (each attribute's values are dealt round-robin, then shuffled independently).
/// A style set drawn this way teaches the style and no bias in the content: a set that happens to hold
/// more circles than squares teaches a LoRA to round off squares.
pub fn dataset_balanced(
    n: usize,
    size: u32,
    style: Style,
    seed: u64,
) -> crate::Result<Vec<(RgbImage, String, Scene)>> {
    fits(n, size)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scenes = balanced_scenes(n, &mut rng);
    draw_all(scenes, size, style, &mut rng)
}

/// `n` scenes in which each attribute's values appear `n / k` or `n / k + 1` times.
pub fn balanced_scenes(n: usize, rng: &mut ChaCha8Rng) -> Vec<Scene> {
    use rand::seq::SliceRandom;
    let mut deal = |k: usize| {
        let mut v: Vec<usize> = (0..n).map(|i| i % k).collect();
        v.shuffle(rng);
        v
    };
    let (shape, color, position, background) = (
        deal(SHAPES.len()),
        deal(COLORS.len()),
        deal(POSITIONS.len()),
        deal(BACKGROUNDS.len()),
    );
    (0..n)
        .map(|i| Scene {
            shape: shape[i],
            color: color[i],
            position: position[i],
            background: background[i],
        })
        .collect()
}

fn fits(n: usize, size: u32) -> crate::Result<()> {
    crate::util::mem::ensure_fits(
        &format!("{n} images of {size}×{size}"),
        n as u128 * size as u128 * size as u128 * 3,
        "8-bit RGB, held at once",
        "lower --size or --images",
    )
}

/// Draws each scene (the caller has checked that `scenes.len()` images of `size` fit in memory).
fn draw_all(
    scenes: Vec<Scene>,
    size: u32,
    style: Style,
    rng: &mut ChaCha8Rng,
) -> crate::Result<Vec<(RgbImage, String, Scene)>> {
    Ok(scenes
        .into_iter()
        .map(|s| {
            let img = s.draw(size, style, rng);
            (img, s.caption(), s)
        })
        .collect())
}
