//! `postforge mask`: build a mask PNG from a box, a colour key, the shape detector or a file, then
//! transform it in the order the `--op` flags are given.

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use postforge::data::masks::{Combine, Mask};
use postforge::media::image::read_rgb;
use std::path::{Path, PathBuf};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The image the mask is for (its size; needed by `color:` and `shape:` sources).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The canvas size WxH when there is no --image.
    #[arg(long)]
    size: Option<String>,
    /// Where the mask starts: `box:x0,y0,x1,y1` (pixels, end exclusive), `color:r,g,b[:tolerance]`
    /// (default tolerance 40), `shape:WORDS` (the object the procedural shape detector finds, e.g.
    /// `shape:red circle` or a caption), `file:PATH`, `all` or `none`.
    #[arg(long)]
    from: String,
    /// Transformations, applied in order: `invert`, `dilate:N`, `erode:N` (pixels), `feather:SIGMA`
    /// (Gaussian, pixels), `threshold:T`, `union:PATH`, `intersect:PATH`, `add:PATH`, `subtract:PATH`.
    #[arg(long)]
    op: Vec<String>,
    /// Refuse a mask file whose size differs from the image instead of resizing it.
    #[arg(long)]
    strict: bool,
    /// Output PNG (8-bit grey, white = edit).
    #[arg(short, long)]
    out: PathBuf,
}

fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--size `{s}` is not WxH"))?;
    let (w, h): (usize, usize) = (
        w.trim()
            .parse()
            .with_context(|| format!("--size `{s}`: width"))?,
        h.trim()
            .parse()
            .with_context(|| format!("--size `{s}`: height"))?,
    );
    if w == 0 || h == 0 {
        bail!("--size `{s}` is empty");
    }
    Ok((w, h))
}

fn numbers<T: std::str::FromStr>(s: &str, n: usize, what: &str) -> anyhow::Result<Vec<T>> {
    let v: Vec<T> = s
        .split(',')
        .map(|p| p.trim().parse::<T>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("{what} `{s}`: expected {n} comma-separated numbers"))?;
    if v.len() != n {
        bail!(
            "{what} `{s}`: expected {n} comma-separated numbers, got {}",
            v.len()
        );
    }
    Ok(v)
}

/// Reads a mask file for an image of `size` (resized with a warning, or refused when strict).
pub fn read_fitted(path: &Path, size: (usize, usize), strict: bool) -> anyhow::Result<Mask> {
    let (m, warn) = Mask::read(path)?.fit(size.0, size.1, strict, path)?;
    if let Some(w) = warn {
        eprintln!("warning: {w}");
    }
    Ok(m)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let img = a.image.as_deref().map(read_rgb).transpose()?;
    let size = match (&img, &a.size) {
        (Some(i), _) => (i.width() as usize, i.height() as usize),
        (None, Some(s)) => parse_size(s)?,
        (None, None) => bail!("give --image or --size"),
    };
    let need_img = || {
        img.as_ref()
            .with_context(|| format!("--from {}: needs --image", a.from))
    };
    let (kind, arg) = a.from.split_once(':').unwrap_or((a.from.as_str(), ""));
    let mut m = match kind {
        "box" => {
            let v: Vec<usize> = numbers(arg, 4, "--from box")?;
            Mask::from_box(size.0, size.1, (v[0], v[1], v[2], v[3])).context("--from box")?
        }
        "color" => {
            let (rgb, tol) = match arg.rsplit_once(':') {
                Some((c, t)) => (
                    c,
                    t.parse::<f32>()
                        .with_context(|| format!("--from color: tolerance `{t}`"))?,
                ),
                None => (arg, 40.0),
            };
            if !(tol.is_finite() && tol >= 0.0) {
                bail!("--from color: tolerance {tol} must be ≥ 0");
            }
            let v: Vec<u8> = numbers(rgb, 3, "--from color")?;
            Mask::from_color_key(need_img()?, [v[0], v[1], v[2]], tol)
        }
        "shape" => Mask::from_shape(need_img()?, arg).context("--from shape")?,
        "file" => read_fitted(Path::new(arg), size, a.strict)?,
        "all" => Mask::filled(size.0, size.1, 1.0),
        "none" => Mask::filled(size.0, size.1, 0.0),
        _ => bail!(
            "--from `{}`: expected box:, color:, shape:, file:, all or none",
            a.from
        ),
    };
    for op in &a.op {
        let (name, arg) = op.split_once(':').unwrap_or((op.as_str(), ""));
        let num = |what: &str| -> anyhow::Result<f32> {
            let v: f32 = arg
                .parse()
                .with_context(|| format!("--op {op}: {what} `{arg}` is not a number"))?;
            if !(v.is_finite() && v >= 0.0) {
                bail!("--op {op}: {what} must be a finite number ≥ 0");
            }
            Ok(v)
        };
        m = match name {
            "invert" => m.invert(),
            "dilate" => m.dilate(num("radius")? as usize),
            "erode" => m.erode(num("radius")? as usize),
            "feather" => m.feather(num("sigma")?),
            "threshold" => m.threshold(num("threshold")?),
            "union" | "intersect" | "add" | "subtract" => {
                let other = read_fitted(Path::new(arg), size, a.strict)?;
                m.combine(&other, Combine::parse(name)?)
            }
            _ => bail!("--op `{op}`: expected invert, dilate:N, erode:N, feather:S, threshold:T, union:/intersect:/add:/subtract:PATH"),
        };
    }
    m.write_png(&a.out)?;
    println!(
        "wrote {} ({}x{}, {:.1} % white)",
        a.out.display(),
        m.w,
        m.h,
        100.0 * m.coverage()
    );
    Ok(())
}
