//! Per-image masks of a training run (kohya's `masked_loss`): read from `conditioning_data_dir`
//! (same-named files, subfolders mirrored) or from the images' alpha channel, cover-cropped like
//! their images.

use super::config::LoraTrainConfig;
use crate::data::buckets::cover_crop_at;
use crate::data::masks::Mask;
use crate::{Error, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// The mask of training image `path` (original size `size`), cover-cropped to bucket `bucket`
/// like the image, as (1, H, W) in [0, 1]; `None` when the run uses no masks.
pub(super) fn item_mask(
    cfg: &LoraTrainConfig,
    path: &Path,
    size: (u32, u32),
    bucket: (u32, u32),
) -> Result<Option<Tensor>> {
    if !(cfg.masked_loss || cfg.route_adapter_to_mask) {
        return Ok(None);
    }
    let m = if cfg.alpha_mask {
        Mask::alpha_of(path)?.ok_or_else(|| {
            Error::format(path, "alpha_mask is set but the image has no alpha channel")
        })?
    } else {
        let dir = cfg.conditioning_data_dir.as_deref().ok_or_else(|| {
            Error::Config("masked_loss needs conditioning_data_dir or alpha_mask".into())
        })?;
        let file = mask_file(dir, &cfg.train_data_dir, path)?;
        let (m, warn) = Mask::read(&file)?.fit(size.0 as usize, size.1 as usize, false, &file)?;
        if let Some(w) = warn {
            eprintln!("warning: {w}");
        }
        m
    };
    let (cropped, _) = cover_crop_at(&m.to_rgb(), bucket);
    let m = Mask::from_image(&image::DynamicImage::ImageRgb8(cropped));
    Ok(Some(m.to_tensor(&crate::util::device::current())?))
}

/// The mask of image `path` of `train_dir` in `dir`: the same relative path (subfolders kept) or
/// the same file name directly in `dir`, with any image extension.
fn mask_file(dir: &Path, train_dir: &Path, path: &Path) -> Result<PathBuf> {
    let rel = path.strip_prefix(train_dir).unwrap_or(path);
    let mut tried = vec![];
    for base in [dir.join(rel), dir.join(rel.file_name().unwrap_or_default())] {
        for ext in ["png", "jpg", "jpeg", "webp"] {
            let f = base.with_extension(ext);
            if f.is_file() {
                return Ok(f);
            }
            tried.push(f);
        }
    }
    Err(Error::format(
        path,
        format!(
            "no mask for this image in conditioning_data_dir {} (looked for {})",
            dir.display(),
            tried
                .iter()
                .take(2)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}
