//! kohya-style image folders: `<dir>/<repeats>_<name>/image.png` with a caption file next to each image
//! (`--caption-extension`, default `.caption` as in sd-scripts), or a folder with `metadata.jsonl`
//! (`{"file_name": ..., "text": ...}`, the diffusers/datasets image-folder layout).

use crate::media::image::{read_rgb, write_png};
use crate::{Error, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// One training example.
#[derive(Debug, Clone)]
pub struct Example {
    /// The image file.
    pub path: PathBuf,
    /// Its caption.
    pub caption: String,
    /// How often it repeats per epoch.
    pub repeats: usize,
}

const IMAGE_EXT: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The image files (png, jpg, jpeg, webp) directly in `dir`, sorted by name.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| IMAGE_EXT.contains(&e.to_string_lossy().to_lowercase().as_str()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Lists a kohya training folder (subfolders `<repeats>_<name>`) or a `metadata.jsonl` folder.
/// Images without a caption file use the subfolder's class name (kohya's rule).
pub fn scan(dir: &Path, caption_extension: &str) -> Result<Vec<Example>> {
    let meta = dir.join("metadata.jsonl");
    let mut out = vec![];
    let ext = caption_extension.trim_start_matches('.');
    let mut uncaptioned: Vec<PathBuf> = vec![];
    if meta.exists() {
        let text = std::fs::read_to_string(&meta).map_err(|e| Error::io(&meta, e))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::format(&meta, crate::util::json_line_error(i + 1, &e)))?;
            let file = v["file_name"]
                .as_str()
                .ok_or_else(|| Error::format(&meta, format!("line {}: no file_name", i + 1)))?;
            let caption = v["text"]
                .as_str()
                .or(v["caption"].as_str())
                .ok_or_else(|| {
                    Error::format(
                        &meta,
                        format!("line {}: `{file}` has no `text` or `caption` string", i + 1),
                    )
                })?
                .to_string();
            out.push(Example {
                path: dir.join(file),
                caption,
                repeats: 1,
            });
        }
    } else {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut subs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        for sub in subs {
            let name = sub
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parsed = name
                .split_once('_')
                .and_then(|(rep, class)| Some((rep.parse::<usize>().ok()?, class)));
            let Some((repeats, class)) = parsed else {
                // kohya ignores such folders too, and says so.
                eprintln!(
                    "warning: {}: not a <repeats>_<name> folder; its images are not used",
                    sub.display()
                );
                continue;
            };
            if repeats == 0 {
                return Err(Error::Config(format!(
                    "{}: 0 repeats: none of its images would be trained on (use 1_{class})",
                    sub.display()
                )));
            }
            for f in images_in(&sub)? {
                let cap_path = f.with_extension(ext);
                let caption = match std::fs::read_to_string(&cap_path) {
                    Ok(t) => t.lines().next().unwrap_or_default().trim().to_string(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if let Some(other) = ["txt", "caption"]
                            .iter()
                            .map(|x| f.with_extension(x))
                            .find(|p| *p != cap_path && p.exists())
                        {
                            return Err(Error::Config(format!(
                                "{}: no caption file {} but {} exists: the caption extension is \
                                 `.{ext}`; pass --caption_extension .{}",
                                f.display(),
                                cap_path.display(),
                                other.display(),
                                other.extension().unwrap_or_default().to_string_lossy()
                            )));
                        }
                        uncaptioned.push(f.clone());
                        class.to_string()
                    }
                    Err(e) => return Err(Error::io(&cap_path, e)),
                };
                out.push(Example {
                    path: f,
                    caption,
                    repeats,
                });
            }
        }
    }
    if let Some(first) = uncaptioned.first() {
        eprintln!(
            "warning: {} of {} images have no `.{ext}` caption file and are captioned with their \
             folder's class name (kohya's rule); the first is {}",
            uncaptioned.len(),
            out.len(),
            first.display()
        );
    }
    if out.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no training images (expected <repeats>_<name>/ subfolders with images, or metadata.jsonl)",
            dir.display()
        )));
    }
    Ok(out)
}

/// Refuses an image of `size` (w, h) that would be trained at `target` (w, h) when the resize
/// would not fit in memory, or when a side is so small (under 8 pixels, or upscaled more than 8×)
/// that nothing but blur would be learned; the error names the file and both sizes.
pub fn check_trainable_size(path: &Path, size: (u32, u32), target: (u32, u32)) -> Result<()> {
    let ((w, h), (tw, th)) = (size, target);
    let scale = (tw as f64 / w.max(1) as f64).max(th as f64 / h.max(1) as f64);
    crate::util::mem::ensure_fits(
        &format!("{} resized to cover {tw}×{th}", path.display()),
        ((w as f64 * scale).ceil() as u128) * ((h as f64 * scale).ceil() as u128) * 3 * 2,
        "8-bit RGB, the resized copy and its crop",
        "lower the resolution",
    )?;
    if w.min(h) < 8 || scale > 8.0 {
        return Err(Error::format(
            path,
            format!(
                "the image is {w}×{h}: too small to train at {tw}×{th} (a side under 8 pixels, or \
                 upscaled {scale:.1}× where at most 8× is allowed); remove it or lower the resolution"
            ),
        ));
    }
    Ok(())
}

/// Resizes to cover `size`×`size` and centre-crops (the square bucket).
pub fn load_square(path: &Path, size: u32) -> Result<RgbImage> {
    let img = read_rgb(path)?;
    let (w, h) = img.dimensions();
    check_trainable_size(path, (w, h), (size, size))?;
    let scale = size as f32 / w.min(h) as f32;
    let (nw, nh) = (
        (w as f32 * scale).round().max(size as f32) as u32,
        (h as f32 * scale).round().max(size as f32) as u32,
    );
    let resized = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    Ok(
        image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size)
            .to_image(),
    )
}

/// Writes images with caption files as a kohya folder `<dir>/<repeats>_<name>/`.
pub fn write_kohya(
    dir: &Path,
    repeats: usize,
    name: &str,
    items: &[(RgbImage, String)],
    caption_extension: &str,
) -> Result<PathBuf> {
    let sub = dir.join(format!("{repeats}_{name}"));
    std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
    for (i, (img, cap)) in items.iter().enumerate() {
        let stem = sub.join(format!("{i:04}"));
        write_png(&stem.with_extension("png"), img)?;
        crate::util::write_atomic(
            &stem.with_extension(caption_extension.trim_start_matches('.')),
            cap.as_bytes(),
        )?;
    }
    Ok(sub)
}
