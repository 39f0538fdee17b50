//! Image I/O between PNG/JPEG files and tensors (C, H, W) in [-1, 1], written atomically.

use crate::util::write_atomic;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use std::path::Path;

/// (3, H, W) or (1, H, W) in [-1, 1] → RGB image (values clamped).
pub fn tensor_to_image(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 && c != 1 {
        return Err(Error::Msg(format!(
            "an image tensor needs 1 or 3 channels, got shape {:?}",
            t.dims()
        )));
    }
    let v = ((t.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut img = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let px = |ch: usize| v[(if c == 3 { ch } else { 0 }) * h * w + y * w + x].round() as u8;
            img.put_pixel(x as u32, y as u32, image::Rgb([px(0), px(1), px(2)]));
        }
    }
    Ok(img)
}

/// RGB image → (3, H, W) tensor in [-1, 1].
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut v = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            v[c * h * w + y as usize * w + x as usize] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(v, (3, h, w), device)?)
}

/// Reads an image file as RGB, with an error naming the file.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let img =
        image::open(path).map_err(|e| Error::format(path, format!("cannot read image: {e}")))?;
    Ok(img.to_rgb8())
}

/// Writes a PNG atomically.
pub fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Msg(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}
