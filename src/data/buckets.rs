//! Aspect-ratio buckets in the manner of kohya's sd-scripts: a set of resolutions of (about) equal
//! area, stepped by `reso_steps`, each image assigned to the bucket whose aspect ratio is nearest,
//! resized to cover it and centre-cropped. Batches are drawn from one bucket at a time.

use crate::{Error, Result};
use image::RgbImage;

/// Bucket settings (kohya: `--enable_bucket`, `--min_bucket_reso`, `--max_bucket_reso`,
/// `--bucket_reso_steps`, `--bucket_no_upscale`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketConfig {
    /// Target resolution (width, height); its area bounds every bucket's area.
    pub resolution: (u32, u32),
    /// Buckets on (false: every image is resized/cropped to `resolution`).
    pub enabled: bool,
    /// Smallest bucket side.
    pub min_reso: u32,
    /// Largest bucket side.
    pub max_reso: u32,
    /// Bucket sides are multiples of this.
    pub reso_steps: u32,
    /// Images smaller than the target area keep their size (rounded down to `reso_steps`).
    pub no_upscale: bool,
}

impl BucketConfig {
    /// Checks the settings: every side a multiple of `reso_steps` and of `divisor` (the model's
    /// total downsampling, so that every bucket fits the network).
    pub fn validate(&self, divisor: u32) -> Result<()> {
        let s = self.reso_steps;
        let (w, h) = self.resolution;
        if s == 0 || w == 0 || h == 0 {
            return Err(Error::Config(
                "resolution and bucket_reso_steps must be positive".into(),
            ));
        }
        if !s.is_multiple_of(divisor) && self.enabled {
            return Err(Error::Config(format!(
                "bucket_reso_steps {s} is not a multiple of the model's downsampling factor {divisor}"
            )));
        }
        if !w.is_multiple_of(divisor) || !h.is_multiple_of(divisor) {
            return Err(Error::Config(format!(
                "resolution {w}x{h} is not a multiple of the model's downsampling factor {divisor}"
            )));
        }
        if self.enabled && (self.min_reso > self.max_reso || self.min_reso == 0) {
            return Err(Error::Config(format!(
                "min_bucket_reso {} must be positive and at most max_bucket_reso {}",
                self.min_reso, self.max_reso
            )));
        }
        Ok(())
    }

    /// The bucket resolutions (width, height), sorted.
    pub fn resolutions(&self) -> Vec<(u32, u32)> {
        if !self.enabled {
            return vec![self.resolution];
        }
        let s = self.reso_steps;
        let area = self.resolution.0 as u64 * self.resolution.1 as u64;
        let mut v = vec![];
        let side = ((area as f64).sqrt() as u32 / s) * s;
        v.push((side, side));
        let mut w = self.min_reso.div_ceil(s) * s;
        while w <= self.max_reso {
            let h = (((area / w as u64) as u32 / s) * s).min(self.max_reso);
            if h >= self.min_reso {
                v.push((w, h));
                v.push((h, w));
            }
            w += s;
        }
        v.sort();
        v.dedup();
        v
    }

    /// The bucket of an image of `size` (width, height).
    pub fn assign(&self, size: (u32, u32), buckets: &[(u32, u32)]) -> (u32, u32) {
        let (w, h) = (size.0.max(1), size.1.max(1));
        let target_area = self.resolution.0 as u64 * self.resolution.1 as u64;
        if self.enabled && self.no_upscale && (w as u64 * h as u64) <= target_area {
            // Keep the image's own size, rounded down to the step (at least one step).
            let s = self.reso_steps;
            return (((w / s) * s).max(s), ((h / s) * s).max(s));
        }
        let ar = w as f64 / h as f64;
        let mut best = buckets[0];
        let mut err = f64::INFINITY;
        for &b in buckets {
            let e = (b.0 as f64 / b.1 as f64 - ar).abs();
            if e < err - 1e-12 {
                err = e;
                best = b;
            }
        }
        best
    }
}

/// Resizes `img` to cover `size` (width, height) and centre-crops it.
pub fn cover_crop(img: &RgbImage, size: (u32, u32)) -> RgbImage {
    cover_crop_at(img, size).0
}

/// [`cover_crop`], also returning the crop's top-left corner (left, top) in the resized image
/// (SDXL's crop conditioning).
pub fn cover_crop_at(img: &RgbImage, size: (u32, u32)) -> (RgbImage, (u32, u32)) {
    let (w, h) = img.dimensions();
    if (w, h) == size {
        return (img.clone(), (0, 0));
    }
    let scale = (size.0 as f64 / w as f64).max(size.1 as f64 / h as f64);
    let nw = ((w as f64 * scale).round() as u32).max(size.0);
    let nh = ((h as f64 * scale).round() as u32).max(size.1);
    let filter = if scale < 1.0 {
        image::imageops::FilterType::Triangle
    } else {
        image::imageops::FilterType::Lanczos3
    };
    let r = image::imageops::resize(img, nw, nh, filter);
    let (x0, y0) = ((nw - size.0) / 2, (nh - size.1) / 2);
    (
        image::imageops::crop_imm(&r, x0, y0, size.0, size.1).to_image(),
        (x0, y0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BucketConfig {
        BucketConfig {
            resolution: (512, 512),
            enabled: true,
            min_reso: 256,
            max_reso: 1024,
            reso_steps: 64,
            no_upscale: false,
        }
    }

    #[test]
    fn kohya_sd_buckets() {
        let r = cfg().resolutions();
        // Every bucket is a multiple of 64, within [256, 1024], with area at most 512².
        assert!(r
            .iter()
            .all(|(w, h)| w % 64 == 0 && h % 64 == 0 && w * h <= 512 * 512));
        for b in [
            (512, 512),
            (256, 1024),
            (1024, 256),
            (576, 448),
            (448, 576),
            (640, 384),
        ] {
            assert!(r.contains(&b), "{b:?} missing from {r:?}");
        }
        let c = cfg();
        assert_eq!(c.assign((1920, 1080), &r), (640, 384));
        assert_eq!(c.assign((1000, 1000), &r), (512, 512));
        assert_eq!(c.assign((300, 1200), &r), (256, 1024));
    }

    #[test]
    fn cover_crop_fills_the_bucket() {
        let img = RgbImage::from_fn(40, 20, |x, _| image::Rgb([x as u8 * 6, 0, 0]));
        let out = cover_crop(&img, (16, 16));
        assert_eq!(out.dimensions(), (16, 16));
        // Centre crop: the middle column of the source stays in the middle.
        assert!((out.get_pixel(8, 8)[0] as i32 - 120).abs() <= 12);
    }
}
