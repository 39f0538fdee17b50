//! Reads back drawn scenes in every style under blur and noise and prints how often each shape is read
//! as drawn, with the squareness (hull share of the box) of circles and squares: the evidence for the
//! detector's thresholds.  cargo run --release --example detector_probe
use postforge::data::shapes::{detect, Scene, Style, SHAPES};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
fn main() {
    let sigmas = [0.0f32, 0.5, 0.7, 0.9];
    for style in [Style::Filled, Style::Striped, Style::Outlined] {
        for &sg in &sigmas {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let mut ok = [0usize; 3];
            let mut tot = [0usize; 3];
            let mut read_as = [[0usize; 4]; 3];
            let mut sq: [Vec<f32>; 3] = Default::default();
            for i in 0..600 {
                let mut s = Scene::random(&mut rng);
                s.shape = i % 3;
                let img = s.draw(32, style, &mut rng);
                let mut img = if sg > 0.0 {
                    image::imageops::blur(&img, sg)
                } else {
                    img
                };
                for p in img.pixels_mut() {
                    for c in p.0.iter_mut() {
                        let n: f32 = rng.random_range(-12.0..12.0);
                        *c = (*c as f32 + n).clamp(0.0, 255.0) as u8;
                    }
                }
                let det = detect(&img);
                sq[s.shape].push(det.squareness);
                let d = det.scene;
                tot[s.shape] += 1;
                match d {
                    Some(d) => {
                        read_as[s.shape][d.shape] += 1;
                        ok[s.shape] += (d.shape == s.shape) as usize
                    }
                    None => read_as[s.shape][3] += 1,
                }
            }
            for v in sq.iter_mut() {
                v.sort_by(|a, b| a.total_cmp(b));
            }
            let q = |v: &Vec<f32>, f: f32| v[((v.len() - 1) as f32 * f) as usize];
            println!("  squareness circle p0 {:.3} p50 {:.3} p95 {:.3} p100 {:.3} | square p0 {:.3} p5 {:.3} p50 {:.3}", q(&sq[0],0.0), q(&sq[0],0.5), q(&sq[0],0.95), q(&sq[0],1.0), q(&sq[1],0.0), q(&sq[1],0.05), q(&sq[1],0.5));
            println!(
                "{:?} blur {sg}: {}",
                style,
                (0..3)
                    .map(|k| format!("{} {}/{} {:?}", SHAPES[k], ok[k], tot[k], read_as[k]))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
        }
    }
}
