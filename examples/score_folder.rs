use postforge::data::shapes::{adheres, style_score, Scene, Style};
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let style = Style::parse(&std::env::args().nth(2).unwrap_or("striped".into())).unwrap();
    let (mut n, mut st, mut ad) = (0, 0.0, 0);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    paths.sort();
    for p in paths {
        let cap = std::fs::read_to_string(p.with_extension("txt")).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        let s = style_score(&img, style);
        let a = adheres(&img, &Scene::parse(&cap).unwrap());
        n += 1;
        st += s;
        ad += a as usize;
        println!("{} {:.3} {} {}", p.display(), s, a, cap.trim());
    }
    println!("n={n} style={:.3} adherence={}/{n}", st / n as f32, ad);
}
