//! Draws scenes in every style, blurs (σ 0–0.9) and noises them, and prints how often the detector reads
//! each shape as drawn: the evidence that the shape reading does not depend on the style.
//!   cargo run --release --example detector_probe
use postforge::data::shapes::{detect, Scene, Style, SHAPES};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() {
    for style in [Style::Filled, Style::Outlined, Style::Striped] {
        for sigma in [0.0f32, 0.5, 0.7, 0.9] {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            // read_as[drawn][read]: circle, square, triangle, nothing.
            let mut read_as = [[0usize; 4]; 3];
            for i in 0..600 {
                let mut s = Scene::random(&mut rng);
                s.shape = i % 3;
                let img = s.draw(32, style, &mut rng);
                let mut img = if sigma > 0.0 {
                    image::imageops::blur(&img, sigma)
                } else {
                    img
                };
                for p in img.pixels_mut() {
                    for c in p.0.iter_mut() {
                        let n: f32 = rng.random_range(-12.0..12.0);
                        *c = (*c as f32 + n).clamp(0.0, 255.0) as u8;
                    }
                }
                let read = detect(&img).scene.map_or(3, |d| d.shape);
                read_as[s.shape][read] += 1;
            }
            let cells: Vec<String> = (0..3)
                .map(|k| format!("{} {}/200 {:?}", SHAPES[k], read_as[k][k], read_as[k]))
                .collect();
            println!("{style:?} σ={sigma}: {}", cells.join("  "));
        }
    }
}
