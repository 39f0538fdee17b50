//! Pictures: labeled grids and image/tensor conversion.

use image::{Rgb, RgbImage};
use postforge::media::grid::{render, side_by_side, GridLabels};

fn cell(v: u8) -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| Rgb([v, (x * 8) as u8, (y * 8) as u8]))
}

#[test]
fn grid_has_labels_cells_and_checks_its_shape() {
    let cells: Vec<Vec<RgbImage>> = (0..2)
        .map(|r| (0..3).map(|c| cell((r * 3 + c) as u8 * 40)).collect())
        .collect();
    let labels = GridLabels {
        title: Some("seed: 7".into()),
        columns: vec![
            "LoRA scale: 0".into(),
            "LoRA scale: 0.5".into(),
            "LoRA scale: 1".into(),
        ],
        rows: vec![
            "a red circle on a blue background".into(),
            "a green square".into(),
        ],
    };
    let g = render(&cells, &labels, 96).unwrap();
    // Cells are upscaled 3x to 96 px; the label column and header add room.
    assert!(
        g.width() > 3 * 96 && g.height() > 2 * 96,
        "{}x{}",
        g.width(),
        g.height()
    );
    // Some ink in the header and in the left label column.
    let ink = |x0: u32, y0: u32, x1: u32, y1: u32| {
        (x0..x1)
            .flat_map(|x| (y0..y1).map(move |y| (x, y)))
            .filter(|&(x, y)| g.get_pixel(x, y).0 == [20, 20, 20])
            .count()
    };
    assert!(ink(0, 0, g.width(), 40) > 50, "title/column labels missing");
    assert!(ink(0, 60, 150, g.height()) > 50, "row labels missing");
    let two = side_by_side(&[g.clone(), g.clone()]).unwrap();
    assert!(two.width() > 2 * g.width());
    // Wrong label counts are errors, not panics.
    let bad = GridLabels {
        columns: vec!["x".into()],
        ..labels.clone()
    };
    assert!(render(&cells, &bad, 96)
        .unwrap_err()
        .to_string()
        .contains("column"));
    std::fs::create_dir_all(concat!(env!("CARGO_TARGET_TMPDIR"), "/grid")).unwrap();
    postforge::media::image::write_png(
        std::path::Path::new(concat!(env!("CARGO_TARGET_TMPDIR"), "/grid/grid.png")),
        &g,
    )
    .unwrap();
}

#[test]
fn image_tensor_round_trip() {
    let img = cell(200);
    let t = postforge::media::image::image_to_tensor(&img, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 32, 32]);
    let back = postforge::media::image::tensor_to_image(&t).unwrap();
    assert_eq!(back, img);
}
